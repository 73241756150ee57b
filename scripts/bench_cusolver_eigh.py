"""Benchmark (CUDA only): cuSOLVER eigensolvers that torch 2.11's ``eigvalsh`` does not call, through ctypes.

Why: issue #3's batched target for full spectra (64 checkpoints of N ≈ 1,500, ≥ 3× one by one) is not
met with torch 2.11, whose CUDA ``eigvalsh`` loops cuSOLVER's ``syevd`` over a batch of matrices larger
than 32 × 32 (1.0–1.2×, ``docs/bench/bench_hessian_h100_final.txt``), and eigh peaks at 6×H.
pytorch/pytorch#175403 routes batched eigh to cuSOLVER's batched solver ``cusolverDnXsyevBatched`` (torch
2.12, by a later PyTorch issue thread); a pass of ``pipeline.hessian.spectra_at_many`` already makes one
batched ``eigvalsh`` call, so it would take that path by itself. This script measures, on the torch that
is installed, what that solver does for our Hessians — without changing the project's code:

1. device workspace that ``cusolverDnXsyevd`` asks for (eigenvalues only / with vectors) and that
   ``cusolverDnXsyevBatched`` asks for a pass, in units of H = N²·8 bytes — where eigh's 6×H comes from;
2. a pass of 64 closed-form Hessians of N = 1,483 (the ``bench_hessian`` batched problem): torch's
   batched ``eigvalsh`` call, ``eigvalsh`` one by one, and ``XsyevBatched`` (eigenvalues only) on a copy,
   with times, ratios, torch-allocated peak memory and the largest eigenvalue difference / max|λ|;
3. ``cusolverDnXsyevd`` (eigenvalues only) in H's own memory (no copy, H destroyed) against ``eigvalsh``
   at N ≈ 5.5k and 19k: time and peak.

A benchmark, not a test: it asserts nothing and changes nothing in the pipeline. Run it as its own step
(``scripts/gpu_checks.sh`` does): a wrong foreign call could end the process.

    python scripts/bench_cusolver_eigh.py [--checkpoints 64] [--sizes 5508,19204]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util

import torch

from bench_hessian import F64, Peak, device_name, problem, timed  # the same MLP problem and clocks as bench_hessian
from pipeline import hessian as hs

# Enumerations from cusolver_common.h, cublas_api.h and library_types.h.
EIG_MODE_NOVECTOR, EIG_MODE_VECTOR = 0, 1
FILL_MODE_LOWER = 0
CUDA_R_64F = 1
V, I32, I64, SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t
_COMMON = [V, V, I32, I32, I64, I32, V, I64, I32, V, I32]  # handle … computeType


def _library_path() -> str:
    """The libcusolver that torch loaded (it loads it on its first CUDA linear-algebra call)."""
    torch.linalg.eigvalsh(torch.eye(40, dtype=F64, device="cuda"))
    torch.cuda.synchronize()
    with open("/proc/self/maps") as fh:
        for line in fh:
            path = line.split()[-1]
            if "/libcusolver.so" in path:
                return path
    found = ctypes.util.find_library("cusolver")
    if not found:
        raise RuntimeError("no libcusolver in this process or on the library path")
    return found


class Cusolver:
    """The few cuSOLVER calls this benchmark needs, on torch's current CUDA stream."""

    def __init__(self):
        self.path = _library_path()
        lib = ctypes.CDLL(self.path)
        lib.cusolverGetVersion.argtypes = [ctypes.POINTER(I32)]
        lib.cusolverDnCreate.argtypes = [ctypes.POINTER(V)]
        lib.cusolverDnSetStream.argtypes = [V, V]
        lib.cusolverDnCreateParams.argtypes = [ctypes.POINTER(V)]
        lib.cusolverDnDestroyParams.argtypes = [V]
        lib.cusolverDnDestroy.argtypes = [V]
        lib.cusolverDnXsyevd_bufferSize.argtypes = _COMMON + [ctypes.POINTER(SZ), ctypes.POINTER(SZ)]
        lib.cusolverDnXsyevd.argtypes = _COMMON + [V, SZ, V, SZ, V]
        self.batched = hasattr(lib, "cusolverDnXsyevBatched")  # cuSOLVER ≥ 11.7.1 (CUDA 12.6.2)
        names = ["cusolverGetVersion", "cusolverDnCreate", "cusolverDnSetStream", "cusolverDnCreateParams",
                 "cusolverDnDestroyParams", "cusolverDnDestroy", "cusolverDnXsyevd_bufferSize", "cusolverDnXsyevd"]
        if self.batched:
            lib.cusolverDnXsyevBatched_bufferSize.argtypes = _COMMON + [ctypes.POINTER(SZ), ctypes.POINTER(SZ), I64]
            lib.cusolverDnXsyevBatched.argtypes = _COMMON + [V, SZ, V, SZ, V, I64]
            names += ["cusolverDnXsyevBatched_bufferSize", "cusolverDnXsyevBatched"]
        for name in names:
            getattr(lib, name).restype = I32
        self.lib = lib
        version = I32()
        self._ok(lib.cusolverGetVersion(ctypes.byref(version)), "cusolverGetVersion")
        self.version = version.value
        self.handle, self.params = V(), V()
        self._ok(lib.cusolverDnCreate(ctypes.byref(self.handle)), "cusolverDnCreate")
        self._ok(lib.cusolverDnSetStream(self.handle, V(torch.cuda.current_stream().cuda_stream)),
                 "cusolverDnSetStream")
        self._ok(lib.cusolverDnCreateParams(ctypes.byref(self.params)), "cusolverDnCreateParams")

    @staticmethod
    def _ok(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} returned cusolverStatus_t {status}")

    def _head(self, A: torch.Tensor, W: torch.Tensor, jobz: int) -> list:
        n = A.shape[-1]
        return [self.handle, self.params, jobz, FILL_MODE_LOWER, n, CUDA_R_64F, V(A.data_ptr()), n,
                CUDA_R_64F, V(W.data_ptr()), CUDA_R_64F]

    def workspace(self, A: torch.Tensor, jobz: int = EIG_MODE_NOVECTOR) -> int:
        """Device workspace bytes cuSOLVER asks for: ``A`` ``[N, N]`` (syevd) or ``[B, N, N]`` (batched)."""
        W = torch.empty(A.shape[:-1], dtype=F64, device=A.device)
        dev, host = SZ(), SZ()
        if A.dim() == 2:
            self._ok(self.lib.cusolverDnXsyevd_bufferSize(*self._head(A, W, jobz), ctypes.byref(dev),
                                                          ctypes.byref(host)), "cusolverDnXsyevd_bufferSize")
        else:
            self._ok(self.lib.cusolverDnXsyevBatched_bufferSize(*self._head(A, W, jobz), ctypes.byref(dev),
                                                                ctypes.byref(host), A.shape[0]),
                     "cusolverDnXsyevBatched_bufferSize")
        return dev.value

    def eigvalsh_(self, A: torch.Tensor) -> torch.Tensor:
        """Eigenvalues (ascending) of symmetric float64 CUDA ``A`` ``[N, N]`` or ``[B, N, N]``, contiguous;
        ``A`` is overwritten. (Row-major symmetric A is its own column-major transpose.)"""
        if A.dtype != F64 or not A.is_cuda or not A.is_contiguous() or A.dim() not in (2, 3):
            raise ValueError(f"need a contiguous float64 CUDA [N, N] or [B, N, N], got {A.dtype} {tuple(A.shape)}")
        W = torch.empty(A.shape[:-1], dtype=F64, device=A.device)
        info = torch.zeros(A.shape[0] if A.dim() == 3 else 1, dtype=torch.int32, device=A.device)
        dev, host = SZ(), SZ()
        head = self._head(A, W, EIG_MODE_NOVECTOR)
        batched = A.dim() == 3
        if batched:
            self._ok(self.lib.cusolverDnXsyevBatched_bufferSize(*head, ctypes.byref(dev), ctypes.byref(host),
                                                                A.shape[0]), "cusolverDnXsyevBatched_bufferSize")
        else:
            self._ok(self.lib.cusolverDnXsyevd_bufferSize(*head, ctypes.byref(dev), ctypes.byref(host)),
                     "cusolverDnXsyevd_bufferSize")
        work = torch.empty(max(dev.value, 1), dtype=torch.uint8, device=A.device)
        host_work = ctypes.create_string_buffer(max(host.value, 1))
        tail = [V(work.data_ptr()), dev.value, ctypes.cast(host_work, V), host.value, V(info.data_ptr())]
        if batched:
            self._ok(self.lib.cusolverDnXsyevBatched(*head, *tail, A.shape[0]), "cusolverDnXsyevBatched")
        else:
            self._ok(self.lib.cusolverDnXsyevd(*head, *tail), "cusolverDnXsyevd")
        torch.cuda.synchronize()
        if int(info.abs().max()) != 0:
            raise RuntimeError(f"cuSOLVER info {info.tolist()[:8]} (nonzero: did not converge or bad argument)")
        return W

    def close(self) -> None:
        self.lib.cusolverDnDestroyParams(self.params)
        self.lib.cusolverDnDestroy(self.handle)


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
    cs = Cusolver()
    print(f"# bench_cusolver_eigh on {device_name(device)}; cuSOLVER {cs.version} ({cs.path})")

    print("\n## Device workspace cuSOLVER asks for (H = N²·8 bytes)\n")
    print("| call | N | B | workspace |\n|---|---|---|---|")
    for n in (int(s) for s in args.workspace_sizes.split(",")):
        A = torch.empty(n, n, dtype=F64, device=device)
        for jobz, what in ((EIG_MODE_NOVECTOR, "Xsyevd, eigenvalues"), (EIG_MODE_VECTOR, "Xsyevd, vectors")):
            w = cs.workspace(A, jobz)
            print(f"| {what} | {n:,} | 1 | {w / 2**20:,.0f} MiB ({w / (n * n * 8):.2f}×H) |", flush=True)
        del A
    model, loss = problem(args.batched_n, device)
    n = model.n_params
    if cs.batched:
        A = torch.empty(args.checkpoints, n, n, dtype=F64, device=device)
        w = cs.workspace(A)
        print(f"| XsyevBatched, eigenvalues | {n:,} | {args.checkpoints} | {w / 2**20:,.0f} MiB "
              f"({w / (n * n * 8):.2f}×H, {w / A.numel() / 8:.2f}×H per matrix) |", flush=True)
        del A
    else:
        print(f"\ncusolverDnXsyevBatched is not in cuSOLVER {cs.version} (it needs 11.7.1, CUDA 12.6.2): "
              "the pass below times eigvalsh only")

    print(f"\n## A pass: {args.checkpoints} closed-form Hessians of N = {n:,} (eigenvalues only)\n")
    thetas = torch.stack([model.init(s) for s in range(args.checkpoints)]).to(device)
    H = hs.hessians(loss, thetas)
    cs.eigvalsh_(H[0].clone())  # warm: the first calls pay one-off costs
    if cs.batched:
        cs.eigvalsh_(H[:2].clone())
    torch.linalg.eigvalsh(H[:2])
    t_batched, p_batched, ref = peak_of(lambda: torch.linalg.eigvalsh(H), device)
    t_loop, _ = timed(lambda: [torch.linalg.eigvalsh(h) for h in H], device)
    h_bytes = n * n * 8
    print("| path | s | vs one by one | torch-allocated peak | max |Δλ| / max|λ| vs eigvalsh |")
    print("|---|---|---|---|---|")
    print(f"| eigvalsh one by one | {t_loop:.3f} | 1.0× | — | — |")
    print(f"| eigvalsh, one batched call (a pass today) | {t_batched:.3f} | {t_loop / t_batched:.1f}× | "
          f"{p_batched / h_bytes:.2f}×H ({p_batched / h_bytes / args.checkpoints:.2f}×H per matrix) | 0 |")
    if cs.batched:
        t_x, p_x, lam = peak_of(lambda: cs.eigvalsh_(H.clone()), device)
        print(f"| XsyevBatched on a copy | {t_x:.3f} | {t_loop / t_x:.1f}× | {p_x / h_bytes:.2f}×H "
              f"({p_x / h_bytes / args.checkpoints:.2f}×H per matrix) | {rel_diff(lam, ref):.1e} |", flush=True)
    del H, ref

    print("\n## One H: eigvalsh against Xsyevd (eigenvalues only) in H's own memory\n")
    print("| N | eigvalsh s | eigvalsh peak | Xsyevd in place s | Xsyevd peak | max |Δλ| / max|λ| |")
    print("|---|---|---|---|---|---|")
    for target in (int(s) for s in args.sizes.split(",")):
        model, loss = problem(target, device)
        n, h_bytes = model.n_params, model.n_params ** 2 * 8
        H = hs.hessian(loss, model.init(0).to(device))
        t_e, p_e, ref = peak_of(lambda: torch.linalg.eigvalsh(H), device)
        t_x, p_x, lam = peak_of(lambda: cs.eigvalsh_(H), device)  # H is destroyed
        print(f"| {n:,} | {t_e:.3f} | {p_e / h_bytes:.2f}×H | {t_x:.3f} | {p_x / h_bytes:.2f}×H | "
              f"{rel_diff(lam, ref):.1e} |", flush=True)
        del H, ref, lam
    cs.close()
    print("\n# peaks: torch.cuda.max_memory_allocated above the start (H itself excluded; cuSOLVER's own "
          "allocations, if any, are not seen)")


if __name__ == "__main__":
    main()
