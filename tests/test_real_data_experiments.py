"""The real-data experiments: each composes as one command (`--cfg job`), and, shrunk as their YAML says,
runs through the sweep on fixture files in the real formats on the session's local Ray."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from conftest import compose_config
from pipeline.orchestration.sweep import run_sweep
from test_datasets import cifar_fixture, mnist_fixture

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name,expect", [("mnist_lecture", "name: mnist"), ("cifar_cnn", "pipeline.curvature.nets.SmallCNN")])
def test_experiment_composes_as_one_command(name, expect):
    out = subprocess.run([sys.executable, "-m", "pipeline", f"+experiment={name}", "--cfg", "job"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout and f"name: {name}" in out.stdout


SHRUNK = {
    "mnist_lecture": ["sweep.seeds=1", "data.n_samples=32", "model.width=4", "optim.max_steps=300",
                      "stall.window=100", "refine.max_iters=3", "sweep.grid={optim.lr:[0.5]}"],
    "cifar_cnn": ["sweep.seeds=1", "data.side=8", "data.n_samples=24", "model.kwargs.channels=[2,2]",
                  "optim.max_steps=200", "stall.window=100"],
}


@pytest.mark.parametrize("name", ["mnist_lecture", "cifar_cnn"])
def test_experiment_runs_shrunk_on_fixture_data(name, tmp_path, ray_session):
    (mnist_fixture if name == "mnist_lecture" else cifar_fixture)(tmp_path / "data")
    cfg = compose_config([f"+experiment={name}", f"data.root={tmp_path / 'data'}",
                          f"results_root={tmp_path / 'results'}", "figures=false", "sweep.progress=none",
                          *SHRUNK[name]], shrink=False)
    summary = run_sweep(cfg)
    assert summary.points >= 1 and summary.points_failed == 0, summary
    points = pd.read_parquet(tmp_path / "results" / name / "points")
    assert set(points["status"]) == {"ok"}
    if name == "mnist_lecture":
        assert "refined" in set(points["stage"])
