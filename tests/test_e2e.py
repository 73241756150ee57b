"""End to end: the real default config, shrunk, on a real local Ray; real Parquet read back three ways."""
from __future__ import annotations

import logging
import subprocess
import sys

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from conftest import two_stalls
from pipeline.orchestration import tables
from pipeline.orchestration.config import RunConfig
from pipeline.orchestration.plan import expand
from pipeline.orchestration.sweep import run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep_result(tmp_path_factory, ray_session):
    from conftest import compose_config

    root = tmp_path_factory.mktemp("e2e") / "results"
    cfg = compose_config([f"results_root={root}", "sweep.name=e2e", "sweep.seeds=4"])
    summary = run_sweep(cfg)
    return cfg, root / "e2e", summary


def test_sweep_writes_four_tables_with_expected_rows(sweep_result):
    cfg, folder, summary = sweep_result
    n_runs = len(expand(cfg))
    runs = pd.read_parquet(folder / "runs")
    points = pd.read_parquet(folder / "points")
    spectra = pd.read_parquet(folder / "spectra")
    curves = pd.read_parquet(folder / "curves")
    assert len(runs) == n_runs == 4
    assert set(runs["status"]) == {"ok"}
    assert (runs["n_checkpoints"] >= 1).all()
    assert len(points) == runs["n_checkpoints"].sum() == summary.points
    assert len(spectra) == len(points)
    assert len(curves) == sum(s // cfg.optim.log_every + 1 for s in runs["steps"])
    for name, df in (("runs", runs), ("points", points), ("spectra", spectra), ("curves", curves)):
        assert not df.duplicated(list(tables.KEYS[name])).any(), name
        assert list(df.columns) == tables.SCHEMAS[name].names, name


def test_every_config_value_is_a_runs_column(sweep_result):
    cfg, folder, _ = sweep_result
    runs = pd.read_parquet(folder / "runs")
    assert (runs["model_width"] == cfg.model.width).all()
    assert runs["model_conv_layers"].isna().all() and runs["model_buffers"].isna().all()  # an MLP reads neither
    assert (runs["optim_lr"] == cfg.optim.lr).all()
    assert (runs["data_name"] == "digits").all()
    assert sorted(runs["seed"]) == [0, 1, 2, 3]


def test_points_are_honest_and_consistent(sweep_result):
    _, folder, _ = sweep_result
    p = pd.read_parquet(folder / "points")
    spectra = pd.read_parquet(folder / "spectra").set_index(["run_id", "step", "stage"])
    assert (p["status"] == "ok").all()
    assert ((p["n_pos"] + p["n_neg"] + p["n_zero"]) == p["n_params"]).all()
    assert np.allclose(p["min_ratio"], p["n_pos"] / p["n_params"])
    assert np.allclose(p["min_ratio_naive"], p["n_pos_naive"] / p["n_params"])
    assert p["min_ratio"].between(0, 1).all() and (p["tol"] >= 0).all()
    assert (p["grad_norm"] >= 0).all() and (p["loss"] > 0).all()
    assert set(p["label"]) <= {"minimum", "degenerate_minimum", "saddle", "maximum", "degenerate_maximum", "flat"}
    assert set(p["stage"]) <= {"stalled", "final"} and (p["dtype"] == "float64").all()
    for _, row in p.iterrows():
        lam = np.asarray(spectra.loc[(row["run_id"], row["step"], row["stage"]), "eigenvalues"])
        assert len(lam) == row["n_params"] and np.all(np.diff(lam) >= 0)
        assert int((lam > row["tol"]).sum()) == row["n_pos"]
        assert int((lam < -row["tol"]).sum()) == row["n_neg"]
        assert lam[0] == pytest.approx(row["lam_min"]) and lam[-1] == pytest.approx(row["lam_max"])


def test_curves_match_points(sweep_result):
    _, folder, _ = sweep_result
    curves = pd.read_parquet(folder / "curves")
    points = pd.read_parquet(folder / "points")
    merged = points.merge(curves, on=["run_id", "step"], suffixes=("", "_curve"))
    assert len(merged) == len(points)
    # The Hessian job recomputes loss and gradient norm from the checkpoint: they agree with training.
    np.testing.assert_allclose(merged["loss"], merged["loss_curve"], rtol=1e-9)
    np.testing.assert_allclose(merged["grad_norm"], merged["grad_norm_curve"], rtol=1e-6)


def test_tables_read_with_pyarrow_and_duckdb_without_glue(sweep_result):
    _, folder, _ = sweep_result
    assert pads.dataset(folder / "points", format="parquet").count_rows() == len(pd.read_parquet(folder / "points"))
    con = duckdb.connect()
    n, = con.execute(f"select count(*) from read_parquet('{folder}/runs/*.parquet')").fetchone()
    assert n == 4
    labels = con.execute(
        f"select r.seed, p.label, p.min_ratio from read_parquet('{folder}/points/*.parquet') p "
        f"join read_parquet('{folder}/runs/*.parquet') r using (run_id)").fetchall()
    assert len(labels) == len(pd.read_parquet(folder / "points"))


def test_rerun_skips_finished_work_and_changes_nothing(sweep_result, ray_session):
    cfg, folder, _ = sweep_result
    before = {name: pd.read_parquet(folder / name) for name in tables.TABLES}
    summary = run_sweep(cfg)
    assert summary.runs_skipped == 4
    for name in tables.TABLES:
        after = pd.read_parquet(folder / name)
        pd.testing.assert_frame_equal(before[name], after)


def test_the_readme_reads_the_tables_with_pandas_duckdb_and_polars(sweep_result, capsys):
    """The README's result-reading blocks run as written, on a real sweep's folder."""
    import re
    from pathlib import Path

    _, folder, _ = sweep_result
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert sum("results/default" in b for b in blocks) == 3
    for block in blocks:
        exec(block.replace("results/default", str(folder)), {})
    out = capsys.readouterr().out
    assert out.count("min_ratio") >= 3 and "label" in out


def test_analysis_command_writes_figures(sweep_result):
    _, folder, _ = sweep_result
    res = subprocess.run([sys.executable, "-m", "pipeline.orchestration.analysis", str(folder)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "checkpoints analysed" in res.stdout
    figs = sorted(p.name for p in (folder / "figures").glob("*.png"))
    for name in ("min_ratio_vs_loss.png", "grad_norm_vs_loss.png", "ratio_vs_tol.png", "loss_curves.png",
                 "index_vs_loss.png"):
        assert name in figs
    assert any(f.startswith("eigenvalues_") for f in figs)
    assert all((folder / "figures" / f).stat().st_size > 10_000 for f in figs)


def test_analysis_command_rejects_a_folder_that_is_not_a_sweep(tmp_path, monkeypatch):
    """Run in this process (the test above runs the command as a process of its own): ``sys.exit`` with a
    message is exit code 1 and that message on stderr."""
    from pipeline.orchestration import analysis

    monkeypatch.setattr(sys, "argv", ["minratio-analyze", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        analysis.main()
    assert isinstance(exit_.value.code, str) and "not a sweep results folder" in exit_.value.code


def test_estimate_method_end_to_end(make_cfg, ray_session):
    """hessian.method=estimate: counts from HVPs only, with their intervals in the points table."""
    cfg = make_cfg(["sweep.name=est", "sweep.seeds=1", "hessian.method=estimate", "hessian.tol_mode=rel",
                    "hessian.rel_tol=1e-2", "hessian.estimate_probes=10", "figures=false"])
    run_sweep(cfg)
    points = pd.read_parquet(f"{cfg.results_root}/est/points")
    assert (points["status"] == "ok").all() and (points["method"] == "estimate").all()
    assert (points["n_pos_lo"] <= points["n_pos"]).all() and (points["n_pos"] <= points["n_pos_hi"]).all()
    assert (points["min_ratio_lo"] <= points["min_ratio_hi"]).all() and (points["estimate_resolution"] > 0).all()
    assert points["n_pos_naive"].isna().all()


def test_failed_points_make_the_command_fail_and_say_where(make_cfg, ray_session, caplog):
    """A tolerance the estimator cannot resolve (rel_tol 1e-6) fails every point with its reason; the
    command exits 1 and says where the errors are, though every run trained; the summary and the loss
    curves are still drawn."""
    from pipeline.orchestration import cli

    def logged():
        info = "\n".join(r.getMessage() for r in caplog.records if r.levelno < logging.WARNING)
        warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        caplog.clear()
        return info, warned

    caplog.set_level(logging.INFO, logger="minratio")
    cfg = make_cfg(["sweep.name=unresolved", "sweep.seeds=1", "hessian.method=estimate", "hessian.tol_mode=rel",
                    "hessian.estimate_probes=4", "figures=true"])
    assert cli.run(cfg) == 1
    out, err = logged()
    assert "checkpoints analysed: 0  failed:" in out and "loss_curves.png" in out
    assert "0 failed run(s)" in err and "failed point(s)" in err and "unresolved/runs and /points" in err
    points = pd.read_parquet(f"{cfg.results_root}/unresolved/points")
    assert (points["status"] == "failed").all() and points["error"].str.contains("cannot be resolved").all()
    # Another plan added to the same sweep (sweep.extend) that goes well exits 0: those failures are not its own.
    other = make_cfg(["sweep.name=unresolved", "sweep.seeds=[1]", "hessian.method=estimate", "hessian.tol_mode=rel",
                      "hessian.rel_tol=1e-2", "hessian.estimate_probes=4", "figures=false", "sweep.extend=true"])
    assert cli.run(other) == 0
    out, err = logged()
    assert f"also holds {len(points)} failed row(s) of runs this command did not plan" in err
    assert "failed point(s)" not in err


def test_a_multirun_goes_on_past_a_job_with_failed_points(multirun):
    """Under Hydra's --multirun a job whose points failed reports it, the next job still runs, and the
    command exits 1 at the end."""
    assert multirun.returncode == 1, multirun.stderr[-3000:]
    assert multirun.stderr.count("failed point(s)") == 1, multirun.stderr[-3000:]
    failed, next_job = (pd.read_parquet(multirun.jobs[t] / "points") for t in ("1e-6", "1e-2"))
    assert (failed["status"] == "failed").all() and failed["error"].str.contains("cannot be resolved").all()
    assert len(next_job) > 0 and (next_job["status"] == "ok").all()


def test_a_multirun_by_a_process_launcher_exits_non_zero_when_a_job_failed(tmp_path):
    """Hydra's joblib launcher runs each job in a worker process, whose exit code cannot reach the command's:
    a failed job is reported to Hydra as failed there, the other job still runs, and the command exits 1.
    (Both jobs fail on their values, before any Ray starts: a sweep in a worker process adds a minute.)"""
    res = subprocess.run([sys.executable, "-m", "pipeline", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                          "optim.lr=-1,-2", f"results_root={tmp_path / 'r'}", f"hydra.sweep.dir={tmp_path / 'm'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "optim.lr=-1.0 is not allowed" in res.stderr and "optim.lr=-2.0 is not allowed" in res.stderr
    assert "ended with exit code 2" in res.stderr and not (tmp_path / "r").exists()


def test_diverged_run_is_recorded(make_cfg, ray_session):
    cfg = make_cfg(["sweep.name=div", "sweep.seeds=1", "optim.lr=1e6", "figures=false"])
    summary = run_sweep(cfg)
    runs = pd.read_parquet(f"{cfg.results_root}/div/runs")
    assert list(runs["status"]) == ["diverged"] and "loss became" in runs["error"][0]
    assert summary.run_status == {"diverged": 1}


def test_refinement_and_curvature_logging_end_to_end(make_cfg, ray_session):
    """Stalled points are refined by Newton-MR in their own tasks: both become rows, keyed by stage."""
    cfg = make_cfg(["sweep.name=refine", "sweep.seeds=2", "refine=newton_mr", "refine.max_iters=5",
                    "stall.curvature_every=300", "figures=false"])
    run_sweep(cfg)
    folder = f"{cfg.results_root}/refine"
    points = pd.read_parquet(f"{folder}/points")
    assert not points.duplicated(["run_id", "step", "stage"]).any()
    first = points[points["stage"] != "refined"].set_index(["run_id", "step"])
    refined = points[points["stage"] == "refined"].set_index(["run_id", "step"])
    assert sorted(refined.index) == sorted(first.index)
    assert (refined["status"] == "ok").all() and (refined["refine_method"] == "newton_mr").all()
    assert set(refined["refine_stopped_because"]) <= {"converged", "max_iters", "line_search_failed", "stalled"}
    # Newton-MR's line search never lets ‖g‖² grow.
    assert (refined["refine_grad_norm2"] <= refined["refine_grad_norm2_start"] * (1 + 1e-9)).all()
    np.testing.assert_allclose(refined["refine_grad_norm2_start"], first.loc[refined.index, "grad_norm"] ** 2,
                               rtol=1e-6)
    # Every point says whether it is critical at all, and every stalled point why training stopped.
    assert set(points["critical_label"]) <= {"not_critical", "gradient_flat", "minimum", "degenerate_minimum",
                                             "saddle", "maximum", "degenerate_maximum", "flat"}
    assert ((points["grad_norm2"] >= 1e-10) == (points["critical_label"] == "not_critical")
            | (points["critical_label"] == "gradient_flat")).all()
    assert set(first["stall_tag"]) <= {"small_gradient", "oscillating"}
    shares = points[["grad_share_neg", "grad_share_zero", "grad_share_pos"]].sum(axis=1)
    np.testing.assert_allclose(shares, 1.0, atol=1e-9)
    curves = pd.read_parquet(f"{folder}/curves")
    measured = curves[curves["step"] % 300 == 0]
    assert measured["lam_max"].notna().all() and (measured["lam_max"] > 0).all()
    assert curves[curves["step"] % 300 != 0]["lam_max"].isna().all()
    # A re-run finds nothing left to do: no new rows, refined ones included.
    summary = run_sweep(cfg)
    assert summary.runs_skipped == 2
    assert len(pd.read_parquet(f"{folder}/points")) == len(points)


def test_jobs_accept_a_config_composed_before_newer_keys_existed(make_cfg):
    """A task running newer code than the driver that planned it (an editable install changed under a
    running sweep) fills missing hessian/refine keys with their defaults instead of failing every point."""
    import dataclasses

    from pipeline.orchestration import jobs
    from pipeline.orchestration.storage import Store

    cfg = make_cfg(["sweep.seeds=1", "optim.max_steps=400", "stall.window=100", "refine=newton_mr",
                    "refine.max_iters=2"])
    store = Store.open(cfg.results_root)
    (run,) = expand(cfg)
    sections = run.config.sections()
    old = {**sections, "hessian": {k: v for k, v in sections["hessian"].items()
                                   if k not in ("naive_count", "data_workers")},
           "refine": {k: v for k, v in sections["refine"].items() if k != "gtol2"}}
    run = dataclasses.replace(run, config=RunConfig.from_sections(old))
    assert run.config.hessian.naive_count is True and run.config.refine.gtol2 == 1e-10
    status, refs = jobs.train_job(store.uri, "old", run)
    assert status == "ok"
    jobs.hessian_job(store.uri, "old", refs)
    jobs.refine_job(store.uri, "old", refs[0])
    points = tables.read(store, "old", "points").to_pandas()
    assert (points["status"] == "ok").all() and set(points["stage"]) >= {"refined"}, points["error"].tolist()


def test_a_point_that_cannot_be_analysed_fails_alone(make_cfg):
    """One checkpoint of a group with NaN parameters: its points row fails with an error that says so,
    and the other points of the same pass are analysed as usual (the group is retried point by point)."""
    import io

    import torch

    from pipeline.orchestration import jobs

    store, refs = two_stalls(make_cfg, "nan")
    meta = jobs.load_checkpoint(store, refs[0].path)
    meta["theta"][3] = float("nan")
    buf = io.BytesIO()
    torch.save(meta, buf)
    store.write_bytes(refs[0].path, buf.getvalue())
    store.delete(jobs.record_path(refs[0].path))  # as if training had written it so (else: a damaged file)
    assert jobs.hessian_job(store.uri, "nan", refs) == 1  # what the sweep's progress counts as failed
    points = tables.read(store, "nan", "points").to_pandas().set_index("step")
    bad = points.loc[refs[0].step]
    assert bad["status"] == "failed" and bad["error"].startswith("ValueError: NaN or inf in the parameters")
    others = points.drop(index=refs[0].step)
    assert len(others) == len(refs) - 1 and (others["status"] == "ok").all(), others["error"].tolist()
