"""The pipeline's Hessian job on a GPU gives the rows it gives on the CPU (skipped without CUDA).

Ray is not needed here: the Ray task only picks ``device="cuda"`` when it holds a GPU and calls this job.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_config
from pipeline import jobs, tables
from pipeline.plan import expand
from pipeline.storage import Store

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_hessian_job_on_cuda_matches_cpu(tmp_path):
    cfg = compose_config([f"results_root={tmp_path}", "sweep.seeds=2", "optim.max_steps=600",
                          "stall.window=200", "model.width=16"])
    store = Store.open(str(tmp_path))
    refs = []
    for run in expand(cfg):
        status, got = jobs.train_job(store.uri, "cpu", run)
        assert status == "ok"
        refs += got
    # The same checkpoints, analysed on each device in turn (the second job rewrites the same keys).
    jobs.hessian_job(store.uri, "cpu", refs, device="cuda")
    gpu = tables.read(store, "cpu", "points").to_pandas()
    assert gpu["device"].str.startswith("cuda").all()
    jobs.hessian_job(store.uri, "cpu", refs, device="cpu")
    cpu = tables.read(store, "cpu", "points").to_pandas()
    assert (cpu["device"] == "cpu").all()
    key = ["run_id", "step", "stage"]
    a, b = cpu.sort_values(key).reset_index(drop=True), gpu.sort_values(key).reset_index(drop=True)
    for col in ("n_pos", "n_neg", "n_zero", "label", "critical_label"):
        pd.testing.assert_series_equal(a[col], b[col], check_names=False)
    np.testing.assert_allclose(a["lam_max"], b["lam_max"], rtol=1e-9)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-9)
