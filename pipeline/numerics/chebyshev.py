"""Smoothed step functions as Chebyshev series with Jackson damping, and the stochastic Chebyshev moments
that turn them into traces — the numerical core of :mod:`pipeline.curvature.estimate`.

On a spectral interval [a, b], λ = (a+b)/2 + (b−a)/2 · cos θ. The step 1[λ > t] is 1[θ < φ] with
t ↔ φ; its Chebyshev coefficients are φ/π and (2/π) sin(kφ)/k. Jackson's damping factors make the truncated
series a convolution with a positive kernel, so the smoothed step stays in [0, 1], grows monotonically with φ,
and departs from the true step only within a band of half-width ≈ 13/m in θ (for ε = 1e-3) around φ: about
13·(b−a)/(2m) in λ mid-interval, and far less near a or b, where dλ/dθ → 0.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.fft import dct

from pipeline.numerics.lanczos import MatVec

GRID_PER_DEGREE = 16  # grid points per unit of degree: 32 per period of T_m, so p is resolved between points
MAX_DEGREE = 1 << 17  # beyond ~10⁵ matvecs per probe the estimator is not the tool; refuse instead


def jackson(m: int) -> np.ndarray:
    """Jackson damping factors ``[m+1]`` for Chebyshev terms 0..m (Weiße et al., Rev. Mod. Phys. 78, 275)."""
    M = m + 1
    k = np.arange(M)
    q = np.pi / (M + 1)
    return ((M - k + 1) * np.cos(q * k) + np.sin(q * k) / np.tan(q)) / (M + 1)


class SmoothedSteps:
    """Jackson-damped Chebyshev steps of degree ``m`` on the spectral interval ``[a, b]``.

    The step at λ = a + (b−a)(1+cos φ)/2 is 1[θ < φ] in the angle θ = arccos x of the scaled variable x.
    Its polynomial is evaluated on a uniform θ-grid by a DCT, so thresholds can be searched cheaply.
    """

    def __init__(self, m: int, a: float, b: float, eps: float):
        if not (b > a):
            raise ValueError(f"spectral interval must have b > a, got [{a}, {b}]")
        if m < 2:
            raise ValueError(f"degree must be ≥ 2, got {m}")
        self.m, self.a, self.b, self.eps = m, a, b, eps
        # Bounds are met on the grid with 1% to spare: between grid points p strays by less (tested).
        self._eps_grid = 0.99 * eps
        self.damp = jackson(m)
        self.G = GRID_PER_DEGREE * m
        self.theta = np.pi * np.arange(self.G + 1) / self.G
        self.lam = self.to_lam(np.cos(self.theta))  # decreasing along the grid

    def to_lam(self, x):
        return 0.5 * (self.a + self.b) + 0.5 * (self.b - self.a) * x

    def phi_at(self, lam: float) -> float:
        """The angle φ of threshold ``lam`` (clipped to [0, π] outside [a, b])."""
        x = (2.0 * lam - self.a - self.b) / (self.b - self.a)
        return float(np.arccos(np.clip(x, -1.0, 1.0)))

    def coefficients(self, phi: float) -> np.ndarray:
        """Damped Chebyshev coefficients ``[m+1]`` of 1[θ < φ]: φ/π, then (2/π) sin(kφ)/k."""
        k = np.arange(1, self.m + 1)
        c = np.concatenate([[phi / np.pi], 2.0 / np.pi * np.sin(k * phi) / k])
        return c * self.damp

    def on_grid(self, phi: float) -> np.ndarray:
        """The smoothed step at every grid point ``[G+1]`` (DCT-I of the coefficients)."""
        x = np.zeros(self.G + 1)
        c = self.coefficients(phi)
        x[0], x[1:self.m + 1] = c[0], 0.5 * c[1:]
        return dct(x, type=1)

    def at(self, phi: float, theta: float) -> float:
        """The smoothed step with threshold angle ``phi`` at the angle ``theta``."""
        return float(np.cos(theta * np.arange(self.m + 1)) @ self.coefficients(phi))

    def below(self, lam: float) -> float:
        """Largest φ with p ≤ ε wherever λ ≤ ``lam`` (a step that never counts those as positive)."""
        mask, th = self.lam <= lam, self.phi_at(lam)
        # The grid and the threshold itself: next to it the step is steep, between grid points it is not.
        e = self._eps_grid
        return self._bisect(lambda phi, p: (not mask.any() or p[mask].max() <= e)
                            and (lam > self.b or self.at(phi, th) <= e), ok_at_zero=True)

    def above(self, lam: float) -> float:
        """Smallest φ with p ≥ 1 − ε wherever λ ≥ ``lam`` (a step that counts all of those as positive)."""
        mask, th = self.lam >= lam, self.phi_at(lam)
        e = self._eps_grid
        return self._bisect(lambda phi, p: (not mask.any() or p[mask].min() >= 1.0 - e)
                            and (lam < self.a or self.at(phi, th) >= 1.0 - e), ok_at_zero=False)

    def _bisect(self, ok, ok_at_zero: bool) -> float:
        # p grows monotonically with φ (positive kernel), so the feasible φ form one interval.
        lo, hi = 0.0, np.pi
        if ok_at_zero and ok(hi, self.on_grid(hi)):
            return hi
        if not ok_at_zero and ok(lo, self.on_grid(lo)):
            return lo
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if ok(mid, self.on_grid(mid)) == ok_at_zero:
                lo = mid
            else:
                hi = mid
        return lo if ok_at_zero else hi

    def resolution(self, lam: float) -> float:
        """Half-width δ of the step at ``lam``: p ≤ ε below lam − δ and p ≥ 1 − ε above lam + δ (0 when the
        threshold lies outside [a, b], where the step is exact)."""
        p = self.on_grid(self.phi_at(lam))
        rising, short = self.lam[p > self.eps], self.lam[p < 1.0 - self.eps]
        left = lam - rising.min() if rising.size else 0.0
        right = short.max() - lam if short.size else 0.0
        return float(max(left, right, 0.0))

    def band(self, phi_hi: float, phi_lo: float) -> tuple[float, float]:
        """Where the upper-bound step (``phi_hi``) and the lower-bound step (``phi_lo``) can disagree."""
        up, lo = self.on_grid(phi_hi), self.on_grid(phi_lo)
        amb = self.lam[(up > self.eps) & (lo < 1.0 - self.eps)]
        return (float(amb.min()), float(amb.max())) if amb.size else (float("nan"), float("nan"))


def resolution(degree: int, a: float, b: float, tol: float, eps: float = 1e-3) -> float:
    """The resolution δ at ±``tol`` of a degree-``degree`` smoothed step on the spectral interval [a, b]."""
    s = SmoothedSteps(degree, a, b, eps)
    return max(s.resolution(tol), s.resolution(-tol))


def min_degree(a: float, b: float, tol: float, eps: float = 1e-3, target: float = 0.0) -> int:
    """Smallest degree (to within 3%) whose resolution at ±``tol`` on [a, b] is ≤ ``target`` (default
    ``tol``); ``MAX_DEGREE + 1`` when even that is not enough."""
    target = target or tol
    if tol <= 0:
        return MAX_DEGREE + 1
    lo, hi = 2, 16
    while resolution(hi, a, b, tol, eps) > target:
        if hi >= MAX_DEGREE:
            return MAX_DEGREE + 1
        lo, hi = hi, min(2 * hi, MAX_DEGREE)
    while hi > 1.03 * lo + 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if resolution(mid, a, b, tol, eps) <= target else (mid, hi)
    return hi


def chebyshev_moments(op: MatVec, Z: torch.Tensor, degree: int, a: float, b: float) -> np.ndarray:
    """``mu[j, k] = z_jᵀ T_k(B̃) z_j`` for k = 0..degree, with B̃ = (B − c)/r mapping [a, b] to [−1, 1].

    ``Z`` ``[N, p]``: probe columns. ⌈degree/2⌉ matvecs (T_{2k} = 2T_k² − T_0, T_{2k−1} = 2T_kT_{k−1} − T_1).
    Returns float64 ``[p, degree+1]``. Raises when a column grows, i.e. the spectrum leaves [a, b].
    """
    c, r = 0.5 * (a + b), 0.5 * (b - a)

    def apply(V):
        return (op(V) - c * V) / r

    def dots(X, Y):
        return torch.linalg.vecdot(X.double(), Y.double(), dim=0).cpu().numpy()

    K = (degree + 1) // 2
    mu = np.zeros((Z.shape[1], 2 * K + 1))
    v_prev, v = Z, apply(Z)
    mu[:, 0], mu[:, 1] = dots(Z, Z), dots(Z, v)
    z_norm = np.sqrt(mu[:, 0])
    for j in range(1, K + 1):
        mu[:, 2 * j] = 2 * dots(v, v) - mu[:, 0]
        mu[:, 2 * j - 1] = 2 * dots(v, v_prev) - mu[:, 1]
        # |T_j| ≤ 1 on [−1, 1]: growth means eigenvalues outside the padded range, and moments would be wrong.
        if np.any(np.sqrt(np.maximum(mu[:, 2 * j] + mu[:, 0], 0) / 2) > 4 * z_norm):
            raise RuntimeError(f"Chebyshev vectors grew at degree {j}: the spectrum leaves the estimated "
                               f"range [{a:.6g}, {b:.6g}]; increase lanczos_steps or range_pad")
        if j < K:
            v_prev, v = v, 2 * apply(v) - v_prev
    return mu[:, :degree + 1]
