"""Stage 9 — analysis: load a sweep's tables, write PNG figures and print a summary.

Figures (under ``<results>/<sweep>/figures/``):

- ``min_ratio_vs_loss.png`` — the lecture's figure: minimum ratio against training loss, one point per
  checkpoint where training stopped (marker: stalled or final), coloured by label; tolerance-aware ratio
  (left, with the estimator's intervals as bars where counts were estimated) beside the naive one (right);
- ``grad_norm_vs_loss.png`` — gradient norm at each analysed point: a stall is not a critical point;
- ``ratio_vs_tol.png`` — the minimum ratio as the tolerance varies, per checkpoint, with a dot at the
  tolerance its counts used;
- ``eigenvalues_<run_id>_<step>_<stage>.png`` — the eigenvalue histogram of one point (symlog axis);
- ``loss_curves.png`` — training loss of each run, stalls marked;
- ``index_vs_loss.png`` — index n_neg / n_params against loss (Dauphin et al.; Pennington & Bahri);
- ``stalled_vs_refined.png`` — with refinement: minimum ratio vs loss at the stalled points and at the
  critical points found from them, side by side, coloured by the honest ``critical_label``.
"""
from __future__ import annotations

import argparse
import posixpath
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import spectrum, tables  # noqa: E402
from pipeline.storage import Store  # noqa: E402

COLORS = {"minimum": "tab:green", "degenerate_minimum": "tab:olive", "saddle": "tab:red",
          "maximum": "tab:purple", "degenerate_maximum": "tab:pink", "flat": "tab:gray"}
REL_TOLS = np.logspace(-12, -1, 45)
STAGE_MARKERS = {"stalled": "o", "final": "s", "refined": "^"}
KEY = ["run_id", "step", "stage"]


def open_results(folder: str) -> tuple[Store, str]:
    """``<root>/<sweep>`` (path or URI) → the store of ``<root>`` and the sweep name."""
    folder, sep, query = folder.partition("?")  # a URI's options (endpoint_override=…) belong to the root
    folder = folder.rstrip("/")
    root, sweep = posixpath.split(folder) if "://" in folder else (
        posixpath.dirname(posixpath.abspath(folder)), posixpath.basename(posixpath.abspath(folder)))
    store = Store.open(root + sep + query)
    if not store.exists(f"{sweep}/runs"):
        raise FileNotFoundError(f"{store.location(sweep)!r} is not a sweep results folder (no runs/ table inside)")
    return store, sweep


def load(store: Store, sweep: str) -> dict[str, pd.DataFrame]:
    return {name: tables.read(store, sweep, name).to_pandas() for name in tables.TABLES}


def summary_text(t: dict[str, pd.DataFrame]) -> str:
    runs, points = t["runs"], t["points"]
    lines = [f"runs: {len(runs)}  " + "  ".join(f"{k}={v}" for k, v in runs["status"].value_counts().items())]
    ok = points[points["status"] == "ok"]
    refined = int((ok["stage"] == "refined").sum())
    lines.append(f"checkpoints analysed: {len(ok) - refined}" + (f"  refined points: {refined}" if refined else "")
                 + f"  failed: {int((points['status'] == 'failed').sum())}")
    if len(ok):
        rel = ok["tol"] / np.maximum(ok["lam_min"].abs(), ok["lam_max"].abs())
        lines.append("tolerance |λ| ≤ tol counted as zero: " + ", ".join(
            f"{k} {v}" for k, v in ok["tol_method"].value_counts().items())
            + f"; tol / max|λ| median {rel.median():.2g} (range {rel.min():.2g} to {rel.max():.2g})")
        est = ok[ok["min_ratio_lo"].notna()]
        if len(est):
            half = (est["min_ratio_hi"] - est["min_ratio_lo"]) / 2
            lines.append(f"estimated counts (method=estimate) at {len(est)} points: minimum ratio ± {half.median():.2g} "
                         "(median half-width of the intervals; the medians below are of the point estimates)")
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
    return store.location(rel)


def _by_label(ax, df: pd.DataFrame, x: str, y: str, bars: tuple[str, str] | None = None) -> None:
    """``y`` against ``x``, coloured by label, one marker per stage; ``bars`` (lo, hi columns): vertical
    bars where they are set (the estimator's intervals)."""
    for (lab, stage), part in df.groupby(["label", "stage"]):
        color = COLORS.get(lab, "k")
        ax.scatter(part[x], part[y], s=22, alpha=0.8, color=color, marker=STAGE_MARKERS.get(stage, "o"),
                   label=f"{lab}, {stage} ({len(part)})")
        if bars is not None and part[bars[0]].notna().any():
            # the point estimate is rounded on its own, so it may sit just outside its interval
            low, high = (part[y] - part[bars[0]]).clip(lower=0), (part[bars[1]] - part[y]).clip(lower=0)
            ax.errorbar(part[x], part[y], yerr=[low, high], fmt="none", ecolor=color, alpha=0.5, lw=1)
    ax.set_xlabel("training loss at the point")
    _log_loss_axis(ax, df[x])


def _log_loss_axis(ax, values: pd.Series) -> None:
    """A log x axis where every value is positive. Over less than two decades matplotlib labels every minor
    tick in scientific notation, and the labels run into each other: plain numbers at 1, 2, 3 and 5 ×
    10ᵏ instead."""
    if not len(values) or not (values > 0).all():
        return
    ax.set_xscale("log")
    if np.log10(values.max() / values.min()) < 2:
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 3, 5)))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)


def fig_min_ratio(ok: pd.DataFrame):
    """The lecture's figure at the points where training stopped (refined points: fig_stalled_vs_refined)."""
    stops = ok[ok["stage"] != "refined"]
    estimated = bool(stops["min_ratio_lo"].notna().any())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    _by_label(axes[0], stops, "loss", "min_ratio", ("min_ratio_lo", "min_ratio_hi"))
    axes[0].set_ylabel("minimum ratio")
    axes[0].set_title("n_pos / n_params, |λ| ≤ tol counted as zero" + ("\n(bars: the estimator's intervals)"
                                                                        if estimated else ""))
    naive = stops[stops["min_ratio_naive"].notna()]
    _by_label(axes[1], naive, "loss", "min_ratio_naive")
    if len(naive) < len(stops):
        axes[1].text(0.5, 0.5, f"naive count not taken at {len(stops) - len(naive)} of {len(stops)} points\n"
                     "(hessian.method=estimate, or hessian.naive_count=false)", ha="center", va="center",
                     transform=axes[1].transAxes, fontsize=9)
    axes[1].set_title("naive: share of λ > 0 (the lecture's count)")
    for ax in axes:
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    return fig


def _fig_by_stage(ok: pd.DataFrame, y: str, ylabel: str, title: str, log_y: bool):
    """``y`` against training loss, one marker per stage (stalled, final, refined)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for stage, marker in STAGE_MARKERS.items():
        part = ok[ok["stage"] == stage]
        if len(part):
            ax.scatter(part["loss"], part[y], marker=marker, s=22, alpha=0.8, label=stage)
    ax.set_xlabel("training loss")
    ax.set_ylabel(ylabel)
    _log_loss_axis(ax, ok["loss"])
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
        _log_loss_axis(ax, part["loss"])
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("minimum ratio n_pos / n_params")
    return fig


def fig_ratio_vs_tol(spectra: pd.DataFrame, points: pd.DataFrame):
    """Each spectrum's #{λ > tol}/n as tol/max|λ| varies, with a dot at the tolerance its counts used
    (``points.tol``)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    used = spectra.merge(points[KEY + ["tol"]], on=KEY, how="left")
    for lam, tol in zip(used["eigenvalues"], used["tol"]):
        lam = np.asarray(lam)
        line, = ax.plot(REL_TOLS, spectrum.ratio_vs_tol(lam, REL_TOLS), alpha=0.35, lw=1)
        top = float(np.abs(lam).max()) if lam.size else 0.0
        if top > 0 and tol > 0:  # NaN (no points row) compares False
            ax.scatter([tol / top], [(lam > tol).sum() / lam.size], s=14, color=line.get_color(), zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("tol / max|λ|")
    ax.set_ylabel("minimum ratio #{λ > tol} / n")
    ax.set_title("minimum ratio against the tolerance (• the one used)")
    ax.grid(alpha=0.3)
    return fig


def fig_eigenvalues(point: pd.Series):
    """The histogram of one point's ``eigenvalues`` (its spectra row joined with its points row)."""
    lam = np.asarray(point["eigenvalues"])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.hist(np.sign(lam) * np.log10(1 + np.abs(lam) / max(point["tol"], 1e-300)), bins=60, color="tab:blue")
    ax.set_xlabel("sign(λ) · log10(1 + |λ| / tol)")
    ax.set_ylabel("count")
    ax.set_title(f"run {point['run_id']} step {point['step']} ({point['stage']}): {point['label']}, "
                 f"n+={point['n_pos']} n-={point['n_neg']} n0={point['n_zero']}, tol={point['tol']:.2g}", fontsize=9)
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


def _histogram_point(spectra: pd.DataFrame, checkpoint: str | None, sweep: str) -> pd.DataFrame:
    """The spectrum (joined with its points row) whose histogram to draw: ``checkpoint`` =
    ``RUN:STEP[:STAGE]`` (a stalled or final point before a refined one), else the lowest-loss point."""
    if not checkpoint:
        return spectra.sort_values("loss").head(1)
    parts = checkpoint.split(":")
    try:
        run_id, step, stage = parts[0], int(parts[1]), parts[2:]
        if len(parts) > 3:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"--checkpoint {checkpoint!r}: expected RUN_ID:STEP[:STAGE] with an integer step") from None
    sel = spectra[(spectra["run_id"] == run_id) & (spectra["step"] == step)]
    if stage:
        sel = sel[sel["stage"] == stage[0]]
    if sel.empty:
        raise ValueError(f"checkpoint {checkpoint!r} has no spectrum in {sweep!r}")
    return sel.assign(_refined=sel["stage"] == "refined").sort_values("_refined").head(1)


def analyze(store: Store, sweep: str, checkpoint: str | None = None) -> tuple[str, list[str]]:
    """Write the figures of a sweep and return ``(summary text, figure paths)``.

    ``checkpoint`` = ``"<run_id>:<step>[:<stage>]"`` picks the eigenvalue histogram (without a stage, the
    point where training stopped rather than its refined one); by default the analysed point with the
    lowest loss.
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
        figs.append(save_figure(fig_ratio_vs_tol(t["spectra"], ok), store, f"{sweep}/figures/ratio_vs_tol.png"))
        sel = _histogram_point(t["spectra"].merge(ok, on=KEY, suffixes=("", "_point")), checkpoint, sweep)
        if len(sel):
            row = sel.iloc[0]
            figs.append(save_figure(fig_eigenvalues(row), store,
                                    f"{sweep}/figures/eigenvalues_{row['run_id']}_{row['step']}_{row['stage']}.png"))
    if len(t["curves"]):
        figs.append(save_figure(fig_curves(t["curves"], t["points"]), store, f"{sweep}/figures/loss_curves.png"))
    return summary_text(t), figs


def folder_args(description: str, checkpoint: bool = False) -> argparse.Namespace:
    """The command line of a command over one sweep's results folder (``minratio-analyze``,
    ``minratio-compact``): the folder, and with ``checkpoint`` the point whose histogram to draw."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("folder", help="a sweep's results folder, <results_root>/<sweep.name> (path or URI)")
    if checkpoint:
        p.add_argument("--checkpoint", help="RUN_ID:STEP[:STAGE] whose eigenvalue histogram to draw (without "
                       "STAGE, the point where training stopped rather than its refined one)")
    return p.parse_args()


def main() -> None:
    """``minratio-analyze`` / ``python -m pipeline.analysis``: write a sweep's figures, print its summary."""
    args = folder_args("Write figures and print the summary of a minratio sweep.", checkpoint=True)
    try:
        store, sweep = open_results(args.folder)
        text, figs = analyze(store, sweep, args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"minratio-analyze: {err}")
    print(text)
    print("figures:\n  " + "\n  ".join(figs))


if __name__ == "__main__":
    main()
