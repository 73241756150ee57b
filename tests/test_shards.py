"""Data-parallel HVPs over Ray actors (pipeline.orchestration.shards) against the in-process operator, on a real local Ray."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import compose_config
from pipeline.orchestration.config import ConfigError, validate
from pipeline.curvature.estimate import hvp_matvec
from pipeline.orchestration.shards import sharded_hvp
from pipeline.orchestration.sweep import run_sweep
from pipeline.orchestration.train import run_problem

SMALL = ["data.n_samples=50", "model.width=6", "optim.weight_decay=1e-3"]  # 50 rows; L2 counted once


def _problem_for(overrides):
    cfg = compose_config(SMALL + overrides)
    return lambda: run_problem(cfg, 3)


@pytest.mark.parametrize("shards,rows", [(1, 50), (3, 50), (3, 2)])  # 3 shards of 2 rows: one adds nothing
def test_sharded_hvp_equals_the_in_process_operator(ray_session, shards, rows):
    problem_for = _problem_for([f"data.n_samples={rows}"])
    problem = problem_for()
    theta = problem.model.init(5)
    V = torch.randn(theta.numel(), 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = hvp_matvec(problem.loss_fn(), theta)(V)
    with sharded_hvp(problem_for, shards, num_cpus=0.25) as matvec_at:
        got = matvec_at(theta)(V)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
        other = problem.model.init(6)  # a second point through the same actors
        torch.testing.assert_close(matvec_at(other)(V), hvp_matvec(problem.loss_fn(), other)(V),
                                   rtol=1e-12, atol=1e-13)


def test_data_workers_serve_the_estimator_only_and_are_checked_before_work():
    with pytest.raises(ConfigError, match="hessian.data_workers"):
        validate(compose_config(["hessian.method=eigh", "hessian.data_workers=2"]))
    with pytest.raises(ConfigError, match="hessian.data_workers"):
        validate(compose_config(["hessian.method=estimate", "hessian.data_workers=-1"]))
    with pytest.raises(ValueError, match="shards must be"):
        with sharded_hvp(_problem_for([]), 0):
            pass


def test_estimate_sweep_with_data_workers_gives_the_in_process_rows(make_cfg, ray_session):
    """The same sweep with HVPs split over 3 actors: the same counts and intervals (up to the rounding of
    a sum taken in another order), and every point analysed."""
    base = ["sweep.seeds=1", "hessian.method=estimate", "hessian.tol_mode=rel", "hessian.rel_tol=1e-2",
            "hessian.estimate_probes=10", "hessian.num_cpus=0.5", "figures=false"]
    rows = {}
    for name, workers in (("local", 0), ("sharded", 3)):
        cfg = make_cfg([f"sweep.name={name}", f"hessian.data_workers={workers}", *base])
        run_sweep(cfg)
        rows[name] = pd.read_parquet(f"{cfg.results_root}/{name}/points").sort_values(["step", "stage"])
    a, b = rows["local"].reset_index(drop=True), rows["sharded"].reset_index(drop=True)
    assert len(a) == len(b) > 0 and (b["status"] == "ok").all()
    for col in ("n_pos", "n_neg", "n_pos_lo", "n_pos_hi", "n_neg_lo", "n_neg_hi"):
        assert (a[col] - b[col]).abs().max() <= 1, col
    pd.testing.assert_series_equal(a["tol"], b["tol"], rtol=1e-9)
