"""cuSOLVER's symmetric eigensolvers through ctypes, for what torch's CUDA ``eigvalsh`` / ``eigh`` do not do.

torch loops cuSOLVER's ``syevd`` over a batch of matrices larger than 32 × 32, so a pass of B Hessians
costs B single calls. ``cusolverDnXsyevBatched`` (cuSOLVER ≥ 11.7.1, CUDA 12.6.2) does the batch in one
call, with the same eigenvalues to rounding (timings: docs/performance.md, ``scripts/bench_cusolver_eigh.py``).
:func:`syev_batched_` runs it in the matrices' own memory (they are destroyed, or hold the eigenvectors),
on torch's current stream, with its workspace from torch's allocator — in sub-batches that fit the free
memory (its workspace, which cuSOLVER sizes, is about 4×H per matrix). The library is the ``libcusolver``
torch itself loaded.

cuSOLVER's ``syevd`` (and the batched ``syevBatched``) asks for about 4×H of workspace, with or without
eigenvectors, so torch's ``eigvalsh``, which also copies H, needs about 6×H.
:func:`eigvalsh_inplace_` takes a matrix's eigenvalues in about 1×H instead: cuSOLVER's tridiagonal
reduction ``sytrd`` in the matrix's own memory (its workspace is a panel), then LAPACK's ``dsterf`` on
the host for the tridiagonal's eigenvalues (O(N²), sequential) — what LAPACK's ``dsyevd`` does for
eigenvalues alone, so as accurate, and slower than ``syevd``: for Hessians whose 6×H does not fit
(docs/performance.md has the memory and time measured).

``MINRATIO_BATCHED_EIGH=torch`` in the environment turns both paths off (torch's calls are used).
No Ray, Hydra or files here.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Optional

import numpy as np
import torch

# Enumerations from cusolver_common.h, cublas_api.h and library_types.h.
EIG_MODE_NOVECTOR, EIG_MODE_VECTOR = 0, 1
FILL_MODE_LOWER = 0
CUDA_TYPES = {torch.float64: 1, torch.float32: 0}  # CUDA_R_64F, CUDA_R_32F
V, I32, I64, SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t
_COMMON = [V, V, I32, I32, I64, I32, V, I64, I32, V, I32]  # handle, params, jobz, uplo, n, types, A, lda, W
_LOCK = threading.Lock()
_LIB: dict = {}  # "lib": the loaded library once tried (None if there is none)
_HANDLES = threading.local()  # per thread: {device index: (handle, params)}


def _library_path() -> Optional[str]:
    """The libcusolver torch loaded (it loads it on its first CUDA linear-algebra call), else the
    system's, else None."""
    torch.linalg.eigvalsh(torch.eye(40, dtype=torch.float64, device="cuda"))
    torch.cuda.synchronize()
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.split()[-1]
                if "/libcusolver.so" in path:
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("cusolver")


def library() -> Optional[ctypes.CDLL]:
    """The cuSOLVER library with its signatures declared, or None (no CUDA, no library, no
    ``cusolverDnXsyevBatched``). Loaded once per process."""
    with _LOCK:
        if "lib" not in _LIB:
            _LIB["lib"] = _load() if torch.cuda.is_available() else None
        return _LIB["lib"]


def _load() -> Optional[ctypes.CDLL]:
    path = _library_path()
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    if not hasattr(lib, "cusolverDnXsyevBatched"):
        return None
    sig = {"cusolverGetVersion": [ctypes.POINTER(I32)],
           "cusolverDnCreate": [ctypes.POINTER(V)], "cusolverDnSetStream": [V, V],
           "cusolverDnCreateParams": [ctypes.POINTER(V)], "cusolverDnDestroyParams": [V],
           "cusolverDnDestroy": [V],
           "cusolverDnXsyevd_bufferSize": _COMMON + [ctypes.POINTER(SZ), ctypes.POINTER(SZ)],
           "cusolverDnXsyevd": _COMMON + [V, SZ, V, SZ, V],
           "cusolverDnXsyevBatched_bufferSize": _COMMON + [ctypes.POINTER(SZ), ctypes.POINTER(SZ), I64],
           "cusolverDnXsyevBatched": _COMMON + [V, SZ, V, SZ, V, I64]}
    for t in "DS":  # the one-stage tridiagonal reduction, handle, uplo, n, A, lda, d, e, tau (legacy API)
        sig[f"cusolverDn{t}sytrd_bufferSize"] = [V, I32, I32, V, I32, V, V, V, ctypes.POINTER(I32)]
        sig[f"cusolverDn{t}sytrd"] = [V, I32, I32, V, I32, V, V, V, V, I32, V]
    for name, argtypes in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, I32
    lib.path = path
    return lib


def _required_library() -> ctypes.CDLL:
    """:func:`library`, or RuntimeError where there is none."""
    lib = library()
    if lib is None:
        raise RuntimeError("cuSOLVER with cusolverDnXsyevBatched is not available here")
    return lib


def _turned_off() -> bool:
    """``MINRATIO_BATCHED_EIGH=torch``: use torch's calls only."""
    return os.environ.get("MINRATIO_BATCHED_EIGH", "auto") == "torch"


def _room(device: torch.device, max_bytes: Optional[float]) -> float:
    """Bytes a call may take on ``device``: 90 % of what is free (torch's cached blocks count as free),
    and at most ``max_bytes`` when given."""
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
        - torch.cuda.memory_allocated(device)
    return min(0.9 * free, max_bytes if max_bytes is not None else free)


def version() -> int:
    """cuSOLVER's version number (e.g. 12004), of the library :func:`library` loaded."""
    lib = _required_library()
    out = I32()
    _ok(lib.cusolverGetVersion(ctypes.byref(out)), "cusolverGetVersion")
    return out.value


def enabled(H: torch.Tensor) -> bool:
    """Whether :func:`syev_batched_` takes ``H`` ``[B, N, N]``: CUDA, float32/64, a batch (B > 1) of
    matrices over 32 × 32 (torch's own batched Jacobi is fast below), the library present, and not
    turned off by ``MINRATIO_BATCHED_EIGH=torch``."""
    return (not _turned_off() and H.is_cuda and H.dim() == 3
            and H.shape[0] > 1 and H.shape[-1] > 32 and H.dtype in CUDA_TYPES and H.is_contiguous()
            and library() is not None)


ALLOC_FAILED = 2  # cusolverStatus_t CUSOLVER_STATUS_ALLOC_FAILED


def _ok(status: int, what: str) -> None:
    if status == ALLOC_FAILED:
        raise torch.OutOfMemoryError(f"{what}: cuSOLVER could not allocate memory")
    if status != 0:
        raise RuntimeError(f"{what} returned cusolverStatus_t {status}")


def _handle(lib: ctypes.CDLL, device: torch.device) -> tuple:
    """This thread's cuSOLVER handle and params for ``device``, bound to torch's current stream."""
    cache = getattr(_HANDLES, "by_device", None)
    if cache is None:
        cache = _HANDLES.by_device = {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in cache:
        with torch.cuda.device(index):
            handle, params = V(), V()
            _ok(lib.cusolverDnCreate(ctypes.byref(handle)), "cusolverDnCreate")
            _ok(lib.cusolverDnCreateParams(ctypes.byref(params)), "cusolverDnCreateParams")
        cache[index] = (handle, params)
    handle, params = cache[index]
    _ok(lib.cusolverDnSetStream(handle, V(torch.cuda.current_stream(index).cuda_stream)), "cusolverDnSetStream")
    return handle, params


def _head(handle, params, A: torch.Tensor, W: torch.Tensor, jobz: int) -> list:
    n, t = A.shape[-1], CUDA_TYPES[A.dtype]
    return [handle, params, jobz, FILL_MODE_LOWER, n, t, V(A.data_ptr()), n, t, V(W.data_ptr()), t]


def workspace_bytes(A: torch.Tensor, vectors: bool = False) -> int:
    """Device workspace cuSOLVER asks for: ``A`` ``[N, N]`` (``Xsyevd``) or ``[B, N, N]`` (batched)."""
    lib = _required_library()
    with torch.cuda.device(A.device):  # a handle works on the device it was made on: make it current
        handle, params = _handle(lib, A.device)
        return _buffer_sizes(lib, handle, params, A, vectors)[0]


def _buffer_sizes(lib, handle, params, A: torch.Tensor, vectors: bool) -> tuple[int, int]:
    """(device, host) workspace bytes for ``A`` on the current device."""
    W = torch.empty(A.shape[:-1], dtype=A.dtype, device=A.device)
    dev, host = SZ(), SZ()
    head = _head(handle, params, A, W, EIG_MODE_VECTOR if vectors else EIG_MODE_NOVECTOR)
    if A.dim() == 2:
        _ok(lib.cusolverDnXsyevd_bufferSize(*head, ctypes.byref(dev), ctypes.byref(host)), "Xsyevd_bufferSize")
    else:
        _ok(lib.cusolverDnXsyevBatched_bufferSize(*head, ctypes.byref(dev), ctypes.byref(host), A.shape[0]),
            "XsyevBatched_bufferSize")
    return dev.value, host.value


def syev_(A: torch.Tensor, vectors: bool = False) -> torch.Tensor:
    """Eigenvalues ``[..., N]``, ascending, of the symmetric ``A`` (``[N, N]`` by ``Xsyevd``, ``[B, N, N]``
    by ``XsyevBatched`` in one call), contiguous float32/64 on CUDA. ``A`` is overwritten: with
    ``vectors``, row ``j`` of each matrix becomes the unit eigenvector of eigenvalue ``j`` (cuSOLVER
    writes them as columns of the column-major matrix); otherwise its content is undefined.
    Raises RuntimeError when cuSOLVER reports an error or no convergence (``info`` ≠ 0)."""
    lib = _required_library()
    if not A.is_cuda or A.dtype not in CUDA_TYPES or not A.is_contiguous() or A.dim() not in (2, 3):
        raise ValueError(f"need a contiguous float32/64 CUDA [N, N] or [B, N, N], got {A.dtype} {tuple(A.shape)} "
                         f"on {A.device}")
    with torch.cuda.device(A.device):  # a handle works on the device it was made on: make it current
        return _syev(lib, A, vectors)


def _syev(lib, A: torch.Tensor, vectors: bool) -> torch.Tensor:
    handle, params = _handle(lib, A.device)
    batch = A.shape[0] if A.dim() == 3 else 1
    dev, host = _buffer_sizes(lib, handle, params, A, vectors)
    W = torch.empty(A.shape[:-1], dtype=A.dtype, device=A.device)
    info = torch.zeros(batch, dtype=torch.int32, device=A.device)
    work = torch.empty(max(dev, 1), dtype=torch.uint8, device=A.device)  # out of memory here: A untouched
    host_work = ctypes.create_string_buffer(max(host, 1))
    head = _head(handle, params, A, W, EIG_MODE_VECTOR if vectors else EIG_MODE_NOVECTOR)
    tail = [V(work.data_ptr()), dev, ctypes.cast(host_work, V), host, V(info.data_ptr())]
    if A.dim() == 3:
        _ok(lib.cusolverDnXsyevBatched(*head, *tail, batch), "cusolverDnXsyevBatched")
    else:
        _ok(lib.cusolverDnXsyevd(*head, *tail), "cusolverDnXsyevd")
    bad = info.nonzero().flatten().tolist()  # synchronises: host_work must outlive the call
    if bad:
        raise RuntimeError(f"cuSOLVER eigensolver failed for matrices {bad[:8]} of {batch} (info "
                           f"{info[bad[:8]].tolist()}: no convergence or a bad argument)")
    return W


def syev_batched_(A: torch.Tensor, vectors: bool = False, max_bytes: Optional[float] = None
                  ) -> Optional[torch.Tensor]:
    """:func:`syev_` over ``A`` ``[B, N, N]`` in sub-batches whose workspace (as cuSOLVER sizes it, about
    4×N² numbers per matrix) fits the free device memory and ``max_bytes`` (the caller's budget); None, with ``A``
    untouched, when not even one matrix's does or cuSOLVER cannot size it. When a later sub-batch runs
    out of memory, the rest go through torch one matrix at a time, leaving ``A`` as :func:`syev_` would."""
    try:
        per = max(1, workspace_bytes(A[:2], vectors) // 2)
    except (RuntimeError, torch.OutOfMemoryError):
        return None
    step = int(_room(A.device, max_bytes) // per)
    if step < 1:
        return None
    out = []
    for s in range(0, A.shape[0], step):
        part = A[s:s + step]
        try:
            out.append(syev_(part, vectors) if part.shape[0] > 1 else syev_(part[0], vectors)[None])
        except torch.OutOfMemoryError:
            if not s:
                return None  # nothing overwritten yet: the caller takes torch's path for all of A
            out.extend(_torch_syev_(M, vectors)[None] for M in A[s:])
            break
    return torch.cat(out)


def _torch_syev_(M: torch.Tensor, vectors: bool) -> torch.Tensor:
    """torch's eigensolver for one matrix, leaving ``M`` as :func:`syev_` does (rows: eigenvectors)."""
    if not vectors:
        return torch.linalg.eigvalsh(M)
    lam, V = torch.linalg.eigh(M)
    M.copy_(V.mT)
    return lam


def eigvalsh_needs_inplace(A: torch.Tensor, max_bytes: Optional[float] = None) -> bool:
    """Whether torch's ``eigvalsh`` of the CUDA ``A`` ``[N, N]`` — a copy of A and ``syevd``'s workspace —
    would not fit the free device memory or ``max_bytes``, while :func:`eigvalsh_inplace_` can take it."""
    if (_turned_off() or not A.is_cuda or A.dim() != 2
            or A.dtype not in CUDA_TYPES or not A.is_contiguous() or A.numel() >= 2**31 or library() is None):
        return False  # (library() last: it sets up CUDA)
    try:  # torch's copy of A and syevd's workspace, and what the in-place path takes instead
        need = A.numel() * A.element_size() + workspace_bytes(A)
        lean = sytrd_workspace_bytes(A)
    except (RuntimeError, torch.OutOfMemoryError):
        return False
    return need > _room(A.device, max_bytes) and lean < need


def eigvalsh_inplace_(A: torch.Tensor) -> torch.Tensor:
    """Eigenvalues ``[N]`` float64 on the CPU, ascending, of the symmetric contiguous float32/64 CUDA
    ``A`` ``[N, N]``, in ``A``'s own memory plus :func:`sytrd_workspace_bytes` (see the module docstring).
    ``A`` is overwritten (it holds the Householder vectors after). Raises RuntimeError when cuSOLVER
    reports an error or the tridiagonal QR does not converge, ValueError for a matrix it cannot take."""
    lib, n = _sytrd_library(A), A.shape[-1]
    with torch.cuda.device(A.device):
        handle, _ = _handle(lib, A.device)
        t, d, e, tau, lwork = _sytrd_buffers(lib, handle, A)
        work = torch.empty(max(lwork, 1), dtype=A.dtype, device=A.device)
        info = torch.zeros(1, dtype=torch.int32, device=A.device)
        _ok(getattr(lib, f"cusolverDn{t}sytrd")(handle, FILL_MODE_LOWER, n, *_sytrd_ptrs(A, d, e, tau),
                                               V(work.data_ptr()), lwork, V(info.data_ptr())), f"cusolverDn{t}sytrd")
        if int(info.item()):
            raise RuntimeError(f"cusolverDn{t}sytrd: bad argument {-int(info.item())}")
        diag = d[:n].cpu().numpy().astype(np.float64)
        off = e[:n - 1].cpu().numpy().astype(np.float64)
    if n == 1:  # scipy's dsterf wants a non-empty off-diagonal
        return torch.from_numpy(diag)
    from scipy.linalg import lapack  # scipy comes with scikit-learn; only this path needs it

    lam, status = lapack.dsterf(diag, off)
    if status:
        raise RuntimeError(f"dsterf: {status} off-diagonal elements did not converge")
    return torch.from_numpy(lam)


def sytrd_workspace_bytes(A: torch.Tensor) -> int:
    """Device memory :func:`eigvalsh_inplace_` takes beside ``A`` ``[N, N]``: cuSOLVER's ``sytrd`` workspace
    (a panel, as cuSOLVER sizes it: a small share of N² at large N, about N² at N ≈ 1,500) and the
    tridiagonal."""
    lib = _sytrd_library(A)
    with torch.cuda.device(A.device):
        handle, _ = _handle(lib, A.device)
        lwork = _sytrd_buffers(lib, handle, A)[-1]
    return (lwork + 3 * A.shape[-1]) * A.element_size()


def _sytrd_library(A: torch.Tensor) -> ctypes.CDLL:
    lib, n = _required_library(), A.shape[-1]
    if not A.is_cuda or A.dtype not in CUDA_TYPES or not A.is_contiguous() or A.shape != (n, n) \
            or n * n >= 2**31:
        raise ValueError(f"need a contiguous float32/64 CUDA [N, N] with N² < 2³¹ (the legacy API's int), got "
                         f"{A.dtype} {tuple(A.shape)} on {A.device}")
    return lib


def _sytrd_ptrs(A, d, e, tau) -> list:
    return [V(A.data_ptr()), A.shape[-1], V(d.data_ptr()), V(e.data_ptr()), V(tau.data_ptr())]


def _sytrd_buffers(lib, handle, A: torch.Tensor) -> tuple:
    """(type letter, d ``[N]``, e and tau ``[N-1]`` on A's device, workspace in numbers) for ``sytrd``."""
    n, t = A.shape[-1], "D" if A.dtype == torch.float64 else "S"
    d, e, tau = (torch.empty(max(k, 1), dtype=A.dtype, device=A.device) for k in (n, n - 1, n - 1))
    lwork = I32()
    _ok(getattr(lib, f"cusolverDn{t}sytrd_bufferSize")(handle, FILL_MODE_LOWER, n, *_sytrd_ptrs(A, d, e, tau),
                                                      ctypes.byref(lwork)), f"{t}sytrd_bufferSize")
    return t, d, e, tau, lwork.value
