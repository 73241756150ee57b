"""Stage 9 — analysis: load a sweep's tables, write PNG figures and print a summary.

Figures (under ``<results>/<sweep>/figures/``):

- ``min_ratio_vs_loss.png`` — the lecture's figure: minimum ratio against training loss, one point per
  checkpoint, coloured by label; tolerance-aware ratio (left) beside the naive one (right);
- ``grad_norm_vs_loss.png`` — gradient norm at each analysed point: a stall is not a critical point;
- ``ratio_vs_tol.png`` — the minimum ratio as the tolerance varies, per checkpoint;
- ``eigenvalues_<run_id>_<step>.png`` — the eigenvalue histogram of one checkpoint (symlog axis);
- ``loss_curves.png`` — training loss of each run, stalls marked;
- ``index_vs_loss.png`` — index n_neg / n_params against loss (Dauphin et al.; Pennington & Bahri);
- ``stalled_vs_refined.png`` — with refinement: minimum ratio vs loss at the stalled points and at the
  critical points found from them, side by side, coloured by the honest ``critical_label``.
"""
from __future__ import annotations

import posixpath

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import spectrum, tables  # noqa: E402
from pipeline.storage import Store  # noqa: E402

COLORS = {"minimum": "tab:green", "degenerate_minimum": "tab:olive", "saddle": "tab:red",
          "maximum": "tab:purple", "degenerate_maximum": "tab:pink", "flat": "tab:gray"}
REL_TOLS = np.logspace(-12, -1, 45)


def open_results(folder: str) -> tuple[Store, str]:
    """``<root>/<sweep>`` (path or URI) → the store of ``<root>`` and the sweep name."""
    folder = folder.rstrip("/")
    root, sweep = posixpath.split(folder) if "://" in folder else (
        posixpath.dirname(posixpath.abspath(folder)), posixpath.basename(posixpath.abspath(folder)))
    store = Store.open(root)
    if not store.exists(f"{sweep}/runs"):
        raise FileNotFoundError(f"{folder!r} is not a sweep results folder (no runs/ table inside)")
    return store, sweep


def load(store: Store, sweep: str) -> dict[str, pd.DataFrame]:
    return {name: tables.read(store, sweep, name).to_pandas() for name in tables.TABLES}


def summary_text(t: dict[str, pd.DataFrame]) -> str:
    runs, points = t["runs"], t["points"]
    lines = [f"runs: {len(runs)}  " + "  ".join(f"{k}={v}" for k, v in runs["status"].value_counts().items())]
    ok = points[points["status"] == "ok"]
    lines.append(f"checkpoints analysed: {len(ok)}  failed: {int((points['status'] == 'failed').sum())}")
    if len(ok):
        by = ok.groupby(["stage", "label"]).agg(
            n=("run_id", "size"), loss_median=("loss", "median"), grad_norm_median=("grad_norm", "median"),
            min_ratio_median=("min_ratio", "median"), min_ratio_naive_median=("min_ratio_naive", "median"),
            n_zero_median=("n_zero", "median")).reset_index()
        lines.append(by.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        honest = ok.fillna({"stall_tag": "-", "critical_label": "-"}).groupby(
            ["stage", "stall_tag", "critical_label"]).size().rename("n").reset_index()
        lines.append("is it a critical point? (critical when ‖g‖² < refine.gtol2)")
        lines.append(honest.to_string(index=False))
    return "\n".join(lines)


def save_figure(fig, store: Store, rel: str) -> str:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    store.write_bytes(rel, buf.getvalue())
    return store.path(rel)


def _by_label(ax, df: pd.DataFrame, x: str, y: str) -> None:
    for lab, part in df.groupby("label"):
        ax.scatter(part[x], part[y], s=22, alpha=0.8, color=COLORS.get(lab, "k"), label=f"{lab} ({len(part)})",
                   marker="o" if (part["stage"] != "final").all() else None)
    ax.set_xlabel("training loss at the point")
    if (df[x] > 0).all() and len(df):
        ax.set_xscale("log")


def fig_min_ratio(ok: pd.DataFrame):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    _by_label(axes[0], ok, "loss", "min_ratio")
    axes[0].set_ylabel("minimum ratio")
    axes[0].set_title("n_pos / n_params, |λ| ≤ tol counted as zero")
    _by_label(axes[1], ok, "loss", "min_ratio_naive")
    axes[1].set_title("naive: share of λ > 0 (the lecture's count)")
    for ax in axes:
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    return fig


def _fig_by_stage(ok: pd.DataFrame, y: str, ylabel: str, title: str, log_y: bool):
    """``y`` against training loss, one marker per stage (stalled, final, refined)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for stage, marker in (("stalled", "o"), ("final", "s"), ("refined", "^")):
        part = ok[ok["stage"] == stage]
        if len(part):
            ax.scatter(part["loss"], part[y], marker=marker, s=22, alpha=0.8, label=stage)
    ax.set_xlabel("training loss")
    ax.set_ylabel(ylabel)
    if len(ok) and (ok["loss"] > 0).all():
        ax.set_xscale("log")
    if log_y and len(ok) and (ok[y] > 0).all():
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def fig_grad_norm(ok: pd.DataFrame):
    return _fig_by_stage(ok, "grad_norm", "‖∇L‖ at the point", "gradient norm where training stopped", True)


def fig_index(ok: pd.DataFrame):
    return _fig_by_stage(ok, "index", "index  n_neg / n_params", "index against loss", False)


CRITICAL_COLORS = {**COLORS, "not_critical": "tab:orange", "gradient_flat": "tab:cyan"}


def fig_stalled_vs_refined(ok: pd.DataFrame):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, stages, title in ((axes[0], ("stalled", "final"), "where training stopped"),
                              (axes[1], ("refined",), "after refinement (critical-point finder)")):
        part = ok[ok["stage"].isin(stages)]
        for lab, sub in part.groupby("critical_label"):
            ax.scatter(sub["loss"], sub["min_ratio"], s=22, alpha=0.8, color=CRITICAL_COLORS.get(lab, "k"),
                       label=f"{lab} ({len(sub)})")
        ax.set_title(title)
        ax.set_xlabel("training loss")
        if len(part) and (part["loss"] > 0).all():
            ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("minimum ratio n_pos / n_params")
    return fig


def fig_ratio_vs_tol(spectra: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for lam in spectra["eigenvalues"]:
        ax.plot(REL_TOLS, spectrum.ratio_vs_tol(np.asarray(lam), REL_TOLS), alpha=0.35, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("tol / max|λ|")
    ax.set_ylabel("minimum ratio #{λ > tol} / n")
    ax.axvline(1e-6, color="k", ls=":", lw=1)
    ax.set_title("minimum ratio against the tolerance")
    ax.grid(alpha=0.3)
    return fig


def fig_eigenvalues(row: pd.Series, point: pd.Series):
    lam = np.asarray(row["eigenvalues"])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.hist(np.sign(lam) * np.log10(1 + np.abs(lam) / max(point["tol"], 1e-300)), bins=60, color="tab:blue")
    ax.set_xlabel("sign(λ) · log10(1 + |λ| / tol)")
    ax.set_ylabel("count")
    ax.set_title(f"run {row['run_id']} step {row['step']}: {point['label']}, n+={point['n_pos']} "
                 f"n-={point['n_neg']} n0={point['n_zero']}, tol={point['tol']:.2g}", fontsize=9)
    return fig


def fig_curves(curves: pd.DataFrame, points: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run_id, part in curves.groupby("run_id"):
        line, = ax.plot(part["step"], part["loss"], lw=1, alpha=0.7)
        stalls = points[(points["run_id"] == run_id) & (points["stage"] == "stalled")]
        ax.scatter(stalls["step"], stalls["loss"], color=line.get_color(), marker="x", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("full-batch training loss")
    ax.set_title("training curves (× = stall)")
    ax.grid(alpha=0.3)
    return fig


def analyze(store: Store, sweep: str, checkpoint: str | None = None) -> tuple[str, list[str]]:
    """Write the figures of a sweep and return ``(summary text, figure paths)``.

    ``checkpoint`` = ``"<run_id>:<step>"`` picks the eigenvalue histogram; by default the analysed point
    with the lowest loss.
    """
    t = load(store, sweep)
    ok = t["points"][t["points"]["status"] == "ok"]
    figs = []
    if len(ok):
        figs.append(save_figure(fig_min_ratio(ok), store, f"{sweep}/figures/min_ratio_vs_loss.png"))
        figs.append(save_figure(fig_grad_norm(ok), store, f"{sweep}/figures/grad_norm_vs_loss.png"))
        figs.append(save_figure(fig_index(ok), store, f"{sweep}/figures/index_vs_loss.png"))
        if (ok["stage"] == "refined").any():
            figs.append(save_figure(fig_stalled_vs_refined(ok), store, f"{sweep}/figures/stalled_vs_refined.png"))
    if len(t["spectra"]):
        figs.append(save_figure(fig_ratio_vs_tol(t["spectra"]), store, f"{sweep}/figures/ratio_vs_tol.png"))
        spectra = t["spectra"]
        if checkpoint:
            run_id, _, step = checkpoint.partition(":")
            sel = spectra[(spectra["run_id"] == run_id) & (spectra["step"] == int(step))]
            if sel.empty:
                raise ValueError(f"checkpoint {checkpoint!r} has no spectrum in {sweep!r}")
        else:
            best = ok[ok["method"] == "eigh"].sort_values("loss").head(1)
            sel = spectra.merge(best[["run_id", "step", "stage"]], on=["run_id", "step", "stage"])
        if len(sel):
            row = sel.iloc[0]
            point = ok[(ok["run_id"] == row["run_id"]) & (ok["step"] == row["step"])].iloc[0]
            figs.append(save_figure(fig_eigenvalues(row, point), store,
                              f"{sweep}/figures/eigenvalues_{row['run_id']}_{row['step']}.png"))
    if len(t["curves"]):
        figs.append(save_figure(fig_curves(t["curves"], t["points"]), store, f"{sweep}/figures/loss_curves.png"))
    return summary_text(t), figs


if __name__ == "__main__":
    from pipeline.cli import analyze_main

    analyze_main()
