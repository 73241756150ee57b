"""Benchmark: the critical-point finders side by side on the same stalled checkpoints — how often each reaches
‖g‖² < refine.gtol2 (1e-10), why the others stop, in how many iterations and seconds, and whether the
converged points are minima or saddles (counts from the exact float64 spectrum at the converged θ, with the
hessian section's tolerance rule).

Two nets, each trained in this process with the real composed config (no Ray), seeds 0..k−1, from the first
checkpoint of each run (its first stall, or its last state when it never stalled):

- ``default``: the default sweep's MLP 16-8-10 tanh on the 4×4 digits, N = 226;
- ``lecture``: ``+experiment=lecture_digits`` (64-16-10 tanh on the 8×8 digits, N = 1,210) at lr 0.5, where
  runs stall within a few thousand steps (at lr 0.1 they run to 20,000 steps without stalling).

Each finder runs with its conf/refine/<finder>.yaml settings, as ``refine=<finder>`` gives a user. A benchmark,
not a test: nothing asserts.

    python scripts/bench_refine.py                               # 4 + 2 seeds, one torch thread
    python scripts/bench_refine.py --seeds 8,4 --finders newton_eig,newton_mr
    python scripts/bench_refine.py --mode operators [--device cuda]   # dense H vs HVPs inside Newton-MR
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.landscape import refine
from pipeline.curvature.hessian import spectrum_at
from pipeline.orchestration.train import run_problem, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sweep import compose  # noqa: E402  (Hydra composition of the installed config)

NETS = {"default": [], "lecture": ["+experiment=lecture_digits", "optim.lr=0.5"]}
FINDERS = ("newton_mr", "gnm", "newton_eig")


def stalled_points(overrides: list[str], seeds: int) -> list[tuple[int, object, torch.Tensor, str]]:
    """``(seed, loss function, θ [N] float64, why saved)`` of each run's first checkpoint."""
    cfg = compose(overrides)
    out = []
    for seed in range(seeds):
        ck = train(cfg, seed).checkpoints[0]
        f = run_problem(cfg, seed).to("cpu", torch.float64).loss_fn()
        out.append((seed, f, ck.theta.to(torch.float64), "stall" if ck.stalled else "final"))
    return out


def run_finder(finder: str, overrides: list[str], points) -> list[dict]:
    """One row per point: stop reason, iterations, seconds, final ‖g‖² and, when converged, the label."""
    cfg = compose(overrides + [f"refine={finder}"])
    h = cfg.hessian
    rule = {"rel_tol": h.rel_tol, "gap_ratio": h.gap_ratio, "tol_mode": h.tol_mode}
    opts = refine.options_for(finder, cfg.refine, h)
    rows = []
    for seed, f, theta, why in points:
        res = refine.refine(finder, f, theta, **opts)
        label = ""
        if res.converged:
            label = spectrum_at(f, res.theta, method="eigh", **rule).label
        rows.append({"seed": seed, "stop": res.stopped_because, "iters": res.iterations, "s": res.seconds,
                     "g2": res.grad_norm2, "g2_0": res.grad_norm2_0, "loss": res.loss, "label": label, "why": why})
        print(f"#   {finder:10s} seed {seed} ({why}): {res.stopped_because:18s} {res.iterations:4d} it "
              f"{res.seconds:7.1f} s  ‖g‖² {res.grad_norm2_0:.1e} → {res.grad_norm2:.1e}  loss {res.loss:.4g} "
              f"{label}", flush=True)
    return rows


def table_row(net: str, n: int, finder: str, rows: list[dict]) -> str:
    conv = [r for r in rows if r["stop"] == "converged"]
    stops = {}
    for r in rows:
        stops[r["stop"]] = stops.get(r["stop"], 0) + 1
    minima = sum(r["label"] in ("minimum", "degenerate_minimum") for r in conv)
    saddles = sum(r["label"] == "saddle" for r in conv)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return (f"| {net} | {n:,} | {finder} | {len(conv)}/{len(rows)} ({100 * len(conv) / len(rows):.0f} %) | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(stops.items()))} | {med('iters'):.0f} | {med('s'):.1f} | "
            f"{med('g2'):.1e} | {minima} / {saddles} |")


def finders_main(args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    finders = [f for f in args.finders.split(",") if f]
    print(f"# bench_refine (finders) on CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"# seeds per net: {dict(zip(NETS, seeds))}; finders with their conf/refine/*.yaml settings\n")
    lines = []
    for (net, overrides), k in zip(NETS.items(), seeds):
        if k < 1:
            continue
        t0 = time.perf_counter()
        points = stalled_points(overrides, k)
        n = points[0][2].numel()
        print(f"# {net}: N = {n:,}, {k} runs trained in {time.perf_counter() - t0:.0f} s", flush=True)
        for finder in finders:
            lines.append(table_row(net, n, finder, run_finder(finder, overrides, points)))
    print("\n| net | N | finder | reached ‖g‖² < 1e-10 | stop reasons | median iterations | median s "
          "| median final ‖g‖² | converged: minima / saddles |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("finders", "operators"), default="finders")
    ap.add_argument("--seeds", default="4,2", help="runs per net: default,lecture")
    ap.add_argument("--finders", default=",".join(FINDERS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="--mode operators only")
    ap.add_argument("--sizes", default="", help="--mode operators only: N values")
    ap.add_argument("--steps", type=int, default=5, help="--mode operators only: Newton-MR steps per run")
    args, rest = ap.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    if args.mode == "operators":
        from bench_refine_operator import main as operators_main

        operators_main([f"--device={args.device}", f"--steps={args.steps}", f"--threads={args.threads}"]
                       + ([f"--sizes={args.sizes}"] if args.sizes else []) + rest)
        return
    finders_main(args)


if __name__ == "__main__":
    main()
