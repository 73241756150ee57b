"""Power-law fits of the index against the loss at critical points (Pennington & Bahri 2017).

Their random-matrix model predicts, below a critical loss εc, an index (share of negative eigenvalues)
α(ε) ≈ α0 · |(ε − εc)/εc|^{3/2} — zero at εc, where the critical points become minima. Given the critical
points of one setting (loss ε_i, index α_i > 0), :func:`index_power_fit` fits α = A · (ε − εc)^p with εc
profiled over a grid below the smallest loss (log α linear in log(ε − εc) for each εc; the εc with the
least squared error wins) and a bootstrap over the points for the exponent's interval. :func:`spearman`
gives a rank correlation (e.g. of the minimum ratio with the loss) with a bootstrap interval. Pure NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerFit:
    """α ≈ A · (ε − eps_c)^p over ``n`` points; ``p_ci``: the bootstrap interval (``confidence``)."""

    p: float
    p_ci: tuple[float, float]
    eps_c: float
    A: float
    n: int
    rms_log: float  # root-mean-square residual of log α (natural log)
    confidence: float


def _fit_at(eps: np.ndarray, alpha: np.ndarray, eps_c: float) -> tuple[float, float, float]:
    """(p, log A, sum of squared log-residuals) of log α = log A + p·log(ε − eps_c)."""
    x, y = np.log(eps - eps_c), np.log(alpha)
    X = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    r = y - X @ coef
    return float(coef[1]), float(coef[0]), float(r @ r)


def _profile(eps: np.ndarray, alpha: np.ndarray, grid: int) -> tuple[float, float, float, float]:
    """Best (p, log A, sse, eps_c) over eps_c in [0, min ε) on a grid denser near min ε."""
    lo = float(eps.min())
    # eps_c = lo·(1 − s) for s log-spaced in [1e-4, 1]: resolves an εc just below the smallest loss.
    cands = lo * (1.0 - np.logspace(-4, 0, grid))
    best = None
    for c in cands:
        p, log_a, sse = _fit_at(eps, alpha, c)
        if best is None or sse < best[2]:
            best = (p, log_a, sse, float(c))
    return best


def index_power_fit(loss, index, *, grid: int = 200, n_boot: int = 300, confidence: float = 0.9,
                    seed: int = 0) -> PowerFit:
    """Fit ``index`` ≈ A·(``loss`` − εc)^p over the points with index > 0 (1-D arrays of equal length:
    training loss, any units ≥ 0, and n_neg / n_params). Needs ≥ 4 such points with ≥ 3 distinct losses;
    raises ValueError naming what it got otherwise."""
    eps, alpha = np.asarray(loss, dtype=float), np.asarray(index, dtype=float)
    if eps.shape != alpha.shape or eps.ndim != 1:
        raise ValueError(f"loss and index must be 1-D of one length, got {eps.shape} and {alpha.shape}")
    keep = (alpha > 0) & np.isfinite(eps) & np.isfinite(alpha) & (eps >= 0)
    eps, alpha = eps[keep], alpha[keep]
    if eps.size < 4 or np.unique(eps).size < 3:
        raise ValueError(f"a power-law fit needs ≥ 4 points with index > 0 at ≥ 3 distinct losses, "
                         f"got {eps.size} points at {np.unique(eps).size} losses")
    p, log_a, sse, eps_c = _profile(eps, alpha, grid)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, eps.size, eps.size)
        if np.unique(eps[idx]).size >= 3:
            boots.append(_profile(eps[idx], alpha[idx], grid // 4)[0])
    return PowerFit(p, _percentile_interval(boots, confidence), eps_c, float(np.exp(log_a)), int(eps.size), float(np.sqrt(sse / eps.size)),
                    confidence)


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's ρ of ``n`` pairs with its bootstrap interval ``ci`` (percentile, ``confidence``)."""

    rho: float
    ci: tuple[float, float]
    n: int
    confidence: float


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``v`` ``[n]``, ties given their mean rank."""
    order = np.argsort(v, kind="mergesort")
    r = np.empty(v.size)
    r[order] = np.arange(1, v.size + 1)
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx @ rx) * (ry @ ry))
    return float(rx @ ry / den) if den > 0 else float("nan")


def spearman(x, y, *, n_boot: int = 1000, confidence: float = 0.9, seed: int = 0) -> RankCorrelation:
    """Spearman's rank correlation of ``x`` and ``y`` (1-D, equal length; pairs with a NaN are left out),
    with a percentile bootstrap interval over the pairs (resamples whose ranks are all tied are skipped).
    Needs ≥ 3 pairs; raises ValueError naming what it got otherwise."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3:
        raise ValueError(f"a rank correlation needs ≥ 3 finite pairs, got {x.size}")
    rng = np.random.default_rng(seed)
    boots = [_spearman(x[i], y[i]) for i in (rng.integers(0, x.size, x.size) for _ in range(n_boot))]
    boots = [b for b in boots if np.isfinite(b)]
    return RankCorrelation(_spearman(x, y), _percentile_interval(boots, confidence), int(x.size), confidence)


def _percentile_interval(boots: list, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap values (NaN, NaN when there are none)."""
    if not boots:
        return float("nan"), float("nan")
    q = (1 - confidence) / 2
    return float(np.quantile(boots, q)), float(np.quantile(boots, 1 - q))
