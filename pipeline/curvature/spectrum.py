"""The one definition of the minimum ratio: tolerance choice, eigenvalue counts, ratios and labels.

Many Hessian eigenvalues of a network are zero up to rounding, and their sign is noise. So eigenvalues
are counted with a tolerance ``tol``: ``n_pos`` = #{λ > tol}, ``n_neg`` = #{λ < −tol}, ``n_zero`` = the rest
(|λ| ≤ tol). Everything here is plain NumPy and knows nothing of models, Ray or files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

LABELS = ("minimum", "degenerate_minimum", "saddle", "maximum", "degenerate_maximum", "flat")
TOL_MODES = ("auto", "gap", "rel", "abs")  # see choose_tol


@dataclass(frozen=True)
class Counts:
    n_pos: int
    n_neg: int
    n_zero: int
    n_pos_naive: Optional[int]  # #{λ > 0}: the lecture's count, with no tolerance (None: not measured)

    @property
    def n(self) -> int:
        return self.n_pos + self.n_neg + self.n_zero


def choose_tol(abs_eigs: np.ndarray, rel_tol: float = 1e-6, gap_ratio: float = 1e4,
               eps: float = float(np.finfo(np.float64).eps), mode: str = "auto",
               abs_tol: float = 0.0) -> tuple[float, str]:
    """Pick the tolerance below which |λ| counts as zero. Returns ``(tol, how)``.

    ``abs_eigs``: |λ|, any order, shape ``[n]``. Modes:

    - ``rel``: ``rel_tol · max|λ|``.
    - ``gap``: a clear gap near zero — consecutive sorted |λ| that differ by ≥ ``gap_ratio`` — whose lower
      side is already zero by the ``rel`` rule and whose upper side stands above rounding noise
      (``100 · n · eps · max|λ|``); the lowest such gap wins, and ``tol`` is the geometric mean of its two
      sides (values below ``n · eps · max|λ|`` count as that level). Falls back to ``rel``
      when there is no such gap. The gap rule never calls zero anything the ``rel`` rule calls non-zero.
    - ``auto``: same as ``gap``.
    - ``abs``: ``abs_tol`` as given.
    """
    if mode == "abs":
        return float(abs_tol), "abs"
    a = np.sort(np.abs(np.asarray(abs_eigs, dtype=np.float64)))
    top = float(a[-1]) if a.size else 0.0
    if top == 0.0:
        return 0.0, "rel"
    rel = rel_tol * top
    if mode in ("gap", "auto"):
        noise = 100.0 * a.size * eps * top
        # Exact zeros sit at the rounding level for the purpose of measuring a gap (no tol of 1e-300).
        floor = np.maximum(a, a.size * eps * top)
        ratios = floor[1:] / floor[:-1]
        ok = (ratios >= gap_ratio) & (a[:-1] <= rel) & (a[1:] > noise)
        if ok.any():
            # The lowest such gap: what lies below it is the rounding-level cluster, nothing more.
            i = int(np.argmax(ok))
            return float(np.sqrt(floor[i] * floor[i + 1])), "gap"
    elif mode != "rel":
        raise ValueError(f"unknown tolerance mode {mode!r}: expected auto, gap, rel or abs")
    return float(rel), "rel"


def gap_shifts(top: float, n: int, rel_tol: float = 1e-6, gap_ratio: float = 1e4,
               eps: float = float(np.finfo(np.float64).eps), per_decade: int = 2) -> np.ndarray:
    """Log-spaced tolerances ``[K]`` (ascending, ``per_decade`` per decade) at which zero counts
    #{|λ| ≤ t} reveal the gap :func:`choose_tol` looks for in a spectrum with max|λ| = ``top`` and ``n``
    eigenvalues: from the rounding floor ``n·eps·top`` up to ``rel_tol·top·gap_ratio`` (a gap's upper side
    above a lower side ≤ rel_tol·top), capped at ``top``."""
    if not top > 0:
        return np.zeros(0)
    lo = np.log10(n * eps * top)
    hi = np.log10(min(rel_tol * top * gap_ratio, top))
    return 10.0 ** np.arange(lo, hi + 1e-9, 1.0 / per_decade) if hi > lo else np.zeros(0)


def gap_from_zero_counts(tols: np.ndarray, n_zero: np.ndarray, *, top: float, n: int, rel_tol: float = 1e-6,
                         gap_ratio: float = 1e4, eps: float = float(np.finfo(np.float64).eps)) -> Optional[float]:
    """:func:`choose_tol`'s gap rule from counts alone (an inertia count knows no spectrum): ``n_zero[k]`` =
    #{|λ| ≤ ``tols[k]``} for ascending ``tols`` ``[K]`` (e.g. :func:`gap_shifts`). A count that stays the
    same from ``tols[j]`` to ``tols[k]`` means no |λ| in (tols[j], tols[k]]: a gap of at least
    tols[k]/tols[j]. The lowest plateau with ≥ 1 eigenvalue below it, tols[j] ≤ ``rel_tol·top``, tols[k]
    above rounding noise (``100·n·eps·top``) and tols[k]/tols[j] ≥ ``gap_ratio`` wins; its tolerance is
    √(tols[j]·tols[k]), inside the gap, so the counts equal eigh's with the spectrum's own gap. A gap
    narrower than ``gap_ratio`` times one grid step may be missed (then None: the caller falls back to
    the relative rule, as :func:`choose_tol` does)."""
    tols, n_zero = np.asarray(tols, dtype=float), np.asarray(n_zero)
    rel, noise = rel_tol * top, 100.0 * n * eps * top
    for j in range(len(tols)):
        if n_zero[j] < 1 or tols[j] > rel:
            continue
        k = j
        while k + 1 < len(tols) and n_zero[k + 1] == n_zero[j]:
            k += 1
        if tols[k] >= noise and tols[k] / tols[j] >= gap_ratio:
            return float(np.sqrt(tols[j] * tols[k]))
    return None


def count(eigenvalues: np.ndarray, tol: float) -> Counts:
    """Counts of λ above ``tol``, below ``−tol`` and in between (inclusive) for eigenvalues ``[n]``."""
    if not tol >= 0:  # also NaN
        raise ValueError(f"tol must be ≥ 0, got {tol}")
    lam = np.asarray(eigenvalues, dtype=np.float64)
    n_pos, n_neg = int((lam > tol).sum()), int((lam < -tol).sum())
    return Counts(n_pos, n_neg, lam.size - n_pos - n_neg, int((lam > 0).sum()))


def label(c: Counts) -> str:
    """``minimum`` · ``degenerate_minimum`` · ``saddle`` · ``maximum`` · ``degenerate_maximum`` · ``flat``."""
    if c.n_pos == 0 and c.n_neg == 0:
        return "flat"
    if c.n_pos > 0 and c.n_neg > 0:
        return "saddle"
    if c.n_neg == 0:
        return "minimum" if c.n_zero == 0 else "degenerate_minimum"
    return "maximum" if c.n_zero == 0 else "degenerate_maximum"


def label_from_intervals(n_pos: tuple[int, int], n_neg: tuple[int, int], n_zero: tuple[int, int]) -> str:
    """The label when counts are only known to lie in ``(lo, hi)`` intervals: the label every count in
    them agrees on, else ``uncertain`` (e.g. n_neg ∈ [0, 2] cannot tell a minimum from a saddle)."""
    def sign(lo_hi):
        lo, hi = lo_hi
        return True if lo > 0 else False if hi == 0 else None
    signs = (sign(n_pos), sign(n_neg), sign(n_zero))
    if None in signs:
        return "uncertain"
    pos, neg, zero = signs
    return label(Counts(int(pos), int(neg), int(zero), None))


def ratios(c: Counts) -> dict[str, float]:
    """``min_ratio`` = n_pos/n (flat directions are not positive); ``min_ratio_naive`` = #{λ>0}/n (the
    lecture's figure); ``min_ratio_curved`` = n_pos/(n_pos+n_neg) (NaN when nothing is curved);
    ``index`` = n_neg/n."""
    n = c.n
    curved = c.n_pos + c.n_neg
    return {
        "min_ratio": c.n_pos / n if n else float("nan"),
        "min_ratio_naive": c.n_pos_naive / n if n and c.n_pos_naive is not None else float("nan"),
        "min_ratio_curved": c.n_pos / curved if curved else float("nan"),
        "index": c.n_neg / n if n else float("nan"),
    }


def ratio_vs_tol(eigenvalues: np.ndarray, rel_tols: np.ndarray) -> np.ndarray:
    """``min_ratio`` at ``tol = r · max|λ|`` for each ``r`` in ``rel_tols`` (shape as ``rel_tols``)."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    top = np.abs(lam).max() if lam.size else 0.0
    tols = np.asarray(rel_tols, dtype=np.float64) * top
    # #{λ > t} by binary search on the sorted spectrum.
    return (lam.size - np.searchsorted(lam, tols, side="right")) / max(lam.size, 1)


@dataclass(frozen=True)
class Summary:
    counts: Counts
    tol: float
    tol_method: str
    lam_min: Optional[float]
    lam_max: Optional[float]

    @property
    def label(self) -> str:
        return label(self.counts)


def summarize(eigenvalues: np.ndarray, *, tol: Optional[float] = None, rel_tol: float = 1e-6,
              gap_ratio: float = 1e4, eps: float = float(np.finfo(np.float64).eps),
              tol_mode: str = "auto") -> Summary:
    """Counts, tolerance and extremes of a full spectrum ``[n]``; ``tol`` given overrides ``tol_mode``."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues contain NaN or inf: the Hessian is not finite at this point")
    if tol is None:
        tol, how = choose_tol(np.abs(lam), rel_tol=rel_tol, gap_ratio=gap_ratio, eps=eps, mode=tol_mode)
    else:
        how = "given"
    return Summary(count(lam, tol), float(tol), how, float(lam.min()), float(lam.max()))
