"""Stage 7 — the exact Hessian and its eigenvalue counts: :func:`spectrum_at`, the project's public API.

For an MLP's mean loss the Hessian comes in closed form, block by block (``closed_form``,
:mod:`pipeline.mlp_hessian`, offered by the loss as ``loss_fn.closed_form``): about 2·n·N² flops in GEMMs,
10× faster than the HVP build on 2 CPU cores at N = 1,732 and 3,852 (0.05 s and 0.24 s), and the
default wherever the loss offers it.
Otherwise the Hessian is built a block of rows at a time from Hessian-vector products with basis
vectors, vmapped over the block, so the build is a few large batched kernels rather than N autograd
calls. Two HVP modes:

- ``rev`` (reverse-over-reverse, ``vjp`` of ``grad``): the forward and backward pass are taken once per
  block and only the second backward is batched. Faster on CPU (0.48 vs 0.69 ms per column, one core,
  MLP 16-32-32-4 tanh, 512 samples, N = 1,732) and the default everywhere.
- ``fwd`` (forward-over-reverse, ``jvp`` of ``grad``): same flops (8.1 MFLOP per column for that MLP),
  selectable with ``hvp="fwd"``; ``scripts/bench_hessian.py`` times both on the device at hand.

Counting then uses the full spectrum (``eigh``) or, for counts only, the inertia of LDLᵀ factorisations
(:mod:`pipeline.inertia`), which is several times cheaper. Peak memory is the Hessian, then for ``eigh``
one N×N copy made by the eigensolver (cuSOLVER's workspace on top) or for ``inertia`` a copy of H's lower
triangle (0.53×H; the factorisations run in H's own memory; on CUDA the blocked LDLᵀ needs no copy, and
the copy is only made where it falls back), and one block's build workspace
(:func:`default_chunk_size`) — never an N×N identity.

No Ray, Hydra or files here: ``loss_fn`` is any function of a flat parameter vector.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.func import grad, grad_and_value, jvp, vjp, vmap

from pipeline import cusolver, inertia, spectrum

LossFn = Callable[[torch.Tensor], torch.Tensor]
# A loss given as a weighted sum of terms, e.g. per-data-batch losses weighted by n_b / n.
WeightedTerms = Sequence[tuple[float, LossFn]]

# `auto` takes the full spectrum up to this many parameters, counts only (LDLᵀ) above: about where the
# spectrum stops costing no more than the counts. CPU (2 cores): eigh 0.18 s vs counts 0.17 s at N = 1,732,
# 1.25 s vs 0.97 s at 3,852. H100 with the blocked LDLᵀ (docs/bench/bench_hessian_h100.txt): eigh 0.025 s vs
# 0.080 s at 1,999, 0.25 s vs 0.16 s (0.22 s with the naive count) at 5,508, 5.3 s vs 0.69 s at 19,204.
AUTO_EIGH_MAX_N = {"cpu": 4096, "cuda": 4096}
METHODS = ("auto", "eigh", "inertia", "estimate")
HVP_MODES = ("auto", "rev", "fwd", "closed_form")
DEFAULT_HVP = {"cpu": "rev", "cuda": "rev"}
# Build workspace on CPU per thread count. One thread: blocks whose activations stay in cache are
# fastest — measured optima 32-64 columns at N = 172 (300 samples), 16-32 at N = 612 (1,000 samples),
# 8-16 at N = 1,732 (512 samples); 16 MiB gives 61, 8 and 8 columns, each within 3 % of the best.
# Two threads: bigger blocks amortise each op's fork/join — 32-128 columns best at N = 1,732, 8
# columns 40 % slower. So 16 MiB × threads², at most 256 MiB.
CPU_WORKSPACE_BYTES = 16 * 2**20
CPU_WORKSPACE_MAX_BYTES = 256 * 2**20
# Build several points in one vmapped pass only where it pays: on CUDA it turns B small launches into
# one; on CPU the build is compute-bound and the multi-point pass measured 10-20 % slower.
BATCH_POINTS_DEVICES = ("cuda",)
# Eigenvalue error of a Hessian built in float32, relative to max|λ|: measured ≤ 4e-8 on tanh / ReLU /
# softplus MLPs up to N = 1,732 (tests/test_hessian.py asserts ≤ 1e-6). A relative tolerance below
# the floor would count rounding noise, so float32 raises rel_tol to it; float64 leaves it alone.
REL_NOISE_FLOOR = {torch.float32: 1e-6}
# What counting holds, in units of one Hessian (N² numbers), as (per point of a pass, once per pass):
# inertia: H, and one point's saved lower triangle. eigh: H and the copy eigh takes (one batched call);
# with eigenvectors (vectors=True, one point at a time), H, and one point's eigenvectors and workspace —
# LAPACK dsyevd's 2N² + 6N + 1 numbers on CPU, cuSOLVER syevd's 4.0×H on CUDA (measured with and
# without eigenvectors, N = 1,483 to 29,124; docs/bench/bench_cusolver_eigh_h100.txt). These plan the fast
# path; a CUDA pass of one point whose eigvalsh does not fit takes its eigenvalues in about 1.1×H instead
# (cusolver.eigvalsh_inplace_, 1.4-1.6× slower; see _eigen).
FOOTPRINT = {("inertia", "cpu"): (1.0, inertia.SAVED_SHARE), ("inertia", "cuda"): (1.0, inertia.SAVED_SHARE),
             ("eigh", "cpu"): (2.0, 0.0), ("eigh", "cuda"): (2.0, 4.0),
             ("eigh_vectors", "cpu"): (1.0, 3.0), ("eigh_vectors", "cuda"): (1.0, 5.0)}
GAP_NEEDS_SPECTRUM = ("tol_mode='gap' needs the full spectrum or a dense Hessian: use method='eigh' or "
                      "'inertia', or a rel/abs tolerance")
HESSIAN_SHARE = 0.75  # of the stage's memory for Hessians and their counting; the rest is build workspace


def _terms(loss_fn: Union[LossFn, WeightedTerms]) -> list[tuple[float, LossFn]]:
    return [(1.0, loss_fn)] if callable(loss_fn) else [(float(w), f) for w, f in loss_fn]


def resolve_hvp(hvp: str, device: torch.device, loss_fn: Union[LossFn, WeightedTerms, None] = None) -> str:
    """How H is built: ``auto`` → ``closed_form`` when every term of ``loss_fn`` offers one, else the
    device's HVP mode (``rev``). Asking for ``closed_form`` where a term has none is a ValueError."""
    if hvp not in HVP_MODES:
        raise ValueError(f"unknown hvp mode {hvp!r}: expected one of {', '.join(HVP_MODES)}")
    offered = loss_fn is not None and all(_closed_form(f) is not None for _, f in _terms(loss_fn))
    if hvp == "closed_form" and not offered:
        raise ValueError("hvp='closed_form' needs a loss that offers one (an MLP's MeanLoss); "
                         "use 'rev' or 'fwd' for other models")
    if hvp == "auto":
        return "closed_form" if offered else DEFAULT_HVP.get(device.type, "rev")
    return hvp


def _closed_form(fn) -> Optional[Callable[..., torch.Tensor]]:
    """A loss term's closed-form Hessian builder (:attr:`pipeline.train.MeanLoss.closed_form`), or None."""
    return getattr(fn, "closed_form", None)


def activation_bytes(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor) -> int:
    """Bytes autograd saves for the backward pass of the largest term of ``loss_fn`` at ``theta``
    (one forward pass, measured with saved-tensor hooks): the memory one HVP column holds, up to a
    small factor."""
    most = 0
    for _, fn in _terms(loss_fn):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(theta.detach().requires_grad_(True))
        most = max(most, total)
    return most


def default_chunk_size(n_params: int, device: torch.device, *, column_bytes: int,
                       workspace_bytes: float = 0.0, n_points: int = 1) -> int:
    """Columns per point per vmapped HVP call: ``workspace_bytes`` / ``column_bytes`` shared by
    ``n_points`` points, in [1, N].

    ``column_bytes``: what one column needs while it is built (activations of its HVP and a few
    N-vectors). ``workspace_bytes`` 0 means the device default (:func:`default_workspace_bytes`).
    """
    workspace_bytes = workspace_bytes if workspace_bytes > 0 else default_workspace_bytes(device)
    return int(max(1, min(n_params, workspace_bytes // max(1, column_bytes) // n_points)))


def default_workspace_bytes(device: torch.device) -> float:
    """Build workspace when none is given: a quarter of free memory on CUDA (big blocks keep the GPU
    busy); on CPU 16 MiB × threads², at most 256 MiB (cache-sized blocks on one thread, bigger ones
    to keep several threads busy)."""
    if device.type == "cuda":
        return 0.25 * torch.cuda.mem_get_info(device)[0]
    return float(min(CPU_WORKSPACE_BYTES * torch.get_num_threads() ** 2, CPU_WORKSPACE_MAX_BYTES))


def _column_bytes(loss_fn, theta: torch.Tensor) -> int:
    # Three saved-activation sets per column (forward, backward, their tangents) and 8 N-vectors
    # (basis row, output row, gradient slices), measured to bound CUDA peaks within 20 %.
    return 3 * activation_bytes(loss_fn, theta) + 8 * theta.numel() * theta.element_size()


def _hvp_rows(fn: LossFn, theta: torch.Tensor, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping basis rows ``V`` ``[c, N]`` to ``V H`` ``[c, N]`` (rows of the Hessian)."""
    if mode == "rev":
        _, pull = vjp(grad(fn), theta)  # forward + backward once; only the second backward is batched
        return vmap(lambda v: pull(v)[0])
    g = grad(fn)
    return vmap(lambda v: jvp(g, (theta,), (v,))[1])


def _fill(H: torch.Tensor, rows_for: Callable[[torch.Tensor], torch.Tensor], weight: float, first: bool,
          chunk: int) -> None:
    """H[..., s:s+c, :] (+)= weight · rows_for(E) for basis blocks E = I[s:s+c], one reused buffer."""
    n = H.shape[-1]
    E = torch.zeros(min(chunk, n), n, dtype=H.dtype, device=H.device)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        idx = torch.arange(rows, device=H.device)
        E[idx, idx + start] = 1
        block = rows_for(E[:rows])
        target = H[..., start:start + rows, :]
        if first:
            target.copy_(block)
            if weight != 1.0:
                target.mul_(weight)
        else:
            target.add_(block, alpha=weight)
        E[idx, idx + start] = 0


def hessian(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor, *, chunk_size: int = 0,
            memory_budget_mb: float = 0.0, hvp: str = "auto", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense, symmetrised Hessian ``[N, N]`` of ``loss_fn`` at ``theta`` ``[N]``.

    Built on ``theta``'s device and dtype. ``loss_fn`` may be a list of ``(weight, fn)`` pairs whose
    weighted sum is the loss (e.g. per-batch losses weighted by batch size / n): their Hessians are
    accumulated, so data that does not fit one batch never has to be in memory at once.
    ``chunk_size``: columns per vmapped call (0: as many as ``memory_budget_mb`` MiB of build
    workspace hold — the Hessian itself comes on top — or the device default, see
    :func:`default_chunk_size`). ``hvp``: ``auto``, ``closed_form``, ``rev`` or ``fwd`` (see
    :func:`resolve_hvp`). ``out``: an
    ``[N, N]`` tensor to build into (e.g. a slice of a batch), else a new one. ``hvp='closed_form'``
    (what ``auto`` picks when every term offers it) ignores ``chunk_size``; its temporaries stay within
    the same workspace.
    """
    mode = resolve_hvp(hvp, theta.device, loss_fn)
    if theta.dim() != 1 and not (mode == "closed_form" and theta.dim() == 2):
        raise ValueError(f"theta must be a flat 1-D parameter vector, got shape {tuple(theta.shape)}")
    theta = theta.detach()
    n = theta.shape[-1]
    H = theta.new_empty(*theta.shape[:-1], n, n) if out is None else out
    if H.shape != (*theta.shape[:-1], n, n):
        raise ValueError(f"out must be {[*theta.shape[:-1], n, n]}, got {tuple(H.shape)}")
    if mode == "closed_form":  # also takes B points [B, N] at once (see hessians)
        workspace = memory_budget_mb * 2**20 or default_workspace_bytes(theta.device)
        for i, (weight, fn) in enumerate(_terms(loss_fn)):
            _closed_form(fn)(theta, out=H, weight=weight, accumulate=i > 0, workspace_bytes=workspace)
        return H
    chunk = chunk_size or default_chunk_size(n, theta.device, column_bytes=_column_bytes(loss_fn, theta),
                                             workspace_bytes=memory_budget_mb * 2**20)
    for i, (weight, fn) in enumerate(_terms(loss_fn)):
        _fill(H, _hvp_rows(fn, theta, mode), weight, i == 0, chunk)
    symmetrize_(H)
    return H


def hessians(loss_fn: Union[LossFn, WeightedTerms], thetas: torch.Tensor, *, chunk_size: int = 0,
             memory_budget_mb: float = 0.0, hvp: str = "auto") -> torch.Tensor:
    """Hessians ``[B, N, N]`` of one loss at many points ``thetas`` ``[B, N]`` (same architecture), built
    in one vmapped pass over the points: ``loss_fn`` must be vmappable in its parameter argument.
    ``chunk_size`` counts columns per point; the default divides the workspace among the B points.
    A closed-form build (see :func:`hessian`) takes the B points in batched GEMMs instead."""
    if thetas.dim() != 2:
        raise ValueError(f"thetas must be [B, N], got shape {tuple(thetas.shape)}")
    thetas = thetas.detach()
    b, n = thetas.shape
    mode = resolve_hvp(hvp, thetas.device, loss_fn)
    if mode == "closed_form":
        return hessian(loss_fn, thetas, memory_budget_mb=memory_budget_mb, hvp=mode)
    chunk = chunk_size or default_chunk_size(n, thetas.device, column_bytes=_column_bytes(loss_fn, thetas[0]),
                                             workspace_bytes=memory_budget_mb * 2**20, n_points=b)
    H = torch.empty(b, n, n, dtype=thetas.dtype, device=thetas.device)
    for i, (weight, fn) in enumerate(_terms(loss_fn)):
        over_points = vmap(lambda th, V, fn=fn: _hvp_rows(fn, th, mode)(V), in_dims=(0, None))
        _fill(H, lambda V: over_points(thetas, V), weight, i == 0, chunk)
    symmetrize_(H)
    return H


def symmetrize_(H: torch.Tensor) -> torch.Tensor:
    """H ← (H + Hᵀ)/2 in place for ``[..., N, N]``, one block pair at a time, so the temporaries are
    2 blocks of (N/8)² rather than a second N×N matrix. Rounding makes the HVP build slightly
    asymmetric (~1e-16 relative); eigh and LDLᵀ would otherwise read only one triangle."""
    n = H.shape[-1]
    block = max(512, -(-n // 8))
    for i in range(0, n, block):
        for j in range(0, i + 1, block):
            lower, upper = H[..., i:i + block, j:j + block], H[..., j:j + block, i:i + block]
            avg = (lower + upper.transpose(-1, -2)).mul_(0.5)
            lower.copy_(avg)
            upper.copy_(avg.transpose(-1, -2))
    return H


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
    n_pos_naive: Optional[int]  # None when inertia skipped that factorisation (naive=False) or estimated
    tol: float
    tol_method: str
    lam_min: Optional[float]
    lam_max: Optional[float]
    method: str
    dtype: str
    device: str
    eigenvalues: Optional[np.ndarray] = None
    seconds: dict = field(default_factory=dict)
    # method="estimate" only: intervals (lo, hi) of the counts, the resolution δ and the settings
    # (pipeline.estimate.CountEstimate); the counts above are then the rounded point estimates.
    estimate: Optional[dict] = None
    # eigh with vectors=True only, [N] float64 NumPy: the gradient's coordinates in the eigenbasis (Vᵀg, in
    # the eigenvalues' order) and the eigenvector of λmin — what pipeline.critical.report_from_eigen needs.
    grad_coeffs: Optional[np.ndarray] = None
    v_min: Optional[np.ndarray] = None

    @property
    def counts(self) -> spectrum.Counts:
        return spectrum.Counts(self.n_pos, self.n_neg, self.n_zero, self.n_pos_naive)

    @property
    def label(self) -> str:
        if self.estimate is not None:
            e = self.estimate
            return spectrum.label_from_intervals(e["n_pos_ci"], e["n_neg_ci"], e["n_zero_ci"])
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


def resolve_method(method: str, n_params: int, device: Union[str, torch.device] = "cpu",
                   itemsize: int = 8, memory_budget_mb: float = 0.0, vectors: bool = False) -> str:
    """``auto`` → ``eigh`` up to :data:`AUTO_EIGH_MAX_N` parameters on that device type, ``inertia`` above
    or where eigh's footprint does not fit, and ``estimate`` (no dense H) where neither does
    (one point's :func:`footprint`: on CPU 2·N²·itemsize bytes for eigh, 4·N²·itemsize with ``vectors``,
    1.53·N²·itemsize for inertia; on CUDA 6·N²·itemsize for eigh — against the :data:`HESSIAN_SHARE` of
    the memory the stage may hold, :func:`total_budget_bytes`, that a pass gives its Hessians — the rest
    is the build's workspace)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "auto":
        device = torch.device(device)
        limit = AUTO_EIGH_MAX_N.get(device.type, AUTO_EIGH_MAX_N["cpu"])
        room = HESSIAN_SHARE * total_budget_bytes(device, memory_budget_mb)
        for dense in (("eigh", "inertia") if n_params <= limit else ("inertia",)):
            if footprint(dense, device, vectors) * n_params * n_params * itemsize <= room:
                return dense
        return "estimate"
    return method


def _footprint(method: str, device: Union[str, torch.device], vectors: bool) -> tuple[float, float]:
    """:data:`FOOTPRINT` of ``method`` (``eigh`` with ``vectors``: ``eigh_vectors``) on that device type."""
    key = "eigh_vectors" if method == "eigh" and vectors else method
    return FOOTPRINT[(key, "cuda" if torch.device(device).type == "cuda" else "cpu")]


def footprint(method: str, device: Union[str, torch.device] = "cpu", vectors: bool = False) -> float:
    """What counting one point holds, in units of its Hessian (H included)."""
    return sum(_footprint(method, device, vectors))


def effective_rel_tol(rel_tol: float, dtype: torch.dtype) -> float:
    """``rel_tol`` raised to the relative noise floor of Hessians built in ``dtype`` (float32: 1e-6)."""
    return max(rel_tol, REL_NOISE_FLOOR.get(dtype, 0.0))


def count_dense(H: torch.Tensor, *, method: str = "eigh", tol: Optional[float] = None, rel_tol: float = 1e-6,
                tol_mode: str = "auto", gap_ratio: float = 1e4,
                extremes: Optional[tuple[float, float]] = None,
                naive: bool = True) -> tuple[spectrum.Summary, Optional[np.ndarray]]:
    """Counts for a symmetric matrix ``H`` ``[N, N]`` by ``eigh`` (full spectrum) or ``inertia``.

    ``inertia`` knows no spectrum, so its tolerance is ``tol`` or ``rel_tol`` · max|λ| (``extremes``
    (λmin, λmax) if given, else from Lanczos); ``tol_mode='gap'`` needs ``eigh``. ``naive=False`` skips
    inertia's third factorisation (#{λ > 0}; ``n_pos_naive`` is then None). Returns the summary and the
    ascending eigenvalues (None for ``inertia``). A CUDA ``H`` whose ``eigh`` would not fit the free
    memory is overwritten (see :func:`_eigen`).
    """
    rel_tol = effective_rel_tol(rel_tol, H.dtype)
    if method == "eigh":
        lam = _eigen(H[None], None)[0][0]
        return _summarize(lam, H.dtype, tol, rel_tol, tol_mode, gap_ratio), lam
    if method != "inertia":
        raise ValueError(f"count_dense method must be eigh or inertia, got {method!r}")
    lam_lo, lam_hi = extremes or inertia.extreme_eigenvalues(H)
    tol, how = _inertia_tol((lam_lo, lam_hi), tol, rel_tol, tol_mode, H, gap_ratio)
    c = inertia.counts(H, tol, naive=naive)
    return spectrum.Summary(c, tol, how, lam_lo, lam_hi), None


def _inertia_tol(extremes: tuple[float, float], tol: Optional[float], rel_tol: float, tol_mode: str,
                 H: Optional[torch.Tensor] = None, gap_ratio: float = 1e4) -> tuple[float, str]:
    """The tolerance of an ``inertia`` count and how it was set: ``tol`` if given; with ``tol_mode='gap'``
    the spectrum's gap found from zero counts of ``H`` ``[N, N]`` at log-spaced shifts
    (:func:`pipeline.spectrum.gap_from_zero_counts`, two LDLᵀ per shift, about 2 shifts per decade from
    rounding level to ``rel_tol·gap_ratio``), so that eigh and inertia follow one rule; else (or with no
    gap) ``rel_tol`` · max|λ| from the Lanczos ``extremes`` (λmin, λmax)."""
    if tol is not None:
        return float(tol), "given"
    top = max(abs(extremes[0]), abs(extremes[1]))
    if tol_mode == "gap" and H is not None:
        n = H.shape[-1]
        eps = float(torch.finfo(H.dtype).eps)
        shifts = spectrum.gap_shifts(top, n, rel_tol, gap_ratio, eps)
        zeros = [inertia.counts(H, float(t), naive=False).n_zero for t in shifts]
        gap = spectrum.gap_from_zero_counts(shifts, np.array(zeros), top=top, n=n, rel_tol=rel_tol,
                                            gap_ratio=gap_ratio, eps=eps)
        if gap is not None:
            return gap, "gap"
    elif tol_mode == "gap":
        raise ValueError(GAP_NEEDS_SPECTRUM)
    return rel_tol * top, "rel"


def _summarize(lam: np.ndarray, dtype: torch.dtype, tol, rel_tol, tol_mode, gap_ratio) -> spectrum.Summary:
    return spectrum.summarize(lam, tol=tol, rel_tol=rel_tol, gap_ratio=gap_ratio,
                              eps=float(torch.finfo(dtype).eps), tol_mode=tol_mode)


def spectrum_at(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor, *, method: str = "auto",
                tol: Optional[float] = None, rel_tol: float = 1e-6, tol_mode: str = "auto",
                gap_ratio: float = 1e4, dtype: Optional[torch.dtype] = torch.float64,
                device: Optional[Union[str, torch.device]] = None, chunk_size: int = 0,
                memory_budget_mb: float = 0.0, hvp: str = "auto",
                estimate: Optional[dict] = None, naive: bool = True,
                matvec: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                vectors: bool = False) -> SpectrumResult:
    """Hessian spectrum summary of ``loss_fn`` at ``theta``.

    ``loss_fn`` maps a flat parameter tensor ``[N]`` to a scalar (or is a list of ``(weight, fn)``
    terms). ``theta`` ``[N]`` is the point. The Hessian is built in ``dtype`` (float64 by default; None
    keeps ``theta``'s) on ``device`` (default: ``theta``'s).

    ``method``: ``eigh`` (full spectrum), ``inertia`` (counts from LDLᵀ of H ∓ tol·I, no eigenvalues) or
    ``auto`` (``eigh`` up to N = 4,096, ``inertia`` above). ``tol``: |λ| ≤ tol counts as zero; when None
    it is chosen by ``tol_mode`` (``auto``: from a clear gap in |λ| near zero, else ``rel_tol · max|λ|``,
    see :func:`pipeline.spectrum.choose_tol` — with ``inertia`` always the latter; ``gap``: the gap rule for
    ``eigh`` and ``inertia`` alike, inertia finding the gap from zero counts at log-spaced shifts, so one
    rule holds across sizes; ``result.tol_method`` records which rule set each point's tolerance); in
    float32 ``rel_tol`` is at least 1e-6, its noise floor.
    ``chunk_size`` / ``memory_budget_mb`` (build workspace; the Hessian and what counting holds,
    :func:`footprint`, come on top) / ``hvp``: see :func:`hessian`. ``naive=False``: ``inertia`` skips the
    factorisation behind the naive #{λ > 0} (two LDLᵀ instead of three; ``n_pos_naive`` is None).
    ``vectors=True`` (``eigh`` only): one eigh with eigenvectors instead of eigvalsh, keeping the
    gradient's coordinates in the eigenbasis (``result.grad_coeffs``) and the eigenvector of λmin
    (``result.v_min``), both ``[N]`` — what :func:`pipeline.critical.report_from_eigen` needs; it
    costs about 4× eigvalsh on CPU and holds 4×H there, 6×H on CUDA (:func:`footprint`).

    ``method="estimate"`` never forms H: counts come from Hessian-vector products only
    (:func:`pipeline.estimate.estimate_counts`, options in ``estimate``, e.g. ``{"n_probes": 30,
    "degree": 0}``), each with an interval in ``result.estimate``; the label is ``uncertain`` when the
    intervals allow two labels; a tolerance finer than the estimator's resolution raises ValueError.
    It needs a relative or given tolerance (``tol_mode="gap"`` needs a dense Hessian). ``matvec``
    (``V [N, k] -> H V``, e.g. data-parallel from :func:`pipeline.shards.sharded_hvp`) replaces the
    in-process HVPs of ``loss_fn``, which then only gives the loss and gradient.
    """
    device = torch.device(device) if device is not None else theta.device
    theta = theta.detach().to(device=device, dtype=dtype or theta.dtype)
    _check_finite(theta[None], "parameters")
    _check_tol_mode(tol, tol_mode)
    method = resolve_method(method, theta.numel(), theta.device, theta.element_size(), vectors=vectors)
    if method == "estimate":
        return _estimated(loss_fn, theta, tol=tol, rel_tol=rel_tol, tol_mode=tol_mode, matvec=matvec,
                          **(estimate or {}))
    # the eigenbasis needs the gradient; taken before the clock starts, as a pass takes it
    value, g = _value_and_gradient(loss_fn, theta) if method == "eigh" and vectors else (None, None)
    t0 = time.perf_counter()
    H = hessian(loss_fn, theta, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb, hvp=hvp)
    _check_finite(H[None], "Hessian")
    _sync(device)
    t1 = time.perf_counter()
    eigen = {}
    if g is not None:
        lams, coeffs, v_mins = _eigen(H[None], g[None])
        del H
        lam = lams[0]
        summary = _summarize(lam, theta.dtype, tol, effective_rel_tol(rel_tol, theta.dtype), tol_mode, gap_ratio)
        eigen = {"value": value, "g": g, "grad_coeffs": coeffs[0], "v_min": v_mins[0]}
    else:
        summary, lam = count_dense(H, method=method, tol=tol, rel_tol=rel_tol, tol_mode=tol_mode,
                                   gap_ratio=gap_ratio, naive=naive)
        del H
    _sync(device)
    return _result(loss_fn, theta, summary, lam, method, {"build": t1 - t0, "count": time.perf_counter() - t1},
                   **eigen)


def _value_and_gradient(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor
                        ) -> tuple[float, torch.Tensor]:
    """The (weighted) loss at ``theta`` ``[N]`` and its gradient ``[N]``, one forward and backward per term."""
    value, g = 0.0, 0.0
    for w, f in _terms(loss_fn):
        g_f, v_f = grad_and_value(f)(theta)
        value, g = value + w * float(v_f), g + w * g_f
    return value, g


def _values_and_gradients(loss_fn: Union[LossFn, WeightedTerms], thetas: torch.Tensor, batched: bool,
                          workspace_bytes: float = 0.0) -> tuple[list[float], torch.Tensor]:
    """The (weighted) loss at each point of ``thetas`` ``[B, N]`` (floats) and its gradient ``[B, N]``:
    when ``batched``, in vmapped calls over as many points as one backward pass each fits
    ``workspace_bytes`` (0: the device default; the loss must be vmappable), else one by one."""
    if batched:
        budget = workspace_bytes or default_workspace_bytes(thetas.device)
        step = max(1, int(budget // _column_bytes(loss_fn, thetas[0])))
        values, G = [], []
        for s in range(0, thetas.shape[0], step):
            g_sum, v_sum = 0.0, 0.0
            for w, f in _terms(loss_fn):
                g, v = vmap(grad_and_value(f))(thetas[s:s + step])
                g_sum, v_sum = g_sum + w * g, v_sum + w * v
            G.append(g_sum)
            values.extend(v_sum.tolist())
        return values, torch.cat(G)
    pairs = [_value_and_gradient(loss_fn, theta) for theta in thetas]
    return [v for v, _ in pairs], torch.stack([g for _, g in pairs])


def _eigen(H: torch.Tensor, G: Optional[torch.Tensor], max_bytes: Optional[float] = None
           ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Eigenvalues of each ``H`` ``[B, N, N]``, ascending, ``[B, N]`` float64 NumPy — one batched eigvalsh.
    With the points' gradients ``G`` ``[B, N]``, an eigh with eigenvectors instead, one point at a time
    (so a pass holds its Hessians and one point's V and workspace, :data:`FOOTPRINT`),
    and also each gradient's coordinates in its eigenbasis, Vᵀg, and the eigenvector of λmin, both
    ``[B, N]`` float64 NumPy (None without ``G``). A CUDA batch goes to cuSOLVER's batched solver
    (:mod:`pipeline.cusolver`) in H's own memory, which H does not survive, with at most ``max_bytes`` of
    workspace at a time; so does one CUDA matrix's eigvalsh (tridiagonal reduction in place) when
    torch's copy and workspace (5×H) would not fit the free memory or ``max_bytes``; elsewhere H is
    left as it is."""
    if cusolver.enabled(H):  # a CUDA batch in one cuSOLVER call, in H's own memory (H is spent after)
        lam = cusolver.syev_batched_(H, vectors=G is not None, max_bytes=max_bytes)
        if lam is not None:
            if G is None:
                return lam.cpu().numpy().astype(np.float64), None, None
            # H's rows are now the eigenvectors
            return tuple(x.cpu().numpy().astype(np.float64) for x in (lam, (H @ G[..., None])[..., 0], H[:, 0]))
    if G is None and H.shape[0] == 1 and cusolver.eigvalsh_needs_inplace(H[0], max_bytes):
        return cusolver.eigvalsh_inplace_(H[0])[None].numpy(), None, None  # 1×H, where 6×H does not fit
    if G is None:
        return torch.linalg.eigvalsh(H).cpu().numpy().astype(np.float64), None, None
    lams, coeffs, v_mins = [], [], []
    for Hk, g in zip(H, G):
        lam, V = torch.linalg.eigh(Hk)
        lams.append(lam)
        coeffs.append(V.mT @ g)
        v_mins.append(V[:, 0].clone())
        del V
    return tuple(torch.stack(x).cpu().numpy().astype(np.float64) for x in (lams, coeffs, v_mins))


def _estimated(loss_fn, theta: torch.Tensor, *, tol, rel_tol, tol_mode, matvec=None, **options) -> SpectrumResult:
    from pipeline import estimate

    if tol is None and tol_mode == "gap":
        raise ValueError(GAP_NEEDS_SPECTRUM)
    t0 = time.perf_counter()
    est = estimate.estimate_counts(matvec or estimate.hvp_matvec(loss_fn, theta), theta.numel(), tol=tol,
                                   rel_tol=None if tol is not None else rel_tol, dtype=theta.dtype,
                                   device=theta.device, **options)
    n_pos, n_neg = int(round(est.n_pos)), int(round(est.n_neg))
    summary = spectrum.Summary(spectrum.Counts(n_pos, n_neg, theta.numel() - n_pos - n_neg, None),
                               float(est.tol), "given" if tol is not None else "rel", est.lam_min, est.lam_max)
    res = _result(loss_fn, theta, summary, None, "estimate", {"build": 0.0, "count": time.perf_counter() - t0})
    res.estimate = {"n_pos_ci": est.n_pos_ci, "n_neg_ci": est.n_neg_ci, "n_zero_ci": est.n_zero_ci,
                    "min_ratio_ci": est.min_ratio_ci, "resolution": est.resolution, "degree": est.degree,
                    "n_probes": est.n_probes, "confidence": est.confidence,
                    "lam_min_residual": est.lam_min_residual, "lam_max_residual": est.lam_max_residual}
    return res


def _result(loss_fn, theta: torch.Tensor, summary: spectrum.Summary, lam: Optional[np.ndarray], method: str,
            seconds: dict, g: Optional[torch.Tensor] = None, grad_coeffs: Optional[np.ndarray] = None,
            v_min: Optional[np.ndarray] = None, value: Optional[float] = None) -> SpectrumResult:
    """The result at ``theta``: the loss and gradient norm (``value`` and ``g`` when already taken) with
    the counts."""
    if value is None or g is None:
        value, g = _value_and_gradient(loss_fn, theta)
    if not math.isfinite(value):
        raise ValueError(f"the loss is {value} at this point: no spectrum of a non-finite loss")
    c = summary.counts
    return SpectrumResult(
        n_params=theta.numel(), loss=value, grad_norm=float(torch.linalg.vector_norm(g)),
        n_pos=c.n_pos, n_neg=c.n_neg, n_zero=c.n_zero, n_pos_naive=c.n_pos_naive,
        tol=summary.tol, tol_method=summary.tol_method, lam_min=summary.lam_min, lam_max=summary.lam_max,
        method=method, dtype=str(theta.dtype).replace("torch.", ""), device=_device_name(theta.device),
        eigenvalues=lam, seconds=seconds, grad_coeffs=grad_coeffs, v_min=v_min)


def _check_tol_mode(tol: Optional[float], tol_mode: str) -> None:
    """The same refusal from every method: an unknown mode, or ``abs`` without the ``tol`` it needs."""
    if tol_mode not in spectrum.TOL_MODES:
        raise ValueError(f"unknown tol_mode {tol_mode!r}: expected one of {', '.join(spectrum.TOL_MODES)}")
    if tol_mode == "abs" and tol is None:
        raise ValueError("tol_mode='abs' needs tol (the absolute tolerance)")


def _check_finite(X: torch.Tensor, what: str, first: int = 0, of: int = 0) -> None:
    """Raise ValueError naming the points of ``X`` ``[B, ...]`` (parameters or Hessians; numbered from
    ``first`` among ``of`` points, default B) that hold a NaN or inf — before an eigensolver fails on them
    with a convergence error or a factorisation counts garbage. One min/max pass, no copy of X."""
    if X.numel() == 0:
        return
    lo, hi = torch.aminmax(X.reshape(X.shape[0], -1), dim=1)  # NaN propagates into both
    bad = (~(torch.isfinite(lo) & torch.isfinite(hi))).nonzero().flatten().tolist()
    if bad:
        where = f" of point(s) {[first + k for k in bad]}" if max(of, X.shape[0]) > 1 else ""
        raise ValueError(f"NaN or inf in the {what}{where}")


def is_oom(err: BaseException) -> bool:
    """Out of memory on a GPU (torch.OutOfMemoryError) or on the CPU, where torch's allocator raises a
    plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    text = str(err).lower()
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text or "cannot allocate memory" in text


def total_budget_bytes(device: torch.device, memory_budget_mb: float = 0.0) -> float:
    """The memory the Hessian stage may hold on ``device``: ``memory_budget_mb`` MiB when given, else
    80 % of free CUDA memory, or a quarter of the available RAM on CPU (shared with other workers)."""
    if memory_budget_mb > 0:
        return memory_budget_mb * 2**20
    if device.type == "cuda":
        return 0.8 * torch.cuda.mem_get_info(device)[0]
    try:
        return 0.25 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 2 * 2**30


def points_per_pass(n_params: int, itemsize: int, device: torch.device, memory_budget_mb: float = 0.0,
                    method: str = "eigh", vectors: bool = False) -> int:
    """How many Hessians one pass may hold in three quarters of the budget (the last quarter is build
    workspace, :func:`pass_workspace_mb`), each point taking its share of :data:`FOOTPRINT` and the
    pass what is held once (``eigh`` takes the pass's spectra in one batched call, so each point
    needs 2 × its N² numbers; ``inertia`` and eigh with ``vectors`` count one point at a time, so the
    pass needs N² numbers per point and what one point's counting adds)."""
    h = n_params * n_params * itemsize
    room = HESSIAN_SHARE * total_budget_bytes(device, memory_budget_mb)
    per, once = _footprint(method, device, vectors)
    return max(1, int((room - once * h) // (per * h)))


def pass_workspace_mb(device: torch.device, memory_budget_mb: float = 0.0) -> float:
    """Build workspace of a pass, MiB: a quarter of the budget, and no more than the device default."""
    quarter = (1 - HESSIAN_SHARE) * total_budget_bytes(device, memory_budget_mb)
    return min(quarter, default_workspace_bytes(device)) / 2**20


def spectra_at_many(loss_for: Callable[[torch.device, torch.dtype], Union[LossFn, WeightedTerms]],
                    thetas: torch.Tensor, *, method: str = "auto", tol: Optional[float] = None,
                    rel_tol: float = 1e-6, tol_mode: str = "auto", gap_ratio: float = 1e4,
                    dtype: Union[str, torch.dtype] = torch.float64, device: Union[str, torch.device] = "cpu",
                    chunk_size: int = 0, memory_budget_mb: float = 0.0, hvp: str = "auto",
                    batch_points: Optional[bool] = None, estimate: Optional[dict] = None,
                    naive: bool = True, matvec_at: Optional[Callable] = None, vectors: bool = False,
                    ) -> tuple[list[SpectrumResult], Optional[str]]:
    """:func:`spectrum_at` for many points ``thetas`` ``[B, N]`` of one loss, as the pipeline runs it.

    ``loss_for(device, dtype)`` returns the (vmappable) loss on that device. ``memory_budget_mb`` is
    the whole stage's memory here (0: a share of the device's, see :func:`total_budget_bytes`): points
    go in passes of as many as it holds (see :func:`points_per_pass`, :func:`pass_workspace_mb`); a
    pass builds its Hessians in one vmapped call over the points when ``batch_points`` (default: on
    CUDA only, where it pays) and takes their spectra in one batched call. When a device runs out of
    memory the work falls back — one point at a time, then one point with 1/16 of the workspace, then
    the CPU — and the second value says what was done (None when nothing was needed). Each result's
    ``seconds`` is its share of its pass. The device's cached memory is released on return.
    ``matvec_at(theta)`` (``estimate`` only) gives each point's Hessian operator, e.g. data-parallel.
    ``vectors``: see :func:`spectrum_at` (the pass then takes its eigh one point at a time).
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device)
    if thetas.dim() != 2:
        raise ValueError(f"thetas must be [B, N], got shape {tuple(thetas.shape)}")
    _check_finite(thetas.detach(), "parameters")
    _check_tol_mode(tol, tol_mode)
    method = resolve_method(method, thetas.shape[1], device, dtype.itemsize, memory_budget_mb, vectors)
    kw = dict(tol=tol, rel_tol=rel_tol, tol_mode=tol_mode, gap_ratio=gap_ratio, naive=naive, vectors=vectors)
    if method == "estimate":  # no dense Hessian, so nothing to batch and no memory fallback needed
        loss = loss_for(device, dtype)
        return [spectrum_at(loss, t.to(device, dtype), method="estimate", estimate=estimate, dtype=dtype,
                            device=device, matvec=matvec_at(t.to(device, dtype)) if matvec_at else None, **kw)
                for t in thetas], None
    batch_points = device.type in BATCH_POINTS_DEVICES if batch_points is None else batch_points
    try:
        return _with_fallbacks(loss_for, thetas, method, dtype, device, chunk_size, memory_budget_mb, hvp,
                               batch_points, kw)
    finally:
        _empty_cache(device)  # a GPU task hands its memory back


def _with_fallbacks(loss_for, thetas, method, dtype, device, chunk_size, memory_budget_mb, hvp, batch_points,
                    kw) -> tuple[list[SpectrumResult], Optional[str]]:
    n = thetas.shape[1]
    try:
        return _many(loss_for(device, dtype), thetas.to(device, dtype), method, chunk_size,
                     memory_budget_mb, hvp, batch_points, kw), None
    except Exception as err:  # noqa: BLE001 — only out-of-memory falls through to the next try
        if not is_oom(err):
            raise
    _empty_cache(device)
    cpu = torch.device("cpu")
    workspace_mb = pass_workspace_mb(device, memory_budget_mb)
    tries = [(device, chunk_size, workspace_mb, f"one point at a time after out of memory on {device}"),
             (device, chunk_size and max(1, chunk_size // 16), workspace_mb / 16,  # 0: auto in 1/16
              f"one point at a time, 1/16 workspace, after out of memory on {device}"),
             (cpu, chunk_size, 0.0, f"moved to CPU after out of memory on {device}")]
    for dev, chunk, budget, what in tries:
        try:
            loss = loss_for(dev, dtype)
            return [spectrum_at(loss, t, method=method, dtype=dtype, device=dev, chunk_size=chunk,
                                memory_budget_mb=budget, hvp=hvp, **kw) for t in thetas], what
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
        _empty_cache(dev)
    raise MemoryError(f"Hessian of {n} parameters does not fit in memory on {device} or the CPU")


def _many(loss, thetas: torch.Tensor, method: str, chunk_size: int, memory_budget_mb: float, hvp: str,
          batch_points: bool, kw: dict) -> list[SpectrumResult]:
    b, n = thetas.shape
    device = thetas.device
    per = points_per_pass(n, thetas.element_size(), device, memory_budget_mb, method, kw["vectors"])
    workspace_mb = pass_workspace_mb(device, memory_budget_mb)
    out = []
    for s in range(0, b, per):
        part = thetas[s:s + per]
        values, G = _values_and_gradients(loss, part, batch_points, workspace_mb * 2**20)  # as spectrum_at:
        eigen = [{"value": v, "g": g} for v, g in zip(values, G)]  # in neither build nor count seconds
        t0 = time.perf_counter()
        if batch_points and len(part) > 1:
            H = hessians(loss, part, chunk_size=chunk_size, memory_budget_mb=workspace_mb, hvp=hvp)
        else:
            H = torch.empty(len(part), n, n, dtype=thetas.dtype, device=device)
            for k, theta in enumerate(part):
                hessian(loss, theta, chunk_size=chunk_size, memory_budget_mb=workspace_mb, hvp=hvp, out=H[k])
        _check_finite(H, "Hessian", first=s, of=b)
        _sync(device)
        t1 = time.perf_counter()
        if method == "eigh":
            # a given budget caps the solver's workspace beside the pass's Hessians; else free memory does
            room = (HESSIAN_SHARE * memory_budget_mb * 2**20 - H.numel() * H.element_size()
                    if memory_budget_mb > 0 else None)
            lams, coeffs, v_mins = _eigen(H, G if kw["vectors"] else None, max_bytes=room)
            rel = effective_rel_tol(kw["rel_tol"], H.dtype)
            sums = [(_summarize(lam, H.dtype, kw["tol"], rel, kw["tol_mode"], kw["gap_ratio"]), lam)
                    for lam in lams]
            if kw["vectors"]:
                for e, c, v in zip(eigen, coeffs, v_mins):
                    e.update(grad_coeffs=c, v_min=v)
        else:
            extremes = inertia.extreme_eigenvalues_batch(H)  # batched: one matvec per step for the pass
            rel = effective_rel_tol(kw["rel_tol"], H.dtype)
            tols = [_inertia_tol(ex, kw["tol"], rel, kw["tol_mode"], H[k], kw["gap_ratio"])
                    for k, ex in enumerate(extremes)]
            found = inertia.counts_many(H, [t for t, _ in tols], naive=kw["naive"])  # batched where it pays
            sums = [(spectrum.Summary(c, t, how, *ex), None) for c, (t, how), ex in zip(found, tols, extremes)]
        _sync(device)
        secs = {"build": (t1 - t0) / len(part), "count": (time.perf_counter() - t1) / len(part)}
        del H
        out.extend(_result(loss, theta, summ, lam, method, dict(secs), **e)
                   for theta, (summ, lam), e in zip(part, sums, eigen))
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
