"""Every figure of minratio-analyze from a small sweep's tables: PNG and PDF files, every plotted point inside
its axes' limits, x tick labels that do not overlap, colour by a grid key, the naive panel only where it
differs, the ‖g‖² = 1e-10 line and the Pennington–Bahri fit where it can be made."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from matplotlib.collections import PathCollection

from pipeline.orchestration import analysis, tables
from pipeline.orchestration.storage import Store

SWEEP = "grid"
WIDTHS = (4, 8, 16)


def _row(run_id, stage, loss, ratio, crit, width_i, seed):
    n = 100
    n_neg = 0 if crit == "minimum" else max(1, int(round(60 * loss)))
    n_pos = int(round(ratio * n))
    return {"run_id": run_id, "step": 500, "stage": stage, "status": "ok", "loss": loss,
            "grad_norm": 1e-7 if stage == "refined" else 3e-3 * (1 + seed), "method": "eigh",
            "label": "minimum" if n_neg == 0 else "saddle", "critical_label": crit, "n_params": n,
            "n_pos": n_pos, "n_neg": n_neg, "n_zero": n - n_pos - n_neg, "n_pos_naive": n_pos,
            "min_ratio": n_pos / n, "min_ratio_naive": n_pos / n, "index": n_neg / n,
            "tol": 1e-6 * (1 + width_i), "tol_method": "gap" if width_i < 2 else "rel", "lam_min": -0.5,
            "lam_max": 1.0 + width_i}


@pytest.fixture
def store(tmp_path):
    store = Store.open(str(tmp_path))
    rng = np.random.default_rng(0)
    for (i, width), seed in itertools.product(enumerate(WIDTHS), range(4)):
        run_id = f"w{width}s{seed}"
        tables.write(store, SWEEP, "runs", [{"run_id": run_id, "status": "ok", "model_width": width}])
        loss = float(10 ** rng.uniform(-3, 0))  # three decades of loss
        ratio = float(np.clip(0.9 - 0.2 * np.log10(1 / loss) * 0.1 + rng.normal(0, 0.02), 0.3, 1.0))
        tables.write(store, SWEEP, "points", [_row(run_id, "stalled", loss, ratio, "not_critical", i, seed)])
        crit = "minimum" if seed == 0 else "saddle"
        tables.write(store, SWEEP, "points", [_row(run_id, "refined", loss * 0.8, ratio - 0.02, crit, i, seed)])
        tables.write(store, SWEEP, "spectra", [{"run_id": run_id, "step": 500, "stage": "refined", "n_params": 4,
                                                "eigenvalues": [-0.5, 1e-9, 0.2, 1.0 + i]}])
        tables.write(store, SWEEP, "curves", [{"run_id": run_id, "step": s, "loss": 1.0 / (s + 1)}
                                              for s in range(0, 501, 50)], stem=run_id)
    return store


def _check_axes(fig) -> int:
    """Every scattered point and data-space line vertex inside its axes' limits; x tick labels apart; legends
    outside the frame.
    Returns how many points were checked."""
    fig.canvas.draw()
    checked = 0
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        pts = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
        pts += [np.column_stack(line.get_data()) for line in ax.lines if line.get_transform() == ax.transData]
        for xy in pts:
            xy = np.asarray(xy, dtype=float)
            assert ((xy[:, 0] >= x0) & (xy[:, 0] <= x1)).all(), (ax.get_title(), xy[:, 0], (x0, x1))
            assert ((xy[:, 1] >= y0) & (xy[:, 1] <= y1)).all(), (ax.get_title(), xy[:, 1], (y0, y1))
            checked += len(xy)
        boxes = [t.get_window_extent() for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
                 if t.get_visible() and t.get_text() and x0 <= t.get_position()[0] <= x1]
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), f"x tick labels collide in {ax.get_title()!r}"
        legend = ax.get_legend()
        if legend is not None:  # beside the frame, where it hides no point
            assert not legend.get_window_extent().overlaps(ax.get_window_extent()), ax.get_title()
    return checked


def test_every_figure_is_written_as_png_and_pdf(store):
    _, figs = analysis.analyze(store, SWEEP, hue="model.width")
    stems = {f.rsplit("/", 1)[-1].rsplit(".", 1)[0] for f in figs}
    assert {"min_ratio_vs_loss", "grad_norm_vs_loss", "index_vs_loss", "stalled_vs_refined", "ratio_vs_tol",
            "loss_curves"} <= stems
    for stem in stems:
        for ext in ("png", "pdf"):
            path = f"{SWEEP}/figures/{stem}.{ext}"
            assert store.exists(path) and len(store.read_bytes(path)) > 1000, path


def test_each_figure_contains_every_point_it_plots(store):
    t = analysis.load(store, SWEEP)
    ok = analysis.with_hue(t["points"], t["runs"], "model.width")
    for fig in (analysis.fig_min_ratio(ok), analysis.fig_min_ratio(ok, full_range=True),
                analysis.fig_grad_norm(ok), analysis.fig_index(ok), analysis.fig_stalled_vs_refined(ok),
                analysis.fig_ratio_vs_tol(t["spectra"], ok)):
        assert _check_axes(fig) > 0


def test_colour_by_a_grid_key_and_say_the_tolerance(store):
    t = analysis.load(store, SWEEP)
    ok = analysis.with_hue(t["points"], t["runs"], "model.width")
    fig = analysis.fig_min_ratio(ok)
    assert len(fig.axes) == 1  # the naive ratio equals the tolerance-aware one at every point: no second panel
    legend = [x.get_text() for x in fig.axes[0].get_legend().get_texts()]
    assert legend[:3] == ["model.width=4 (8)", "model.width=8 (8)", "model.width=16 (8)"]  # numeric order
    colours = {tuple(c.get_edgecolor()[0]) for c in fig.axes[0].collections}
    assert len(colours) == 3
    note = " ".join(x.get_text() for x in fig.texts)
    assert "a gap in |λ| at 16" in note and "1e-06·max|λ| at 8" in note
    with pytest.raises(ValueError, match="model.depht.*model.width"):
        analysis.with_hue(t["points"], t["runs"], "model.depht")


def test_gradient_line_and_pennington_bahri_fit(store):
    t = analysis.load(store, SWEEP)
    ok = analysis.with_hue(t["points"], t["runs"], None)
    ax = analysis.fig_grad_norm(ok).axes[0]
    assert any(np.allclose(line.get_ydata(), 1e-5) for line in ax.lines)
    assert ax.get_ylim()[0] < 1e-5 < ax.get_ylim()[1]
    ax = analysis.fig_index(ok).axes[0]
    fits = [line for line in ax.lines if "A(ε − εc)^p" in line.get_label()]
    assert len(fits) == 1  # 9 critical saddles with index > 0 at distinct losses


def test_stalled_to_refined_lines_join_each_pair(store):
    t = analysis.load(store, SWEEP)
    ax = analysis.fig_stalled_vs_refined(t["points"]).axes[0]
    segments = [line for line in ax.lines if len(line.get_xdata()) == 2]
    assert len(segments) == 12
    pts = t["points"].set_index(["run_id", "stage"])
    x = sorted(tuple(s.get_xdata()) for s in segments)
    want = sorted((pts.loc[(r, "stalled"), "loss"], pts.loc[(r, "refined"), "loss"])
                  for r in t["runs"]["run_id"])
    np.testing.assert_allclose(x, want)
