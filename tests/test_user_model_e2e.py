"""End to end: a module from a package outside minratio (examples/usernets), named only in the config, through
the whole sweep — the real `minratio-sweep` command, its own local Ray whose workers import the package
from PYTHONPATH, train → stall → Hessian → tables → figures — for all parameters and a subset."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_config

pytestmark = pytest.mark.slow

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples" / "usernets")


@pytest.fixture(scope="module")
def user_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("user") / "results"
    cmd = [sys.executable, "-m", "pipeline", "model=torch", "model._target_=usernets.nets.Tiny",
           "+model.kwargs={in_features: 16, hidden: 6}", "data.n_samples=64", "sweep.seeds=1",
           "optim.max_steps=400", "stall.window=100", "optim.lr=0.3", "ray.num_cpus=2", "sweep.name=user",
           "+sweep.grid={hessian.params:[all,head]}", f"results_root={root}", "sweep.progress=plain",
           f"hydra.run.dir={root.parent / 'hydra'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([EXAMPLES, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "RAY_ADDRESS": ""}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "user"


def test_user_module_goes_through_the_whole_sweep(user_sweep):
    runs = pd.read_parquet(user_sweep / "runs")
    points = pd.read_parquet(user_sweep / "points")
    assert len(runs) == 2 and set(runs["status"]) == {"ok"}
    assert set(runs["model_target"]) == {"usernets.nets.Tiny"} and set(runs["model_buffers"]) == {"eval"}
    assert runs[["model_width", "model_depth", "model_activation"]].isna().all().all()  # the MLP's keys: not read
    assert (runs["n_params"] == 16 * 6 + 6 + 6 * 10 + 10).all()
    assert set(points["status"]) == {"ok"} and set(points["param_subset"]) == {"all", "head"}
    assert (points.loc[points["param_subset"] == "head", "n_params"] == 6 * 10 + 10).all()
    assert (points.loc[points["param_subset"] == "all", "n_params"] == 172).all()
    figs = {p.name for p in (user_sweep / "figures").glob("*.png")}
    assert {"min_ratio_vs_loss.png", "loss_curves.png"} <= figs


def test_spectra_equal_autograd_of_the_same_loss(user_sweep):
    """The eigenvalues in the tables, full and subset, against torch.autograd.functional.hessian of the
    module's loss rebuilt here at the checkpoint's θ."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    from pipeline.curvature.params import select
    from pipeline.orchestration.train import run_problem

    points = pd.read_parquet(user_sweep / "points")
    spectra = pd.read_parquet(user_sweep / "spectra").set_index(["run_id", "step", "stage"])
    cfg = compose_config(["model=torch", "model._target_=usernets.nets.Tiny",
                          "+model.kwargs={in_features: 16, hidden: 6}", "data.n_samples=64"], shrink=False)
    for subset_spec in ("all", "head"):
        p = points[points["param_subset"] == subset_spec].iloc[0]
        ck = sorted((user_sweep / "checkpoints" / p["run_id"]).glob("*.pt"))
        theta = torch.load(next(c for c in ck if f"{p['step']:09d}" in c.name), weights_only=True)["theta"]
        problem = run_problem(cfg, int(p["seed"]))
        H = torch.autograd.functional.hessian(problem.loss_fn(), theta.double())
        sub = select(problem.model.segments(), subset_spec)
        if sub is not None:
            H = H[sub.index][:, sub.index]
        lam = np.asarray(spectra.loc[(p["run_id"], p["step"], p["stage"]), "eigenvalues"])
        assert np.allclose(lam, torch.linalg.eigvalsh(H).numpy(), atol=1e-10, rtol=0)
        # ‖g‖² of the restricted loss, and of the whole loss (whether ∇L vanishes over all of θ too)
        theta = theta.double().requires_grad_(True)
        (g,) = torch.autograd.grad(problem.loss_fn()(theta), theta)
        g_sub = g if sub is None else g[sub.index]
        assert np.isclose(p["grad_norm2"], float(g_sub.square().sum()), rtol=1e-9, atol=0)
        assert np.isclose(p["grad_norm2_all"], float(g.square().sum()), rtol=1e-9, atol=0)
        assert (p["grad_norm2_all"] > p["grad_norm2"]) == (sub is not None)


def test_the_documented_way_back_to_the_network_gives_the_points_loss(user_sweep, capsys):
    """docs/models.md's recipe, run as written on this sweep's folder: the run's problem rebuilt from its
    runs row (the data standardized as it trained on them) gives the points table's loss at the checkpoint,
    and the restored module computes the same outputs as the loss's own evaluation."""
    import re
    import textwrap

    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    code = textwrap.dedent(re.search(r"```python\n( *import json, pandas as pd, torch\n.*?) *```", doc, re.S).group(1))
    code = code.replace('"results/user/', f'"{user_sweep}/')
    scope: dict = {}
    exec(compile(code, "docs/models.md", "exec"), scope)
    loss, table_loss = scope["problem"].loss_fn()(scope["theta"]), scope["point"].loss
    assert np.isclose(float(loss), table_loss, rtol=1e-12, atol=0)
    out = scope["net"](scope["X"])
    assert out.dtype == torch.float64 and torch.allclose(out, scope["problem"].model.forward(scope["theta"],
                                                                                             scope["problem"].data.X))
