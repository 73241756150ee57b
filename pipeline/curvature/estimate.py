"""Eigenvalue counts with confidence intervals from Hessian-vector products only — for N beyond the dense limit.

``n_pos`` = #{λ > tol} is the trace of the step function 1[λ > tol] of H. It is estimated as

1. **Extremes and deflation.** Lanczos (:mod:`pipeline.numerics.lanczos`) gives λmin, λmax with residuals. Up to
   ``deflate`` largest-|λ| converged Ritz pairs (V, Θ) are counted exactly and projected out: the rest of
   the spectrum is that of B = P H P on V⊥ (P = I − VVᵀ), whose range [a, b] — from a second Lanczos run,
   padded — is much narrower when a few outliers dominate, as they do for network Hessians.
2. **A smoothed step** (:mod:`pipeline.numerics.chebyshev`). On [a, b] the step is expanded in Chebyshev polynomials
   up to ``degree`` m with Jackson damping. Jackson's kernel is positive, so the smoothed step p stays in
   [0, 1] and moves monotonically with its threshold; it differs from the true step only in a band around
   the threshold whose half-width — the **resolution** δ — is ≈ 13·(b−a)/(2m) mid-range and much smaller
   near the ends of [a, b].
3. **Stochastic trace.** tr p(B) ≈ mean over Rademacher probes z (projected on V⊥) of zᵀ p(B) z, with all
   Chebyshev moments zᵀT_k(B̃)z from ⌈m/2⌉ batched matvecs ``[N, n_probes]`` (T_{2k} = 2T_k² − 1 doubling).
   Any step threshold reuses the same moments.
4. **Honest intervals.** Two extra one-sided steps bound the count whatever the eigenvalues in the ambiguous
   band do: p_lo ≤ ε wherever λ ≤ tol + η, so tr p_lo − εN ≤ n_pos; p_hi ≥ 1 − ε wherever λ ≥ tol − η, so
   n_pos ≤ tr p_hi / (1 − ε). η = ‖HV − VΘ‖_F bounds how far deflation moves any eigenvalue (Weyl). The
   probe error is a one-sided Student-t bound at (1 − confidence)/2 on each side (the probe mean taken as
   normal, so the stated confidence is approximate for few probes; tested at 10). The interval therefore
   widens by about the number of eigenvalues in the ambiguous band [tol − 2δ, tol + 2δ]
   (``n_ambiguous_pos``), and a tolerance below the resolution is refused (ValueError).

Everything takes a ``matvec(V) -> H @ V`` on ``[N, k]`` blocks; :func:`pipeline.curvature.hvp.hvp_matvec` builds one for a
loss.
:func:`estimate_counts` does it all for one tolerance; the stages :func:`deflation` → :func:`sketch` →
:func:`counts` let one sketch (a few kB of moments) answer many tolerances.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Optional, Union

import numpy as np
import torch
from scipy.stats import t as student_t

from pipeline.numerics.chebyshev import MAX_DEGREE, SmoothedSteps, chebyshev_moments, min_degree, resolution
from pipeline.curvature.hvp import hvp_matvec  # noqa: F401  (re-exported: its old home)
from pipeline.numerics.lanczos import MatVec, extreme_eigenpairs

# ---------------------------------------------------------------- the estimator

@dataclass
class Deflation:
    """Stage 1: extremes of H and the deflated operator's range. ``vectors`` ``[N, d]`` and ``values`` ``[d]``:
    the Ritz pairs counted exactly and projected out; ``error`` η = ‖HV − VΘ‖_F; ``spectral_range`` [a, b]
    of B = PHP on V⊥ (padded); ``lam_*``: extreme Ritz values of H with their residuals."""

    vectors: Optional[torch.Tensor]
    values: np.ndarray
    error: float
    spectral_range: tuple[float, float]
    lam_min: float
    lam_min_residual: float
    lam_max: float
    lam_max_residual: float
    matvecs: int
    seconds: float
    dtype: torch.dtype = torch.float64
    device: str = "cpu"

    def without_vectors(self) -> "Deflation":
        return replace(self, vectors=None)


@dataclass
class Sketch:
    """Stage 2: everything the counts need, for any tolerance — Chebyshev moments ``[n_probes, degree+1]``
    of B on [a, b] for each probe, plus the deflation (its vectors dropped). Small: keep it to recount."""

    n: int
    degree: int
    moments: np.ndarray
    deflation: Deflation
    matvecs: int
    seconds: dict

    @property
    def n_probes(self) -> int:
        return self.moments.shape[0]

    def resolution(self, tol: float, eps: float = 1e-3) -> float:
        return resolution(self.degree, *self.deflation.spectral_range, tol, eps)


@dataclass
class CountEstimate:
    """Estimated counts of λ > tol (``n_pos``), λ < −tol (``n_neg``) and |λ| ≤ tol (``n_zero``) of an
    N×N symmetric operator, each with an interval ``(lo, hi)`` meant to hold with probability ≥ ``confidence``
    (integers: the truth is an integer; the module docstring says what is assumed). ``resolution``:
    half-width δ of the smoothed steps at ±tol (λ units); ``band_pos``/``band_neg``: the λ-ranges whose eigenvalues the interval cannot place, with their
    estimated counts ``n_ambiguous_*``. ``lam_min``/``lam_max``: extreme Ritz values of H with residuals
    (an eigenvalue lies within the residual). ``spectral_range``: [a, b] of the deflated operator;
    ``deflated``: the eigenvalues counted exactly; ``deflation_error`` η: how far deflation may move any
    eigenvalue. ``matvecs``: operator columns applied; ``seconds``: lanczos / chebyshev / counts."""

    n: int
    tol: float
    n_pos: float
    n_neg: float
    n_zero: float
    n_pos_ci: tuple[int, int]
    n_neg_ci: tuple[int, int]
    n_zero_ci: tuple[int, int]
    resolution: float
    band_pos: tuple[float, float]
    band_neg: tuple[float, float]
    n_ambiguous_pos: float
    n_ambiguous_neg: float
    degree: int
    n_probes: int
    confidence: float
    eps: float
    lam_min: float
    lam_min_residual: float
    lam_max: float
    lam_max_residual: float
    spectral_range: tuple[float, float]
    deflated: np.ndarray
    deflation_error: float
    matvecs: int
    seconds: dict = field(default_factory=dict)

    @property
    def min_ratio(self) -> float:
        return self.n_pos / self.n

    @property
    def min_ratio_ci(self) -> tuple[float, float]:
        return self.n_pos_ci[0] / self.n, self.n_pos_ci[1] / self.n

    @property
    def index(self) -> float:
        return self.n_neg / self.n

    @property
    def index_ci(self) -> tuple[float, float]:
        return self.n_neg_ci[0] / self.n, self.n_neg_ci[1] / self.n


def estimate_counts(matvec: MatVec, n: int, *, tol: Optional[float] = None, rel_tol: Optional[float] = None,
                    degree: int = 0, n_probes: int = 30, seed: int = 0, confidence: float = 0.95,
                    eps: float = 1e-3, deflate: int = 32, lanczos_steps: int = 0, range_pad: float = 1e-3,
                    probe_batch: int = 0, dtype: torch.dtype = torch.float64,
                    device: Union[str, torch.device] = "cpu") -> CountEstimate:
    """Estimates of n_pos, n_neg, n_zero for tolerance ``tol`` of the symmetric N×N operator ``matvec``.

    ``matvec``: ``[N, k] -> [N, k]`` on ``dtype``/``device`` tensors (a Hessian: :func:`pipeline.curvature.hvp.hvp_matvec`).
    ``tol`` (λ units) or ``rel_tol`` (``tol = rel_tol · max(|λmin|, |λmax|)``, the ``rel`` rule of
    :func:`pipeline.curvature.spectrum.choose_tol`). ``degree``: Chebyshev degree m (⌈m/2⌉ batched matvecs); 0 picks
    the least degree with resolution ≤ tol/4 (:func:`auto_degree`);
    ``n_probes`` ≥ 2 Rademacher probes, ``probe_batch`` > 0 of them per matvec call; ``eps``: how far a
    smoothed step may stray from 0/1 outside its band (adds ≤ ε·N to the interval); ``deflate``,
    ``lanczos_steps``, ``range_pad``: see :func:`deflation`. Raises ValueError — before any probe is
    spent — when ``tol`` is finer than the resolution of ``degree`` on the deflated range, or when even
    the largest degree would not resolve it.
    """
    _check(n_probes, confidence, eps)
    if (tol is None) == (rel_tol is None):
        raise ValueError(f"give exactly one of tol and rel_tol, got tol={tol}, rel_tol={rel_tol}")
    d = deflation(matvec, n, deflate=deflate, lanczos_steps=lanczos_steps, range_pad=range_pad, seed=seed,
                  dtype=dtype, device=device)
    tol = _tolerance(tol, rel_tol, d)
    degree = degree or auto_degree(d, tol, eps)
    _refuse_below_resolution(tol, degree, d, eps)
    sk = sketch(matvec, n, d, degree=degree, n_probes=n_probes, seed=seed, probe_batch=probe_batch)
    return counts(sk, tol=tol, confidence=confidence, eps=eps)


def deflation(matvec: MatVec, n: int, *, deflate: int = 32, lanczos_steps: int = 0, range_pad: float = 1e-3,
              seed: int = 0, dtype: torch.dtype = torch.float64,
              device: Union[str, torch.device] = "cpu") -> Deflation:
    """Stage 1: Lanczos on H (``lanczos_steps``, default max(80, 6·deflate)) for λmin, λmax and up to
    ``deflate`` converged largest-|λ| Ritz pairs (residual ≤ max(1e-8, 1000·eps_dtype)·max|θ|); then Lanczos
    on the deflated operator for its range, widened by ``range_pad`` × its width plus twice the extreme
    residuals."""
    t0 = time.perf_counter()
    count = [0]

    def op(V):
        count[0] += V.shape[1]
        return matvec(V)

    steps = lanczos_steps or max(80, 6 * deflate)
    # Converged = residual near the rounding floor of the dtype; η below carries whatever residual is left.
    rtol = max(1e-8, 1e3 * torch.finfo(dtype).eps)
    ext = extreme_eigenpairs(op, n, k=max(deflate, 1), steps=steps, rtol=rtol, seed=seed, dtype=dtype,
                             device=device)
    V, values, eta = _pick_deflated(ext, deflate)
    rng = extreme_eigenpairs(_projected(op, V), n, k=1, steps=max(80, steps // 2), dtype=dtype, device=device,
                             v0=_project(V, _gaussian(n, seed + 1, dtype, device)))
    lo, hi = float(rng.bottom.values[0]), float(rng.top.values[0])
    # An unconverged extreme Ritz value is off by far less than its residual; the share of the width
    # guards converged ones. Padding costs resolution, most where zero sits near an end of the range.
    pad = range_pad * max(hi - lo, 1e-300)
    a = lo - pad - 2.0 * float(rng.bottom.residuals[0])
    b = hi + pad + 2.0 * float(rng.top.residuals[0])
    return Deflation(V, values, eta, (a, b), float(ext.bottom.values[0]), float(ext.bottom.residuals[0]),
                     float(ext.top.values[0]), float(ext.top.residuals[0]), count[0], time.perf_counter() - t0,
                     dtype, str(device))


def sketch(matvec: MatVec, n: int, deflation: Deflation, *, degree: int = 1000, n_probes: int = 30,
           seed: int = 0, probe_batch: int = 0) -> Sketch:
    """Stage 2: Chebyshev moments of the deflated operator for ``n_probes`` Rademacher probes projected on
    V⊥, ``probe_batch`` (default all) per matvec call: ⌈degree/2⌉ calls per batch."""
    if degree < 2:
        raise ValueError(f"degree must be ≥ 2, got {degree}")
    if n_probes < 2:
        raise ValueError(f"n_probes must be ≥ 2 for an interval, got {n_probes}")
    t0 = time.perf_counter()
    count = [0]

    def op(Z):
        count[0] += Z.shape[1]
        return matvec(Z)

    V = deflation.vectors
    if V is None and deflation.values.size:
        raise ValueError("this Deflation has had its vectors dropped: compute a fresh one with deflation()")
    a, b = deflation.spectral_range
    Z = _project(V, _rademacher(n, n_probes, seed + 2, deflation.dtype, deflation.device))
    batch = probe_batch if probe_batch > 0 else n_probes
    # B + c·VVᵀ: rounding leaks into span V then meet (B − c)/r = 0 there instead of growing like T_k(−c/r).
    deflated = _projected(op, V)
    cheb_op = deflated if V is None else (lambda Z_: deflated(Z_) + 0.5 * (a + b) * (V @ (V.T @ Z_)))
    mu = np.concatenate([chebyshev_moments(cheb_op, Z[:, s:s + batch], degree, a, b)
                         for s in range(0, n_probes, batch)])
    secs = {"lanczos": deflation.seconds, "chebyshev": time.perf_counter() - t0}
    return Sketch(n, degree, mu, deflation.without_vectors(), deflation.matvecs + count[0], secs)


def counts(sk: Sketch, *, tol: Optional[float] = None, rel_tol: Optional[float] = None,
           confidence: float = 0.95, eps: float = 1e-3) -> CountEstimate:
    """Stage 3 (NumPy only, milliseconds): counts and intervals at one tolerance from a :class:`Sketch`.
    Raises ValueError when ``tol`` is finer than the sketch's resolution."""
    _check(sk.n_probes, confidence, eps)
    t0 = time.perf_counter()
    d, n, mu = sk.deflation, sk.n, sk.moments
    tol = _tolerance(tol, rel_tol, d)
    steps = _refuse_below_resolution(tol, sk.degree, d, eps)
    eta = d.error
    phis = {
        "pos_mid": steps.phi_at(tol), "pos_lo": steps.below(tol + eta), "pos_hi": steps.above(tol - eta),
        "neg_mid": steps.phi_at(-tol), "neg_lo": steps.above(-tol - eta), "neg_hi": steps.below(-tol + eta),
    }
    grids = [steps.on_grid(p) for p in phis.values()]
    p_max, p_min = max(1.0, max(g.max() for g in grids)), min(0.0, min(g.min() for g in grids))
    # Per-probe trace samples; a negative-side step is 1 − (positive-side step), so its trace is zᵀz − ….
    tr = {k: mu @ steps.coefficients(p) for k, p in phis.items()}
    for k in ("neg_mid", "neg_lo", "neg_hi"):
        tr[k] = mu[:, 0] - tr[k]
    tq = float(student_t.ppf(0.5 + 0.5 * confidence, sk.n_probes - 1))
    half = lambda s: tq * s.std(ddof=1) / math.sqrt(s.size)  # noqa: E731 — one-sided bound at (1−conf)/2
    nb = n - d.values.size  # dimension of the deflated space
    above = lambda thr: int((d.values > thr).sum())  # noqa: E731 — deflated eigenvalues, counted exactly
    below = lambda thr: int((d.values < thr).sum())  # noqa: E731

    # Lower-bound steps exceed ε only above their threshold and never exceed p_max; upper-bound steps reach
    # 1 − ε above theirs and never drop below p_min (≈ 0). η: deflation moves no eigenvalue further (Weyl).
    def lower(s, k=1):
        return (s.mean() - half(s) - k * eps * nb) / p_max

    def upper(s, k=1):
        return (s.mean() + half(s) - k * p_min * nb) / (1 - eps)

    pos = (lower(tr["pos_lo"]) + above(tol + eta), upper(tr["pos_hi"]) + above(tol - eta))
    neg = (lower(tr["neg_lo"]) + below(-tol - eta), upper(tr["neg_hi"]) + below(-tol + eta))
    curved_lo = lower(tr["pos_lo"] + tr["neg_lo"], 2) + above(tol + eta) + below(-tol - eta)
    curved_hi = upper(tr["pos_hi"] + tr["neg_hi"], 2) + above(tol - eta) + below(-tol + eta)
    n_pos = float(tr["pos_mid"].mean()) + above(tol)
    n_neg = float(tr["neg_mid"].mean()) + below(-tol)
    secs = dict(sk.seconds, counts=time.perf_counter() - t0)
    return CountEstimate(
        n=n, tol=float(tol), n_pos=n_pos, n_neg=n_neg, n_zero=n - n_pos - n_neg,
        n_pos_ci=_integer_interval(*pos, n), n_neg_ci=_integer_interval(*neg, n),
        n_zero_ci=_integer_interval(n - curved_hi, n - curved_lo, n),
        resolution=max(steps.resolution(tol), steps.resolution(-tol)),
        band_pos=steps.band(phis["pos_hi"], phis["pos_lo"]),
        # On the negative side the upper-bound count comes from the step with the smaller angle.
        band_neg=steps.band(phis["neg_lo"], phis["neg_hi"]),
        n_ambiguous_pos=float((tr["pos_hi"] - tr["pos_lo"]).mean()),
        n_ambiguous_neg=float((tr["neg_hi"] - tr["neg_lo"]).mean()),
        degree=sk.degree, n_probes=sk.n_probes, confidence=confidence, eps=eps,
        lam_min=d.lam_min, lam_min_residual=d.lam_min_residual, lam_max=d.lam_max,
        lam_max_residual=d.lam_max_residual, spectral_range=d.spectral_range, deflated=d.values.copy(),
        deflation_error=eta, matvecs=sk.matvecs, seconds=secs)


def auto_degree(d: Deflation, tol: float, eps: float = 1e-3) -> int:
    """The least degree (≥ 64) whose resolution at ±``tol`` on the deflated range is ≤ tol/4, so the
    ambiguous band is about [tol/2, 3·tol/2]. ValueError when no degree up to MAX_DEGREE will do."""
    need = min_degree(*d.spectral_range, tol, eps, target=tol / 4)
    if need > MAX_DEGREE:
        a, b = d.spectral_range
        raise ValueError(f"tol={tol:.4g} cannot be resolved on the deflated spectral range [{a:.4g}, {b:.4g}] "
                         f"by any degree up to {MAX_DEGREE}: use a larger tolerance")
    return max(64, need)


def _check(n_probes: int, confidence: float, eps: float) -> None:
    if n_probes < 2:
        raise ValueError(f"n_probes must be ≥ 2 for an interval, got {n_probes}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")


def _tolerance(tol: Optional[float], rel_tol: Optional[float], d: Deflation) -> float:
    if (tol is None) == (rel_tol is None):
        raise ValueError(f"give exactly one of tol and rel_tol, got tol={tol}, rel_tol={rel_tol}")
    if tol is None:
        tol = float(rel_tol) * max(abs(d.lam_min), abs(d.lam_max))
    if not tol >= 0:
        raise ValueError(f"tol must be ≥ 0, got {tol}")
    return float(tol)


def _refuse_below_resolution(tol: float, degree: int, d: Deflation, eps: float) -> SmoothedSteps:
    steps = SmoothedSteps(degree, *d.spectral_range, eps)
    res = max(steps.resolution(tol), steps.resolution(-tol))
    if tol < res:
        a, b = d.spectral_range
        need = min_degree(a, b, tol, eps)
        hint = f"degree ≥ {need}" if need <= MAX_DEGREE else f"a degree above {MAX_DEGREE}"
        raise ValueError(f"tol={tol:.4g} is finer than the resolution {res:.4g} of degree {degree} on the "
                         f"deflated spectral range [{a:.4g}, {b:.4g}]: eigenvalues within the resolution of ±tol "
                         f"cannot be told apart. Use tol ≥ {res:.4g} or {hint}.")
    return steps


def _pick_deflated(ext, deflate: int) -> tuple[Optional[torch.Tensor], np.ndarray, float]:
    """Up to ``deflate`` converged Ritz pairs of largest |θ|: vectors ``[N, d]``, values ``[d]``, η = ‖R‖_F."""
    if deflate <= 0:
        return None, np.zeros(0), 0.0
    vals = np.concatenate([ext.top.values, ext.bottom.values])
    ok = np.concatenate([ext.top.converged, ext.bottom.converged])
    res = np.concatenate([ext.top.residuals, ext.bottom.residuals])
    vecs = torch.cat([ext.top.vectors, ext.bottom.vectors], dim=1)
    # top and bottom share vectors when the Krylov space is small: keep each Ritz value once.
    _, first = np.unique(vals, return_index=True)
    keep = np.zeros(vals.size, bool)
    keep[first] = True
    order = [i for i in np.argsort(-np.abs(vals)) if ok[i] and keep[i]][:deflate]
    if not order:
        return None, np.zeros(0), 0.0
    return vecs[:, order], vals[order].copy(), float(np.sqrt((res[order] ** 2).sum()))


def _project(V: Optional[torch.Tensor], Z: torch.Tensor) -> torch.Tensor:
    """(I − VVᵀ) Z for Z ``[N]`` or ``[N, k]``."""
    if V is None:
        return Z
    Z2 = Z if Z.dim() == 2 else Z[:, None]
    out = Z2 - V @ (V.T @ Z2)
    return out if Z.dim() == 2 else out[:, 0]


def _projected(op: MatVec, V: Optional[torch.Tensor]) -> MatVec:
    """P op P with P = I − VVᵀ (the operator itself when nothing is deflated)."""
    if V is None:
        return op
    return lambda Z: _project(V, op(_project(V, Z)))


def _gaussian(n: int, seed: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _rademacher(n: int, k: int, seed: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n, k), generator=g) * 2 - 1).to(device=device, dtype=dtype)


def _integer_interval(lo: float, hi: float, n: int) -> tuple[int, int]:
    """The integers in [lo, hi] ∩ [0, n] (the counts are integers), never empty."""
    lo_i = int(min(max(math.ceil(lo - 1e-9), 0), n))
    hi_i = int(max(min(math.floor(hi + 1e-9), n), lo_i))
    return lo_i, hi_i
