"""Figures and summary on hand-made tables: one point per checkpoint in the lecture's figure, the estimator's
intervals drawn, each point's own tolerance marked and named, a histogram of the stage asked for, and a
summary even when every point failed."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer

from pipeline.orchestration import analysis, tables
from pipeline.orchestration.storage import Store

SWEEP = "a"
LAM_STALLED = [-0.5, 1e-9, 0.2, 1.0]
LAM_REFINED = [-0.1, 2e-9, 0.3, 2.0]


def _point(run_id, step, stage, **extra):
    row = {"run_id": run_id, "step": step, "stage": stage, "status": "ok", "loss": 0.1, "grad_norm": 1e-3,
           "method": "eigh", "label": "saddle", "critical_label": "not_critical", "n_params": 4, "n_pos": 2,
           "n_neg": 1, "n_zero": 1, "n_pos_naive": 3, "min_ratio": 0.5, "min_ratio_naive": 0.75, "index": 0.25,
           "tol": 1e-6, "tol_method": "rel", "lam_min": -0.5, "lam_max": 1.0}
    return {**row, **extra}


@pytest.fixture
def store(tmp_path):
    store = Store.open(str(tmp_path))
    for run_id in ("r1", "r2", "r3"):
        tables.write(store, SWEEP, "runs", [{"run_id": run_id, "status": "ok"}])
    tables.write(store, SWEEP, "points", [_point("r1", 100, "stalled", loss=0.2)])
    tables.write(store, SWEEP, "points", [_point("r1", 100, "refined", loss=0.19, tol=2e-5, lam_max=2.0)])
    tables.write(store, SWEEP, "points", [_point(  # counted by the estimator: intervals, no naive count
        "r2", 300, "final", method="estimate", label="uncertain", n_pos_naive=None, min_ratio_naive=None,
        min_ratio=0.6, min_ratio_lo=0.5, min_ratio_hi=0.7)])
    tables.write(store, SWEEP, "points", [{"run_id": "r3", "step": 50, "stage": "stalled", "status": "failed",
                                           "error": "ValueError: …"}])
    tables.write(store, SWEEP, "spectra", [{"run_id": "r1", "step": 100, "stage": "stalled", "n_params": 4,
                                            "eigenvalues": LAM_STALLED}])
    tables.write(store, SWEEP, "spectra", [{"run_id": "r1", "step": 100, "stage": "refined", "n_params": 4,
                                            "eigenvalues": LAM_REFINED}])
    tables.write(store, SWEEP, "curves", [{"run_id": "r1", "step": s, "loss": 1.0 / (s + 1), "grad_norm": 0.1}
                                          for s in range(0, 101, 10)], stem="r1")
    return store


def _ok(store):
    t = analysis.load(store, SWEEP)
    return t, t["points"][t["points"]["status"] == "ok"]


def test_the_lecture_figure_has_one_point_per_analysed_point_and_the_estimators_bars(store):
    t, ok = _ok(store)
    fig = analysis.fig_min_ratio(analysis.with_hue(ok, t["runs"], None))
    left, right = fig.axes  # the naive ratio differs (0.75 vs 0.5): its own panel
    drawn = sum(len(c.get_offsets()) for c in left.collections if isinstance(c, PathCollection))  # scatters
    assert drawn == 3  # r1's stalled and refined points and r2's final one
    assert sorted(t.get_text() for t in right.get_legend().get_texts()) == [  # one legend, beside the panels
        "critical point (‖g‖² < 1e-10)", "not critical", "saddle (2)", "uncertain (1)"]
    bars = [c for c in left.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1  # the estimated point's interval 0.5–0.7
    assert left.get_ylim()[0] > 0.4 and left.get_ylim()[1] < 0.8  # fitted to the data, not 0–1
    full = analysis.fig_min_ratio(analysis.with_hue(ok, t["runs"], None), full_range=True).axes[0]
    assert full.get_ylim() == (-0.03, 1.03)


def test_an_estimate_just_outside_its_own_interval_still_draws(store):
    """The counts are rounded apart from their bounds, so a point may sit outside its bars (0.49 < 0.5)."""
    tables.write(store, SWEEP, "points", [_point("r4", 10, "final", method="estimate", min_ratio=0.49,
                                                 min_ratio_lo=0.5, min_ratio_hi=0.7, min_ratio_naive=None)])
    t, ok = _ok(store)
    assert len(analysis.fig_min_ratio(analysis.with_hue(ok, t["runs"], None)).axes[0].containers) == 2  # its group and r2's


def test_ratio_vs_tol_marks_the_tolerance_each_count_used(store):
    t, ok = _ok(store)
    ax = analysis.fig_ratio_vs_tol(t["spectra"], ok).axes[0]
    assert len(ax.lines) == 2  # the two spectra's curves and no fixed reference line
    dots = sorted(tuple(np.round(c.get_offsets()[0], 12)) for c in ax.collections)
    # stalled: tol 1e-6 / max|λ| 1.0 → ratio 2/4; refined: tol 2e-5 / 2.0 = 1e-5 → ratio 2/4
    assert dots == [(1e-6, 0.5), (1e-5, 0.5)]


def test_the_summary_counts_refined_points_apart_and_names_the_tolerance(store):
    t, _ = _ok(store)
    text = analysis.summary_text(t)
    assert "checkpoints analysed: 2  refined points: 1  failed: 1" in text
    assert "tolerance |λ| ≤ tol counted as zero: rel 3; tol / max|λ| median 1e-06" in text
    assert "estimated counts (method=estimate) at 1 points: minimum ratio ± 0.1" in text


def test_the_histogram_is_of_the_stage_asked_for(store):
    _, figs = analysis.analyze(store, SWEEP, "r1:100")
    assert any(f.endswith("eigenvalues_r1_100_stalled.png") for f in figs)  # not the refined point
    _, figs = analysis.analyze(store, SWEEP, "r1:100:refined")
    assert any(f.endswith("eigenvalues_r1_100_refined.png") for f in figs)
    for path in store.list_files(f"{SWEEP}/figures"):
        store.delete(path)
    for bad in ("r1:last", "r1", "r1:100:stalled:x"):
        with pytest.raises(ValueError, match="RUN_ID:STEP"):
            analysis.analyze(store, SWEEP, bad)
    with pytest.raises(ValueError, match="has no spectrum"):
        analysis.analyze(store, SWEEP, "r1:100:final")
    assert not store.list_files(f"{SWEEP}/figures")  # refused before any figure was drawn or written


def test_a_sweep_whose_points_all_failed_still_gets_its_summary_and_curves(tmp_path):
    store = Store.open(str(tmp_path))
    tables.write(store, SWEEP, "runs", [{"run_id": "r1", "status": "ok"}])
    tables.write(store, SWEEP, "points", [{"run_id": "r1", "step": 5, "stage": "stalled", "status": "failed"}])
    tables.write(store, SWEEP, "curves", [{"run_id": "r1", "step": s, "loss": 1.0 / (s + 1)} for s in range(5)],
                 stem="r1")
    text, figs = analysis.analyze(store, SWEEP)
    assert "checkpoints analysed: 0  failed: 1" in text
    assert [f.rsplit("/", 1)[-1] for f in figs] == ["loss_curves.png", "loss_curves.pdf"]
    with pytest.raises(ValueError, match="holds no spectra"):  # asked for, not silently left out
        analysis.analyze(store, SWEEP, "r1:5")


def test_rank_correlations_are_also_given_within_each_value_of_the_hue_key(tmp_path):
    """Width 2 ends at high loss and a high ratio, width 16 at low loss and a low one: pooled, ρ(loss,
    min_ratio) is positive, yet within each width the ratio falls as the loss rises (ρ = −1), and the
    summary says both; a constant index has no rank correlation, and the summary says why."""
    store = Store.open(str(tmp_path))
    points = []
    for width, losses, ratios in ((2, [0.30, 0.32, 0.34], [0.9, 0.8, 0.7]), (16, [1e-6, 1e-4, 1e-2], [0.5, 0.4, 0.3])):
        run_id = f"w{width}"
        tables.write(store, SWEEP, "runs", [{"run_id": run_id, "status": "ok", "model_width": width}])
        points += [_point(run_id, 100 * (k + 1), "refined", loss=loss, min_ratio=ratio, index=0.0,
                          critical_label="degenerate_minimum", grad_norm=1e-7)
                   for k, (loss, ratio) in enumerate(zip(losses, ratios))]
    tables.write(store, SWEEP, "points", points)
    t = analysis.load(store, SWEEP)
    pooled = analysis.summary_text(t)
    assert "at 6 critical points" in pooled and "Spearman ρ(loss, min_ratio) = +0.54, 90 % bootstrap" in pooled
    assert "Spearman ρ(loss, index) undefined: index is the same at every point" in pooled
    assert "within" not in pooled and "nan" not in pooled
    by_width = analysis.summary_text(t, "model.width").splitlines()
    within = [line for line in by_width if line.startswith("  within ")]
    assert [line.split(" (")[0] for line in within] == ["  within model.width=2", "  within model.width=16"]
    assert all("ρ(loss, min_ratio) = -1.00 [" in line and "ρ(loss, index) undefined" in line for line in within), within


def test_hue_names_the_config_key_for_every_column_the_runs_table_holds(tmp_path):
    """Every key plot.hue accepts colours the figure, ``model._target_`` (column ``model_target``) too;
    ``hessian.params`` has no column, and plot.hue refuses it before the sweep rather than after it."""
    from pipeline.orchestration.config import recorded_keys

    store = Store.open(str(tmp_path))
    tables.write(store, SWEEP, "runs", [{"run_id": "r1", "status": "ok", "model_target": "pkg.Net"}])
    tables.write(store, SWEEP, "points", [_point("r1", 100, "stalled")])
    t = analysis.load(store, SWEEP)
    assert list(analysis.with_hue(t["points"], t["runs"], "model._target_")["hue"]) == ["model._target_=pkg.Net"]
    for key in recorded_keys():
        assert len(analysis.with_hue(t["points"], t["runs"], key)) == 1
    with pytest.raises(ValueError, match=r"hue 'hessian\.params': no such config key.*model\._target_"):
        analysis.with_hue(t["points"], t["runs"], "hessian.params")
