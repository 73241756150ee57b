"""Inertia of a symmetric matrix from a blocked LDLᵀ built on GEMMs: counts at matrix-multiply speed.

cuSOLVER's Bunch–Kaufman ``sytrf`` picks its pivots one column at a time, so its N³/3 flops run far
below matrix-multiply speed (docs/performance.md gives the timings). This factorisation eliminates
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
would grow the entries more (a tiny λ_j with a real coupling) are not eliminated: they wait, with
their λ_j and their coupling R_j, and join the next window (which takes max(``block`` − waiting,
``block``/4) new indices), where the indices they couple to make them well conditioned (a delayed pivot,
as in sparse indefinite solvers). The last window is decomposed whole. With more than ``max_carried``
directions waiting, :func:`inertia_` gives up (returns None) and the caller factors with Bunch–Kaufman.

Only the lower triangle (diagonal included) is read and overwritten; the strict upper triangle is never
touched, so a symmetric H can be put back from it (:func:`mirror_`). Meant for float64 (in float32 the
rounding budget leaves little to eliminate). A batch of matrices is factored in lockstep, each with its
own choices, its waiting directions padded to the batch's most.
"""
from __future__ import annotations

from typing import Optional

import torch

BLOCK = 512  # window of one matrix: smaller windows give up more often, larger ones gain little (docs/performance.md)
BATCH_BLOCK = 32  # window of a batch: cuSOLVER decomposes a batch of windows ≤ 32 × 32 in one call, larger
# ones one by one
GROWTH = 8.0  # per window: each row's D_i may reach at most this × the current bound on the entries


def inertia_(M: torch.Tensor, *, atol, block: Optional[int] = None, growth: float = GROWTH,
             max_carried: Optional[int] = None):
    """Inertia of symmetric ``M`` ``[N, N]`` or of each matrix of a batch ``[B, N, N]`` (lower triangles):
    ``(n_pos, n_neg, n_zero)``, a list of them for a batch, or None if the factorisation gave up (see the
    module docstring; a batch gives up as a whole). Overwrites the lower triangles and diagonals.

    ``atol`` (a number, or one per matrix): the rounding allowed, in the units of M. The products'
    rounding moves entry (i, l) by at most about u·sqrt(D_i·D_l) (u = unit roundoff), so the eigenvalues
    by about u·√N·max D; directions that would take that past ``atol`` are not eliminated. The inertia
    returned is then exact for a matrix within about ``atol`` of ``M`` (the eigendecompositions' own
    rounding, u·‖M‖ as for Bunch–Kaufman, comes on top). ``block``: the window (default :data:`BLOCK`,
    :data:`BATCH_BLOCK` for a batch of more than one). ``max_carried``: most waiting directions before
    giving up (default 4·``block``).
    """
    if M.dim() not in (2, 3) or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"M must be a square [N, N] matrix or a batch [B, N, N], got shape {tuple(M.shape)}")
    batch = M if M.dim() == 3 else M[None]
    b, n = batch.shape[0], batch.shape[-1]
    block = (BLOCK if b == 1 else BATCH_BLOCK) if block is None else block
    if block < 1:
        raise ValueError(f"block must be ≥ 1, got {block}")
    atol = torch.as_tensor(atol, dtype=M.dtype).expand(b).to(M.device)
    if not bool((atol > 0).all()):
        raise ValueError(f"atol must be > 0, got {atol.tolist() if b > 1 else float(atol[0])}")
    found = _factor(batch, atol, block, growth, 4 * block if max_carried is None else max_carried)
    if found is None:
        return None
    rows = [tuple(int(x) for x in row) for row in found.tolist()]
    return rows[0] if M.dim() == 2 else rows


def _factor(M: torch.Tensor, atol: torch.Tensor, block: int, growth: float, max_carried: int
            ) -> Optional[torch.Tensor]:
    """:func:`inertia_` on a batch ``M`` ``[B, N, N]``: ``[B, 3]`` counts, or None."""
    b, n = M.shape[0], M.shape[-1]
    start = max_abs_lower(M, block)  # [B]
    limit = atol / (torch.finfo(M.dtype).eps * n ** 0.5)  # on max D
    grown = M.new_zeros(b, n)  # D_i: Σ d_ij over eliminated directions
    pos = torch.zeros(b, dtype=torch.long, device=M.device)
    neg, pads = torch.zeros_like(pos), torch.zeros_like(pos)
    # Delayed directions, each matrix's padded to the batch's most: their λ (mutually decoupled: they
    # are eigen-directions of one window) and their coupling to the indices from k on. A pad is λ =
    # start with no coupling: a positive eigenvalue that changes nothing else, taken off at the end.
    lam_late, coupling = M.new_zeros(b, 0), M.new_zeros(b, n, 0)
    k = 0
    while True:
        c = lam_late.shape[1]
        end = min(k + max(block - c, -(-block // 4)), n)  # windows stay near block + a quarter
        w = end - k
        window = M.new_zeros(b, c + w, c + w)
        window[:, :c, :c] = torch.diag_embed(lam_late)
        window[:, c:, :c] = coupling[:, :w]
        window[:, c:, c:] = M[:, k:end, k:end]  # its upper triangle is not read (UPLO L)
        lam, Q = torch.linalg.eigh(window, UPLO="L")  # [B, m], [B, m, m]
        if end == n:  # the last window: its eigenvalues are the rest of the inertia
            pos += (lam > 0).sum(-1)
            neg += (lam < 0).sum(-1)
            pos -= torch.where(start > 0, pads, 0)
            return torch.stack([pos, neg, n - pos - neg], dim=-1)
        R = torch.cat([coupling[:, w:], M[:, end:, k:end]], dim=-1) @ Q  # [B, N − end, m]
        budget = torch.minimum(growth * (start + grown.amax(-1)), limit)  # [B]
        good, d = _eliminable(R, lam, grown[:, end:], budget)
        pos += (good & (lam > 0)).sum(-1)
        neg += (good & (lam < 0)).sum(-1)
        inv = torch.where(good, 1 / lam, 0.0)
        inv = torch.where(inv.isfinite(), inv, 0.0)  # λ = 0 (or 1/λ past the range) is eliminated only uncoupled
        sub_lower_(M[:, end:, end:], R, R * inv[:, None, :])
        grown[:, end:] += (d * good[:, None, :]).sum(-1)
        late = ~good
        n_late = late.sum(-1)
        most = int(n_late.max())
        if most > max_carried:
            return None
        first = torch.argsort(late.to(torch.int8), dim=-1, descending=True, stable=True)[:, :most]
        real = torch.arange(most, device=M.device) < n_late[:, None]  # [B, most]
        lam_late = torch.where(real, lam.gather(-1, first), start[:, None])
        coupling = R.gather(-1, first[:, None, :].expand(-1, R.shape[1], -1)) * real[:, None, :]
        pads += (~real).sum(-1)
        k = end


def _eliminable(R: torch.Tensor, lam: torch.Tensor, grown: torch.Tensor, budget: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which eigen-directions to eliminate: ``(good, d)``, ``good`` ``[B, m]`` and d_ij = R_ij²/|λ_j|
    ``[B, rows, m]``. Directions are ranked by their largest d_ij (a zero λ with nonzero coupling ranks
    last); the first ones are good while every row's ``grown`` + Σ d_ij stays within ``budget`` ``[B]``.
    Entry (i, l) of the Schur complements then stays within |M_il| + sqrt(grown_i·grown_l)."""
    inv = torch.where(lam == 0, float("inf"), 1 / lam.abs())
    d = R.square() * inv[:, None, :]
    d = torch.where(torch.isnan(d), 0.0, d)  # a zero λ with zero coupling: no growth
    order = torch.argsort(d.amax(-2), dim=-1)  # [B, m]
    ranked = d.gather(-1, order[:, None, :].expand_as(d)).cumsum(-1)
    reach = (grown[..., None] + ranked).amax(-2)  # [B, m], nondecreasing along m
    ok = (reach <= budget[:, None]).int().cumprod(-1).bool()
    return torch.zeros_like(ok).scatter_(-1, order, ok), d


def sub_lower_(C: torch.Tensor, R: torch.Tensor, W: torch.Tensor, cols: int = 2 * BLOCK) -> None:
    """C ← C − R Wᵀ on the lower triangle of ``C`` ``[..., r, r]`` (diagonal included), in column blocks
    of ``cols``: GEMMs straight into ``C`` below each diagonal block, and a ``cols``² product for the block
    itself. ``R``, ``W``: ``[..., r, g]``. The strict upper triangle of ``C`` is left bit for bit."""
    r = C.shape[-1]
    for j in range(0, r, cols):
        e = min(j + cols, r)
        C[..., j:e, j:e].sub_((R[..., j:e, :] @ W[..., j:e, :].mT).tril())
        if e == r:
            continue
        if C.dim() == 2:
            C[e:, j:e].addmm_(R[e:], W[j:e].mT, alpha=-1)
        else:
            C[:, e:, j:e].baddbmm_(R[:, e:], W[:, j:e].mT, alpha=-1)


def max_abs_lower(M: torch.Tensor, rows: int = BLOCK) -> torch.Tensor:
    """max |M_ij| over the lower triangle of each matrix of ``M`` ``[..., N, N]``, ``[...]``, in row
    blocks of ``rows`` (no N² temporary)."""
    n, rows = M.shape[-1], max(rows, 64)
    parts = [M[..., s:s + rows, :s + rows].tril(s).abs().amax((-2, -1)) for s in range(0, n, rows)]
    return torch.stack(parts).amax(0) if parts else M.new_zeros(M.shape[:-2])


def mirror_(H: torch.Tensor, *, from_upper: bool, rows: int = BLOCK) -> None:
    """Make each ``H`` ``[..., N, N]`` symmetric from one triangle: copy its strict upper triangle into
    the lower one (``from_upper``) or the other way round, in row blocks (no N² temporary). The
    diagonal stays."""
    n = H.shape[-1]
    for s in range(0, n, rows):
        e = min(s + rows, n)
        if from_upper:
            H[..., s:e, :s].copy_(H[..., :s, s:e].mT)
        else:
            H[..., :s, s:e].copy_(H[..., s:e, :s].mT)
        block = H[..., s:e, s:e]
        half = block.triu(1) if from_upper else block.tril(-1)
        block.copy_(torch.diag_embed(block.diagonal(dim1=-2, dim2=-1)) + half + half.mT)
