"""Inertia of a symmetric matrix from a blocked LDLᵀ built on GEMMs: counts at matrix-multiply speed.

cuSOLVER's Bunch–Kaufman ``sytrf`` picks its pivots one column at a time and reaches a few TFLOP/s on
an H100; the same N³/3 flops as matrix products run ten times faster. This factorisation eliminates
whole blocks instead. For the window W of ``block`` not yet eliminated indices it takes the
eigendecomposition W = Q Λ Qᵀ (an orthogonal congruence: Sylvester's law keeps the inertia), then
eliminates each eigen-direction q_j with pivot λ_j:

    trailing ← trailing − R Λ⁻¹ Rᵀ,  R = (rows below W) · Q,

one symmetric rank-``block`` update in GEMMs. The signs of the eliminated λ_j are part of the inertia.

Stability comes from the choice of which directions to eliminate, as pivoting does for Bunch–Kaufman.
Each row i keeps the sum D_i of d_ij = R_ij²/|λ_j| over the directions eliminated so far; by
Cauchy–Schwarz no entry (i, l) has then moved by more than sqrt(D_i·D_l). The directions of a window
are taken in order of growing max_i d_ij while every row's D_i stays within ``growth`` × the current
bound on the entries and u·√N·max D (the products' rounding) within ``atol``. Directions that
would grow the entries more (a tiny λ_j with a real coupling) are not eliminated: they stay, rotated,
at the front of the next window, where the new indices they couple to make them well conditioned (a
delayed pivot, as in sparse indefinite solvers). The last window is decomposed whole. With more than
``max_carried`` directions waiting, :func:`inertia_` gives up (returns None) and the caller factors
with Bunch–Kaufman instead.

Only the lower triangle (diagonal included) is read and overwritten; the strict upper triangle is never
touched, so a symmetric H can be put back from it (:func:`mirror_`). Float64, one matrix at a time.
"""
from __future__ import annotations

from typing import Optional

import torch

BLOCK = 512
GROWTH = 8.0  # per window: each row's D_i may reach at most this × the current bound on the entries


def inertia_(M: torch.Tensor, *, atol: float, block: Optional[int] = None, growth: float = GROWTH,
             max_carried: Optional[int] = None) -> Optional[tuple[int, int, int]]:
    """``(n_pos, n_neg, n_zero)`` of symmetric ``M`` ``[N, N]`` (its lower triangle), or None if the
    factorisation gave up (see the module docstring). Overwrites ``M``'s lower triangle and diagonal.

    ``atol``: the rounding allowed, in the units of M. The products' rounding moves entry (i, l) by at
    most about u·sqrt(D_i·D_l) (u = unit roundoff), so the eigenvalues by about u·√N·max D; directions
    that would take that past ``atol`` are not eliminated. The inertia returned is then exact for a
    matrix within about ``atol`` of ``M`` (Bunch–Kaufman's own rounding, u·‖M‖, comes on top).
    ``block``: the window (default :data:`BLOCK`). ``max_carried``: most delayed directions before
    giving up (default 4·``block``).
    """
    block = BLOCK if block is None else block
    n = M.shape[-1]
    if M.dim() != 2 or M.shape[0] != n:
        raise ValueError(f"M must be a square [N, N] matrix, got shape {tuple(M.shape)}")
    if block < 1:
        raise ValueError(f"block must be ≥ 1, got {block}")
    if not atol > 0:
        raise ValueError(f"atol must be > 0, got {atol}")
    max_carried = 4 * block if max_carried is None else max_carried
    start = max_abs_lower(M, block)
    limit = atol / (torch.finfo(M.dtype).eps * n ** 0.5)  # on max D
    grown = torch.zeros(n, dtype=M.dtype, device=M.device)  # D_i: Σ d_ij over eliminated directions
    pos = neg = 0
    k, carried = 0, 0  # M[k:, k:] is left; its first `carried` indices are delayed directions
    while True:
        end = min(k + carried + block, n)
        lam, Q = torch.linalg.eigh(M[k:end, k:end], UPLO="L")
        if end == n:  # the last window: its eigenvalues are the rest of the inertia
            p, q = int((lam > 0).sum()), int((lam < 0).sum())
            return (pos + p, neg + q, n - pos - neg - p - q)
        R = M[end:, k:end] @ Q  # [N − end, w]: the rows below the window, in eigen-coordinates
        most = float(grown.max())  # every entry of M[k:, k:] is at most start + most in size
        g, order, d = _eliminable(R, lam, grown[end:], min(growth * (start + most), limit))
        good, late = order[:g], order[g:]
        lam_good = lam[good]
        pos += int((lam_good > 0).sum())
        neg += int((lam_good < 0).sum())
        if g:
            R_good = R[:, good]
            inv = torch.where(lam_good == 0, 0.0, 1 / lam_good)  # λ = 0 is eliminated only uncoupled
            sub_lower_(M[end:, end:], R_good, R_good * inv)
            grown[end:] += d[:, good].sum(1)
        late_n = late.numel()
        if late_n > max_carried:
            return None
        if late_n:  # keep them, rotated, just before `end`: D = diag(λ_late), coupling R_late
            M[end:, end - late_n:end] = R[:, late]
            D = M[end - late_n:end, end - late_n:end]
            D.copy_(D.triu())  # zero the strict lower part (the upper one is never touched)
            D.diagonal().copy_(lam[late])
            grown[end - late_n:end] = grown[k:end].max()
        k, carried = end - late_n, late_n


def _eliminable(R: torch.Tensor, lam: torch.Tensor, grown: torch.Tensor, budget: float
                ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Which eigen-directions to eliminate: ``(g, order, d)`` with d_ij = R_ij²/|λ_j| ``[rows, w]``.

    ``order`` ranks the directions by their largest d_ij (a zero λ with nonzero coupling ranks last);
    the first ``g`` keep every row's ``grown`` + Σ d_ij within ``budget``. Entry (i, l) of the Schur
    complements then stays within |M_il| + sqrt(grown_i·grown_l) ≤ the start's bound + max grown."""
    inv = torch.where(lam == 0, torch.full_like(lam, float("inf")), 1 / lam.abs())
    d = R.square() * inv
    d = torch.where(torch.isnan(d), torch.zeros_like(d), d)  # a zero λ with zero coupling: no growth
    order = torch.argsort(d.amax(0))
    reach = (grown[:, None] + d[:, order].cumsum(1)).amax(0)  # [w], nondecreasing
    g = int((reach <= budget).int().cumprod(0).sum())
    return g, order, d


def sub_lower_(C: torch.Tensor, R: torch.Tensor, W: torch.Tensor, cols: int = 2 * BLOCK) -> None:
    """C ← C − R Wᵀ on the lower triangle of ``C`` ``[r, r]`` (diagonal included), in column blocks of
    ``cols``: GEMMs straight into ``C`` below each diagonal block, and a ``cols``² product for the block
    itself. ``R``, ``W``: ``[r, g]``. The strict upper triangle of ``C`` is left bit for bit."""
    r = C.shape[0]
    for j in range(0, r, cols):
        e = min(j + cols, r)
        C[j:e, j:e].sub_((R[j:e] @ W[j:e].mT).tril())
        if e < r:
            C[e:, j:e].addmm_(R[e:], W[j:e].mT, alpha=-1)


def max_abs_lower(M: torch.Tensor, rows: int = BLOCK) -> float:
    """max |M_ij| over the lower triangle of ``M`` ``[N, N]``, in row blocks (no N² temporary)."""
    n = M.shape[-1]
    return max((float(M[s:s + rows, :s + rows].abs().max()) for s in range(0, n, rows)), default=0.0)


def mirror_(H: torch.Tensor, *, from_upper: bool, rows: int = BLOCK) -> None:
    """Make ``H`` ``[N, N]`` symmetric from one triangle: copy its strict upper triangle into the lower
    one (``from_upper``) or the other way round, in row blocks (no N² temporary). The diagonal stays."""
    n = H.shape[-1]
    for s in range(0, n, rows):
        e = min(s + rows, n)
        if from_upper:
            H[s:e, :s].copy_(H[:s, s:e].mT)
        else:
            H[:s, s:e].copy_(H[s:e, :s].mT)
        block = H[s:e, s:e]
        half = block.triu(1) if from_upper else block.tril(-1)
        block.copy_(block.diagonal().diag_embed() + half + half.mT)
