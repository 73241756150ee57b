"""Validate the HVP-only estimator (``hessian.method=estimate``) on real checkpoints that have exact spectra.

For every point of one or more sweep results folders (run with ``hessian.method=eigh`` or ``auto``), the
estimator counts eigenvalues above ``rel · max|λ|`` from Hessian-vector products only; the exact count
comes from the stored spectrum. Prints, per tolerance, the interval's coverage of the exact minimum ratio,
its mean half-width and the estimate's error — next to SLQ as PyHessian computes it (the broadened
density's mass above the tolerance) on the same points.

    python scripts/validate_estimate.py results/default results/refined [--rel 1e-3,1e-2] [--probes 30]
    python scripts/validate_estimate.py results/lecture_digits --rel 1e-2 --max-points 60   # N = 1,210
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline.curvature import estimate
from pipeline.orchestration import jobs
from pipeline.orchestration.analysis import load, open_results
from pipeline.orchestration.train import run_problem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_estimate import slq_share_above  # noqa: E402  (the benchmark's own SLQ, written from its description)


def points_of(folder: str):
    store, sweep = open_results(folder)
    t = load(store, sweep)
    runs = t["runs"].set_index("run_id")
    spectra = t["spectra"]
    for _, row in spectra.iterrows():
        cfg = OmegaConf.create(json.loads(runs.loc[row["run_id"], "config_json"]))
        seed = int(runs.loc[row["run_id"], "seed"])
        sub = "refined" if row["stage"] == "refined" else "checkpoints"
        meta = jobs.load_checkpoint(store, f"{sweep}/{sub}/{row['run_id']}/step-{int(row['step']):09d}.pt")
        yield f"{sweep}/{row['run_id']}/{row['step']}/{row['stage']}", cfg, seed, meta["theta"], np.asarray(row["eigenvalues"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--rel", default="1e-3,1e-2", help="tolerances, relative to max|λ|")
    ap.add_argument("--probes", type=int, default=30)
    ap.add_argument("--degree", type=int, default=0, help="Chebyshev degree (0 = the least that resolves tol)")
    ap.add_argument("--slq-steps", type=int, default=100)
    ap.add_argument("--max-points", type=int, default=0, help="at most this many points, in table order (0 = all)")
    args = ap.parse_args()
    rels = [float(r) for r in args.rel.split(",")]
    torch.set_num_threads(1)
    print(f"# validate_estimate on cpu ({platform.processor() or platform.machine()}), 1 thread, "
          f"{args.probes} probes, degree {args.degree or 'auto'}, 95 % intervals; SLQ {args.slq_steps} Lanczos steps, 1 run")
    rows, t0 = [], time.perf_counter()
    points = (p for f in args.folders for p in points_of(f))
    for i, (label, cfg, seed, theta, lam) in enumerate(points):
        if args.max_points and i >= args.max_points:
            break
        loss = run_problem(cfg, seed).to("cpu", torch.float64).loss_fn()
        mv = estimate.hvp_matvec(loss, theta.to(torch.float64))
        n, top = lam.size, np.abs(lam).max()
        slq = slq_share_above(mv, n, [r * top for r in rels], steps=args.slq_steps, n_v=1, seed=0,
                              dtype=torch.float64, device="cpu")
        for k, rel in enumerate(rels):
            exact = float((lam > rel * top).mean())
            try:
                e = estimate.estimate_counts(mv, n, tol=rel * top, n_probes=args.probes, degree=args.degree, seed=1)
            except ValueError as err:
                rows.append(dict(point=label, rel=rel, exact=exact, refused=str(err)[:80]))
                continue
            lo, hi = e.min_ratio_ci
            rows.append(dict(point=label, rel=rel, n=n, exact=exact, est=e.min_ratio, lo=lo, hi=hi,
                             covered=lo <= exact <= hi, degree=e.degree, slq=float(slq[k])))
    print(f"# {len({r['point'] for r in rows})} points in {time.perf_counter() - t0:.0f} s")
    print("| tol / max|λ| | points | refused | coverage of the exact ratio | mean half-width | mean |error| "
          "| max |error| | SLQ mean |error| | SLQ max |error| | degree (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rel in rels:
        sel = [r for r in rows if r["rel"] == rel]
        ok = [r for r in sel if "refused" not in r]
        if not ok:
            print(f"| {rel:g} | {len(sel)} | {len(sel)} | — | — | — | — | — | — | — |")
            continue
        err = np.array([abs(r["est"] - r["exact"]) for r in ok])
        slq = np.array([abs(r["slq"] - r["exact"]) for r in ok])
        half = np.array([(r["hi"] - r["lo"]) / 2 for r in ok])
        cov = np.mean([r["covered"] for r in ok])
        print(f"| {rel:g} | {len(sel)} | {len(sel) - len(ok)} | {cov:.3f} ({sum(r['covered'] for r in ok)}/{len(ok)}) "
              f"| {half.mean():.4f} | {err.mean():.4f} | {err.max():.4f} | {slq.mean():.4f} | {slq.max():.4f} "
              f"| {int(np.median([r['degree'] for r in ok]))} |")


if __name__ == "__main__":
    main()
