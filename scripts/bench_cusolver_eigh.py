"""Benchmark (CUDA only): cuSOLVER eigensolvers that torch 2.11's ``eigvalsh`` does not call, through ctypes.

Why: torch 2.11's CUDA ``eigvalsh`` loops cuSOLVER's ``syevd`` over a batch of matrices larger than
32 × 32, and eigh peaks at 6×H. This script measures, with :mod:`pipeline.numerics.cusolver` (what a pass of
``spectra_at_many`` on CUDA uses), against torch's calls:

1. device workspace that ``cusolverDnXsyevd`` asks for (eigenvalues only / with vectors) and that
   ``cusolverDnXsyevBatched`` asks for a pass, in units of H = N²·8 bytes — where eigh's 6×H comes from;
2. a pass of 64 closed-form Hessians of N = 1,483 (the ``bench_hessian`` batched problem): torch's
   batched ``eigvalsh`` call, ``eigvalsh`` one by one, and ``XsyevBatched`` on a copy (eigenvalues only,
   and with eigenvectors against ``eigh`` one by one), with times, ratios, torch-allocated peak memory and
   the largest eigenvalue difference / max|λ|;
3. ``cusolverDnXsyevd`` (eigenvalues only) in H's own memory (no copy, H destroyed) against ``eigvalsh``
   at N ≈ 5.5k and 19k: time and peak.

A benchmark, not a test: it asserts nothing. Run it as its own step (``scripts/gpu_checks.sh`` does): a
wrong foreign call could end the process.

    python scripts/bench_cusolver_eigh.py [--checkpoints 64] [--sizes 5508,19204]
"""
from __future__ import annotations

import argparse

import torch

from bench_hessian import F64, Peak, device_name, problem, timed  # the same MLP problem and clocks as bench_hessian
from pipeline.numerics import cusolver
from pipeline.curvature import hessian as hs


def peak_of(fn, device: torch.device):
    """(seconds, torch-allocated peak bytes above the start, result) of one call."""
    with Peak(device) as peak:
        seconds, out = timed(fn, device)
    return seconds, peak.bytes, out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| over the last axis, the worst over the batch."""
    return float(((a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-300)).max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoints", type=int, default=64)
    ap.add_argument("--batched-n", type=int, default=1500)
    ap.add_argument("--sizes", default="5508,19204", help="N for syevd in H's own memory")
    ap.add_argument("--workspace-sizes", default="1483,5508,19204,29124")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cusolver_eigh needs a CUDA device; nothing to do here")
        return
    device = torch.device("cuda")
    if cusolver.library() is None:
        print("no cuSOLVER with cusolverDnXsyevBatched (it needs 11.7.1, CUDA 12.6.2) in this process")
        return
    print(f"# bench_cusolver_eigh on {device_name(device)}; cuSOLVER {cusolver.version()} "
          f"({cusolver.library().path})")

    print("\n## Device workspace cuSOLVER asks for (H = N²·8 bytes)\n")
    print("| call | N | B | workspace |\n|---|---|---|---|")
    for n in (int(s) for s in args.workspace_sizes.split(",")):
        A = torch.empty(n, n, dtype=F64, device=device)
        for vectors, what in ((False, "Xsyevd, eigenvalues"), (True, "Xsyevd, vectors")):
            w = cusolver.workspace_bytes(A, vectors)
            print(f"| {what} | {n:,} | 1 | {w / 2**20:,.0f} MiB ({w / (n * n * 8):.2f}×H) |", flush=True)
        del A
    model, loss = problem(args.batched_n, device)
    n = model.n_params
    A = torch.empty(args.checkpoints, n, n, dtype=F64, device=device)
    for vectors, what in ((False, "eigenvalues"), (True, "vectors")):
        w = cusolver.workspace_bytes(A, vectors)
        print(f"| XsyevBatched, {what} | {n:,} | {args.checkpoints} | {w / 2**20:,.0f} MiB "
              f"({w / (n * n * 8):.2f}×H, {w / A.numel() / 8:.2f}×H per matrix) |", flush=True)
    del A

    print(f"\n## A pass: {args.checkpoints} closed-form Hessians of N = {n:,} (eigenvalues only)\n")
    thetas = torch.stack([model.init(s) for s in range(args.checkpoints)]).to(device)
    H = hs.hessians(loss, thetas)
    cusolver.syev_(H[0].clone())  # warm: the first calls pay one-off costs
    cusolver.syev_(H[:2].clone())
    torch.linalg.eigvalsh(H[:2])
    t_batched, p_batched, ref = peak_of(lambda: torch.linalg.eigvalsh(H), device)
    t_loop, _ = timed(lambda: [torch.linalg.eigvalsh(h) for h in H], device)
    h_bytes = n * n * 8
    print("| path | s | vs one by one | torch-allocated peak | max |Δλ| / max|λ| vs eigvalsh |")
    print("|---|---|---|---|---|")
    print(f"| eigvalsh one by one | {t_loop:.3f} | 1.0× | — | — |")
    print(f"| eigvalsh, one batched call (a pass today) | {t_batched:.3f} | {t_loop / t_batched:.1f}× | "
          f"{p_batched / h_bytes:.2f}×H ({p_batched / h_bytes / args.checkpoints:.2f}×H per matrix) | 0 |")
    t_x, p_x, lam = peak_of(lambda: cusolver.syev_(H.clone()), device)
    print(f"| XsyevBatched on a copy | {t_x:.3f} | {t_loop / t_x:.1f}× | {p_x / h_bytes:.2f}×H "
          f"({p_x / h_bytes / args.checkpoints:.2f}×H per matrix) | {rel_diff(lam, ref):.1e} |", flush=True)
    t_v, p_v, lam = peak_of(lambda: cusolver.syev_(H.clone(), vectors=True), device)
    t_e, _ = timed(lambda: [torch.linalg.eigh(h) for h in H], device)
    print(f"| eigh with vectors one by one | {t_e:.3f} | — | — | — |")
    print(f"| XsyevBatched with vectors on a copy | {t_v:.3f} | {t_e / t_v:.1f}× (vs eigh one by one) "
          f"| {p_v / h_bytes:.2f}×H ({p_v / h_bytes / args.checkpoints:.2f}×H per matrix) "
          f"| {rel_diff(lam, ref):.1e} |", flush=True)
    del H, ref

    print("\n## One H: eigvalsh against Xsyevd (eigenvalues only) in H's own memory\n")
    print("| N | eigvalsh s | eigvalsh peak | Xsyevd in place s | Xsyevd peak | max |Δλ| / max|λ| |")
    print("|---|---|---|---|---|---|")
    for target in (int(s) for s in args.sizes.split(",")):
        model, loss = problem(target, device)
        n, h_bytes = model.n_params, model.n_params ** 2 * 8
        H = hs.hessian(loss, model.init(0).to(device))
        t_e, p_e, ref = peak_of(lambda: torch.linalg.eigvalsh(H), device)
        t_x, p_x, lam = peak_of(lambda: cusolver.syev_(H), device)  # H is destroyed
        print(f"| {n:,} | {t_e:.3f} | {p_e / h_bytes:.2f}×H | {t_x:.3f} | {p_x / h_bytes:.2f}×H | "
              f"{rel_diff(lam, ref):.1e} |", flush=True)
        del H, ref, lam
    print("\n# peaks: torch.cuda.max_memory_allocated above the start (H itself excluded; cuSOLVER's own "
          "allocations, if any, are not seen)")


if __name__ == "__main__":
    main()
