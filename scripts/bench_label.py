"""Benchmark: one full-spectrum point of the pipeline with its honest-label columns, two ways.

- before (the baseline, as the Hessian job did it until the pass kept its eigenvectors): the pass's
  ``spectrum_at(method="eigh")`` — build, eigvalsh — then :func:`pipeline.landscape.critical.critical_report`,
  which builds the Hessian again and takes an eigh with eigenvectors;
- now: ``spectrum_at(method="eigh", vectors=True)`` — build, one eigh with eigenvectors, keeping Vᵀg and
  v_min — then :func:`pipeline.landscape.critical.report_from_eigen`, which needs no N×N matrix.

Same model as ``scripts/bench_hessian.py`` (MLP 16-h-h-4 tanh, 512 samples, MSE, float64, random init).
Prints the times, the speed-up against the baseline of this run, the peak CUDA memory (n/a on CPU) and
whether the two reports agree (labels, counts; shares and residuals to 1e-8). A benchmark, not a test.

    python scripts/bench_label.py                         # CPU 1732,3852 / GPU 1999,5508
    python scripts/bench_label.py --sizes 1732 --repeat 3
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hessian import Peak, device_name, fmt_mem, problem, timed, warm_up  # noqa: E402

from pipeline.landscape import critical  # noqa: E402
from pipeline.curvature import hessian as hs  # noqa: E402
from pipeline.orchestration import rows  # noqa: E402


def before(f, theta):
    res = hs.spectrum_at(f, theta, method="eigh")
    return res, rows.critical_columns(critical.critical_report(f, theta, tol=res.tol))


def now(f, theta):
    res = hs.spectrum_at(f, theta, method="eigh", vectors=True)
    report = critical.report_from_eigen(f, theta, res.eigenvalues, res.grad_coeffs, res.v_min, tol=res.tol)
    return res, rows.critical_columns(report)


def agree(a: dict, b: dict) -> bool:
    """Same labels and escape verdict; floats to 1e-8 relative (NaN equal to NaN)."""
    for key, x in a.items():
        y = b[key]
        if isinstance(x, float) and isinstance(y, float):
            if not (math.isnan(x) and math.isnan(y)) and abs(x - y) > 1e-8 * max(abs(x), abs(y), 1e-12):
                return False
        elif x != y:
            return False
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="", help="comma-separated N (default: GPU 1999,5508; CPU 1732,3852)")
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs of each way")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()] or (
        [1999, 5508] if device.type == "cuda" else [1732, 3852])
    t_start = time.perf_counter()
    print(f"# bench_label on {device}: {device_name(device)}")
    warm_up(device)
    print("\n| N | before: eigvalsh pass + critical_report, s | now: eigh with vectors + report_from_eigen, s "
          "| speed-up | peak before | peak now | reports agree | label / critical_label |")
    print("|---|---|---|---|---|---|---|---|")
    for n_target in sizes:
        model, f = problem(n_target, device)
        theta, n = model.init(0).to(device), model.n_params
        with Peak(device) as p0:
            t0, (res0, row0) = timed(lambda: before(f, theta), device, args.repeat)
        hs._empty_cache(device)
        with Peak(device) as p1:
            t1, (res1, row1) = timed(lambda: now(f, theta), device, args.repeat)
        hs._empty_cache(device)
        same = agree(row0, row1) and res0.counts == res1.counts
        print(f"| {n:,} | {t0:.3f} | {t1:.3f} | {t0 / t1:.2f}× | {fmt_mem(p0.bytes, n)} | {fmt_mem(p1.bytes, n)} "
              f"| {'yes' if same else 'NO'} | {res1.label} / {row1['critical_label']} |", flush=True)
    print(f"\n# total {time.perf_counter() - t_start:.0f} s on {device_name(device)}")


if __name__ == "__main__":
    main()
