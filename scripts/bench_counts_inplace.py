"""Benchmark: exact counts at large N in the Hessian's own memory — parameters to counts, peak memory, and the
counts checked by a second factorisation in another order.

The model is bench_hessian's (MLP 16-h-h-4, tanh, 512 Gaussian samples, MSE, float64, random init;
N = h² + 22h + 4). For each N:

1. parameters to counts as the pipeline runs a point with ``hessian.method=inertia naive_count=false``:
   one :func:`pipeline.curvature.hessian.spectrum_at` call — the closed-form Hessian built into one N×N buffer, Lanczos
   for max|λ| (tol = 1e-6·max|λ|), then n+ and n− from the LDLᵀ of H ∓ tol·I in H's own memory (the blocked
   LDLᵀ on CUDA: ``inertia.resolve_factor``). Wall time and peak CUDA memory above the start, in units of
   H = N²·8 bytes. Best of ``--repeat`` where N ≤ 40,000 (the first call also reported).
2. the check: H built again (build time and peak alone), its rows and columns reversed in place (J H J has
   H's inertia, Sylvester's law, but every elimination window now holds other indices), and n+ and n−
   counted again with the same tol (count time and peak alone). eigvalsh cannot run at 100k (it needs 6×H).

Each size runs only where ``--headroom`` × H fits the free memory; otherwise a line says so, and with
``--fit-largest`` the largest N of the family that fits runs in its place. Without CUDA (and no
``--device cpu``) it prints one line and exits 0. A benchmark, not a test: nothing asserts; the last
column says whether the two orders agree.

    python scripts/bench_counts_inplace.py                                  # N ≈ 29k and 100k on CUDA
    python scripts/bench_counts_inplace.py --sizes 100000 --fit-largest     # 100k, or the largest that fits
    python scripts/bench_counts_inplace.py --device cpu --sizes 1732        # the same steps on the CPU

Targets (issue 20): N ≈ 29k parameters to counts ≤ 1.0 s; N ≈ 100k on one H200 < 60 s with peak ≤ 1.2×H.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from pipeline.curvature import hessian as hs
from pipeline.curvature import inertia

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hessian import Peak, device_name, free_bytes, problem, sync, timed, warm_up, width_for  # noqa: E402

REL_TOL = 1e-6
SIZES = [29124, 100000]


def reverse_(H: torch.Tensor, rows: int = 256) -> None:
    """H ← J H J in place for ``H`` ``[N, N]`` (J the exchange matrix: index i ↔ N−1−i), ``rows`` rows and
    then columns at a time: a symmetric permutation, exact, with temporaries of a few N × ``rows`` panels."""
    n = H.shape[0]
    half = n // 2
    for dim in (0, 1):
        for s in range(0, half, rows):
            e = min(s + rows, half)
            top, bottom = H.narrow(dim, s, e - s), H.narrow(dim, n - e, e - s)
            saved = top.flip(dim)  # a copy
            top.copy_(bottom.flip(dim))
            bottom.copy_(saved)
            del saved


def fits(n: int, device: torch.device, headroom: float) -> tuple[bool, float, float]:
    """(whether ``headroom`` × H fits the free memory, need in bytes, free bytes)."""
    need, free = headroom * n * n * 8, free_bytes(device)
    return need <= free, need, free


def largest_fitting(device: torch.device, headroom: float) -> int:
    """The largest N = h² + 22h + 4 whose ``headroom`` × H fits the free memory now."""
    n_max = math.sqrt(free_bytes(device) / (headroom * 8))
    h = width_for(int(n_max))
    while h > 1 and h * h + 22 * h + 4 > n_max:
        h -= 1
    return h * h + 22 * h + 4


def run_size(n_target: int, device: torch.device, repeat: int) -> dict:
    """Steps 1 and 2 of the module docstring at N ≈ ``n_target``."""
    model, f = problem(n_target, device)
    n, theta = model.n_params, model.init(0).to(device)
    r = {"N": n, "h": model.width, "H_bytes": n * n * 8}
    runs = []
    for _ in range(repeat if n <= 40_000 else 1):
        with Peak(device) as pk:
            seconds, res = timed(lambda: hs.spectrum_at(f, theta, method="inertia", naive=False), device)
        runs.append((seconds, pk.bytes))
        hs._empty_cache(device)
    r["first_s"] = runs[0][0]
    r["to_counts_s"], r["peak"] = min(runs, key=lambda x: x[0])
    r.update(counts=(res.n_pos, res.n_neg, res.n_zero), tol=res.tol, lam=(res.lam_min, res.lam_max),
             build_s=res.seconds["build"], count_s=res.seconds["count"])

    with Peak(device) as pk:
        r["check_build_s"], H = timed(lambda: hs.hessian(f, theta), device)
    r["check_build_peak"] = pk.bytes
    r["factor"] = inertia.resolve_factor("auto", H)
    r["reverse_s"], _ = timed(lambda: reverse_(H), device)
    with Peak(device) as pk:
        r["check_count_s"], c = timed(lambda: inertia.counts(H, res.tol, naive=False), device)
    r["check_count_peak"] = None if pk.bytes is None else pk.bytes + r["H_bytes"]  # H was there before
    r["check_counts"] = (c.n_pos, c.n_neg, c.n_zero)
    del H
    hs._empty_cache(device)
    return r


def fmt_mem(b, h_bytes: int) -> str:
    return "n/a" if b is None else f"{b / 2**30:.1f} GiB ({b / h_bytes:.2f}×H)"


def report(r: dict) -> None:
    agree = "yes" if r["counts"] == r["check_counts"] else f"NO (reversed order: {r['check_counts']})"
    print(f"| {r['N']:,} | {r['H_bytes'] / 2**30:.1f} GiB | {r['to_counts_s']:.3f} (first {r['first_s']:.3f}) "
          f"| {r['build_s']:.3f} / {r['count_s']:.3f} | {fmt_mem(r['peak'], r['H_bytes'])} | {r['factor']} "
          f"| {r['counts']} | {r['tol']:.3g} | {r['lam'][0]:.3g} … {r['lam'][1]:.3g} "
          f"| {r['check_build_s']:.3f}, {fmt_mem(r['check_build_peak'], r['H_bytes'])} "
          f"| {r['reverse_s']:.3f} | {r['check_count_s']:.3f}, {fmt_mem(r['check_count_peak'], r['H_bytes'])} "
          f"| {agree} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="", help="cuda (default) or cpu")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated N (targets)")
    ap.add_argument("--headroom", type=float, default=1.25, help="run a size only where this × H is free")
    ap.add_argument("--fit-largest", action="store_true",
                    help="where a size does not fit, run the largest N of the family that does")
    ap.add_argument("--repeat", type=int, default=2, help="parameters-to-counts runs per size up to N = 40,000")
    args = ap.parse_args(argv)
    if not args.device and not torch.cuda.is_available():
        print("bench_counts_inplace: skipped: no CUDA device (torch.cuda.is_available() is False); "
              "--device cpu runs the same steps on the CPU")
        return 0
    device = torch.device(args.device or "cuda")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(f"# bench_counts_inplace on {device}: {device_name(device)}")
    print(f"# MLP 16-h-h-4 tanh, 512 samples, MSE, float64, random init; tol = {REL_TOL:g}·max|λ| (Lanczos); "
          f"times in s (wall); peaks above the start (torch.cuda.max_memory_allocated), H = N²·8 bytes")
    warm_up(device)
    print("\n| N | H | params→counts s | build / Lanczos + 2 LDLᵀ s | peak | factor | counts (n+, n−, n0) | tol "
          "| λmin … λmax | check: build s, peak | reverse s | check: 2 LDLᵀ s, peak (H incl.) | orders agree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n_target in sizes:
        n = width_for(n_target) ** 2 + 22 * width_for(n_target) + 4
        hs._empty_cache(device)  # what torch's allocator keeps cached would count as taken
        ok, need, free = fits(n, device, args.headroom)
        if not ok:
            print(f"# N={n:,}: skipped: needs {args.headroom:g}×H = {need / 2**30:.1f} GiB, "
                  f"{free / 2**30:.1f} GiB free on {device}", flush=True)
            if not args.fit_largest:
                continue
            n = largest_fitting(device, args.headroom)
            print(f"# N={n:,}: the largest of the family that fits, in its place", flush=True)
        t0 = time.perf_counter()
        report(run_size(n, device, args.repeat))
        sync(device)
        print(f"#   N={n:,} took {time.perf_counter() - t0:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
