"""Stage 6b — refinement: from a stalled point, look for a true critical point (∇L = 0), float64, full batch.

Two finders, both pure functions of a loss ``loss_fn(theta) -> scalar`` and a flat start ``theta0`` ``[N]``:

- :func:`newton_mr` — Newton-MR (Roosta, Liu, Xu, Mahoney 2018; recommended by Frye et al. 2021): the step
  ``p`` is the minimum-residual solution of ``H p = −g`` from :func:`minres`, which works for indefinite and
  singular ``H``; a backtracking line search on ``‖g‖²`` (Armijo: ``‖g(θ+αp)‖² ≤ ‖g‖² + 2ρα⟨Hp, g⟩``) picks α.
- :func:`gnm` — gradient-norm minimisation, the baseline: descent on ``½‖g‖²``, whose gradient is ``Hg``.

A third, :func:`pipeline.landscape.newton_eig.newton_eig`, takes Newton steps from the exact eigendecomposition
(N up to a few thousand); :func:`refine` dispatches to all three by name.

Both stop when ``‖g‖² < gtol2`` (default 1e-10, the cut-off Frye et al. found necessary for correct loss and
index values). Finders that hunt ``‖g‖² → 0`` can also end where ``g`` lies in the Hessian's null space
(gradient-flat points, ``Hg = 0`` but ``g ≠ 0``); the MINRES residuals recorded at the final point say so
(see :mod:`pipeline.landscape.critical`). No Ray, Hydra or files here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.func import grad_and_value

from pipeline.landscape.critical import GTOL2
from pipeline.curvature.hessian_build import hessian, resolve_hvp
from pipeline.curvature.hvp import LossFn, hvp_at
from pipeline.numerics.lanczos import MatVec, reorthogonalize
from pipeline.landscape.newton_eig import newton_eig
from pipeline.landscape.refine_result import (STOP_REASONS, RefineResult, flat_start,  # noqa: F401  (STOP_REASONS re-exported)
                                    new_history, norm2, push_history)

METHODS = ("newton_mr", "gnm", "newton_eig")  # newton_eig: pipeline.landscape.newton_eig (exact eigendecomposition)
MINRES_STOPS = ("solved", "least_squares", "invariant", "max_iters", "zero_rhs")
OPERATORS = ("auto", "hvp", "dense")
# `auto` builds H (closed form) per Newton step up to this N, where products with a dense H are still
# cheaper than HVPs; above it a product with a large H is memory-bound (crossovers: docs/performance.md).
AUTO_DENSE_MAX_N = {"cpu": 2048, "cuda": 4096}


# ------------------------------------------------------------------------------------------------ MINRES


@dataclass
class MinresResult:
    """What :func:`minres` returns for ``A x ≈ b``.

    ``x`` ``[N]``: the minimum-residual solution in the Krylov space, of minimum length among those (singular
    values of the projected matrix below ``rcond · σmax`` are dropped, as MINRES-QLP does for singular A).
    ``residual`` ``[N]`` is ``b − A x``, computed explicitly. ``relative_residual`` = ‖b − Ax‖ / ‖b‖;
    ``cokernel_residual`` = ‖A r‖ / (‖A‖₂ ‖r‖): near 0 when the residual lies in A's null space, i.e. ``x``
    solves the least-squares problem (0 when ``r`` = 0; meaningless when ``r`` is rounding noise, i.e. for a
    solved consistent system). ``a_norm``: σmax of the projected matrix, a lower
    estimate of ‖A‖₂. ``stopped_because`` ∈ ``MINRES_STOPS``.
    """

    x: torch.Tensor
    residual: torch.Tensor
    iterations: int
    stopped_because: str
    relative_residual: float
    cokernel_residual: float
    a_norm: float
    matvecs: int


def _tridiag_times(alphas: np.ndarray, betas: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``T̄ t`` for the (m+1)×m Lanczos matrix with diagonal ``alphas`` [m] and sub/super-diagonal ``betas``
    [m] (``betas[j]`` = T̄[j+1, j]); ``t`` has length m."""
    m = len(alphas)
    out = np.zeros(m + 1)
    out[:m] += alphas * t
    out[1:m + 1] += betas * t
    out[:m - 1] += betas[:m - 1] * t[1:]
    return out


def minres(matvec: MatVec, b: torch.Tensor, *, rtol: float = 1e-10, max_iters: Optional[int] = None,
           rcond: float = 1e-10) -> MinresResult:
    """Minimum-residual solution of ``A x = b`` for a symmetric, possibly indefinite or singular, ``A``.

    ``matvec``: ``v ↦ A v`` for ``v`` ``[N]`` (e.g. a Hessian-vector product). Lanczos with full
    reorthogonalisation builds the Krylov basis ``V``; the residual of the MINRES iterate is tracked by Givens
    rotations of the tridiagonal ``T̄``, and the iteration stops when

    - ``‖r‖ ≤ rtol · ‖b‖`` (``solved``: a consistent system), or
    - ``‖A r‖ ≤ rtol · ‖A b‖`` (``least_squares``: the normal equations A²x = Ab are solved to ``rtol`` — the
      inexactness condition of Newton-MR (Roosta et al.); it also ends an inconsistent system, whose residual
      then lies in A's null space; checked one iteration late, when ``A r`` is known), or
    - the Krylov space is invariant (``invariant``: the solution in it is the exact least-squares one), or
    - after ``max_iters`` (default N) iterations (``max_iters``).

    The returned ``x`` solves ``min ‖β₁e₁ − T̄y‖`` by a truncated SVD (``rcond``), so a singular ``A`` gives
    the minimum-length least-squares solution in the Krylov space instead of a blown-up one. Memory: the
    basis, ``(iterations + 1) × N`` numbers. The Lanczos step and the Givens update of the residuals are one
    recurrence, so they stay in one loop.
    """
    n = b.numel()
    if b.dim() != 1:
        raise ValueError(f"b must be a flat [N] vector, got shape {tuple(b.shape)}")
    m_max = n if max_iters is None else max(1, min(int(max_iters), n))
    beta1 = float(torch.linalg.vector_norm(b))
    if beta1 == 0.0:
        zero = torch.zeros_like(b)
        return MinresResult(zero, zero.clone(), 0, "zero_rhs", 0.0, 0.0, 0.0, 0)
    V = b.new_zeros(m_max + 1, n)
    V[0] = b / beta1
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] = β_{j+1} = T̄[j+1, j]
    c2, c1, s1 = 1.0, 1.0, 0.0  # cosine of rotation j−2; cosine and sine of rotation j−1
    phibar = beta1
    q = np.ones(1)  # Q_jᵀ e_{j+1}: direction of the small-space residual of the MINRES iterate
    t_prev: Optional[np.ndarray] = None  # small-space residual of the previous iterate
    a_norm, stop, matvecs = 0.0, "max_iters", 0
    eps = float(torch.finfo(b.dtype).eps)
    for j in range(m_max):
        w = matvec(V[j])
        matvecs += 1
        alpha = float(V[j] @ w)
        w = w - alpha * V[j]
        if j > 0:
            w = w - betas[-1] * V[j - 1]
        w = reorthogonalize(w, V[:j + 1])  # full: Lanczos vectors lose orthogonality otherwise
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        betas.append(beta)
        beta_j = betas[-2] if j > 0 else 0.0
        a_norm = max(a_norm, math.sqrt(beta_j ** 2 + alpha ** 2 + beta ** 2))
        if j == 0:
            ab_norm = beta1 * math.hypot(alpha, beta)  # ‖A b‖ = β₁‖A v₁‖
        # Givens QR of column j of T̄ (entries β_j, α_j, β_{j+1} in rows j−1, j, j+1): rotation j−2 leaves
        # c₂β_j in row j−1, rotation j−1 leaves γ̄ in row j, and rotation j zeroes β_{j+1} below it.
        gbar = -s1 * (c2 * beta_j) + c1 * alpha
        gamma = math.hypot(gbar, beta)
        c, s = (gbar / gamma, beta / gamma) if gamma > 0 else (1.0, 0.0)
        phibar = -s * phibar
        q = np.append(q * (-s), c)
        # ‖A r‖ of the previous iterate, now that column j of T̄ is known: A V_{j+1} = V_{j+2} T̄_j.
        if t_prev is not None:
            ar = float(np.linalg.norm(_tridiag_times(np.array(alphas), np.array(betas), t_prev)))
            if ar <= rtol * ab_norm:
                stop = "least_squares"
                break
        c2, c1, s1 = c1, c, s
        if abs(phibar) <= rtol * beta1 and gamma > 0:  # γ = 0: a zero column (b in the null space), not solved
            stop = "solved"
            break
        if beta <= n * eps * a_norm:
            stop = "invariant"
            break
        V[j + 1] = w / beta
        t_prev = phibar * q
    m = len(alphas)
    y, s_max = _small_least_squares(alphas, betas, beta1, stop == "invariant", rcond)
    x = V[:m].T @ torch.as_tensor(y, dtype=b.dtype, device=b.device)
    r = b - matvec(x)
    ar_vec = matvec(r)
    matvecs += 2
    r_norm = float(torch.linalg.vector_norm(r))
    cok = float(torch.linalg.vector_norm(ar_vec)) / (s_max * r_norm) if r_norm > 0 and s_max > 0 else 0.0
    return MinresResult(x, r, m, stop, r_norm / beta1, cok, s_max, matvecs)


def _small_least_squares(alphas: list, betas: list, beta1: float, invariant: bool, rcond: float
                         ) -> tuple[np.ndarray, float]:
    """The minimum-length solution ``y`` ``[m]`` of ``min ‖β₁e₁ − T̄y‖`` for the (m+1)×m Lanczos matrix
    (m×m when the Krylov space is ``invariant``: its last row is then rounding noise) by an SVD truncated
    at ``rcond`` · σmax, and σmax, the estimate of ‖A‖₂."""
    m = len(alphas)
    T = np.zeros((m + 1, m))
    T[np.arange(m), np.arange(m)] = alphas
    T[np.arange(1, m + 1), np.arange(m)] = betas
    T[np.arange(m - 1), np.arange(1, m)] = betas[:m - 1]
    if invariant:
        T = T[:m]
    U, S, Wt = np.linalg.svd(T, full_matrices=False)
    keep = S > rcond * S[0] if S[0] > 0 else np.zeros_like(S, dtype=bool)
    rhs = np.zeros(T.shape[0])
    rhs[0] = beta1
    return Wt[keep].T @ ((U[:, keep].T @ rhs) / S[keep]), float(S[0])


# ------------------------------------------------------------------------------------------------ finders


def _stalled(gn2s: list, window: int, rtol: float) -> bool:
    """``‖g‖²`` fell by less than a factor ``1 − rtol`` over the last ``window`` iterations."""
    return window > 0 and len(gn2s) > window and gn2s[-1] > (1.0 - rtol) * gn2s[-1 - window]


def _backtrack(gv, theta: torch.Tensor, d: torch.Tensor, gn2: float, slope: float, alpha: float, c: float,
               backtrack: float):
    """Backtracking line search on ‖g‖² along ``d`` from step ``alpha``: the first α (shrunk by ``backtrack``)
    with ‖g(θ+αd)‖² ≤ ‖g‖² + c·α·``slope`` (Armijo; ``slope`` = d/dα ‖g(θ+αd)‖² at 0, < 0 for descent).
    Returns ``((θ+αd, g, loss, ‖g‖², α), gradient evaluations)``, or ``(None, evaluations)`` when no such
    α exists above rounding level or ``d`` is no descent direction."""
    d_norm = float(torch.linalg.vector_norm(d))
    theta_norm = float(torch.linalg.vector_norm(theta))
    evals = 0
    while slope < 0 and alpha * d_norm > 1e-16 * (1.0 + theta_norm):
        trial = theta + alpha * d
        g_t, loss_t = gv(trial)
        evals += 1
        gn2_t = norm2(g_t)
        if math.isfinite(gn2_t) and gn2_t <= gn2 + c * alpha * slope:
            return (trial, g_t, loss_t, gn2_t, alpha), evals
        alpha *= backtrack
    return None, evals


def _stop(gn2: float, gtol2: float, it: int, max_iters: int, history: dict, window: int, rtol: float) -> str:
    """Why a finder stops before its next step ("" to go on): converged, max_iters or stalled."""
    if gn2 < gtol2:
        return "converged"
    if it >= max_iters:
        return "max_iters"
    if _stalled(history["grad_norm2"], window, rtol):
        return "stalled"
    return ""


def resolve_operator(operator: str, loss_fn: LossFn, theta: torch.Tensor) -> str:
    """``auto`` → ``dense`` where the loss offers a closed-form Hessian (an MLP's, so one build costs a few
    dozen HVPs' time) and N ≤ :data:`AUTO_DENSE_MAX_N` for ``theta``'s device type, else ``hvp``."""
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}: expected one of {', '.join(OPERATORS)}")
    if operator != "auto":
        return operator
    small = theta.numel() <= AUTO_DENSE_MAX_N.get(theta.device.type, AUTO_DENSE_MAX_N["cpu"])
    return "dense" if small and resolve_hvp("auto", theta.device, loss_fn) == "closed_form" else "hvp"


def _matvec(loss_fn: LossFn, theta: torch.Tensor, operator: str) -> MatVec:
    """``v -> H v`` at ``theta`` for a resolved ``operator`` (``hvp`` or ``dense``)."""
    if operator == "hvp":
        return hvp_at(loss_fn, theta)
    H = hessian(loss_fn, theta)  # one N×N build per point, then cheap products
    return lambda v: H @ v


class _Walk:
    """The state a finder walks from ``theta0`` ``[N]``: the point θ, its gradient ``g`` and ``loss``, ‖g‖²,
    the counts of HVPs, gradients and steps, and the history; :meth:`take` accepts a line search's point
    and :meth:`result` makes the :class:`RefineResult`. One owner for what both finders record."""

    def __init__(self, loss_fn: LossFn, theta0: torch.Tensor, **history_columns):
        self.t0 = time.perf_counter()
        self.theta = flat_start(theta0)
        self.start = self.theta.clone()
        self.gv = grad_and_value(loss_fn)
        self.g, loss = self.gv(self.theta)
        self.loss = self.loss0 = float(loss)
        self.gn2 = self.gn2_0 = norm2(self.g)
        self.hvps, self.grads, self.it = 0, 1, 0
        self.history = new_history(loss=self.loss, grad_norm2=self.gn2, step=0.0, step_norm=0.0, **history_columns)

    def stop(self, gtol2: float, max_iters: int, window: int, rtol: float) -> str:
        return _stop(self.gn2, gtol2, self.it, max_iters, self.history, window, rtol)

    def take(self, found, direction_norm: float, **history_columns) -> bool:
        """Move to the line search's ``found`` ``(θ, g, loss, ‖g‖², α)`` and record the step (its length is
        α·``direction_norm``); False, with nothing changed, where the search found no point."""
        if found is None:
            return False
        self.theta, self.g, loss, self.gn2, alpha = found
        self.loss = float(loss)
        self.it += 1
        push_history(self.history, loss=self.loss, grad_norm2=self.gn2, step=alpha,
                     step_norm=alpha * direction_norm, **history_columns)
        return True

    def result(self, method: str, stop: str, flatness: tuple[float, float, int]) -> RefineResult:
        r, r_h, extra = flatness
        return RefineResult(method, self.theta, self.loss, self.loss0, self.gn2, self.gn2_0, self.it, stop,
                            float(torch.linalg.vector_norm(self.theta - self.start)), r, r_h, self.hvps + extra,
                            self.grads, time.perf_counter() - self.t0, self.history)


def newton_mr(loss_fn: LossFn, theta0: torch.Tensor, *, gtol2: float = GTOL2, max_iters: int = 100,
              inner_max_iters: int = 500, inner_rtol: float = 1e-10, forcing: float = 0.1,
              rcond: float = 1e-10, rho: float = 1e-4,
              backtrack: float = 0.5, stall_window: int = 20, stall_rtol: float = 1e-3,
              operator: str = "auto") -> RefineResult:
    """Newton-MR from ``theta0`` ``[N]``: ``p = MINRES(H, −g)``, then α ∈ {1, β, β², …} (β = ``backtrack``)
    until ``‖g(θ+αp)‖² ≤ ‖g‖² + 2ρα⟨Hp, g⟩``. MINRES makes ⟨Hp, g⟩ ≤ 0, so ``p`` descends ``‖g‖²``.

    Stops when ``‖g‖² < gtol2`` (``converged``), after ``max_iters`` Newton steps (``max_iters``), when no α
    changes θ any more or ``p`` is not a descent direction (``line_search_failed`` — typical at gradient-flat
    points), or when ``‖g‖²`` fell by less than a factor ``1 − stall_rtol`` over ``stall_window`` steps
    (``stalled``). MINRES runs to the tolerance η = min(``forcing``, max(``inner_rtol``, ‖g‖^½)) — loose far
    from a critical point, tight near one — with at most ``inner_max_iters`` iterations and ``rcond``
    (see :func:`minres`); ``forcing`` = ``inner_rtol`` gives a fixed tolerance. ``operator``: ``hvp`` (Hessian-vector
    products), ``dense`` (build H once per step, then matrix products) or ``auto`` (see
    :func:`resolve_operator`). ``loss_fn`` must accept float64.
    """
    w = _Walk(loss_fn, theta0, inner_iterations=0, inner_stop="", relative_residual=math.nan,
              cokernel_residual=math.nan)
    operator = resolve_operator(operator, loss_fn, w.theta)
    last = None  # (MINRES result, θ it was solved at)
    while not (stop := w.stop(gtol2, max_iters, stall_window, stall_rtol)):
        matvec = _matvec(loss_fn, w.theta, operator)
        # Inexact Newton: a loose solve far away, tighter as ‖g‖ → 0 (superlinear convergence near the end).
        eta = min(forcing, max(inner_rtol, math.sqrt(math.sqrt(w.gn2))))
        sol = minres(matvec, -w.g, rtol=eta, max_iters=inner_max_iters, rcond=rcond)
        w.hvps += sol.matvecs
        last = (sol, w.theta)
        hp = -w.g - sol.residual  # H p, from r = −g − H p
        slope = 2.0 * float(hp @ w.g)  # d/dα ‖g(θ+αp)‖² at α = 0
        found, evals = _backtrack(w.gv, w.theta, sol.x, w.gn2, slope, 1.0, rho, backtrack)
        w.grads += evals
        if not w.take(found, float(torch.linalg.vector_norm(sol.x)), inner_iterations=sol.iterations,
                      inner_stop=sol.stopped_because, relative_residual=sol.relative_residual,
                      cokernel_residual=sol.cokernel_residual):
            stop = "line_search_failed"
            break
    return w.result("newton_mr", stop, _final_flatness(loss_fn, w.theta, w.g, stop, last, inner_rtol,
                                                       inner_max_iters, rcond, operator))


def _final_flatness(loss_fn, theta, g, stop, last, rtol, max_iters, rcond, operator) -> tuple[float, float, int]:
    """Frye et al.'s residuals (r, r_H) of MINRES on ``H p = −g`` at the final point, and the HVPs spent.
    Reuses the last solve when it was made at the final point; NaN at a converged point."""
    if stop == "converged":
        return math.nan, math.nan, 0
    if last is not None and last[1] is theta:
        return last[0].relative_residual, last[0].cokernel_residual, 0
    sol = minres(_matvec(loss_fn, theta, operator), -g, rtol=rtol, max_iters=max_iters, rcond=rcond)
    return sol.relative_residual, sol.cokernel_residual, sol.matvecs


def gnm(loss_fn: LossFn, theta0: torch.Tensor, *, gtol2: float = GTOL2, max_iters: int = 2000,
        lr: Optional[float] = None, c: float = 1e-4, backtrack: float = 0.5, grow: float = 2.0,
        stall_window: int = 200, stall_rtol: float = 1e-3, inner_max_iters: int = 500,
        inner_rtol: float = 1e-10, rcond: float = 1e-10) -> RefineResult:
    """Gradient-norm minimisation from ``theta0`` ``[N]``: descent on ``q(θ) = ½‖∇L(θ)‖²`` along
    ``−∇q = −H g`` (one HVP per step).

    ``lr`` given: fixed steps ``θ ← θ − lr·Hg``. ``lr`` None: backtracking line search (Armijo,
    ``q(θ − αHg) ≤ q(θ) − c·α·‖Hg‖²``), each search starting from ``grow`` × the last accepted α.
    Stops as :func:`newton_mr` does; ``line_search_failed`` also when ``Hg = 0`` with ``g ≠ 0`` — an exactly
    gradient-flat point, where GNM cannot move. The ``inner_*`` settings only serve the final
    gradient-flat test (MINRES at the final point).
    """
    w = _Walk(loss_fn, theta0)
    alpha = 1.0 if lr is None else float(lr)
    while not (stop := w.stop(gtol2, max_iters, stall_window, stall_rtol)):
        d = -hvp_at(loss_fn, w.theta)(w.g)  # −∇(½‖g‖²)
        w.hvps += 1
        dd = norm2(d)
        found = None
        if lr is not None and dd > 0:
            trial = w.theta + alpha * d
            g_t, loss_t = w.gv(trial)
            w.grads += 1
            if bool(torch.isfinite(g_t).all()):
                found = (trial, g_t, loss_t, norm2(g_t), alpha)
        else:
            # d/dα ‖g(θ+αd)‖² = 2 gᵀH d = −2‖d‖²: Armijo on ½‖g‖² with constant c.
            found, evals = _backtrack(w.gv, w.theta, d, w.gn2, -2.0 * dd, alpha * grow, c, backtrack)
            w.grads += evals
        if not w.take(found, math.sqrt(dd)):
            stop = "line_search_failed"
            break
        alpha = found[4]
    return w.result("gnm", stop, _final_flatness(loss_fn, w.theta, w.g, stop, None, inner_rtol, inner_max_iters,
                                                 rcond, "hvp"))


# The settings of the `refine:` config section each finder takes as keyword arguments (the others are
# `method`, Ray resources and the other finder's settings). tests/test_refine.py checks them against the
# finders' signatures and the config's schema.
SETTINGS = {"newton_mr": ("gtol2", "max_iters", "inner_max_iters", "inner_rtol", "forcing", "rcond", "operator"),
            "gnm": ("gtol2", "max_iters", "inner_max_iters", "inner_rtol", "rcond"),
            "newton_eig": ("gtol2", "max_iters", "damping", "min_damping", "max_tries", "patience", "progress",
                           "continuation")}
# The settings of the `hessian:` section a finder also takes: newton_eig cuts its pseudo-inverse off at the
# counts' tolerance, so it follows their rule.
COUNT_SETTINGS = {"newton_mr": (), "gnm": (), "newton_eig": ("rel_tol", "gap_ratio", "tol_mode", "abs_tol")}


def options_for(method: str, section, counts=None) -> dict:
    """The keyword arguments of finder ``method``: its :data:`SETTINGS` read as attributes of ``section``
    (a run's ``refine`` settings) and its :data:`COUNT_SETTINGS` of ``counts`` (its ``hessian`` counting
    settings; None: the finder's defaults)."""
    if method not in METHODS:
        raise ValueError(f"unknown refine method {method!r}: expected one of {', '.join(METHODS)}")
    found = {k: getattr(counts, k) for k in COUNT_SETTINGS[method]} if counts is not None else {}
    return {**found, **{k: getattr(section, k) for k in SETTINGS[method]}}


def _finder(method: str) -> Callable[..., RefineResult]:
    return {"newton_mr": newton_mr, "gnm": gnm, "newton_eig": newton_eig}[method]


def refine(method: str, loss_fn: LossFn, theta0: torch.Tensor, **options) -> RefineResult:
    """Run the finder named ``method`` (one of :data:`METHODS`) with its keyword ``options``."""
    if method not in METHODS:
        raise ValueError(f"unknown refine method {method!r}: expected one of {', '.join(METHODS)}")
    return _finder(method)(loss_fn, theta0, **options)
