"""Benchmark: the project's exact Hessian path against torch.autograd.functional.hessian + eigvalsh.

One run on one device (CUDA when present, else CPU; ``--device`` to choose). The model is the issue's:
MLP 16-h-h-4, tanh, 512 Gaussian samples, MSE, float64, random initialisation; N = h² + 22h + 4.
For each N it times

- ours: the Hessian build (closed form, :mod:`pipeline.curvature.mlp_hessian`, the default for MLPs; HVP modes
  ``rev`` and ``fwd``), ``eigh`` (eigvalsh of it; on CUDA also the in-place eigenvalues of
  :func:`pipeline.numerics.cusolver.eigvalsh_inplace_`, time and peak) and ``inertia``:
  Lanczos for max|λ|, then the counts from two LDLᵀ factorisations (H ∓ tol·I: Bunch–Kaufman and
  the blocked one), and with the third
  behind the naive #{λ > 0} (``hessian.naive_count``); one LDLᵀ alone; parameters to counts in one
  ``spectrum_at`` call;
- the baselines: ``torch.autograd.functional.hessian`` as a row loop and with ``vectorize=True``,
  each followed by ``torch.linalg.eigvalsh`` — skipped when the estimate says > ``--max-baseline-s``
  or more memory than there is (the table says why);

and prints times, speed-ups against the baseline measured in the same run, peak memory and whether the
counts agree. Then 64 checkpoints (8 on CPU; ``--checkpoints``) of N ≈ 1,500: spectra per second,
batched (``spectra_at_many``) against one by one (``spectrum_at``), with the closed-form build (also with
eigenvectors, as the job takes full spectra) and with the vmapped HVP build. A benchmark, not a test: nothing
asserts. On a GPU the default run takes about 3 minutes.

    python scripts/bench_hessian.py                  # default sizes for the device
    python scripts/bench_hessian.py --quick          # one size, fewer checkpoints
    python scripts/bench_hessian.py --device cpu --sizes 1732,3852 --threads 2
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

from pipeline.curvature import hessian as hs
from pipeline.curvature import hessian_build
from pipeline.curvature.hessian_memory import default_chunk_size
from pipeline.numerics import block_ldl, cusolver
from pipeline.curvature import inertia, spectrum
from pipeline.curvature.hvp import hvp_rows
from pipeline.curvature.models import MLP
from pipeline.curvature.problem import MeanLoss

F64 = torch.float64
GPU_SIZES = [1999, 5508, 19204, 29124]
CPU_SIZES = [1732, 3852]
REL_TOL = 1e-6
BLOCKS_GPU, BLOCKS_CPU = (256, 512, 1024), (256, 512)  # windows of the blocked LDLᵀ to time


def width_for(n_params: int) -> int:
    """Hidden width h of the 16-h-h-4 MLP with N = h² + 22h + 4 closest to ``n_params``."""
    return max(1, round((-22 + math.sqrt(22 * 22 - 4 * (4 - n_params))) / 2))


def problem(n_params: int, device: torch.device, seed: int = 0, samples: int = 512):
    model = MLP(16, 4, depth=2, width=width_for(n_params), activation="tanh")
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, 16, generator=g, dtype=F64).to(device)
    Y = torch.randn(samples, 4, generator=g, dtype=F64).to(device)
    return model, MeanLoss(model, X, Y, "mse")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """Peak CUDA memory allocated above the start of a ``with`` block; None on CPU (torch keeps no CPU
    allocator statistics, and resident-set sampling misses memory reused from earlier steps)."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        return False


CLOCK = time.perf_counter  # --clock cpu: process CPU time, steadier than wall time on a shared machine


def timed(fn, device: torch.device, repeat: int = 1):
    """(best seconds over ``repeat`` runs, last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        out = None
        sync(device)
        t0 = CLOCK()
        out = fn()
        sync(device)
        best = min(best, CLOCK() - t0)
    return best, out


def free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def counts_of(lam: torch.Tensor, tol: float) -> spectrum.Counts:
    return spectrum.count(lam.cpu().numpy(), tol)


def tolerant(c: spectrum.Counts) -> tuple:
    return c.n_pos, c.n_neg, c.n_zero


def bench_size(n_target: int, device: torch.device, args) -> dict:
    model, f = problem(n_target, device)
    n = model.n_params
    theta = model.init(0).to(device)
    rep = 3 if n <= 2500 else 1  # best of 3 where a run is short
    r = {"N": n, "h": model.width}
    for mode in ("closed_form", "rev", "fwd"):
        with Peak(device) as pk:
            r[f"build_{mode}"], H = timed(lambda: hs.hessian(f, theta, hvp=mode), device, rep)
        r[f"peak_build_{mode}"] = pk.bytes
        del H
        hs._empty_cache(device)
    mode = hs.resolve_hvp("auto", device, f)
    r["mode"] = mode
    H = hs.hessian(f, theta, hvp=mode)
    r["build"] = r[f"build_{mode}"]
    with Peak(device) as pk:
        r["eigh"], lam = timed(lambda: torch.linalg.eigvalsh(H), device, rep)
    r["peak_eigh"] = None if pk.bytes is None else pk.bytes + n * n * 8  # H was there before
    r["eigh_inplace"] = r["peak_eigh_inplace"] = r["lam_inplace_err"] = None
    if device.type == "cuda" and cusolver.library() is not None:  # sytrd in H's memory + dsterf on the host
        H_spent = H.clone()
        with Peak(device) as pk:
            r["eigh_inplace"], lam_ip = timed(lambda: cusolver.eigvalsh_inplace_(H_spent), device, 1)
        r["peak_eigh_inplace"] = pk.bytes + n * n * 8
        r["lam_inplace_err"] = float((lam_ip - lam.cpu()).abs().max() / lam.abs().max())
        del H_spent, lam_ip
        hs._empty_cache(device)
    tol = REL_TOL * float(lam.abs().max())
    r["lanczos"], _ = timed(lambda: inertia.extreme_eigenvalues(H), device, rep)
    r["ldl1"], _ = timed(lambda: inertia.inertia(H).tolist(), device, rep)
    r["inertia_bk"], c_bk = timed(lambda: _counts_only(H, naive=False, factor="bunch_kaufman"), device, rep)
    blocks = BLOCKS_GPU if device.type == "cuda" else BLOCKS_CPU
    r["blocked"] = {b: _time_blocked(H, tol, b, device, rep) for b in blocks}
    r["inertia3"], c_three = timed(lambda: _counts_only(H, naive=True), device, rep)
    with Peak(device) as pk:
        r["inertia"], c_inertia = timed(lambda: _counts_only(H, naive=False), device, rep)
    r["peak_inertia"] = None if pk.bytes is None else pk.bytes + n * n * 8  # H was there before
    c_eigh = counts_of(lam, tol)
    # Parameters to counts in one call, as the pipeline runs it with naive_count=false (build + Lanczos + 2 LDLᵀ).
    r["to_counts"], res = timed(lambda: hs.spectrum_at(f, theta, method="inertia", naive=False), device, 1)
    r["agree_ours"] = tolerant(c_eigh) == tolerant(c_inertia) == tolerant(c_three) == tolerant(res.counts) \
        == tolerant(c_bk)
    r["factor"] = inertia.resolve_factor("auto", H)
    r["counts"] = tolerant(c_eigh)

    # Baselines: row loop, then vectorize=True, each + eigvalsh; the same tolerance for the counts.
    H_ref = None
    est_row = _estimate_row_loop(f, theta, device)
    r["est_row"] = est_row
    if est_row > args.max_baseline_s:
        r["row"] = f"skipped (est. {est_row:.0f} s > {args.max_baseline_s:.0f} s)"
    else:
        r["row"], H_ref = timed(lambda: torch.autograd.functional.hessian(f, theta), device, 1 if est_row > 2 else 2)
    need = n * (2 * hs.activation_bytes(f, theta) + 3 * n * 8)  # N vmapped columns of activations + output
    if need > 0.25 * free_bytes(device) and device.type != "cuda":  # CPU RAM is shared: don't try
        r["vec"] = f"skipped (est. {need / 2**30:.0f} GiB)"
    else:
        try:
            r["vec"], H_vec = timed(lambda: torch.autograd.functional.hessian(f, theta, vectorize=True), device, 1)
            H_ref = H_vec if H_ref is None else H_ref
            del H_vec
        except torch.OutOfMemoryError:
            r["vec"] = "OOM"
        hs._empty_cache(device)
    if H_ref is not None:
        r["eigvalsh"], lam_ref = timed(lambda: torch.linalg.eigvalsh(H_ref), device, rep)
        r["agree_ref"] = tolerant(counts_of(lam_ref, tol)) == tolerant(c_eigh)
        r["h_err"] = float((H_ref - H).abs().max() / H_ref.abs().max())
        r["lam_err"] = float((lam_ref - lam).abs().max() / lam_ref.abs().max())
        del H_ref, lam_ref
    else:  # no baseline Hessian: eigvalsh costs the same on ours
        r["eigvalsh"] = r["eigh"]
        r["agree_ref"] = None
    del H, lam
    hs._empty_cache(device)
    return r


def _time_blocked(H: torch.Tensor, tol: float, block: int, device: torch.device, repeat: int):
    """(best seconds, gave up?) of one :func:`pipeline.numerics.block_ldl.inertia_` of H − tol·I, on a fresh copy
    each time (the copy is not timed)."""
    runs = []
    for _ in range(repeat):
        M = H.clone()
        M.diagonal().sub_(tol)
        runs.append(timed(lambda: block_ldl.inertia_(M, atol=inertia.BLOCKED_ACCURACY * tol, block=block) is None,
                          device))
        del M
    hs._empty_cache(device)
    return min(t for t, _ in runs), runs[-1][1]


def _counts_only(H: torch.Tensor, **how) -> spectrum.Counts:
    lo, hi = inertia.extreme_eigenvalues(H)
    return inertia.counts(H, REL_TOL * max(abs(lo), abs(hi)), **how)


def _estimate_row_loop(f, theta: torch.Tensor, device: torch.device, rows: int = 24) -> float:
    """Seconds for autograd's row loop over all N rows, from timing ``rows`` of them the same way
    (grad with create_graph, then one autograd.grad per row)."""
    x = theta.detach().requires_grad_(True)
    sync(device)
    t0 = CLOCK()
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    for i in range(rows):
        torch.autograd.grad(g[i], x, retain_graph=True)
    sync(device)
    return (CLOCK() - t0) / rows * theta.numel()


def bench_batched(n_target: int, checkpoints: int, device: torch.device) -> dict:
    model, _ = problem(n_target, device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 16, generator=g, dtype=F64)
    Y = torch.randn(512, 4, generator=g, dtype=F64)

    def loss_for(dev, dtype):
        Xd, Yd = X.to(dev, dtype), Y.to(dev, dtype)
        return MeanLoss(model, Xd, Yd, "mse")

    thetas = torch.stack([model.init(s) for s in range(checkpoints)])
    loss = loss_for(device, F64)
    out = {"N": model.n_params, "B": checkpoints}
    cases = [("eigh", "closed_form", False), ("eigh", "closed_form", True), ("inertia", "closed_form", False),
             ("eigh", "rev", False), ("inertia", "rev", False)]  # vectors: the job's full-spectrum points
    for method, build, vectors in cases:
        kw = dict(device=device, method=method, hvp=build, vectors=vectors)
        hs.spectra_at_many(loss_for, thetas[:2], **kw)  # warm
        t1, one = timed(lambda: [hs.spectrum_at(loss, t, **kw) for t in thetas], device)
        t2, (many, fallback) = timed(lambda: hs.spectra_at_many(loss_for, thetas, batch_points=True, **kw), device)
        t3, (many_loop, _) = timed(lambda: hs.spectra_at_many(loss_for, thetas, batch_points=False, **kw), device)
        out[(method + (" + eigenvectors" if vectors else ""), build)] = {
            "one": checkpoints / t1, "batched": checkpoints / t2, "pass_loop": checkpoints / t3,
            "build_one": sum(r.seconds["build"] for r in one), "build_batched": sum(r.seconds["build"] for r in many),
            "count_one": sum(r.seconds["count"] for r in one), "count_batched": sum(r.seconds["count"] for r in many),
            "agree": [tolerant(a.counts) for a in one] == [tolerant(b.counts) for b in many], "fallback": fallback}
    return out


def bench_windows(device: torch.device, batch: int = 64, sizes=(32, 48, 64, 128, 512)) -> list[tuple]:
    """The blocked LDLᵀ's windows: seconds for ``batch`` eigendecompositions of m × m in one batched call
    and one by one — what sets :data:`pipeline.numerics.block_ldl.BATCH_BLOCK`."""
    g = torch.Generator().manual_seed(2)
    out = []
    for m in sizes:
        A = torch.randn(batch, m, m, generator=g, dtype=F64).to(device)
        A = A + A.mT
        t_batched, _ = timed(lambda: torch.linalg.eigh(A), device, 3)
        t_loop, _ = timed(lambda: [torch.linalg.eigh(a) for a in A], device, 3)
        out.append((m, t_batched, t_loop))
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def warm_up(device: torch.device) -> None:
    """First calls pay one-off costs (torch.func imports torch._dynamo, ~2 s; cuSOLVER/cuBLAS handles;
    jvp decompositions): pay them on a tiny problem so that no timed row includes them."""
    model, f = problem(60, device, samples=16)
    theta = model.init(0).to(device)
    for method in ("eigh", "inertia"):
        hs.spectrum_at(f, theta, method=method, hvp="rev")
        hs.spectrum_at(f, theta, method=method, hvp="fwd")
        hs.spectrum_at(f, theta, method=method, hvp="closed_form")
    hs.hessians(f, torch.stack([theta, theta]))
    H = torch.autograd.functional.hessian(f, theta)
    torch.autograd.functional.hessian(f, theta, vectorize=True)
    torch.linalg.eigvalsh(H)
    sync(device)


def fmt_t(x) -> str:
    return x if isinstance(x, str) else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_mem(b, n: int) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f} MiB ({b / (n * n * 8):.2f}×H)"


def generic_problem(kind: str, device: torch.device, samples: int, seed: int = 0, n_params: int = 1732):
    """A user's-style ``nn.Module`` through :class:`pipeline.curvature.torch_model.TorchModel` (no closed form):
    ``mlp`` — the 16-h-h-4 tanh MLP of :func:`problem` as a module, h from ``n_params`` (default 16-32-32-4,
    N = 1,732); ``cnn`` — :class:`pipeline.curvature.nets.SmallCNN` on 1×8×8 images, channels (16, 24)
    (N = 4,610); MSE, float64."""
    from pipeline.curvature.torch_model import TorchModel

    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        h = width_for(n_params)
        model = TorchModel("pipeline.curvature.nets.TanhMLP", {"in_features": 16, "hidden": [h, h], "out_features": 4})
        X, out = torch.randn(samples, 16, generator=g, dtype=F64), 4
    else:
        model = TorchModel("pipeline.curvature.nets.SmallCNN", {"in_channels": 1, "side": 8, "channels": [16, 24],
                                                      "n_classes": 10}, sample_shape=(1, 8, 8))
        X, out = torch.randn(samples, 64, generator=g, dtype=F64), 10
    Y = torch.randn(samples, out, generator=g, dtype=F64)
    return model, MeanLoss(model, X.to(device), Y.to(device), "mse")


def hvp_floor(f, theta: torch.Tensor, device: torch.device) -> tuple[float, float, float]:
    """(flops of one Hessian column's HVP (torch's FlopCounterMode, GEMMs and convolutions), the device's
    float64 GEMM rate in flop/s (1024² matmul, best of 3), their floor: flops × N / rate in s)."""
    from torch.utils.flop_counter import FlopCounterMode

    n = theta.numel()
    e = torch.zeros(1, n, dtype=theta.dtype, device=device)
    e[0, 0] = 1
    with FlopCounterMode(display=False) as counter:
        hvp_rows(f, theta, "rev")(e)
    A = torch.randn(1024, 1024, dtype=F64, device=device)
    t, _ = timed(lambda: A @ A, device, 3)
    rate = 2 * 1024 ** 3 / t
    flops = float(counter.get_total_flops())
    return flops, rate, flops * n / rate


def steady(fn, device: torch.device, long_s: float = 5.0):
    """(seconds, result) of ``fn`` as a steady process sees it: one run first (it also pays one-off
    initialisations, e.g. the first LAPACK call); if that took under ``long_s``, the median of 3 more."""
    t, out = timed(fn, device, 1)
    if t >= long_s:
        return t, out
    times = []
    for _ in range(3):
        t, out = timed(fn, device, 1)
        times.append(t)
    return sorted(times)[1], out


def bench_generic(kind: str, device: torch.device, args, n_params: int = 1732) -> dict:
    """Build (rev, fwd, auto's pick and its probe), eigh, counts and the autograd baselines for a generic
    module; for the MLP also the closed-form build of the same-shaped :func:`problem` (the path
    minratio's own MLP takes); every time is :func:`steady`'s."""
    samples = args.generic_samples if kind == "mlp" else args.cnn_samples
    model, f = generic_problem(kind, device, samples, n_params=n_params)
    theta = model.init(0).to(device)
    n = theta.numel()
    chunk = default_chunk_size(n, device, column_bytes=hs.column_bytes(f, theta))
    hessian_build.AUTO_PICKS.clear()
    r = {"kind": kind, "N": n, "samples": f.X.shape[0], "chunk": chunk, "closed": None}
    if kind == "mlp":
        cf_model, cf = problem(n, device, samples=samples)
        cf_theta = cf_model.init(0).to(device)
        r["closed"], _ = steady(lambda: hs.hessian(cf, cf_theta), device)
        del _
    r["probe"], r["mode"] = timed(lambda: hs.resolve_hvp("auto", device, f, theta, chunk), device, 1)
    for mode in ("rev", "fwd"):
        r[f"build_{mode}"], H = steady(lambda: hs.hessian(f, theta, hvp=mode), device)
    r["build"] = r[f"build_{r['mode']}"] + r["probe"]  # a process's first build pays the probe
    r["eigh"], lam = steady(lambda: torch.linalg.eigvalsh(H), device)
    r["inertia"], c = steady(lambda: _counts_only(H, naive=False), device)
    tol = REL_TOL * float(lam.abs().max())
    est = _estimate_row_loop(f, theta, device)
    if est > args.max_baseline_s:
        r["row"], r["eigvalsh"], r["agree"] = f"skipped (est. {est:.0f} s)", r["eigh"], None
    else:
        r["row"], H_ref = steady(lambda: torch.autograd.functional.hessian(f, theta), device)
        r["eigvalsh"], lam_ref = steady(lambda: torch.linalg.eigvalsh(H_ref), device)
        r["agree"] = tolerant(counts_of(lam_ref, tol)) == tolerant(counts_of(lam, tol)) == tolerant(c)
        r["h_err"] = float((H_ref - H).abs().max() / H_ref.abs().max())
    r["flops"], r["rate"], r["floor"] = hvp_floor(f, theta, device)
    return r


def print_generic_header() -> None:
    print("\n## Generic modules (nn.Module through functional_call: no closed form; HVP build)\n")
    print("| module | N | samples | build rev | build fwd | auto picks (probe s) | closed-form build, same MLP "
          "| eigh | counts | autograd row loop | eigvalsh "
          "| full vs row loop+eigvalsh | counts vs row loop+eigvalsh | HVP flops/column | GEMM rate | floor "
          "| floor / build | counts agree | max rel. diff H |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)


def print_generic(rows: list[dict]) -> None:
    for r in rows:
        full, counts = r["build"] + r["eigh"], r["build"] + r["inertia"]
        ref = None if isinstance(r["row"], str) else r["row"] + r["eigvalsh"]
        ratios = ("—", "—") if ref is None else (f"{ref / full:.1f}×", f"{ref / counts:.1f}×")
        print(f"| {r['kind']} | {r['N']:,} | {r['samples']} | {fmt_t(r['build_rev'])} | {fmt_t(r['build_fwd'])} | {r['mode']} ({r['probe']:.2f}) "
              f"| {'—' if r['closed'] is None else fmt_t(r['closed'])} | {fmt_t(r['eigh'])} | {fmt_t(r['inertia'])} | {fmt_t(r['row'])} | {fmt_t(r['eigvalsh'])} "
              f"| {ratios[0]} | {ratios[1]} | {r['flops'] / 1e6:.1f} M | {r['rate'] / 1e9:.1f} GFLOP/s "
              f"| {fmt_t(r['floor'])} | {r['floor'] / r['build']:.0%} | {r['agree']} "
              f"| {r.get('h_err', float('nan')):.1e} |", flush=True)


def print_generic_footer() -> None:
    print("\nTimes: one run, then the median of 3 more where it took under 5 s (the first run pays one-off "
          "initialisations). full = build + eigh, counts = build + LDLᵀ counts, where build is auto's pick plus its "
          "probe (paid once per process and loss structure). Closed-form build: the same 16-h-h-4 tanh MLP "
          "through minratio's own MLP, whose Hessian is built in closed form (other weights, same shapes and data "
          "sizes): what a module costs against the built-in path.")
    print("Floor: one column's HVP flops (torch.utils.flop_counter, GEMMs and convolutions only) × N at the "
          "measured float64 GEMM rate; floor / build is the share of that floor the build reaches.")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="", help="comma-separated N (default: GPU 1999,5508,19204,29124; CPU 1732,3852)")
    ap.add_argument("--quick", action="store_true", help="one size (5,508 GPU / 1,732 CPU), fewer checkpoints")
    ap.add_argument("--checkpoints", type=int, default=0, help="checkpoints in the batched test (default 64; 8 on CPU)")
    ap.add_argument("--batched-n", type=int, default=1500)
    ap.add_argument("--max-baseline-s", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or process CPU time (CPU only: steadier when other work shares the cores)")
    ap.add_argument("--generic", default="", help="only the generic-module rows: comma-separated of mlp,cnn; "
                    "--sizes then sets the generic MLP's N (default 1,732)")
    ap.add_argument("--generic-samples", type=int, default=512, help="samples of the generic MLP")
    ap.add_argument("--cnn-samples", type=int, default=128, help="samples of the generic CNN")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    else:
        sizes = ([5508] if gpu else [1732]) if args.quick else (GPU_SIZES if gpu else CPU_SIZES)
    checkpoints = args.checkpoints or (64 if gpu and not args.quick else 16 if gpu else 8)

    t_start = time.perf_counter()
    print(f"# bench_hessian on {device}: {device_name(device)}")
    if args.generic:
        warm_up(device)
        print(f"# generic modules, MSE, float64, {torch.get_num_threads()} threads; "
              f"times in s ({'process CPU' if args.clock == 'cpu' else 'wall'} time), one try each", flush=True)
        print_generic_header()
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()] or [1732]
        for k in args.generic.split(","):
            for n in sizes if k == "mlp" else [0]:
                print_generic([bench_generic(k, device, args, n_params=n)])
        print_generic_footer()
        print(f"\n# total {time.perf_counter() - t_start:.0f} s on {device_name(device)}")
        return
    print("# MLP 16-h-h-4 tanh, 512 samples, MSE, float64, random init; tol = 1e-6·max|λ|; times in s "
          f"({'process CPU' if args.clock == 'cpu' else 'wall'} time), best of 3 where N ≤ 2,500")
    if args.clock == "cpu" and gpu:
        raise SystemExit("--clock cpu measures the host, not the GPU: use --clock wall on CUDA")
    warm_up(device)
    rows = []
    for n in sizes:
        r = bench_size(n, device, args)
        rows.append(r)
        print(f"#   N={r['N']:,} at {time.perf_counter() - t_start:.0f} s: build {fmt_t(r['build'])}, eigh "
              f"{fmt_t(r['eigh'])}, counts {fmt_t(r['inertia'])}, params→counts {fmt_t(r['to_counts'])}, row loop "
              f"{fmt_t(r['row'])}, vectorize {fmt_t(r['vec'])}, eigvalsh {fmt_t(r['eigvalsh'])}", flush=True)

    print("\n## Times (s)\n")
    print("| N | build closed form | build rev | build fwd | eigh | counts (Lanczos + 2 LDLᵀ, auto) "
          "| counts + naive (Lanczos + 3 LDLᵀ) | Lanczos | one sytrf | params→counts | autograd row loop "
          "| autograd vectorize | eigvalsh |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']:,} | {fmt_t(r['build_closed_form'])} | {fmt_t(r['build_rev'])} | {fmt_t(r['build_fwd'])} "
              f"| {fmt_t(r['eigh'])} "
              f"| {fmt_t(r['inertia'])} | {fmt_t(r['inertia3'])} | {fmt_t(r['lanczos'])} | {fmt_t(r['ldl1'])} "
              f"| {fmt_t(r['to_counts'])} | {fmt_t(r['row'])} | {fmt_t(r['vec'])} "
              f"| {fmt_t(r['eigvalsh'])} |")

    print("\n## Counts: Bunch–Kaufman (LAPACK / cuSOLVER sytrf) against the blocked LDLᵀ (pipeline.numerics.block_ldl)\n")
    blocks = list(rows[0]["blocked"]) if rows else []
    print("| N | counts, Bunch–Kaufman (Lanczos + 2 sytrf) | counts, auto | auto's factor | one sytrf (copy) | "
          + " | ".join(f"one blocked, window {b}" for b in blocks) + " |")
    print("|---|---|---|---|---|" + "---|" * len(blocks))
    for r in rows:
        cells = [fmt_t(r["blocked"][b][0]) + (" (gave up)" if r["blocked"][b][1] else "") for b in blocks]
        print(f"| {r['N']:,} | {fmt_t(r['inertia_bk'])} | {fmt_t(r['inertia'])} | {r['factor']} | {fmt_t(r['ldl1'])} | "
              + " | ".join(cells) + " |")

    print("\n## Speed-ups against the baselines of this run, memory, agreement\n")
    print("| N | full spectrum vs row loop+eigvalsh | counts vs row loop+eigvalsh | full vs vectorize+eigvalsh "
          "| counts vs vectorize+eigvalsh | peak build (default chunk) | peak eigh | peak eigh in place (time) "
          "| peak counts | counts agree (eigh / LDLᵀ / autograd) | max rel. diff H, λ vs autograd (λ in place) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours_full, ours_counts = r["build"] + r["eigh"], r["build"] + r["inertia"]
        ratio = {}
        for base in ("row", "vec"):
            if isinstance(r[base], str):
                ratio[base] = ("—", "—")
            else:
                ref = r[base] + r["eigvalsh"]
                ratio[base] = (f"{ref / ours_full:.1f}×", f"{ref / ours_counts:.1f}×")
        agree = "yes" if r["agree_ours"] and r["agree_ref"] is not False else "NO"
        if r["agree_ref"] is None:
            agree += " (no autograd H)"
        diff = f"{r['h_err']:.1e}, {r['lam_err']:.1e}" if "h_err" in r else "—"
        if r["lam_inplace_err"] is not None:
            diff += f" ({r['lam_inplace_err']:.1e})"
        inplace = "—" if r["eigh_inplace"] is None else \
            f"{fmt_mem(r['peak_eigh_inplace'], r['N'])} ({fmt_t(r['eigh_inplace'])} s)"
        print(f"| {r['N']:,} | {ratio['row'][0]} | {ratio['row'][1]} | {ratio['vec'][0]} | {ratio['vec'][1]} "
              f"| {fmt_mem(r['peak_build_' + r['mode']], r['N'])} | {fmt_mem(r['peak_eigh'], r['N'])} | {inplace} "
              f"| {fmt_mem(r['peak_inertia'], r['N'])} | {agree} {r['counts']} | {diff} |")
    print("\nPeaks: torch.cuda.max_memory_allocated, 'H' = N²·8 bytes (n/a on CPU); 'eigh' is torch's eigvalsh "
          "(a copy and syevd's workspace), 'eigh in place' cusolver.eigvalsh_inplace_ (sytrd in H's memory, dsterf "
          "on the host: what a point whose eigvalsh does not fit takes), 'counts' the two-LDLᵀ "
          "path (auto's factor), H included. Counts: tolerance 1e-6·max|λ|; eigh, both factors and the three-"
          "factorisation path on our H, and eigvalsh of autograd's H with the same tolerance.")

    print(f"\n## The blocked LDLᵀ's windows: {checkpoints} eigendecompositions (torch.linalg.eigh) of m × m\n")
    print("| m | one batched call, s | one by one, s | one by one / batched |")
    print("|---|---|---|---|")
    for m, t_b, t_l in bench_windows(device, checkpoints):
        print(f"| {m} | {t_b:.4f} | {t_l:.4f} | {t_l / t_b:.1f}× |")

    print(f"#   batched: {checkpoints} checkpoints of N ≈ {args.batched_n:,} ...", flush=True)
    b = bench_batched(args.batched_n, checkpoints, device)
    print(f"\n## {b['B']} checkpoints of N = {b['N']:,}: spectra per second\n")
    print("| method, build | one by one (spectrum_at) | spectra_at_many, batched pass | spectra_at_many, "
          "points built in a loop | speed-up (batched vs one by one) | build s (one / batched) "
          "| count s (one / batched) | counts agree |")
    print("|---|---|---|---|---|---|---|---|")
    for (method, build), m in ((k, v) for k, v in b.items() if isinstance(k, tuple)):
        speedup = m["batched"] / m["one"]
        print(f"| {method}, {build} | {m['one']:.1f} | {m['batched']:.1f} | {m['pass_loop']:.1f} | {speedup:.1f}× "
              f"| {m['build_one']:.2f} / {m['build_batched']:.2f} | {m['count_one']:.2f} / {m['count_batched']:.2f} "
              f"| {'yes' if m['agree'] else 'NO'}{'' if m['fallback'] is None else ' — ' + m['fallback']} |")
    print_generic_header()
    for k in ("mlp", "cnn"):
        print_generic([bench_generic(k, device, args)])
    print_generic_footer()
    print(f"\n# total {time.perf_counter() - t_start:.0f} s on {device_name(device)}")


if __name__ == "__main__":
    main()
