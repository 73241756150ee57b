"""Labels beyond the spectrum: is a point critical at all, gradient-flat, or a stall that only oscillates?

The spectrum labels of :mod:`pipeline.spectrum` (minimum, saddle, …) describe the curvature; they only name a
critical point when the gradient vanishes. This module adds, as pure functions:

- :func:`critical_label` — ``not_critical`` when ``‖g‖² ≥ gtol2``, ``gradient_flat`` when the gradient is
  not small but lies (almost) in the Hessian's near-null space (Frye et al. 2021's test on the least-squares
  Newton step p: relative residual ``r = ‖Hp + g‖/(‖H‖_F‖p‖ + ‖g‖) > 0.9`` and co-kernel residual
  ``r_H = ‖H(Hp + g)‖/(‖H‖_F‖Hp + g‖) < 5e-4``), else the spectrum label;
- :func:`gradient_shares` — the shares of ``‖g‖²`` in the negative, near-zero and positive eigenspaces;
- :func:`escape_check` — the loss change along ``±v_min`` against the second-order prediction ½ε²λmin;
- :func:`stall_tag` — ``small_gradient`` or ``oscillating``, with the values behind it;
- :func:`power_lambda_max` and :func:`gradient_cosine` — cheap curvature and direction logs for training;
- :func:`critical_report` — all of the above at one point from its dense Hessian, as table columns;
  :func:`report_from_eigen` the same from an eigendecomposition already taken (the pipeline's).

Everything is float64 PyTorch/NumPy and knows nothing of Ray, Hydra or files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.func import grad, grad_and_value

from pipeline import spectrum
from pipeline.refine import GTOL2, hvp_at

LossFn = Callable[[torch.Tensor], torch.Tensor]

# Frye et al. 2021 (arXiv:2003.10397; definitions as in Frye's 2020 thesis, ch. 3): a point is approximately
# gradient-flat when r > 0.9 and r_H < 5e-4, with r and r_H MINRES-QLP's relres / relAres (Frobenius ‖H‖_F).
FLAT_RESIDUAL = 0.9  # r = ‖g + Hp‖/(‖H‖_F‖p‖ + ‖g‖) above this: g almost all in the near-null space, p small
FLAT_COKERNEL = 5e-4  # r_H = ‖H ρ‖/(‖H‖_F ‖ρ‖) below this: the residual ρ really is in the near-null space
ESCAPE_STEPS = (1e-3, 1e-2, 1e-1)
CRITICAL_LABELS = ("not_critical", "gradient_flat") + spectrum.LABELS
STALL_TAGS = ("small_gradient", "oscillating")


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

    def row(self) -> dict:
        """Scalar summary: the step with the largest drop, its change and the prediction there."""
        i = int(np.argmin(self.delta))
        return {"escape_drops": self.drops, "escape_step": self.steps[i], "escape_delta": self.delta[i],
                "escape_predicted": self.predicted[i],
                "escape_ratio_smallest": _ratio(self.delta[0], self.predicted[0])}


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


# --------------------------------------------------------------------------------------- stalls in training


@dataclass(frozen=True)
class StallTag:
    """``tag`` ∈ {small_gradient, oscillating} and the values behind it.

    ``grad_ratio`` = ‖g‖/‖g₀‖; ``cosine`` between successive gradients; ``sharpness`` = λmax·lr/2 (1 = the
    gradient-descent stability limit λmax = 2/lr); ``reasons``: the criteria that fired, with their values.
    """

    tag: str
    grad_ratio: float
    cosine: float
    sharpness: float
    reasons: str

    def row(self) -> dict:
        return {"stall_tag": self.tag, "stall_grad_ratio": self.grad_ratio, "stall_cosine": self.cosine,
                "stall_sharpness": self.sharpness, "stall_tag_reasons": self.reasons}


def stall_tag(grad_norm: float, grad_norm0: float, cosine: float = math.nan, lam_max: float = math.nan,
              lr: Optional[float] = None, *, grad_ratio_tol: float = 1e-2, cosine_tol: float = 0.0,
              sharpness_tol: float = 0.9) -> StallTag:
    """Tag a stalled checkpoint ``oscillating`` when the iterate shows evidence of bouncing across a valley,
    else ``small_gradient``. Evidence is either of:

    - the gradient is not small relative to its start: ``‖g‖/‖g₀‖ ≥ grad_ratio_tol``;
    - successive gradients point against each other: ``cosine < cosine_tol``.

    Sharpness near the edge of stability, ``λmax·lr/2 ≥ sharpness_tol``, is reported among the reasons when
    it holds, but never tags a point on its own: a run can sit at λmax ≈ 2/lr and still converge smoothly
    (cosine ≈ +1, a gradient 10⁻³ of its start).

    ``grad_norm``, ``grad_norm0``: ‖g‖ at the stall and at step 0. ``cosine``: from :func:`gradient_cosine`.
    ``lam_max``: from :func:`power_lambda_max`. ``lr``: the (S)GD learning rate; pass None for Adam, whose
    stability limit is not 2/lr. A NaN value (not measured) skips its criterion.
    """
    if grad_norm < 0 or grad_norm0 < 0:
        raise ValueError(f"gradient norms must be ≥ 0, got grad_norm={grad_norm}, grad_norm0={grad_norm0}")
    ratio = grad_norm / grad_norm0 if grad_norm0 > 0 else math.nan
    sharp = 0.5 * lam_max * lr if lr is not None and math.isfinite(lam_max) else math.nan
    reasons = []
    if ratio >= grad_ratio_tol:
        reasons.append(f"grad_ratio={ratio:.3g}>={grad_ratio_tol:g}")
    if cosine < cosine_tol:
        reasons.append(f"cosine={cosine:.3g}<{cosine_tol:g}")
    bouncing = bool(reasons)  # NaN comparisons are False: unmeasured criteria never fire
    if sharp >= sharpness_tol:
        reasons.append(f"lam_max*lr/2={sharp:.3g}>={sharpness_tol:g}")
    if not bouncing:
        reasons.insert(0, f"grad_ratio={ratio:.3g}<{grad_ratio_tol:g}")
        return StallTag("small_gradient", ratio, cosine, sharp, "; ".join(reasons))
    return StallTag("oscillating", ratio, cosine, sharp, "; ".join(reasons))


def stall_tag_at(loss_fn: LossFn, theta: torch.Tensor, grad_norm0: float, lr: Optional[float], *,
                 power_iters: int = 50, **thresholds) -> StallTag:
    """:func:`stall_tag` for a saved checkpoint of full-batch gradient descent, from ``theta`` ``[N]`` alone:
    the cosine is taken between ∇L(θ) and the gradient after one more GD step (θ − lr·∇L(θ)), which is what
    GD's next gradient is, and λmax by :func:`power_lambda_max`. ``grad_norm0``: ‖∇L‖ at step 0 (first entry
    of the run's curve). ``lr`` None (Adam): no cosine step and no 2/lr criterion, only ‖g‖/‖g₀‖.
    ``thresholds``: ``grad_ratio_tol``, ``cosine_tol``, ``sharpness_tol`` of :func:`stall_tag`."""
    theta = theta.detach()
    g_fn = grad(loss_fn)
    g = g_fn(theta)
    cos, lam = math.nan, math.nan
    if lr is not None:
        cos = gradient_cosine(g, g_fn(theta - lr * g))
        lam = power_lambda_max(loss_fn, theta, power_iters).lam_max
    return stall_tag(float(torch.linalg.vector_norm(g)), grad_norm0, cos, lam, lr, **thresholds)


def gradient_cosine(g_prev: torch.Tensor, g: torch.Tensor) -> float:
    """cos∠(g_prev, g) for two ``[N]`` gradients; NaN when either is zero."""
    a, b = g_prev.detach().reshape(-1).to(torch.float64), g.detach().reshape(-1).to(torch.float64)
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan


@dataclass(frozen=True)
class PowerResult:
    """``lam_max``: the largest (algebraic) Hessian eigenvalue estimate; ``vector`` ``[N]`` its unit
    eigenvector estimate (pass back as ``v0`` to warm-start the next call); ``hvps`` spent."""

    lam_max: float
    vector: torch.Tensor
    hvps: int


def _power(matvec, v: torch.Tensor, iters: int, rtol: float) -> tuple[float, torch.Tensor, int]:
    """Power iteration: the eigenvalue of largest |λ| (Rayleigh quotient) and its vector."""
    v = v / torch.linalg.vector_norm(v)
    lam, used = math.nan, 0
    for _ in range(iters):
        w = matvec(v)
        used += 1
        new = float(v @ w)
        w_norm = float(torch.linalg.vector_norm(w))
        if w_norm == 0.0:
            return 0.0, v, used
        v = w / w_norm
        if math.isfinite(lam) and abs(new - lam) <= rtol * abs(new):
            return new, v, used
        lam = new
    return lam, v, used


def power_lambda_max(loss_fn: LossFn, theta: torch.Tensor, iters: int = 20, *, v0: Optional[torch.Tensor] = None,
                     rtol: float = 1e-4, seed: int = 0) -> PowerResult:
    """λmax of the Hessian of ``loss_fn`` at ``theta`` ``[N]`` by power iteration on Hessian-vector products.

    Power iteration finds the eigenvalue of largest magnitude; when that one is negative, a second run on
    ``H − λ I`` (λ that negative value) finds the largest algebraic eigenvalue. ``iters`` bounds each run;
    it stops early when the Rayleigh quotient changes by less than ``rtol`` (relative). Runs in ``theta``'s
    dtype and device. Accuracy: a few digits, enough for λmax vs 2/lr; use the dense spectrum for more.
    """
    theta = theta.detach()
    hvp = hvp_at(loss_fn, theta)
    if v0 is None:
        gen = torch.Generator().manual_seed(int(seed))
        v0 = torch.randn(theta.numel(), generator=gen, dtype=torch.float64).to(theta.device, theta.dtype)
    lam, v, used = _power(hvp, v0.to(theta.device, theta.dtype), iters, rtol)
    if lam < 0:
        shift = lam
        mu, v, more = _power(lambda u: hvp(u) - shift * u, v0.to(theta.device, theta.dtype), iters, rtol)
        lam, used = mu + shift, used + more
    return PowerResult(lam, v, used)


# ------------------------------------------------------------------------------------------ one point


@dataclass
class CriticalReport:
    """Everything this module says about one point (see :meth:`row` for the table columns)."""

    loss: float
    grad_norm2: float
    counts: spectrum.Counts
    tol: float
    tol_method: str
    lam_min: float
    lam_max: float
    spectrum_label: str
    label: str
    shares: GradientShares
    flatness: Flatness
    grad_curvature: float  # gᵀHg / (‖g‖² max|λ|) ∈ [−1, 1]: near 0 when g points along flat directions
    escape: Optional[EscapeCheck]

    def row(self) -> dict:
        out = {"grad_norm2": self.grad_norm2, "critical_label": self.label,
               "grad_share_neg": self.shares.neg, "grad_share_zero": self.shares.zero,
               "grad_share_pos": self.shares.pos, "flat_residual": self.flatness.relative_residual,
               "flat_cokernel": self.flatness.cokernel_residual, "grad_curvature": self.grad_curvature}
        if self.escape is not None:
            out.update(self.escape.row())
        else:
            out.update({"escape_drops": None, "escape_step": math.nan, "escape_delta": math.nan,
                        "escape_predicted": math.nan, "escape_ratio_smallest": math.nan})
        return out


def critical_report(loss_fn: LossFn, theta: torch.Tensor, *, H: Optional[torch.Tensor] = None,
                    **options) -> CriticalReport:
    """Dense analysis of one point ``theta`` ``[N]`` in float64: counts and tolerance exactly as
    :func:`pipeline.spectrum.summarize` gives them, gradient shares, the gradient-flat test, the honest
    label, and — when some λ < −tol — the escape check along the most negative eigenvector.

    ``H`` ``[N, N]``: the Hessian if already built (else built here with :func:`pipeline.hessian.hessian`).
    ``options``: those of :func:`report_from_eigen` (``tol``, ``rel_tol``, ``tol_mode``, ``gtol2``, …).
    Cost: one ``eigh`` of N×N (with eigenvectors), so meant for N up to a few thousand.
    """
    from pipeline.hessian import hessian

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
    already (the pipeline's pass: :func:`pipeline.hessian.spectrum_at` with ``vectors=True``), so no
    N×N matrix is needed here.

    ``eigvals`` ``[N]`` ascending; ``grad_coeffs`` ``[N]``: the gradient at ``theta`` in the eigenbasis,
    Vᵀg, in the same order; ``v_min`` ``[N]``: the eigenvector of ``eigvals[0]``. The shares, the
    flatness and gᵀHg come from ``grad_coeffs`` (so from the decomposition's dtype); the loss, ‖g‖² and
    the escape check's losses from ``loss_fn`` at ``theta`` in float64. ``tol`` etc. as in
    :func:`pipeline.spectrum.summarize` (a given ``tol`` gives the counts it was given).
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
    return CriticalReport(loss, gn2, summary.counts, summary.tol, summary.tol_method, float(lam[0]),
                          float(lam[-1]), summary.label, label, shares, flat, curv, escape)
