"""Stage 9 — analysis: load a sweep's tables, write figures (PNG and PDF) and print a summary.

Figures (under ``<results>/<sweep>/figures/``, each as ``.png`` and ``.pdf``):

- ``min_ratio_vs_loss`` — the lecture's figure: minimum ratio against training loss at every analysed point,
  critical points (‖g‖² < refine.gtol2) filled, the others hollow, coloured by a grid key (``hue``, e.g.
  ``model.width``) or by label in a colour-blind-safe palette (Okabe–Ito), the tolerance rule stated, the y
  range fitted to the data (``full_range``: 0–1), with the estimator's intervals as bars; the naive ratio
  (share of λ > 0) in a second panel only where it differs from the tolerance-aware one;
- ``grad_norm_vs_loss`` — gradient norm at each analysed point, with the ‖g‖² = 1e-10 line: a stall is not
  a critical point;
- ``ratio_vs_tol.png`` — the minimum ratio as the tolerance varies, per checkpoint, with a dot at the
  tolerance its counts used;
- ``eigenvalues_<run_id>_<step>_<stage>.png`` — the eigenvalue histogram of one point (symlog axis);
- ``loss_curves.png`` — training loss of each run, stalls marked;
- ``index_vs_loss`` — index n_neg / n_params against loss (Dauphin et al.), with Pennington & Bahri's power
  law fitted to the critical points where :func:`pipeline.landscape.fits.index_power_fit` can;
- ``stalled_vs_refined`` — with refinement: a line from each stalled point to the point its finder reached,
  coloured by the honest ``critical_label``.
"""
from __future__ import annotations

import argparse
import functools
import posixpath
import sys

import matplotlib
import matplotlib.lines
import matplotlib.ticker

matplotlib.use("Agg")  # no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.landscape import critical  # noqa: E402
from pipeline.curvature import spectrum
from pipeline.orchestration import tables
from pipeline.orchestration.config import recorded_keys
from pipeline.orchestration.storage import Store  # noqa: E402

# Okabe & Ito's colour-blind-safe palette (black last); labels keep one colour each across figures.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
COLORS = {"minimum": "#009E73", "degenerate_minimum": "#56B4E9", "saddle": "#D55E00", "maximum": "#CC79A7",
          "degenerate_maximum": "#F0E442", "flat": "#000000", "uncertain": "#E69F00"}
CRITICAL_COLORS = {**COLORS, "not_critical": "#E69F00", "gradient_flat": "#0072B2"}
CRITICAL = set(spectrum.LABELS)  # critical_label values of a point whose ‖g‖² < refine.gtol2
GTOL2 = critical.GTOL2  # the "critical" threshold, as refine.gtol2 defaults to
REL_TOLS = np.logspace(-12, -1, 45)
STAGE_MARKERS = {"stalled": "o", "final": "s", "refined": "^"}
KEY = ["run_id", "step", "stage"]


def locate(folder: str) -> tuple[Store, str]:
    """``<root>/<sweep>`` (path or URI) → the store of ``<root>`` and the sweep name."""
    folder, sep, query = folder.partition("?")  # a URI's options (endpoint_override=…) belong to the root
    folder = folder.rstrip("/")
    root, sweep = posixpath.split(folder) if "://" in folder else (
        posixpath.dirname(posixpath.abspath(folder)), posixpath.basename(posixpath.abspath(folder)))
    return Store.open(root + sep + query), sweep


def check_results(store: Store, sweep: str) -> tuple[Store, str]:
    """``(store, sweep)`` where the sweep's folder holds its tables, else :class:`FileNotFoundError`."""
    if not store.exists(f"{sweep}/runs"):
        raise FileNotFoundError(f"{store.location(sweep)!r} is not a sweep results folder (no runs/ table inside)")
    return store, sweep


def open_results(folder: str) -> tuple[Store, str]:
    """:func:`locate`, for a folder that holds a sweep's tables (else :class:`FileNotFoundError`)."""
    return check_results(*locate(folder))


def load(store: Store, sweep: str) -> dict[str, pd.DataFrame]:
    return {name: tables.read(store, sweep, name).to_pandas() for name in tables.TABLES}


def summary_text(t: dict[str, pd.DataFrame], hue: str | None = None) -> str:
    """The printed analysis of a sweep's tables ``t``; with ``hue`` (a config key, e.g. ``model.width``) the
    rank correlations are also given within each of its values."""
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
        lines += rank_lines(with_hue(ok, runs, hue) if hue else ok)
    return "\n".join(lines)


def rank_lines(ok: pd.DataFrame) -> list[str]:
    """Spearman's ρ of the loss with the minimum ratio and with the index at the critical points (‖g‖² <
    refine.gtol2), with 90 % bootstrap intervals — two different claims, each with its own statistic. With
    a ``hue`` column (:func:`with_hue`), also within each of its values that has ≥ 3 critical points: a grid
    key that moves both the loss and the spectrum (width, data size) can make a pooled trend of its own."""
    from pipeline.landscape.fits import spearman

    crit = ok[ok["critical_label"].isin(CRITICAL)]
    if len(crit) < 3:
        return [f"rank correlations need ≥ 3 critical points, got {len(crit)}"
                + (" (refine=newton_eig moves stalls to critical points)" if not len(crit) else "")]

    def rho(df: pd.DataFrame, col: str, long: bool) -> str:
        name = f"{'Spearman ' if long else ''}ρ(loss, {col})"
        if df["loss"].nunique() < 2 or df[col].nunique() < 2:
            return f"{name} undefined: {col if df[col].nunique() < 2 else 'loss'} is the same at every point"
        r = spearman(df["loss"], df[col])
        ci = f"90 % bootstrap interval [{r.ci[0]:+.2f}, {r.ci[1]:+.2f}]" if long else f"[{r.ci[0]:+.2f}, {r.ci[1]:+.2f}]"
        return f"{name} = {r.rho:+.2f}{',' if long else ''} {ci}"

    out = [f"at {len(crit)} critical points, loss {crit['loss'].min():.2g} to {crit['loss'].max():.2g}:"]
    out += [f"  {rho(crit, col, True)}" for col in ("min_ratio", "index")]
    if "hue" in crit.columns and crit["hue"].nunique() > 1:
        for value, group in sorted(crit.groupby("hue"), key=lambda kv: _natural(kv[0])):
            if len(group) >= 3:
                out.append(f"  within {value} ({len(group)} points, loss {group['loss'].min():.2g} to "
                           f"{group['loss'].max():.2g}): " + ", ".join(rho(group, c, False) for c in ("min_ratio", "index")))
    return out


def save_figure(fig, store: Store, rel: str) -> list[str]:
    """Write ``fig`` as ``<rel>.png`` (130 dpi) and ``<rel>.pdf`` (vector, for a paper); return both paths."""
    import io

    paths = []
    for fmt in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=130, bbox_inches="tight")
        store.write_bytes(f"{rel}.{fmt}", buf.getvalue())
        paths.append(store.location(f"{rel}.{fmt}"))
    plt.close(fig)
    return paths


def with_hue(ok: pd.DataFrame, runs: pd.DataFrame, hue: str | None) -> pd.DataFrame:
    """``ok`` with a ``hue`` column: the run's value of the config key ``hue`` (e.g. ``model.width``, the
    ``runs`` column ``model_width``), else the point's ``label``."""
    if not hue:
        return ok.assign(hue=ok["label"])
    if hue not in recorded_keys():
        raise ValueError(f"hue {hue!r}: no such config key in the runs table; expected one of "
                         f"{', '.join(sorted(recorded_keys()))}")
    values = runs.drop_duplicates("run_id").set_index("run_id")[tables.column_name(*hue.split(".", 1))]
    return ok.assign(hue=ok["run_id"].map(values).map(lambda v: f"{hue}={v}" if pd.notna(v) else "unknown"))


def _palette(values) -> dict:
    """A colour per hue value: the label colours for labels, else Okabe–Ito in sorted order."""
    keys = sorted(set(values), key=_natural)
    if set(keys) <= set(CRITICAL_COLORS):
        return {k: CRITICAL_COLORS[k] for k in keys}
    return {k: OKABE_ITO[i % len(OKABE_ITO)] for i, k in enumerate(keys)}


def _natural(v):
    """Sort ``model.width=16`` after ``model.width=8``."""
    tail = str(v).rsplit("=", 1)[-1]
    try:
        return (0, float(tail), str(v))
    except ValueError:
        return (1, 0.0, str(v))


def _scatter_hue(ax, df: pd.DataFrame, y: str, bars: tuple[str, str] | None = None) -> None:
    """``y`` against loss: colour by ``hue``, filled where the point is critical, hollow where not."""
    colors = _palette(df["hue"])
    for key, part in df.groupby("hue", sort=False):
        crit = part["critical_label"].isin(CRITICAL)
        for mask, filled in ((crit, True), (~crit, False)):
            sub = part[mask]
            if len(sub):
                ax.scatter(sub["loss"], sub[y], s=26, alpha=0.85, marker="o", linewidths=1.1,
                           facecolors=colors[key] if filled else "none", edgecolors=colors[key])
        if bars is not None and part[bars[0]].notna().any():
            low, high = (part[y] - part[bars[0]]).clip(lower=0), (part[bars[1]] - part[y]).clip(lower=0)
            ax.errorbar(part["loss"], part[y], yerr=[low, high], fmt="none", ecolor=colors[key], alpha=0.5, lw=1)


def _hue_legend(ax, df: pd.DataFrame) -> None:
    """One legend for the colours of ``df["hue"]`` (with counts) and the two marker kinds, beside ``ax``."""
    colors = _palette(df["hue"])
    dot = functools.partial(matplotlib.lines.Line2D, [], [], ls="", marker="o")
    handles = [dot(color=colors[k], label=f"{k} ({(df['hue'] == k).sum()})") for k in colors]
    handles += [dot(color="0.3", label="critical point (‖g‖² < 1e-10)"),
                dot(mfc="none", color="0.3", label="not critical")]
    _legend_outside(ax, handles=handles)


def _legend_outside(ax, **kwargs) -> None:
    """The legend beside ``ax``, right of its frame, so that it hides no point (figures are saved with a
    tight bounding box, which keeps it in the file)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def _log_loss_axis(ax, values: pd.Series) -> None:
    """A log x axis where every value is positive. Over less than two decades matplotlib labels every minor
    tick in scientific notation, and the labels run into each other: plain numbers at 1, 2 and 5 × 10ᵏ
    instead (1, 2, 3, 5 within one decade)."""
    if not len(values) or not (values > 0).all():
        return
    ax.set_xscale("log")
    decades = np.log10(values.max() / values.min())
    if decades < 2:
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 3, 5) if decades < 1 else (2, 5)))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)


def _fit_ylim(ax, values: pd.Series, full_range: bool) -> None:
    """0–1 with ``full_range``; else the data's range with a 6 % margin (at least ±0.005), inside [−0.03, 1.03]."""
    if full_range or not len(values):
        ax.set_ylim(-0.03, 1.03)
        return
    lo, hi = float(values.min()), float(values.max())
    pad = max(0.06 * (hi - lo), 0.005)
    ax.set_ylim(max(lo - pad, -0.03), min(hi + pad, 1.03))


def tolerance_text(df: pd.DataFrame) -> str:
    """Which tolerance rule the counts used, in words, e.g. ``|λ| ≤ tol is zero; tol from a gap at 40 points,
    1e-06·max|λ| at 8``."""
    rel = (df["tol"] / np.maximum(df["lam_min"].abs(), df["lam_max"].abs())).replace([np.inf], np.nan)
    parts = []
    for how, part in df.groupby("tol_method"):
        if how == "rel":
            parts.append(f"{rel[part.index].median():.0e}·max|λ| at {len(part)}")
        else:
            parts.append(f"{'a gap in |λ|' if how == 'gap' else how} at {len(part)}")
    return "|λ| ≤ tol counted as zero; tol from " + ", ".join(parts) + " points"


def fig_min_ratio(ok: pd.DataFrame, full_range: bool = False):
    """The lecture's figure at every analysed point (``ok`` needs a ``hue`` column, :func:`with_hue`)."""
    cols = ["min_ratio", "min_ratio_lo", "min_ratio_hi"]
    naive = ok[ok["min_ratio_naive"].notna()]
    differs = bool((naive["min_ratio_naive"] - naive["min_ratio"]).abs().gt(1e-12).any())
    fig, axes = plt.subplots(1, 2 if differs else 1, figsize=(12 if differs else 7.4, 4.4), sharey=differs,
                             squeeze=False)
    axes = axes[0]
    _scatter_hue(axes[0], ok, "min_ratio", ("min_ratio_lo", "min_ratio_hi"))
    axes[0].set_ylabel("minimum ratio (share of eigenvalues > tol)")
    note = "" if differs else "\n(the naive share of λ > 0 is the same at every point)"
    axes[0].set_title("Minimum ratio against training loss" + note, fontsize=10)
    if differs:
        _scatter_hue(axes[1], naive, "min_ratio_naive")
        axes[1].set_title("Naive ratio: share of λ > 0, as in the lecture", fontsize=10)
    _hue_legend(axes[-1], ok)
    span = pd.concat([ok[c] for c in cols] + ([naive["min_ratio_naive"]] if differs else [])).dropna()
    for ax in axes:
        ax.set_xlabel("training loss")
        _log_loss_axis(ax, ok["loss"])
        _fit_ylim(ax, span, full_range)
        ax.grid(alpha=0.3)
    fig.text(0.5, -0.02, tolerance_text(ok), ha="center", fontsize=8)
    return fig


def _fig_by_stage(ok: pd.DataFrame, y: str, ylabel: str, title: str, log_y: bool):
    """``y`` against training loss, one marker per stage (stalled, final, refined)."""
    fig, ax = plt.subplots(figsize=(5.8, 4.3))
    for (stage, marker), color in zip(STAGE_MARKERS.items(), OKABE_ITO[4:]):
        part = ok[ok["stage"] == stage]
        if len(part):
            ax.scatter(part["loss"], part[y], marker=marker, s=24, alpha=0.8, color=color,
                       label=f"{stage} ({len(part)})")
    ax.set_xlabel("training loss")
    ax.set_ylabel(ylabel)
    _log_loss_axis(ax, ok["loss"])
    if log_y and len(ok) and (ok[y] > 0).all():
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def fig_grad_norm(ok: pd.DataFrame):
    fig = _fig_by_stage(ok, "grad_norm", "gradient norm ‖∇L‖", "Gradient norm where each point was analysed",
                        True)
    ax = fig.axes[0]
    ax.axhline(GTOL2 ** 0.5, color="0.2", ls="--", lw=1, label="‖g‖² = 1e-10: critical below")
    if ax.get_yscale() == "log":  # the line must stay in view even when every point lies far above it
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, GTOL2 ** 0.5 / 3), hi)
    _legend_outside(ax)
    return fig


def fig_index(ok: pd.DataFrame):
    """Index against loss; Pennington & Bahri's α = A(ε − εc)^p over the critical points when it can be fitted."""
    from pipeline.landscape.fits import index_power_fit

    fig = _fig_by_stage(ok, "index", "index (share of eigenvalues < −tol)", "Index against training loss", False)
    ax = fig.axes[0]
    crit = ok[ok["critical_label"].isin(CRITICAL)]
    try:
        fit = index_power_fit(crit["loss"], crit["index"])
    except ValueError:
        fit = None
    if fit is not None:
        eps = np.geomspace(max(crit["loss"].min(), fit.eps_c * 1.0001), crit["loss"].max(), 100)
        ax.plot(eps, fit.A * (eps - fit.eps_c) ** fit.p, color="0.2", lw=1.2,
                label=f"A(ε − εc)^p at critical points: p = {fit.p:.2f} [{fit.p_ci[0]:.2f}, {fit.p_ci[1]:.2f}]")
    _legend_outside(ax)
    return fig


def fig_stalled_vs_refined(ok: pd.DataFrame, full_range: bool = False):
    """A grey line from each stalled (or final) point to the point its finder reached; refined points
    coloured by their honest ``critical_label``, start points hollow."""
    starts = ok[ok["stage"].isin(("stalled", "final"))]
    ends = ok[ok["stage"] == "refined"]
    pairs = starts.merge(ends, on=["run_id", "step"], suffixes=("_0", "_1"))
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    for _, r in pairs.iterrows():
        ax.plot([r["loss_0"], r["loss_1"]], [r["min_ratio_0"], r["min_ratio_1"]], color="0.6", lw=0.8, zorder=1)
    ax.scatter(starts["loss"], starts["min_ratio"], s=22, facecolors="none", edgecolors="0.35",
               label=f"where training stopped ({len(starts)})", zorder=2)
    for lab, sub in ends.groupby("critical_label"):
        ax.scatter(sub["loss"], sub["min_ratio"], s=26, color=CRITICAL_COLORS.get(lab, "k"),
                   label=f"refined: {lab.replace('_', ' ')} ({len(sub)})", zorder=3)
    ax.set_xlabel("training loss")
    ax.set_ylabel("minimum ratio (share of eigenvalues > tol)")
    ax.set_title("From each stalled point to the point the finder reached", fontsize=10)
    _log_loss_axis(ax, pd.concat([starts["loss"], ends["loss"]]))
    _fit_ylim(ax, pd.concat([starts["min_ratio"], ends["min_ratio"]]), full_range)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
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
    ax.set(xscale="log", xlabel="tol / max|λ|", ylabel="minimum ratio #{λ > tol} / n",
           title="minimum ratio against the tolerance (• the one used)")
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
    ax.set(yscale="log", xlabel="step", ylabel="full-batch training loss", title="training curves (× = stall)")
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


def analyze(store: Store, sweep: str, checkpoint: str | None = None, hue: str | None = None,
            full_range: bool = False) -> tuple[str, list[str]]:
    """Write the figures of a sweep (PNG and PDF) and return ``(summary text, figure paths)``.

    ``checkpoint`` = ``"<run_id>:<step>[:<stage>]"`` picks the eigenvalue histogram (without a stage, the
    point where training stopped rather than its refined one); by default the analysed point with the
    lowest loss. ``hue``: a config key (``model.width``) whose value colours the minimum-ratio figure
    (default: the label). ``full_range``: minimum-ratio axes span 0–1 instead of the data's range.
    """
    t = load(store, sweep)
    ok = t["points"][t["points"]["status"] == "ok"]
    ok = with_hue(ok, t["runs"], hue)  # before any figure: an unknown key fails before files are written
    if checkpoint and not len(t["spectra"]):
        raise ValueError(f"--checkpoint {checkpoint!r}: {sweep!r} holds no spectra to draw a histogram from "
                         "(hessian.method=inertia and estimate keep counts only; hessian.method=eigh keeps spectra)")
    sel = _histogram_point(t["spectra"].merge(ok, on=KEY, suffixes=("", "_point")), checkpoint, sweep) \
        if len(t["spectra"]) else []  # a bad or unknown --checkpoint likewise
    figs = []
    out = f"{sweep}/figures"
    if len(ok):
        figs += save_figure(fig_min_ratio(ok, full_range), store, f"{out}/min_ratio_vs_loss")
        figs += save_figure(fig_grad_norm(ok), store, f"{out}/grad_norm_vs_loss")
        figs += save_figure(fig_index(ok), store, f"{out}/index_vs_loss")
        if (ok["stage"] == "refined").any():
            figs += save_figure(fig_stalled_vs_refined(ok, full_range), store, f"{out}/stalled_vs_refined")
    if len(t["spectra"]):
        figs += save_figure(fig_ratio_vs_tol(t["spectra"], ok), store, f"{out}/ratio_vs_tol")
        if len(sel):
            row = sel.iloc[0]
            figs += save_figure(fig_eigenvalues(row), store,
                                f"{out}/eigenvalues_{row['run_id']}_{row['step']}_{row['stage']}")
    if len(t["curves"]):
        figs += save_figure(fig_curves(t["curves"], t["points"]), store, f"{out}/loss_curves")
    return summary_text(t, hue), figs


def folder_args(description: str, checkpoint: bool = False) -> argparse.Namespace:
    """The command line of a command over one sweep's results folder (``minratio-analyze``,
    ``minratio-compact``): the folder, and with ``checkpoint`` the analysis options (the point whose histogram
    to draw, the figure's ``--hue`` and ``--full-range``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("folder", help="a sweep's results folder, <results_root>/<sweep.name> (path or URI)")
    if checkpoint:
        p.add_argument("--checkpoint", help="RUN_ID:STEP[:STAGE] whose eigenvalue histogram to draw (without "
                       "STAGE, the point where training stopped rather than its refined one)")
        p.add_argument("--hue", help="a config key whose value colours the minimum-ratio figure, e.g. model.width "
                       "(default: the point's label)")
        p.add_argument("--full-range", action="store_true", help="minimum-ratio axes from 0 to 1, not fitted")
    return p.parse_args()


def main() -> None:
    """``minratio-analyze`` / ``python -m pipeline.orchestration.analysis``: write a sweep's figures, print its summary."""
    args = folder_args("Write figures and print the summary of a minratio sweep.", checkpoint=True)
    try:
        store, sweep = open_results(args.folder)
        text, figs = analyze(store, sweep, args.checkpoint, args.hue, args.full_range)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"minratio-analyze: {err}")
    print(text)
    print("figures:\n  " + "\n  ".join(figs))


if __name__ == "__main__":
    main()
