"""Stage 7 — the exact Hessian's eigenvalue counts: :func:`spectrum_at`, the project's public API, and
:func:`spectra_at_many`, the same for many points of one loss as the pipeline runs it.

The Hessian is built by :mod:`pipeline.curvature.hessian_build` (closed form for an MLP, else from Hessian-vector
products). Counting then uses the full spectrum (``eigh``) or, for counts only, the inertia of LDLᵀ
factorisations (:mod:`pipeline.curvature.inertia`), which is several times cheaper, or the estimator
(:mod:`pipeline.curvature.estimate`) where no dense Hessian fits. Peak memory is the Hessian, then for ``eigh`` one N×N
copy made by the eigensolver (cuSOLVER's workspace on top) or for ``inertia`` a copy of H's lower triangle
(0.53×H; the factorisations run in H's own memory; on CUDA the blocked LDLᵀ needs no copy, and the copy is
only made where it falls back), and one block's build workspace; :mod:`pipeline.curvature.hessian_memory` plans it.
A pass that runs out of memory falls back step by step (:func:`spectra_at_many`).

No Ray, Hydra or files here: ``loss_fn`` is any function of a flat parameter vector.
"""
from __future__ import annotations

import math
import time
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from pipeline.numerics import cusolver
from pipeline.curvature import hvp as hvps, inertia, spectrum
from pipeline.curvature.hessian_build import (HVP_MODES, activation_bytes, column_bytes, hessian,  # noqa: F401  (re-exported)
                                    build_mode, hessians, resolve_hvp)
from pipeline.curvature.hessian_memory import (AUTO_EIGH_MAX_N, BATCH_POINTS_DEVICES, MATRIX_FREE,  # noqa: F401  (re-exported)
                                     FOOTPRINT, HESSIAN_SHARE, METHODS, default_chunk_size,
                                     default_workspace_bytes, footprint, pass_workspace_mb, points_per_pass,
                                     resolve_method, total_budget_bytes)
from pipeline.curvature.hvp import LossFn, WeightedTerms
from pipeline.numerics.symmetric import symmetrize_  # noqa: F401  (re-exported: its old home)

# Eigenvalue error of a Hessian built in float32, relative to max|λ| (tests/test_hessian.py asserts ≤ 1e-6;
# docs/performance.md). A relative tolerance below the floor would count rounding noise, so float32 raises
# rel_tol to it; float64 leaves it alone.
REL_NOISE_FLOOR = {torch.float32: 1e-6}
GAP_NEEDS_SPECTRUM = ("tol_mode='gap' needs the full spectrum or a dense Hessian: use method='eigh' or "
                      "'inertia', or a rel/abs tolerance")


@dataclass
class SpectrumResult:
    """What :func:`spectrum_at` returns: the loss and gradient norm at the point and the ``summary`` of
    its spectrum (counts with their tolerance and the extreme eigenvalues; ``n_pos_naive`` is None where
    inertia skipped that factorisation or the counts were estimated). Eigenvalues are ascending, ``[N]``
    NumPy float64, or None when the counts came from ``inertia``. ``seconds`` splits the time into
    build / count."""

    n_params: int
    loss: float
    grad_norm: float
    summary: spectrum.Summary
    method: str
    dtype: str
    device: str
    eigenvalues: Optional[np.ndarray] = None
    seconds: dict = field(default_factory=dict)
    # method="estimate" only: intervals (lo, hi) of the counts, the resolution δ and the settings
    # (pipeline.curvature.estimate.CountEstimate); the counts above are then the rounded point estimates.
    estimate: Optional[dict] = None
    # eigh with vectors=True only, [N] float64 NumPy: the gradient's coordinates in the eigenbasis (Vᵀg, in
    # the eigenvalues' order) and the eigenvector of λmin — what pipeline.landscape.critical.report_from_eigen needs.
    grad_coeffs: Optional[np.ndarray] = None
    v_min: Optional[np.ndarray] = None
    # how H was built: closed_form, rev or fwd (pipeline.curvature.hessian_build.build_mode); None: no dense H
    hvp: Optional[str] = None

    # The summary's values, read as the result's own (res.n_pos, res.tol, …).
    counts = property(attrgetter("summary.counts"))
    n_pos = property(attrgetter("summary.counts.n_pos"))
    n_neg = property(attrgetter("summary.counts.n_neg"))
    n_zero = property(attrgetter("summary.counts.n_zero"))
    n_pos_naive = property(attrgetter("summary.counts.n_pos_naive"))
    tol = property(attrgetter("summary.tol"))
    tol_method = property(attrgetter("summary.tol_method"))
    lam_min = property(attrgetter("summary.lam_min"))
    lam_max = property(attrgetter("summary.lam_max"))

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


def effective_rel_tol(rel_tol: float, dtype: torch.dtype) -> float:
    """``rel_tol`` raised to the relative noise floor of Hessians built in ``dtype`` (float32: 1e-6)."""
    return max(rel_tol, REL_NOISE_FLOOR.get(dtype, 0.0))


def count_dense(H: torch.Tensor, *, method: str = "eigh", tol: Optional[float] = None, rel_tol: float = 1e-6,
                tol_mode: str = "auto", gap_ratio: float = 1e4,
                extremes: Optional[tuple[float, float]] = None,
                naive: bool = True) -> tuple[spectrum.Summary, Optional[np.ndarray]]:
    """Counts for a symmetric matrix ``H`` ``[N, N]`` by ``eigh`` (full spectrum) or ``inertia``.

    ``inertia`` knows no spectrum, so its tolerance is ``tol``, a gap found from zero counts with
    ``tol_mode='gap'`` (:func:`_inertia_tol`), or ``rel_tol`` · max|λ| (``extremes`` (λmin, λmax) if
    given, else from Lanczos). ``naive=False`` skips
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


def needs_dense(tol: Optional[float], tol_mode: str) -> bool:
    """Whether the tolerance is read from a gap in |λ|: ``tol_mode='gap'`` without a given ``tol``. The gap
    is found in the full spectrum (eigh) or from zero counts of the dense Hessian (inertia); the
    :data:`MATRIX_FREE` methods have neither."""
    return tol is None and tol_mode == "gap"


def _inertia_tol(extremes: tuple[float, float], tol: Optional[float], rel_tol: float, tol_mode: str,
                 H: torch.Tensor, gap_ratio: float) -> tuple[float, str]:
    """The tolerance of an ``inertia`` count and how it was set: ``tol`` if given; with ``tol_mode='gap'``
    the spectrum's gap found from zero counts of ``H`` ``[N, N]`` at log-spaced shifts
    (:func:`pipeline.curvature.spectrum.gap_from_zero_counts`, two LDLᵀ per shift, about 2 shifts per decade from
    rounding level to ``rel_tol·gap_ratio``), so that eigh and inertia follow one rule; else (or with no
    gap) ``rel_tol`` · max|λ| from the Lanczos ``extremes`` (λmin, λmax)."""
    if tol is not None:
        return float(tol), "given"
    top = max(abs(extremes[0]), abs(extremes[1]))
    if needs_dense(tol, tol_mode):
        n = H.shape[-1]
        eps = float(torch.finfo(H.dtype).eps)
        shifts = spectrum.gap_shifts(top, n, rel_tol, gap_ratio, eps)
        zeros = [inertia.counts(H, float(t), naive=False).n_zero for t in shifts]
        gap = spectrum.gap_from_zero_counts(shifts, np.array(zeros), top=top, n=n, rel_tol=rel_tol,
                                            gap_ratio=gap_ratio, eps=eps)
        if gap is not None:
            return gap, "gap"
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
    see :func:`pipeline.curvature.spectrum.choose_tol` — with ``inertia`` always the latter; ``gap``: the gap rule for
    ``eigh`` and ``inertia`` alike, inertia finding the gap from zero counts at log-spaced shifts, so one
    rule holds across sizes; ``result.tol_method`` records which rule set each point's tolerance); in
    float32 ``rel_tol`` is at least 1e-6, its noise floor.
    ``chunk_size`` / ``memory_budget_mb`` (build workspace; the Hessian and what counting holds,
    :func:`footprint`, come on top) / ``hvp``: see :func:`hessian`. ``naive=False``: ``inertia`` skips the
    factorisation behind the naive #{λ > 0} (two LDLᵀ instead of three; ``n_pos_naive`` is None).
    ``vectors=True`` (``eigh`` only): one eigh with eigenvectors instead of eigvalsh, keeping the
    gradient's coordinates in the eigenbasis (``result.grad_coeffs``) and the eigenvector of λmin
    (``result.v_min``), both ``[N]`` — what :func:`pipeline.landscape.critical.report_from_eigen` needs; it
    costs about 4× eigvalsh on CPU and holds 4×H there, 6×H on CUDA (:func:`footprint`).

    ``method="estimate"`` never forms H: counts come from Hessian-vector products only
    (:func:`pipeline.curvature.estimate.estimate_counts`, options in ``estimate``, e.g. ``{"n_probes": 30,
    "degree": 0}``), each with an interval in ``result.estimate``; the label is ``uncertain`` when the
    intervals allow two labels; a tolerance finer than the estimator's resolution raises ValueError.
    It needs a relative or given tolerance (``tol_mode="gap"`` needs a dense Hessian). ``matvec``
    (``V [N, k] -> H V``, e.g. data-parallel from :func:`pipeline.orchestration.shards.sharded_hvp`) replaces the
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
    hvp, chunk_size = build_mode(loss_fn, theta, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb, hvp=hvp)
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
                   hvp=hvp, **eigen)


def _value_and_gradient(loss_fn: Union[LossFn, WeightedTerms], theta: torch.Tensor
                        ) -> tuple[float, torch.Tensor]:
    """The (weighted) loss at ``theta`` ``[N]`` and its gradient ``[N]``, one forward and backward per term."""
    value, g = 0.0, 0.0
    for w, f in hvps.terms(loss_fn):
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
        step = max(1, int(budget // column_bytes(loss_fn, thetas[0])))
        values, G = [], []
        for s in range(0, thetas.shape[0], step):
            g_sum, v_sum = 0.0, 0.0
            for w, f in hvps.terms(loss_fn):
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
    (:mod:`pipeline.numerics.cusolver`) in H's own memory, which H does not survive, with at most ``max_bytes`` of
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
    from pipeline.curvature import estimate

    if needs_dense(tol, tol_mode):
        raise ValueError(GAP_NEEDS_SPECTRUM)
    t0 = time.perf_counter()
    est = estimate.estimate_counts(matvec or hvps.hvp_matvec(loss_fn, theta), theta.numel(), tol=tol,
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
            v_min: Optional[np.ndarray] = None, value: Optional[float] = None,
            hvp: Optional[str] = None) -> SpectrumResult:
    """The result at ``theta``: the loss and gradient norm (``value`` and ``g`` when already taken) with
    the counts and how H was built (``hvp``)."""
    if value is None or g is None:
        value, g = _value_and_gradient(loss_fn, theta)
    if not math.isfinite(value):
        raise ValueError(f"the loss is {value} at this point: no spectrum of a non-finite loss")
    return SpectrumResult(
        n_params=theta.numel(), loss=value, grad_norm=float(torch.linalg.vector_norm(g)), summary=summary,
        method=method, dtype=str(theta.dtype).replace("torch.", ""), device=_device_name(theta.device),
        eigenvalues=lam, seconds=seconds, grad_coeffs=grad_coeffs, v_min=v_min, hvp=hvp)


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
    out, chunk = [], 0
    for s in range(0, b, per):
        part = thetas[s:s + per]
        values, G = _values_and_gradients(loss, part, batch_points, workspace_mb * 2**20)  # as spectrum_at:
        eigen = [{"value": v, "g": g} for v, g in zip(values, G)]  # in neither build nor count seconds
        t0 = time.perf_counter()
        batched = batch_points and len(part) > 1
        # the first pass's chunk serves the later ones: same loss and workspace, never more points per pass
        hvp, chunk = build_mode(loss, part if batched else part[0], chunk_size=chunk_size or chunk,
                                memory_budget_mb=workspace_mb, hvp=hvp)
        if batched:
            H = hessians(loss, part, chunk_size=chunk, memory_budget_mb=workspace_mb, hvp=hvp)
        else:
            H = torch.empty(len(part), n, n, dtype=thetas.dtype, device=device)
            for k, theta in enumerate(part):
                hessian(loss, theta, chunk_size=chunk, memory_budget_mb=workspace_mb, hvp=hvp, out=H[k])
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
        out.extend(_result(loss, theta, summ, lam, method, dict(secs), hvp=hvp, **e)
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
