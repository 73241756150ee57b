"""Index vs loss at critical points, fitted to Pennington & Bahri's α ≈ A·(ε − εc)^p (they predict p = 3/2).

Reads a sweep's tables, keeps the points whose squared gradient norm is below ``--max-grad-norm2`` (1e-10,
Frye et al.'s cut; P&B used 1e-6), groups them by a ``runs`` column (default ``data_n_samples``, the
grid of ``+experiment=pennington_bahri``), fits each group with :func:`pipeline.landscape.fits.index_power_fit`,
prints a Markdown table and draws ``index_fit.png`` next to the sweep's other figures.

    python scripts/fit_index.py results/pennington_bahri
    python scripts/fit_index.py results/pennington_bahri --max-grad-norm2 1e-6
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.orchestration import analysis  # noqa: E402
from pipeline.landscape.fits import index_power_fit  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="results/<sweep> (a local path or URI)")
    ap.add_argument("--group", default="data_n_samples", help="runs column to group by")
    ap.add_argument("--max-grad-norm2", type=float, default=1e-10)
    args = ap.parse_args(argv)
    store, sweep = analysis.open_results(args.folder)
    t = analysis.load(store, sweep)
    pts = t["points"]
    pts = pts[pts["status"] == "ok"].merge(t["runs"][["run_id", args.group]], on="run_id")
    pts = pts.assign(index=pts["n_neg"] / pts["n_params"], g2=pts["grad_norm"] ** 2)
    crit = pts[pts["g2"] < args.max_grad_norm2]
    print(f"# {sweep}: {len(crit)} of {len(pts)} points with ‖g‖² < {args.max_grad_norm2:g}; "
          f"fit α = A·(ε − εc)^p over those with α > 0 (Pennington & Bahri: p = 3/2)\n")
    print(f"| {args.group} | points (α > 0 / all critical) | p | 90 % interval | εc | A | rms log-residual |")
    print("|---|---|---|---|---|---|---|")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for value, grp in crit.groupby(args.group):
        ax.scatter(grp["loss"], grp["index"], s=12, label=f"{args.group}={value}")
        try:
            fit = index_power_fit(grp["loss"].to_numpy(), grp["index"].to_numpy())
        except ValueError as err:
            print(f"| {value} | {int((grp['index'] > 0).sum())} / {len(grp)} | — | {err} | | | |")
            continue
        print(f"| {value} | {fit.n} / {len(grp)} | {fit.p:.2f} | [{fit.p_ci[0]:.2f}, {fit.p_ci[1]:.2f}] "
              f"| {fit.eps_c:.4g} | {fit.A:.3g} | {fit.rms_log:.2f} |")
        top = grp["loss"].max()
        x = np.linspace(fit.eps_c + 1e-3 * (top - fit.eps_c), top, 100)  # (x − εc)^p with p < 0 is ∞ at εc
        ax.plot(x, fit.A * (x - fit.eps_c) ** fit.p, lw=1)
    ax.set_xlabel("training loss ε at the critical point")
    ax.set_ylabel("index α = n_neg / n_params")
    ax.set_title(f"{sweep}: ‖g‖² < {args.max_grad_norm2:g}, fits α = A(ε − εc)^p")
    ax.legend(fontsize=7)
    path = analysis.save_figure(fig, store, f"{sweep}/figures/index_fit.png")
    print(f"\nfigure: {path}")


if __name__ == "__main__":
    main()
