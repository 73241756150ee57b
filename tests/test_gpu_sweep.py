"""The default sweep on a real GPU through Ray, as a user runs it (skipped without CUDA).

``python -m pipeline hessian.num_gpus=0.25`` (what ``minratio-sweep`` runs) starts its own local Ray, which
finds the GPU; Ray gives each Hessian task a quarter of it, so up to four share the card (one checkpoint per
task here, so that the runs' tasks can share it at once). Every point must then be analysed on ``cuda`` and
hold the counts that the same sweep gives with ``hessian.num_gpus=0`` (the CPU): training is on the CPU in
both, so the checkpoints are the same, and float64 counts with the same tolerance rule must not depend on
the device.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SHRINK

KEY = ["run_id", "step", "stage"]


def cli_sweep(root: Path, name: str, *overrides: str) -> pd.DataFrame:
    """Run the default sweep (shrunk as every test shrinks it) through the command line; its points table.
    It runs outside the source tree, as a user's does: ``pipeline`` and its configs (``pipeline.conf``) come
    from the installed package, not from a ``pipeline/`` folder in the working directory."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", f"results_root={root}", f"sweep.name={name}",
                           *SHRINK, "figures=false", *overrides],
                          cwd=root.parent, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"sweep '{name}'" in proc.stdout
    return pd.read_parquet(root / name / "points").sort_values(KEY).reset_index(drop=True)


def assert_same_counts(gpu: pd.DataFrame, cpu: pd.DataFrame) -> None:
    """The same points, each with the same counts and label; λ extremes equal to rounding."""
    assert len(gpu) == len(cpu) > 0
    assert (gpu["status"] == "ok").all() and (cpu["status"] == "ok").all()
    pd.testing.assert_frame_equal(gpu[KEY], cpu[KEY])
    for col in ("n_pos", "n_neg", "n_zero", "label", "n_params"):
        pd.testing.assert_series_equal(gpu[col], cpu[col], check_names=False, obj=col)
    np.testing.assert_allclose(gpu["lam_max"], cpu["lam_max"], rtol=1e-9)
    np.testing.assert_allclose(gpu["tol"], cpu["tol"], rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_sweep_with_a_quarter_gpu_per_hessian_runs_on_cuda_with_the_cpu_counts(tmp_path):
    # one checkpoint per Hessian task, so that the runs' tasks can hold their quarters of the card at once
    gpu = cli_sweep(tmp_path, "gpu", "hessian.num_gpus=0.25", "hessian.batch_checkpoints=1")
    assert gpu["device"].str.startswith("cuda").all(), gpu["device"].value_counts()
    cpu = cli_sweep(tmp_path, "cpu", "hessian.num_gpus=0", "hessian.batch_checkpoints=1")
    assert (cpu["device"] == "cpu").all()
    assert_same_counts(gpu, cpu)
