"""Benchmark: Newton-MR on dense products with the closed-form Hessian (``refine.operator=dense``) against
MINRES on Hessian-vector products (``hvp``), the measurement behind ``refine.operator=auto``'s bound
(:data:`pipeline.landscape.refine.AUTO_DENSE_MAX_N`).

The model is bench_hessian's: MLP 16-h-h-4, tanh, 512 Gaussian samples, MSE, float64; the start is 1,000
full-batch GD steps (lr 0.2) from initialisation. For each N it runs ``--steps`` Newton-MR steps with each
operator from the same start and prints both times, their ratio (dense / hvp; < 1: dense is faster), the
MINRES iterations and the final ‖g‖² of each. A benchmark, not a test: nothing asserts.

    python scripts/bench_refine.py --mode operators   # N ≈ 1.2k, 1.7k, 2.1k, 2.9k, 3.9k on one CPU thread
    python scripts/bench_refine.py --mode operators --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from pipeline.landscape import refine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hessian import device_name, problem, sync  # noqa: E402  (the same model and device name)

SIZES = [1252, 1732, 2116, 2908, 3852]


def start_point(model, f, device: torch.device) -> torch.Tensor:
    theta = model.init(0).to(device).requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=0.2)
    for _ in range(1000):
        opt.zero_grad()
        f(theta).backward()
        opt.step()
    return theta.detach()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--steps", type=int, default=5, help="Newton-MR steps per run")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# bench_refine on {device}: {device_name(device)}")
    print(f"# MLP 16-h-h-4 tanh, 512 samples, MSE, float64; {args.steps} Newton-MR steps from 1,000 GD steps; "
          f"auto's bound N ≤ {refine.AUTO_DENSE_MAX_N.get(device.type, refine.AUTO_DENSE_MAX_N['cpu']):,}\n")
    print("| N | hvp s | dense s | dense / hvp | MINRES iterations (hvp / dense) | final ‖g‖² (hvp / dense) |")
    print("|---|---|---|---|---|---|")
    for n_target in (int(s) for s in args.sizes.split(",") if s.strip()):
        model, f = problem(n_target, device)
        theta0 = start_point(model, f, device)
        out = {}
        for op in ("hvp", "dense"):
            sync(device)
            t0 = time.perf_counter()
            res = refine.newton_mr(f, theta0, max_iters=args.steps, operator=op)
            sync(device)
            out[op] = (time.perf_counter() - t0, res)
        (t_h, r_h), (t_d, r_d) = out["hvp"], out["dense"]
        print(f"| {model.n_params:,} | {t_h:.2f} | {t_d:.2f} | {t_d / t_h:.2f} | {r_h.hvps} / {r_d.hvps} "
              f"| {r_h.grad_norm2:.2e} / {r_d.grad_norm2:.2e} |", flush=True)


if __name__ == "__main__":
    main()
