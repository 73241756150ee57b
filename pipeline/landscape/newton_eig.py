"""A critical-point finder from the exact eigendecomposition: Levenberg–Marquardt Newton on the gradient map.

At the sizes where the exact Hessian is cheap (N up to a few thousand), every step can use ``H = V Λ Vᵀ``
itself. The finder solves ``g(θ) = 0`` (the gradient map, whose Jacobian is ``H``) by damped Newton steps

    p(μ) = −Σ_{|λᵢ| > tol} λᵢ cᵢ / (λᵢ² + μ) · vᵢ,      cᵢ = vᵢᵀ g,

i.e. ``p = −(H² + μI)⁻¹ H g`` restricted to the eigenvalues the counts call non-zero (``tol`` is the counts'
tolerance, :func:`pipeline.curvature.spectrum.choose_tol`); ``μ = 0`` is the minimum-norm Newton step ``−H⁺g``.
``μ = m·‖g‖`` (Fan & Yuan's choice, which keeps quadratic convergence towards a manifold of critical points
of constant rank, the degenerate case networks live in) and ``m`` is set by a trust-region test on
``‖g‖²``: the ratio of the actual to the predicted decrease ``‖g‖² − ‖g + Hp‖²``. Rejected steps retry
with a larger ``m`` on the same decomposition, at one gradient each.

Newton on the gradient map is attracted to critical points of every index, saddles included (unlike
saddle-free Newton, which flees them). Where ``g`` falls into ``H``'s near-null space it cannot make
progress: Frye et al.'s gradient-flat test (r > 0.9, r_H < 5e-4, from the same decomposition) ends the run
there with ``stopped_because = "gradient_flat"``. No Ray, Hydra or files here.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch.func import grad_and_value

from pipeline.landscape import critical
from pipeline.curvature import spectrum
from pipeline.landscape.critical import GTOL2
from pipeline.curvature.hessian_build import hessian
from pipeline.curvature.hvp import LossFn
from pipeline.landscape.refine_result import RefineResult, flat_start, new_history, norm2, push_history

ACCEPT = 1e-4  # a step is taken when the actual decrease of ‖g‖² is at least this share of the predicted one


def _eigen(loss_fn: LossFn, theta: torch.Tensor, g: torch.Tensor, rel_tol: float, gap_ratio: float,
           tol_mode: str, abs_tol: float) -> tuple[np.ndarray, torch.Tensor, np.ndarray, float]:
    """λ ``[N]`` (ascending), V ``[N, N]``, c = Vᵀg ``[N]`` and the counts' tolerance at ``theta``."""
    lam_t, V = torch.linalg.eigh(hessian(loss_fn, theta))
    lam = lam_t.cpu().numpy()
    c = (V.T @ g).cpu().numpy()
    tol, _ = spectrum.choose_tol(np.abs(lam), rel_tol=rel_tol, gap_ratio=gap_ratio, mode=tol_mode, abs_tol=abs_tol)
    return lam, V, c, tol


def lm_step(lam: np.ndarray, c: np.ndarray, tol: float, mu: float) -> tuple[np.ndarray, float]:
    """The step's eigen-coordinates ``[N]`` and the predicted ``‖g + Hp‖²`` for damping ``mu`` ≥ 0.

    ``lam``: eigenvalues ``[N]``; ``c``: the gradient's eigen-coordinates ``[N]``; eigenvalues with
    ``|λ| ≤ tol`` get no step (their gradient part stays in the prediction)."""
    keep = np.abs(lam) > tol
    q = np.zeros_like(c)
    q[keep] = -lam[keep] * c[keep] / (lam[keep] ** 2 + mu)
    return q, float(np.sum((c + lam * q) ** 2))


def descent_step(lam: np.ndarray, c: np.ndarray, nu: float) -> tuple[np.ndarray, float]:
    """Saddle-free Newton step on the loss (Dauphin et al. 2014) with damping ``nu`` > 0: eigen-coordinates
    ``q = −c / (|λ| + ν)`` ``[N]`` and the decrease of the loss its quadratic model predicts."""
    q = -c / (np.abs(lam) + nu)
    return q, -float(c @ q + 0.5 * np.sum(lam * q * q))


def _try_steps(gv, theta, V, lam, c, tol, gn2, loss, m, phase, max_tries):
    """Trust-region loop on one decomposition: raise the damping ``m`` until a step passes the ratio test —
    on ``‖g‖²`` for ``phase="newton"`` (μ = m‖g‖), on the loss for ``phase="descent"`` (ν = m).
    Returns ``(found, m, gradient evaluations)``; ``found`` = (θ, g, loss, ‖g‖², ρ, ‖p‖) or None."""
    g_norm = math.sqrt(gn2)
    for tries in range(1, max_tries + 1):
        if phase == "newton":
            q, pred_gn2 = lm_step(lam, c, tol, m * g_norm)
            pred = gn2 - pred_gn2
        else:
            q, pred = descent_step(lam, c, m)
        if not pred > 0:
            return None, m, tries - 1
        trial = theta + V @ torch.as_tensor(q, dtype=V.dtype, device=V.device)
        g_t, loss_t = gv(trial)
        gn2_t = norm2(g_t)
        actual = gn2 - gn2_t if phase == "newton" else loss - float(loss_t)
        rho = actual / pred if math.isfinite(gn2_t) else -math.inf
        if rho >= ACCEPT:
            m = m * 4.0 if rho < 0.25 else (m / 4.0 if rho > 0.75 else m)
            return (trial, g_t, float(loss_t), gn2_t, rho, float(np.linalg.norm(q))), m, tries
        m *= 4.0
    return None, m, max_tries


def _next_phase(phase: str, history: dict, level: float, patience: int, progress: float) -> tuple[str, float]:
    """Continuation between the two step kinds. ``newton`` hands over to ``descent`` when ``‖g‖²`` fell by
    less than a factor ``progress`` over the last ``patience`` Newton steps (a slow valley of ‖g‖², where
    the gradient sits in directions of tiny curvature); ``descent`` hands back once ``‖g‖²`` is a factor
    ``progress`` below its value at the hand-over (``level``), or after ``3 · patience`` descent steps (a loss
    unbounded below never lets ‖g‖² fall). Returns the phase and the level."""
    gn2s, phases = history["grad_norm2"], history["phase"]
    if phase == "descent":
        ran = len(phases) - 1 - max(i for i, x in enumerate(phases) if x != "descent")
        done = gn2s[-1] < level / progress or ran >= 3 * patience
        return ("newton", math.nan) if done else ("descent", level)
    recent = phases[-patience:]
    if patience > 0 and len(recent) == patience and all(x == "newton" for x in recent) \
            and gn2s[-1] > gn2s[-1 - patience] / progress:
        return "descent", gn2s[-1]
    return "newton", math.nan


def newton_eig(loss_fn: LossFn, theta0: torch.Tensor, *, gtol2: float = GTOL2, max_iters: int = 200,
               rel_tol: float = 1e-6, gap_ratio: float = 1e4, tol_mode: str = "auto", abs_tol: float = 0.0,
               damping: float = 1e-3,
               min_damping: float = 1e-14, max_tries: int = 30, patience: int = 10, progress: float = 10.0,
               continuation: bool = True) -> "RefineResult":
    """Levenberg–Marquardt Newton on the gradient map from ``theta0`` ``[N]``, one Hessian build and ``eigh``
    per step (float64; ``loss_fn`` must accept float64), with continuation through slow stretches.

    Newton steps (:func:`lm_step`, trust region on ‖g‖²) are attracted to the nearest critical point of any
    index. Where they crawl — ‖g‖² fell by less than a factor ``progress`` in ``patience`` steps, or no
    damping gives a step — and ``continuation`` is on, damped saddle-free steps on the loss
    (:func:`descent_step`, trust region on L) carry θ down the slope until ‖g‖² has fallen by ``progress``;
    then Newton steps resume and pick the critical point. ``history["phase"]`` says which step each was.

    ``damping``: the starting damping relative to max|λ|; ``min_damping``: its floor, relative to max|λ|.
    ``rel_tol``, ``gap_ratio``, ``tol_mode``, ``abs_tol``: the counts' tolerance rule (as ``hessian.*``;
    ``abs_tol`` is the tolerance itself when ``tol_mode="abs"``), which also cuts off the pseudo-inverse. ``max_tries``: trial steps per decomposition. Stops: ``converged``
    (‖g‖² < ``gtol2``), ``max_iters``, ``line_search_failed`` (no trial step passed), and, when either of the
    last two ends a run at a point that passes Frye et al.'s gradient-flat test (from the same spectrum),
    ``gradient_flat``. ``relative_residual``/``cokernel_residual`` are Frye's r and r_H at the final point
    (NaN when converged); ``hvps`` is 0 (a run takes ``iterations`` + 1 Hessian builds, or ``iterations``
    when it converged, and no Hessian-vector products).
    """
    t0 = time.perf_counter()
    theta = flat_start(theta0)
    start = theta.clone()
    gv = grad_and_value(loss_fn)
    g, loss = gv(theta)
    gn2, loss, loss0, gn2_0 = norm2(g), float(loss), float(loss), norm2(g)
    grads, it, stop, phase, level = 1, 0, "", "newton", math.nan
    damp = {"newton": math.nan, "descent": math.nan}
    flat = critical.Flatness(math.nan, math.nan)
    history = new_history(loss=loss0, grad_norm2=gn2, step_norm=0.0, damping=math.nan, ratio=math.nan, tol=math.nan,
                    phase="start")
    while gn2 >= gtol2:
        lam, V, c, tol = _eigen(loss_fn, theta, g, rel_tol, gap_ratio, tol_mode, abs_tol)
        flat = critical._flatness(lam, c, tol, math.sqrt(gn2))
        if it >= max_iters:
            stop = "max_iters"
            break
        top = float(np.abs(lam).max()) or 1.0
        for k in damp:
            damp[k] = damping * top if math.isnan(damp[k]) else max(damp[k], min_damping * top)
        found, damp[phase], evals = _try_steps(gv, theta, V, lam, c, tol, gn2, loss, damp[phase], phase, max_tries)
        grads += evals
        if found is None and continuation and phase == "newton":
            phase, level = "descent", gn2
            found, damp[phase], evals = _try_steps(gv, theta, V, lam, c, tol, gn2, loss, damp[phase], phase,
                                                   max_tries)
            grads += evals
        if found is None:
            stop = "line_search_failed"
            break
        theta, g, loss, gn2, rho, p_norm = found
        it += 1
        push_history(history, loss=loss, grad_norm2=gn2, step_norm=p_norm, damping=damp[phase], ratio=rho, tol=tol,
              phase=phase)
        if continuation:
            phase, level = _next_phase(phase, history, level, patience, progress)
    if not stop:
        stop = "converged"
    elif critical.is_gradient_flat(flat.relative_residual, flat.cokernel_residual):
        stop = "gradient_flat"
    r, r_h = (math.nan, math.nan) if stop == "converged" else (flat.relative_residual, flat.cokernel_residual)
    return RefineResult("newton_eig", theta, loss, loss0, gn2, gn2_0, it, stop,
                        float(torch.linalg.vector_norm(theta - start)), r, r_h, 0, grads,
                        time.perf_counter() - t0, history)
