"""Labels beyond the spectrum: is a point critical at all, gradient-flat, or a stall that only oscillates?

The spectrum labels of :mod:`pipeline.curvature.spectrum` (minimum, saddle, …) describe the curvature; they only name a
critical point when the gradient vanishes. This module adds, as pure functions:

- :func:`critical_label` — ``not_critical`` when ``‖g‖² ≥ gtol2``, ``gradient_flat`` when the gradient is
  not small but lies (almost) in the Hessian's near-null space (Frye et al. 2021's test on the least-squares
  Newton step p: relative residual ``r = ‖Hp + g‖/(‖H‖_F‖p‖ + ‖g‖) > 0.9`` and co-kernel residual
  ``r_H = ‖H(Hp + g)‖/(‖H‖_F‖Hp + g‖) < 5e-4``), else the spectrum label;
- :func:`gradient_shares` — the shares of ``‖g‖²`` in the negative, near-zero and positive eigenspaces;
- :func:`escape_check` — the loss change along ``±v_min`` against the second-order prediction ½ε²λmin;
- :func:`critical_report` — all of the above at one point from its dense Hessian, as table columns;
  :func:`report_from_eigen` the same from an eigendecomposition already taken (the pipeline's).

Everything is float64 PyTorch/NumPy and knows nothing of Ray, Hydra or files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from operator import attrgetter
from typing import Optional, Sequence

import numpy as np
import torch
from torch.func import grad, grad_and_value

from pipeline.curvature import spectrum
from pipeline.curvature.hessian_build import hessian
from pipeline.curvature.hvp import LossFn
from pipeline.landscape.stall import (STALL_TAGS, PowerResult, StallTag, gradient_cosine,  # noqa: F401  (their old home)
                            power_lambda_max, stall_tag, stall_tag_at)

# Frye et al. 2021 (arXiv:2003.10397; definitions as in Frye's 2020 thesis, ch. 3): a point is approximately
# gradient-flat when r > 0.9 and r_H < 5e-4, with r and r_H MINRES-QLP's relres / relAres (Frobenius ‖H‖_F).
FLAT_RESIDUAL = 0.9  # r = ‖g + Hp‖/(‖H‖_F‖p‖ + ‖g‖) above this: g almost all in the near-null space, p small
FLAT_COKERNEL = 5e-4  # r_H = ‖H ρ‖/(‖H‖_F ‖ρ‖) below this: the residual ρ really is in the near-null space
# Frye et al.: ‖g‖² below this (absolute) is a critical point; 1e-8 or 1e-6 gave wrong loss and index values.
GTOL2 = 1e-10
ESCAPE_STEPS = (1e-3, 1e-2, 1e-1)
CRITICAL_LABELS = ("not_critical", "gradient_flat") + spectrum.LABELS


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


# ------------------------------------------------------------------------------------- gradient vs spectrum


@dataclass(frozen=True)
class GradientShares:
    """Fractions of ‖g‖² in the eigenspaces of λ < −tol, |λ| ≤ tol and λ > tol (sum 1; NaN when g = 0)."""

    neg: float
    zero: float
    pos: float


def gradient_shares(g, eigvals, eigvecs, tol: float) -> GradientShares:
    """Shares of ``‖g‖²`` in the negative / near-zero / positive eigenspaces of H.

    ``g`` ``[N]``; ``eigvals`` ``[N]``; ``eigvecs`` ``[N, N]`` with eigenvector ``i`` in column ``i`` (as
    ``torch.linalg.eigh`` returns them); ``tol`` ≥ 0: |λ| ≤ tol counts as zero (the tolerance of the counts).
    """
    lam, c = _coefficients(g, eigvals, eigvecs, tol)
    return _shares(lam, c, tol)


def _coefficients(g, eigvals, eigvecs, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """λ ``[N]`` and g's coordinates in the eigenbasis, Vᵀg ``[N]``, after checking shapes and ``tol``."""
    lam, V, gv = _np(eigvals), _np(eigvecs), _np(g)
    if V.shape != (lam.size, lam.size) or gv.shape != (lam.size,):
        raise ValueError(f"need g [N], eigvals [N], eigvecs [N, N]; got {gv.shape}, {lam.shape}, {V.shape}")
    if tol < 0:
        raise ValueError(f"tol must be ≥ 0, got {tol}")
    return lam, V.T @ gv


def _shares(lam: np.ndarray, c: np.ndarray, tol: float) -> GradientShares:
    c2 = c ** 2
    total = float(c2.sum())
    if total == 0.0:
        return GradientShares(math.nan, math.nan, math.nan)
    return GradientShares(float(c2[lam < -tol].sum() / total), float(c2[np.abs(lam) <= tol].sum() / total),
                          float(c2[lam > tol].sum() / total))


@dataclass(frozen=True)
class Flatness:
    """Frye et al.'s gradient-flat quantities for the least-squares Newton system ``H p = −g``.

    At the minimum-length least-squares solution p* (residual ρ = g + Hp*):

    - ``relative_residual`` r = ‖ρ‖ / (‖H‖_F ‖p*‖ + ‖g‖) — MINRES-QLP's ``relres``, Frye et al.'s r; in [0, 1],
      1 only when all of g is in the null space (then p* = 0), 0 when g is in the range of H. ``r > 0.9``
      needs both ‖ρ‖ > 0.9‖g‖ and a small Newton step, ‖H‖_F‖p*‖ < ‖g‖/9; the bare null-space share
      ‖ρ‖/‖g‖ (= √``grad_share_zero``) is a weaker, different quantity.
    - ``cokernel_residual`` r_H = ‖Hρ‖ / (‖H‖_F ‖ρ‖) — MINRES-QLP's ``relAres`` (small: ρ is a null vector, so
      p* really solves the least-squares problem).

    ‖H‖_F is the Frobenius norm, as in Frye's definitions. Both are dimensionless.
    """

    relative_residual: float
    cokernel_residual: float


def flatness_from_spectrum(g, eigvals, eigvecs, tol: float) -> Flatness:
    """:class:`Flatness` from a full eigendecomposition: p* = −H⁺g with eigenvalues |λ| ≤ ``tol`` treated as
    zero (the same tolerance as the counts), so ρ is the part of ``g`` in the near-null eigenspace and
    ‖p*‖² = Σ_{|λ|>tol} (vᵢᵀg)²/λᵢ². This is the limit a MINRES-QLP solve reaches, in exact arithmetic, when
    its near-null space is |λ| ≤ ``tol``. Shapes as in :func:`gradient_shares`. NaN when g = 0."""
    lam, c = _coefficients(g, eigvals, eigvecs, tol)
    return _flatness(lam, c, tol, float(np.linalg.norm(_np(g))))


def _flatness(lam: np.ndarray, c: np.ndarray, tol: float, g_norm: float) -> Flatness:
    if g_norm == 0.0:
        return Flatness(math.nan, math.nan)
    null = np.abs(lam) <= tol
    rho_norm = float(np.linalg.norm(c[null]))
    p_norm = float(np.linalg.norm(c[~null] / lam[~null]))
    h_fro = float(np.linalg.norm(lam))
    h_rho = float(np.linalg.norm(lam[null] * c[null]))
    cok = h_rho / (h_fro * rho_norm) if rho_norm > 0 and h_fro > 0 else 0.0
    return Flatness(rho_norm / (h_fro * p_norm + g_norm), cok)


def is_gradient_flat(relative_residual: float, cokernel_residual: float, *, min_residual: float = FLAT_RESIDUAL,
                     max_cokernel: float = FLAT_COKERNEL) -> bool:
    """Frye et al.'s test: ``r > min_residual`` and ``r_H < max_cokernel`` (NaN → False)."""
    return bool(relative_residual > min_residual and cokernel_residual < max_cokernel)


def critical_label(grad_norm2: float, spectrum_label: str, relative_residual: float = math.nan,
                   cokernel_residual: float = math.nan, *, gtol2: float = GTOL2,
                   min_residual: float = FLAT_RESIDUAL, max_cokernel: float = FLAT_COKERNEL) -> str:
    """What the point is, honestly.

    - ``‖g‖² < gtol2`` (absolute, default 1e-10 as in Frye et al., who found 1e-8 too loose to recover the
      loss and index of known critical points): a critical point → ``spectrum_label``;
    - otherwise, if the gradient-flat test passes (:func:`is_gradient_flat` on r, r_H of :class:`Flatness`)
      → ``gradient_flat``;
    - otherwise → ``not_critical``.
    """
    if spectrum_label not in spectrum.LABELS:
        raise ValueError(f"unknown spectrum label {spectrum_label!r}: expected one of {spectrum.LABELS}")
    if not math.isfinite(grad_norm2) or grad_norm2 < 0:
        raise ValueError(f"grad_norm2 must be a finite ‖g‖² ≥ 0, got {grad_norm2}")
    if grad_norm2 < gtol2:
        return spectrum_label
    if is_gradient_flat(relative_residual, cokernel_residual, min_residual=min_residual,
                        max_cokernel=max_cokernel):
        return "gradient_flat"
    return "not_critical"


# ------------------------------------------------------------------------------------------- escape check


@dataclass(frozen=True)
class EscapeCheck:
    """Loss changes ``L(θ ± εv) − L(θ)`` along the unit eigenvector ``v`` of λmin, per step ε.

    ``delta`` is the better of the two signs; ``predicted`` = ½ε²λmin (second order, at a critical point);
    ``predicted_with_slope`` = −ε|gᵀv| + ½ε²λmin (adds the first-order term at a non-critical point).
    ``drops``: the loss fell for at least one step."""

    lam_min: float
    grad_dot_v: float
    steps: tuple
    delta_plus: tuple
    delta_minus: tuple
    delta: tuple
    predicted: tuple
    predicted_with_slope: tuple

    @property
    def drops(self) -> bool:
        return any(d < 0 for d in self.delta)

    @property
    def ratio_smallest(self) -> float:
        """Δloss / (½ε²λmin) at the smallest step (1 where the second-order prediction holds; NaN if 0)."""
        return _ratio(self.delta[0], self.predicted[0])


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def escape_check(loss_fn: LossFn, theta: torch.Tensor, v_min, lam_min: float,
                 steps: Sequence[float] = ESCAPE_STEPS) -> EscapeCheck:
    """Loss change along ``±v_min`` (normalised here) from ``theta`` ``[N]`` for each step ε in ``steps``.

    At a saddle (λmin < 0, g = 0) the loss drops by about ½ε²|λmin| for small ε: the lecture's "a saddle point
    can still go down". Evaluated in float64."""
    theta = theta.detach().to(torch.float64)
    v = torch.as_tensor(_np(v_min), dtype=torch.float64, device=theta.device)
    if v.shape != theta.shape:
        raise ValueError(f"v_min must have theta's shape {tuple(theta.shape)}, got {tuple(v.shape)}")
    norm = float(torch.linalg.vector_norm(v))
    if norm == 0 or not math.isfinite(norm):
        raise ValueError(f"v_min must be a non-zero finite vector, got norm {norm}")
    v = v / norm
    steps = tuple(float(e) for e in steps)
    if not steps or any(e <= 0 for e in steps):
        raise ValueError(f"steps must be positive, got {steps}")
    with torch.no_grad():
        base = float(loss_fn(theta))
        plus = tuple(float(loss_fn(theta + e * v)) - base for e in steps)
        minus = tuple(float(loss_fn(theta - e * v)) - base for e in steps)
    slope = float(grad(loss_fn)(theta) @ v)
    lam = float(lam_min)
    return EscapeCheck(lam, slope, steps, plus, minus, tuple(min(p, m) for p, m in zip(plus, minus)),
                       tuple(0.5 * e * e * lam for e in steps),
                       tuple(-e * abs(slope) + 0.5 * e * e * lam for e in steps))


# ------------------------------------------------------------------------------------------ one point


@dataclass
class CriticalReport:
    """Everything this module says about one point (:func:`pipeline.orchestration.rows.critical_columns` makes its table
    columns): the loss, ‖g‖², the spectrum's ``summary`` (counts with their tolerance, extreme eigenvalues,
    label), the honest ``label``, gradient shares, flatness, gᵀHg / (‖g‖² max|λ|) ∈ [−1, 1] (near 0 when g
    points along flat directions) and the escape check where some λ < −tol."""

    loss: float
    grad_norm2: float
    summary: spectrum.Summary
    label: str
    shares: GradientShares
    flatness: Flatness
    grad_curvature: float
    escape: Optional[EscapeCheck]

    spectrum_label = property(attrgetter("summary.label"))
    lam_min = property(attrgetter("summary.lam_min"))


def critical_report(loss_fn: LossFn, theta: torch.Tensor, *, H: Optional[torch.Tensor] = None,
                    **options) -> CriticalReport:
    """Dense analysis of one point ``theta`` ``[N]`` in float64: counts and tolerance exactly as
    :func:`pipeline.curvature.spectrum.summarize` gives them, gradient shares, the gradient-flat test, the honest
    label, and — when some λ < −tol — the escape check along the most negative eigenvector.

    ``H`` ``[N, N]``: the Hessian if already built (else built here with :func:`pipeline.curvature.hessian_build.hessian`).
    ``options``: those of :func:`report_from_eigen` (``tol``, ``rel_tol``, ``tol_mode``, ``gtol2``, …).
    Cost: one ``eigh`` of N×N (with eigenvectors), so meant for N up to a few thousand.
    """
    theta = theta.detach().to(torch.float64)
    H = hessian(loss_fn, theta) if H is None else H.to(theta.device, torch.float64)
    lam, V = torch.linalg.eigh(H)
    return report_from_eigen(loss_fn, theta, lam, V.mT @ grad(loss_fn)(theta), V[:, 0], **options)


def report_from_eigen(loss_fn: LossFn, theta: torch.Tensor, eigvals, grad_coeffs, v_min, *,
                      tol: Optional[float] = None, rel_tol: float = 1e-6, tol_mode: str = "auto",
                      gap_ratio: float = 1e4, gtol2: float = GTOL2, min_residual: float = FLAT_RESIDUAL,
                      max_cokernel: float = FLAT_COKERNEL,
                      escape_steps: Sequence[float] = ESCAPE_STEPS) -> CriticalReport:
    """:func:`critical_report` from an eigendecomposition of the Hessian at ``theta`` ``[N]`` taken
    already (the pipeline's pass: :func:`pipeline.curvature.hessian.spectrum_at` with ``vectors=True``), so no
    N×N matrix is needed here.

    ``eigvals`` ``[N]`` ascending; ``grad_coeffs`` ``[N]``: the gradient at ``theta`` in the eigenbasis,
    Vᵀg, in the same order; ``v_min`` ``[N]``: the eigenvector of ``eigvals[0]``. The shares, the
    flatness and gᵀHg come from ``grad_coeffs`` (so from the decomposition's dtype); the loss, ‖g‖² and
    the escape check's losses from ``loss_fn`` at ``theta`` in float64. ``tol`` etc. as in
    :func:`pipeline.curvature.spectrum.summarize` (a given ``tol`` gives the counts it was given).
    """
    theta = theta.detach().to(torch.float64)
    lam, c = _np(eigvals), _np(grad_coeffs)
    if lam.shape != (theta.numel(),) or c.shape != lam.shape or _np(v_min).shape != lam.shape:
        raise ValueError(f"need eigvals, grad_coeffs and v_min of theta's shape ({theta.numel()},); got "
                         f"{lam.shape}, {c.shape}, {_np(v_min).shape}")
    summary = spectrum.summarize(lam, tol=tol, rel_tol=rel_tol, gap_ratio=gap_ratio, tol_mode=tol_mode)
    g, value = grad_and_value(loss_fn)(theta)  # one forward and backward for both
    loss, gn2 = float(value), float(g @ g)
    c2 = float(c @ c)
    shares = _shares(lam, c, summary.tol)
    flat = _flatness(lam, c, summary.tol, math.sqrt(c2))
    top = float(np.abs(lam).max())
    curv = float(lam @ c ** 2) / (c2 * top) if c2 > 0 and top > 0 else math.nan
    label = critical_label(gn2, summary.label, flat.relative_residual, flat.cokernel_residual, gtol2=gtol2,
                           min_residual=min_residual, max_cokernel=max_cokernel)
    escape = escape_check(loss_fn, theta, v_min, float(lam[0]), escape_steps) if lam[0] < -summary.tol else None
    return CriticalReport(loss, gn2, summary, label, shares, flat, curv, escape)
