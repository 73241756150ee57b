"""Stage 6 — stalls: when training stopped improving, and why.

A run has stalled at step t when the loss improved by less than ``threshold`` (relative) over the last
``window`` steps: ``(L[t - window] - L[t]) / |L[t - window]| < threshold``. A loss that went *up* over the
window (oscillation, divergence) also counts as no improvement. That rule is a pure function of the loss
history (:func:`is_stalled`, :func:`stall_steps`).

A stall is then tagged ``small_gradient`` or ``oscillating`` (:func:`stall_tag`, :func:`stall_tag_at`) from
cheap measurements at the point: the gradient's norm, the cosine between successive gradients
(:func:`gradient_cosine`) and λmax by power iteration (:func:`power_lambda_max`), against the stability limit
of the optimizer, 2(1 + μ)/lr for (S)GD with heavy-ball momentum μ (2/lr without).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.func import grad

from pipeline.curvature.hvp import LossFn, hvp_at

STALL_TAGS = ("small_gradient", "oscillating")
# ‖g‖/‖g₀‖ below this many machine epsilons is rounding noise: a mean loss's gradient sums many
# O(‖g₀‖) per-sample terms, each rounded, so an exact minimum's computed gradient is a few hundred ε·‖g₀‖.
NOISE_EPS = 1e3


def relative_improvement(before: float, after: float) -> float:
    """``(before - after) / |before|``; 0 when both are 0 (nothing left to improve)."""
    if before == 0.0:
        return 0.0 if after == 0.0 else -math.inf
    return (before - after) / abs(before)


def is_stalled(steps: Sequence[int], losses: Sequence[float], window: int, threshold: float,
               since: int = 0) -> bool:
    """Whether the history ``(steps[i], losses[i])`` (steps ascending) shows a stall at its last entry.

    Only entries at steps ≥ ``since`` are used, so after a stall the window must fill again before the
    next one can be declared. Needs an entry exactly ``window`` steps or more before the last one.
    """
    if len(steps) != len(losses):
        raise ValueError(f"steps and losses differ in length: {len(steps)} vs {len(losses)}")
    if window < 1 or threshold <= 0:
        raise ValueError(f"need window ≥ 1 and threshold > 0, got window={window}, threshold={threshold}")
    if not steps:
        return False
    t = steps[-1]
    # The latest recorded entry at least `window` steps before t, not earlier than `since`.
    ref = None
    for s, loss in zip(reversed(steps), reversed(losses)):
        if s < since:
            break
        if s <= t - window:
            ref = loss
            break
    if ref is None:
        return False
    return relative_improvement(ref, losses[-1]) < threshold


def stall_steps(steps: Sequence[int], losses: Sequence[float], window: int, threshold: float,
                max_stalls: int | None = None) -> list[int]:
    """Every step at which a stall is declared when the history is scanned in order (offline twin of
    what training does online): after each stall the window restarts at that step."""
    out: list[int] = []
    since = steps[0] if steps else 0
    for i in range(len(steps)):
        if is_stalled(steps[: i + 1], losses[: i + 1], window, threshold, since=since):
            out.append(steps[i])
            since = steps[i]
            if max_stalls is not None and len(out) >= max_stalls:
                break
    return out


# --------------------------------------------------------------------------------------- stalls in training


@dataclass(frozen=True)
class StallTag:
    """``tag`` ∈ {small_gradient, oscillating} and the values behind it.

    ``grad_ratio`` = ‖g‖/‖g₀‖; ``cosine`` between successive gradients; ``sharpness`` = λmax·lr/(2(1 + μ))
    (1 = the stability limit λmax = 2(1 + μ)/lr of (S)GD with momentum μ, 2/lr for plain GD); ``reasons``:
    the criteria that fired, with their values.
    """

    tag: str
    grad_ratio: float
    cosine: float
    sharpness: float
    reasons: str


def stall_tag(grad_norm: float, grad_norm0: float, cosine: float = math.nan, lam_max: float = math.nan,
              lr: Optional[float] = None, *, momentum: float = 0.0, grad_ratio_tol: float = 1e-2,
              cosine_tol: float = 0.0, sharpness_tol: float = 0.9, noise_ratio: float = 0.0) -> StallTag:
    """Tag a stalled checkpoint ``oscillating`` when the iterate shows evidence of bouncing across a valley,
    else ``small_gradient``. Evidence is either of:

    - the gradient is not small relative to its start: ``‖g‖/‖g₀‖ ≥ grad_ratio_tol``;
    - successive gradients point against each other: ``cosine < cosine_tol``.

    Sharpness near the edge of stability, ``λmax·lr/(2(1 + momentum)) ≥ sharpness_tol``, is reported among
    the reasons when it holds, but never tags a point on its own: a run can sit at the limit and still
    converge smoothly (cosine ≈ +1, a small gradient).

    ``grad_norm``, ``grad_norm0``: ‖g‖ at the stall and at step 0. ``cosine``: from :func:`gradient_cosine`.
    ``lam_max``: from :func:`power_lambda_max`. ``lr``: the (S)GD learning rate; pass None for Adam, whose
    stability limit is not 2/lr. ``momentum``: (S)GD's heavy-ball μ (torch's ``SGD(momentum=μ)``, no
    dampening), which moves the limit to 2(1 + μ)/lr. A NaN value (not measured) skips its criterion.
    ``noise_ratio``: below this ``‖g‖/‖g₀‖`` the gradient is rounding noise (an exact minimum, loss ≈ 0), its
    direction carries no information, and the cosine criterion is not applied (:func:`stall_tag_at` derives
    it from the dtype).
    """
    if grad_norm < 0 or grad_norm0 < 0:
        raise ValueError(f"gradient norms must be ≥ 0, got grad_norm={grad_norm}, grad_norm0={grad_norm0}")
    ratio = grad_norm / grad_norm0 if grad_norm0 > 0 else math.nan
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    sharp = 0.5 * lam_max * lr / (1.0 + momentum) if lr is not None and math.isfinite(lam_max) else math.nan
    reasons = []
    if ratio >= grad_ratio_tol:
        reasons.append(f"grad_ratio={ratio:.3g}>={grad_ratio_tol:g}")
    noise = ratio < noise_ratio
    if cosine < cosine_tol and not noise:
        reasons.append(f"cosine={cosine:.3g}<{cosine_tol:g}")
    bouncing = bool(reasons)  # NaN comparisons are False: unmeasured criteria never fire
    if sharp >= sharpness_tol:
        name = "lam_max*lr/2" if momentum == 0 else f"lam_max*lr/(2*(1+{momentum:g}))"
        reasons.append(f"{name}={sharp:.3g}>={sharpness_tol:g}")
    if not bouncing:
        reasons.insert(0, f"grad_ratio={ratio:.3g}<{grad_ratio_tol:g}")
        if noise and math.isfinite(cosine):
            reasons.append(f"cosine={cosine:.3g} not used: gradient at rounding level (grad_ratio<{noise_ratio:.3g})")
        return StallTag("small_gradient", ratio, cosine, sharp, "; ".join(reasons))
    return StallTag("oscillating", ratio, cosine, sharp, "; ".join(reasons))


def stall_tag_at(loss_fn: LossFn, theta: torch.Tensor, grad_norm0: float, lr: Optional[float], *,
                 power_iters: int = 50, **thresholds) -> StallTag:
    """:func:`stall_tag` for a saved checkpoint of full-batch gradient descent, from ``theta`` ``[N]`` alone:
    the cosine is taken between ∇L(θ) and the gradient after one more GD step (θ − lr·∇L(θ)), which is what
    GD's next gradient is, and λmax by :func:`power_lambda_max`. ``grad_norm0``: ‖∇L‖ at step 0 (first entry
    of the run's curve). ``lr`` None (Adam): no cosine step and no 2/lr criterion, only ‖g‖/‖g₀‖.
    ``thresholds``: ``momentum``, ``grad_ratio_tol``, ``cosine_tol``, ``sharpness_tol`` of :func:`stall_tag`
    (with momentum the cosine still probes one plain step of ``lr``: θ alone holds no momentum buffer). The rounding
    level below which the cosine is noise is :data:`NOISE_EPS` machine epsilons of ``theta``'s dtype."""
    theta = theta.detach()
    g_fn = grad(loss_fn)
    g = g_fn(theta)
    cos, lam = math.nan, math.nan
    if lr is not None:
        cos = gradient_cosine(g, g_fn(theta - lr * g))
        lam = power_lambda_max(loss_fn, theta, power_iters).lam_max
    noise = NOISE_EPS * torch.finfo(theta.dtype).eps
    return stall_tag(float(torch.linalg.vector_norm(g)), grad_norm0, cos, lam, lr, noise_ratio=noise, **thresholds)


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
