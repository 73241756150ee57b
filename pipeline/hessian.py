"""Stage 7 — the exact Hessian and its eigenvalue counts: :func:`spectrum_at`, the project's public API.

The Hessian is built column block by column block from Hessian-vector products (forward-over-reverse,
``jvp`` of ``grad``) vmapped over a chunk of basis vectors, so the build is a few large batched kernels
rather than N autograd calls. Counting then uses either the full spectrum (``eigh``) or, for counts only,
the inertia of LDLᵀ factorisations (:mod:`pipeline.inertia`), which is several times cheaper.

No Ray, Hydra or files here: ``loss_fn`` is any function of a flat parameter vector.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from pipeline import inertia, spectrum

LossFn = Callable[[torch.Tensor], torch.Tensor]
# A loss given as a weighted sum of terms, e.g. per-data-batch losses weighted by n_b / n.
WeightedTerms = Sequence[tuple[float, LossFn]]

AUTO_EIGH_MAX_N = 4096  # `auto` takes the full spectrum up to this many parameters, counts only above
METHODS = ("auto", "eigh", "inertia")


def _terms(loss_fn: Union[LossFn, WeightedTerms]) -> list[tuple[float, LossFn]]:
    return [(1.0, loss_fn)] if callable(loss_fn) else [(float(w), f) for w, f in loss_fn]


def default_chunk_size(n_params: int, device: torch.device, elem_bytes: int = 8,
                       memory_budget_mb: float = 0.0, per_column_bytes: Optional[int] = None) -> int:
    """Columns per vmapped HVP call so that a chunk fits the memory budget.

    ``per_column_bytes``: memory one HVP needs (parameters, gradients, activations); when unknown it is
    taken as 16 parameter vectors. The budget defaults to a quarter of free device memory (CUDA) or
    256 MB (CPU, where bigger chunks stop paying off and memory is shared with other workers).
    """
    if memory_budget_mb <= 0:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_budget_mb = 0.25 * free / 2**20
        else:
            memory_budget_mb = 256.0
    per_col = per_column_bytes or 16 * n_params * elem_bytes
    return int(max(1, min(n_params, memory_budget_mb * 2**20 // per_col)))


def hessian(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor, *, chunk_size: int = 0,
            memory_budget_mb: float = 0.0) -> torch.Tensor:
    """The dense, symmetrised Hessian ``[N, N]`` of ``loss_fn`` at ``theta`` ``[N]``.

    Built on ``theta``'s device and dtype. ``loss_fn`` may be a list of ``(weight, fn)`` pairs whose
    weighted sum is the loss (e.g. per-batch losses weighted by batch size / n): their Hessians are
    accumulated, so data that does not fit one batch never has to be in memory at once.
    """
    if theta.dim() != 1:
        raise ValueError(f"theta must be a flat 1-D parameter vector, got shape {tuple(theta.shape)}")
    n = theta.numel()
    chunk = chunk_size or default_chunk_size(n, theta.device, theta.element_size(), memory_budget_mb)
    H = torch.zeros(n, n, dtype=theta.dtype, device=theta.device)
    for weight, fn in _terms(loss_fn):
        g = grad(fn)

        def hvp(v, g=g):
            return jvp(g, (theta,), (v,))[1]

        batched = vmap(hvp)
        for start in range(0, n, chunk):
            # Row block of H (= column block, H is symmetric), written in place: one N×N buffer in all.
            H[start:start + chunk].add_(batched(_basis(start, min(chunk, n - start), n, theta)), alpha=weight)
    _symmetrize_(H, chunk)
    return H


def hessians(loss_fn: Union[LossFn, WeightedTerms], thetas: torch.Tensor, *,
             chunk_size: int = 0, memory_budget_mb: float = 0.0) -> torch.Tensor:
    """Hessians ``[B, N, N]`` of one loss at many points ``thetas`` ``[B, N]`` (same architecture), built
    in one vmapped pass over the points: ``loss_fn`` must be vmappable in its parameter argument."""
    if thetas.dim() != 2:
        raise ValueError(f"thetas must be [B, N], got shape {tuple(thetas.shape)}")
    b, n = thetas.shape
    chunk = chunk_size or max(1, default_chunk_size(n, thetas.device, thetas.element_size(),
                                                    memory_budget_mb) // b)
    H = torch.zeros(b, n, n, dtype=thetas.dtype, device=thetas.device)
    for weight, fn in _terms(loss_fn):
        g = grad(fn)

        def block(theta, vs, g=g):
            return vmap(lambda v: jvp(g, (theta,), (v,))[1])(vs)

        over_points = vmap(block, in_dims=(0, None))
        for start in range(0, n, chunk):
            H[:, start:start + chunk].add_(over_points(thetas, _basis(start, min(chunk, n - start), n, thetas)),
                                           alpha=weight)
    for k in range(b):
        _symmetrize_(H[k], chunk)
    return H


def _basis(start: int, rows: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start .. start+rows-1`` of the identity ``[rows, n]`` (never the whole N×N identity)."""
    e = torch.zeros(rows, n, dtype=like.dtype, device=like.device)
    e[torch.arange(rows), torch.arange(start, start + rows)] = 1
    return e


def _symmetrize_(H: torch.Tensor, block: int) -> None:
    """H ← (H + Hᵀ)/2 in place, one block pair at a time, so no second N×N buffer is needed.
    Rounding makes the HVP build slightly asymmetric; eigh and LDLᵀ would read only one triangle."""
    n = H.shape[0]
    block = max(block, 256)
    for i in range(0, n, block):
        for j in range(0, i + 1, block):
            avg = 0.5 * (H[i:i + block, j:j + block] + H[j:j + block, i:i + block].T)
            H[i:i + block, j:j + block] = avg
            H[j:j + block, i:i + block] = avg.T


@dataclass
class SpectrumResult:
    """What :func:`spectrum_at` returns. Eigenvalues are ascending, ``[N]`` NumPy float64, or None when
    the counts came from ``inertia``. ``seconds`` splits the time into build / count."""

    n_params: int
    loss: float
    grad_norm: float
    n_pos: int
    n_neg: int
    n_zero: int
    n_pos_naive: int
    tol: float
    tol_method: str
    lam_min: Optional[float]
    lam_max: Optional[float]
    method: str
    dtype: str
    device: str
    eigenvalues: Optional[np.ndarray] = None
    seconds: dict = field(default_factory=dict)

    @property
    def counts(self) -> spectrum.Counts:
        return spectrum.Counts(self.n_pos, self.n_neg, self.n_zero, self.n_pos_naive)

    @property
    def label(self) -> str:
        return spectrum.label(self.counts)

    @property
    def min_ratio(self) -> float:
        return spectrum.ratios(self.counts)["min_ratio"]

    @property
    def min_ratio_naive(self) -> float:
        return spectrum.ratios(self.counts)["min_ratio_naive"]

    @property
    def min_ratio_curved(self) -> float:
        return spectrum.ratios(self.counts)["min_ratio_curved"]

    @property
    def index(self) -> float:
        return spectrum.ratios(self.counts)["index"]


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def resolve_method(method: str, n_params: int) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "auto":
        return "eigh" if n_params <= AUTO_EIGH_MAX_N else "inertia"
    return method


def count_dense(H: torch.Tensor, *, method: str = "eigh", tol: Optional[float] = None, rel_tol: float = 1e-6,
                tol_mode: str = "auto", gap_ratio: float = 1e4) -> tuple[spectrum.Summary, Optional[np.ndarray]]:
    """Counts for a symmetric matrix ``H`` ``[N, N]`` by ``eigh`` (full spectrum) or ``inertia``."""
    eps = _eps(H.dtype)
    if method == "eigh":
        lam = torch.linalg.eigvalsh(H).cpu().numpy().astype(np.float64)
        return spectrum.summarize(lam, tol=tol, rel_tol=rel_tol, gap_ratio=gap_ratio, eps=eps,
                                  tol_mode=tol_mode), lam
    if method != "inertia":
        raise ValueError(f"count_dense method must be eigh or inertia, got {method!r}")
    lam_lo, lam_hi = inertia.extreme_eigenvalues(H)
    if tol is None:
        if tol_mode == "gap":
            raise ValueError("tol_mode='gap' needs the full spectrum: use method='eigh' or a rel/abs tolerance")
        tol, how = rel_tol * max(abs(lam_lo), abs(lam_hi)), "rel"
    else:
        how = "given"
    c = inertia.counts(H, tol)
    return spectrum.Summary(c, float(tol), how, lam_lo, lam_hi), None


def spectrum_at(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor, *, method: str = "auto",
                tol: Optional[float] = None, rel_tol: float = 1e-6, tol_mode: str = "auto",
                gap_ratio: float = 1e4, dtype: Optional[torch.dtype] = torch.float64,
                device: Optional[Union[str, torch.device]] = None, chunk_size: int = 0,
                memory_budget_mb: float = 0.0) -> SpectrumResult:
    """Hessian spectrum summary of ``loss_fn`` at ``theta``.

    ``loss_fn`` maps a flat parameter tensor ``[N]`` to a scalar (or is a list of ``(weight, fn)``
    terms). ``theta`` ``[N]`` is the point. The Hessian is built in ``dtype`` (float64 by default; None
    keeps ``theta``'s) on ``device`` (default: ``theta``'s).

    ``method``: ``eigh`` (full spectrum), ``inertia`` (counts from LDLᵀ of H ∓ tol·I, no eigenvalues) or
    ``auto`` (``eigh`` up to N = 4,096, ``inertia`` above). ``tol``: |λ| ≤ tol counts as zero; when None
    it is chosen by ``tol_mode`` (``auto``: from a clear gap in |λ| near zero, else ``rel_tol · max|λ|``;
    see :func:`pipeline.spectrum.choose_tol`).
    """
    device = torch.device(device) if device is not None else theta.device
    theta = theta.detach().to(device=device, dtype=dtype or theta.dtype)
    method = resolve_method(method, theta.numel())
    t0 = time.perf_counter()
    H = hessian(loss_fn, theta, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb)
    _sync(device)
    t1 = time.perf_counter()
    summary, lam = count_dense(H, method=method, tol=tol, rel_tol=rel_tol, tol_mode=tol_mode,
                               gap_ratio=gap_ratio)
    _sync(device)
    del H
    return _result(loss_fn, theta, summary, lam, method, {"build": t1 - t0, "count": time.perf_counter() - t1})


def _result(loss_fn, theta: torch.Tensor, summary: spectrum.Summary, lam: Optional[np.ndarray], method: str,
            seconds: dict) -> SpectrumResult:
    terms = _terms(loss_fn)
    with torch.no_grad():
        value = sum(w * f(theta) for w, f in terms)
    g = sum(w * grad(f)(theta) for w, f in terms)
    c = summary.counts
    return SpectrumResult(
        n_params=theta.numel(), loss=float(value), grad_norm=float(torch.linalg.vector_norm(g)),
        n_pos=c.n_pos, n_neg=c.n_neg, n_zero=c.n_zero, n_pos_naive=c.n_pos_naive,
        tol=summary.tol, tol_method=summary.tol_method, lam_min=summary.lam_min, lam_max=summary.lam_max,
        method=method, dtype=str(theta.dtype).replace("torch.", ""), device=_device_name(theta.device),
        eigenvalues=lam, seconds=seconds)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def _budget_bytes(device: torch.device, memory_budget_mb: float) -> float:
    if memory_budget_mb > 0:
        return memory_budget_mb * 2**20
    if device.type == "cuda":
        return 0.5 * torch.cuda.mem_get_info(device)[0]
    import os
    try:
        return 0.25 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 2 * 2**30


def spectra_at_many(loss_for: Callable[[torch.device, torch.dtype], Union[LossFn, WeightedTerms]],
                    thetas: torch.Tensor, *, method: str = "auto", tol: Optional[float] = None,
                    rel_tol: float = 1e-6, tol_mode: str = "auto", gap_ratio: float = 1e4,
                    dtype: Union[str, torch.dtype] = torch.float64, device: Union[str, torch.device] = "cpu",
                    chunk_size: int = 0, memory_budget_mb: float = 0.0) -> tuple[list[SpectrumResult], Optional[str]]:
    """:func:`spectrum_at` for many points ``thetas`` ``[B, N]`` of one loss, as the pipeline runs it.

    ``loss_for(device, dtype)`` returns the (vmappable) loss on that device. Points are built together in
    vmapped passes as far as the memory budget allows (B·N² numbers per pass). When a device runs out of
    memory the work falls back — counts only (``inertia``), then smaller chunks, then the CPU — and the
    second value says what was done (None when nothing was needed).
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device)
    b, n = thetas.shape
    method = resolve_method(method, n)
    kw = dict(tol=tol, rel_tol=rel_tol, tol_mode=tol_mode, gap_ratio=gap_ratio)
    try:
        return _many(loss_for(device, dtype), thetas.to(device, dtype), method, chunk_size,
                     memory_budget_mb, kw), None
    except Exception as err:  # noqa: BLE001 — only out-of-memory falls through to the next try
        if not _is_oom(err):
            raise
    _empty_cache(device)
    cpu = torch.device("cpu")
    tries = [(device, "inertia", chunk_size, "counts only (inertia) after out of memory"),
             (device, "inertia", max(1, (chunk_size or 64) // 8), "counts only with 1/8 chunks after out of memory"),
             (cpu, method, chunk_size, f"moved to CPU after out of memory on {device}")]
    for dev, meth, chunk, what in tries:
        try:
            loss = loss_for(dev, dtype)
            return [spectrum_at(loss, t.to(dev, dtype), method=meth, dtype=dtype, chunk_size=chunk,
                                memory_budget_mb=memory_budget_mb, **kw) for t in thetas], what
        except Exception as err:  # noqa: BLE001
            if not _is_oom(err):
                raise
            _empty_cache(dev)
    raise MemoryError(f"Hessian of {n} parameters does not fit in memory on {device} or CPU")


def _many(loss, thetas, method, chunk_size, memory_budget_mb, kw) -> list[SpectrumResult]:
    b, n = thetas.shape
    device = thetas.device
    # Two B·N² buffers at a time (the Hessians and eigh's or LDLᵀ's copy) must fit the budget.
    per = max(1, int(_budget_bytes(device, memory_budget_mb) // (2 * n * n * thetas.element_size())))
    out = []
    for s in range(0, b, per):
        part = thetas[s:s + per]
        if len(part) == 1:
            out.append(spectrum_at(loss, part[0], method=method, dtype=None, chunk_size=chunk_size,
                                   memory_budget_mb=memory_budget_mb, **kw))
            continue
        t0 = time.perf_counter()
        H = hessians(loss, part, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb)
        _sync(device)
        t1 = time.perf_counter()
        if method == "eigh":
            lams = torch.linalg.eigvalsh(H).cpu().numpy().astype(np.float64)
            eps = _eps(H.dtype)
            sums = [(spectrum.summarize(lam, tol=kw["tol"], rel_tol=kw["rel_tol"], gap_ratio=kw["gap_ratio"],
                                        eps=eps, tol_mode=kw["tol_mode"]), lam) for lam in lams]
        else:
            sums = [count_dense(H[k], method=method, **kw) for k in range(len(part))]
        _sync(device)
        t2 = time.perf_counter()
        del H
        secs = {"build": (t1 - t0) / len(part), "count": (t2 - t1) / len(part)}
        out.extend(_result(loss, theta, summ, lam, method, dict(secs)) for theta, (summ, lam) in zip(part, sums))
    return out


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"
