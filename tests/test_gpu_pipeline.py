"""The pipeline's Hessian job on a GPU gives the rows it gives on the CPU (skipped without CUDA).

Ray is not needed here: the Ray task only picks ``device="cuda"`` when it holds a GPU and calls this job.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_config
from pipeline.orchestration import jobs, tables
from pipeline.orchestration.plan import expand
from pipeline.orchestration.storage import Store

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _checkpoints(tmp_path, *overrides: str):
    cfg = compose_config([f"results_root={tmp_path}", "sweep.seeds=2", "optim.max_steps=600",
                          "stall.window=200", "model.width=16", *overrides])
    store = Store.open(str(tmp_path))
    refs = []
    for run in expand(cfg):
        status, got = jobs.train_job(store.uri, "cpu", run)
        assert status == "ok"
        refs += got
    return store, refs


def test_hessian_job_on_cuda_matches_cpu(tmp_path):
    store, refs = _checkpoints(tmp_path)
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
    # the honest-label columns come from the pass's eigenvectors (Vᵀg): sums over eigenspaces, so basis-free
    for col in ("grad_share_neg", "grad_share_zero", "grad_share_pos", "grad_curvature", "flat_residual"):
        np.testing.assert_allclose(a[col], b[col], rtol=0, atol=1e-8, err_msg=col)


def test_inertia_and_estimate_jobs_on_cuda_hold_the_exact_counts(tmp_path):
    """The counts-only paths as the pipeline wires them on a GPU: two LDLᵀ (no naive count), and the
    HVP-only estimator, whose intervals must hold the exact counts."""
    key = ["run_id", "step", "stage"]
    exact_store, refs = _checkpoints(tmp_path / "eigh", "hessian.method=eigh", "hessian.tol_mode=rel")
    jobs.hessian_job(exact_store.uri, "cpu", refs, device="cpu")
    exact = tables.read(exact_store, "cpu", "points").to_pandas().sort_values(["seed", "step", "stage"])
    store, refs = _checkpoints(tmp_path / "inertia", "hessian.method=inertia", "hessian.naive_count=false")
    jobs.hessian_job(store.uri, "cpu", refs, device="cuda")
    got = tables.read(store, "cpu", "points").to_pandas().sort_values(["seed", "step", "stage"])
    assert got["device"].str.startswith("cuda").all() and got["n_pos_naive"].isna().all()
    for col in ("n_pos", "n_neg", "n_zero"):
        assert got[col].tolist() == exact[col].tolist()
    store, refs = _checkpoints(tmp_path / "estimate", "hessian.method=estimate", "hessian.rel_tol=1e-3")
    jobs.hessian_job(store.uri, "cpu", refs, device="cuda")
    est = tables.read(store, "cpu", "points").to_pandas().sort_values(["seed", "step", "stage"])
    assert est["device"].str.startswith("cuda").all() and len(est) == len(exact)
    spectra = tables.read(exact_store, "cpu", "spectra").to_pandas().set_index(key)
    for (_, e), (_, x) in zip(est.iterrows(), exact.iterrows()):
        lam = np.asarray(spectra.loc[(x.run_id, x.step, x.stage), "eigenvalues"])
        n_pos, n_neg = int((lam > e.tol).sum()), int((lam < -e.tol).sum())
        assert e.n_pos_lo <= n_pos <= e.n_pos_hi and e.n_neg_lo <= n_neg <= e.n_neg_hi, (e.seed, e.step, e.stage)


def test_cnn_hessians_on_cuda_match_cpu():
    """The digits CNN (conv2d under vmapped HVPs, one point and several at once) on CUDA = CPU."""
    from pipeline.curvature import hessian as hs
    from pipeline.orchestration.train import run_problem

    cfg = compose_config(["model=cnn", "data.side=4", "data.n_samples=128"])  # 838 parameters
    problem = run_problem(cfg, 0)
    thetas = torch.stack([problem.model.init(s) for s in range(3)])
    cpu = hs.hessian(problem.loss_fn(), thetas[0])
    gpu_problem = problem.to("cuda", torch.float64)
    gpu = hs.hessian(gpu_problem.loss_fn(), thetas[0].cuda()).cpu()
    scale = float(cpu.abs().max())
    assert float((gpu - cpu).abs().max()) <= 1e-12 * scale
    many = hs.hessians(gpu_problem.loss_fn(), thetas.cuda()).cpu()
    for k in range(3):
        ref = cpu if k == 0 else hs.hessian(problem.loss_fn(), thetas[k])
        assert float((many[k] - ref).abs().max()) <= 1e-12 * scale
    a = hs.spectrum_at(problem.loss_fn(), thetas[0], method="eigh", tol_mode="rel")
    b = hs.spectrum_at(gpu_problem.loss_fn(), thetas[0].cuda(), method="eigh", tol_mode="rel")
    assert (a.n_pos, a.n_neg, a.n_zero) == (b.n_pos, b.n_neg, b.n_zero)


def test_large_estimate_experiment_job_on_cuda(tmp_path):
    """+experiment=large_estimate's Hessian job (99,985 parameters, HVP-only counts) on a GPU, from a
    checkpoint trained on the CPU: counts with intervals, written like any other point."""
    cfg = compose_config([f"results_root={tmp_path}", "+experiment=large_estimate", "sweep.seeds=1",
                          "optim.max_steps=60", "stall.window=30"], shrink=False)
    store = Store.open(str(tmp_path))
    (run,) = expand(cfg)
    status, refs = jobs.train_job(store.uri, "large_estimate", run)
    assert status == "ok" and refs
    jobs.hessian_job(store.uri, "large_estimate", refs[-1:], device="cuda")
    (p,) = tables.read(store, "large_estimate", "points").to_pylist()
    assert p["status"] == "ok" and p["device"].startswith("cuda") and p["method"] == "estimate"
    assert p["n_params"] == 99_985 and p["estimate_resolution"] > 0
    assert p["n_pos_lo"] <= p["n_pos"] <= p["n_pos_hi"] and p["n_neg_lo"] <= p["n_neg"] <= p["n_neg_hi"]
    assert p["min_ratio_lo"] <= p["min_ratio"] <= p["min_ratio_hi"]
