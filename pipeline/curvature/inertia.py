"""Exact eigenvalue counts without eigenvalues: the inertia of a Bunch–Kaufman LDLᵀ factorisation.

By Sylvester's law of inertia, A = L D Lᵀ has as many positive / negative / zero eigenvalues as the
block-diagonal D (1×1 and 2×2 blocks). So #{λ > tol} is the positive count of H − tol·I and
#{λ < −tol} the negative count of H + tol·I: two factorisations (N³/3 flops each) instead of an
eigendecomposition (about 9N³ on CPU). Works on CPU (LAPACK sytrf) and CUDA (cuSOLVER sytrf), batched.
:func:`counts` on a CUDA float64 matrix factors with :mod:`pipeline.numerics.block_ldl` instead (GEMM speed),
falling back to Bunch–Kaufman where that gives up.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from pipeline.numerics import block_ldl, lanczos
from pipeline.curvature.spectrum import Counts

FACTORS = ("auto", "bunch_kaufman", "blocked")
BLOCKED_ACCURACY = 1e-3  # the blocked factorisation's rounding stays within this × tol (tol = 0: Bunch–Kaufman)


def inertia(A: torch.Tensor) -> torch.Tensor:
    """``(n_pos, n_neg, n_zero)`` of symmetric ``A`` ``[..., N, N]``, as an int64 tensor ``[..., 3]``.

    Reads the lower triangle only; ``A`` is left alone (the factorisation works on a copy — see
    :func:`counts` for the in-place path). Singular ``A`` is fine: an exact zero pivot is a zero of D.
    """
    # ldl_factor (without _ex) raises on an exact zero pivot, which is just a zero eigenvalue here.
    LD, pivots, _ = torch.linalg.ldl_factor_ex(A, check_errors=False)
    return _inertia_of_factor(LD, pivots)


def _inertia_of_factor(LD: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """Inertia ``[..., 3]`` of D from LAPACK's lower LDLᵀ factor ``LD`` ``[..., N, N]`` and its ``pivots``."""
    d = LD.diagonal(dim1=-2, dim2=-1)  # [..., N]
    e = torch.nn.functional.pad(LD.diagonal(offset=-1, dim1=-2, dim2=-1), (0, 1))  # sub-diagonal, [..., N]
    neg_piv = pivots < 0  # LAPACK (lower): a 2×2 block at rows k, k+1 has negative pivots at both
    # Inside a run of negative pivots, blocks pair up from the run's start: k is a block start when
    # an even number of negative pivots precede it within the run.
    start2 = neg_piv & (_position_in_run(neg_piv) % 2 == 0)
    one = ~neg_piv
    pos = ((d > 0) & one).sum(-1)
    neg = ((d < 0) & one).sum(-1)
    # 2×2 block [[a, b], [b, c]]: det < 0 → one of each sign; det > 0 → both of the sign of a;
    # det = 0 → one zero and one of the sign of a + c. (Bunch–Kaufman only picks det < 0 blocks,
    # but rounding makes no promises.)
    a, c = d, torch.roll(d, -1, dims=-1)
    det = a * c - e * e
    tr = a + c
    pos = pos + (start2 & (det < 0)).sum(-1) + 2 * (start2 & (det > 0) & (a > 0)).sum(-1) \
        + (start2 & (det == 0) & (tr > 0)).sum(-1)
    neg = neg + (start2 & (det < 0)).sum(-1) + 2 * (start2 & (det > 0) & (a < 0)).sum(-1) \
        + (start2 & (det == 0) & (tr < 0)).sum(-1)
    n = LD.shape[-1]
    return torch.stack([pos, neg, n - pos - neg], dim=-1)


def _position_in_run(mask: torch.Tensor) -> torch.Tensor:
    """For a boolean ``[..., N]``, each True's 0-based position within its run of consecutive Trues."""
    idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    # Index of the last False at or before k (−1 if none): the run started right after it.
    last_false = torch.where(~mask, idx, torch.full_like(idx, -1)).cummax(dim=-1).values
    return idx - last_false - 1


def counts(H: torch.Tensor, tol: float, *, naive: bool = True, factor: str = "auto") -> Counts:
    """Tolerance-aware counts of symmetric ``H`` ``[N, N]``: #{λ > tol}, #{λ < −tol}, the rest, #{λ > 0}.

    One factorisation per count: H − tol·I for n_pos, H + tol·I for n_neg, and H itself for the naive
    #{λ > 0} unless ``naive=False`` (then ``n_pos_naive`` is None: two factorisations instead of three;
    tol = 0 needs one). Reads the lower triangle of ``H`` only, and factors in ``H``'s own memory.
    ``factor``: ``bunch_kaufman`` (LAPACK / cuSOLVER sytrf, in place, H put back from a copy of its lower
    triangle kept in row blocks: peak about 1.53×H, H = N² numbers), ``blocked``
    (:func:`pipeline.numerics.block_ldl.inertia_`, on the lower triangle while the upper one keeps H: peak about
    1.0×H plus a few N×512 panels, more on CPU, where it is not the default and the allocator keeps the
    freed panels (docs/performance.md); its rounding is held within :data:`BLOCKED_ACCURACY` × tol, and
    Bunch–Kaufman takes over for a shift where it gives up, or for tol = 0) or ``auto``
    (:func:`resolve_factor`). On return — also after an error in a factorisation — ``H`` is its lower
    triangle mirrored: unchanged, bit for bit, when it was exactly symmetric, as
    :func:`pipeline.curvature.hessian.hessian` builds it.
    """
    if not tol >= 0:
        raise ValueError(f"tol must be ≥ 0, got {tol}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square [N, N] matrix, got shape {tuple(H.shape)}")
    factor = resolve_factor(factor, H)
    H = H.detach()  # same memory; in-place work on a tensor that requires grad would be refused
    n = H.shape[-1]
    if factor == "blocked" and BLOCKED_ACCURACY * tol > 0:
        found = _blocked_counts(H[None], torch.tensor([tol], dtype=torch.float64), _signs(tol, naive))
        found = {sign: rows[0] for sign, rows in found.items()}
    else:
        found = _bunch_kaufman_counts(H, tol, _signs(tol, naive))
    return _counts_from(found, n, naive)


def counts_many(H: torch.Tensor, tols: list[float], *, naive: bool = True, factor: str = "auto") -> list[Counts]:
    """:func:`counts` of each matrix of ``H`` ``[B, N, N]`` with its own tolerance ``tols[k]``. With the
    ``blocked`` factor and N ≤ :data:`BATCH_MAX_N` the matrices are factored together
    (:func:`pipeline.numerics.block_ldl.inertia_` on a batch, in groups that keep its panels within
    :data:`BATCH_PANEL_BYTES`): on a GPU that turns B
    launches of small kernels into one. Each ``H[k]`` comes back as :func:`counts` leaves it."""
    if H.dim() != 3 or H.shape[-1] != H.shape[-2] or len(tols) != H.shape[0]:
        raise ValueError(f"H must be [B, N, N] with one tol per matrix, got shape {tuple(H.shape)} "
                         f"and {len(tols)} tols")
    if resolve_factor(factor, H) != "blocked" or not all(BLOCKED_ACCURACY * t > 0 for t in tols) or H.shape[0] < 2 \
            or H.shape[-1] > BATCH_MAX_N:
        return [counts(H[k], t, naive=naive, factor=factor) for k, t in enumerate(tols)]
    H = H.detach()
    b, n = H.shape[0], H.shape[-1]
    cols = min(n, 2 * block_ldl.BLOCK)  # sub_lower_'s diagonal blocks: one cols² product per matrix
    per_matrix = (8 * n * 2 * block_ldl.BATCH_BLOCK + cols * cols) * H.element_size()
    group = max(1, int(BATCH_PANEL_BYTES // max(per_matrix, 1)))
    out = []
    for s in range(0, b, group):
        part = torch.tensor(tols[s:s + group], dtype=torch.float64)
        found = _blocked_counts(H[s:s + group], part, _signs(1.0, naive))
        out += [_counts_from({sign: rows[k] for sign, rows in found.items()}, n, naive) for k in range(len(part))]
    return out


BATCH_PANEL_BYTES = 2**30  # a batch's [B, N, window] panels (about eight) and products stay within this
# Larger matrices go one at a time: their factorisations are GEMM-bound, and a 32-wide window would take
# N/32 steps; small ones batched gain many times the throughput of one by one (docs/performance.md).
BATCH_MAX_N = 2048


def _signs(tol: float, naive: bool) -> list[int]:
    """Shifts, in units of tol: −1 for n_pos (H − tol·I), +1 for n_neg, 0 for the naive #{λ > 0}."""
    return [0] if tol == 0 else ([0] if naive else []) + [-1, 1]


def _counts_from(found: dict[int, list[int]], n: int, naive: bool) -> Counts:
    """Counts from the inertia ``[pos, neg, zero]`` of H + sign·tol·I for each sign of :func:`_signs`."""
    if list(found) == [0]:  # tol = 0
        pos, neg = found[0][:2]
        return Counts(pos, neg, n - pos - neg, pos)
    n_pos, n_neg = found[-1][0], found[1][1]
    return Counts(n_pos, n_neg, n - n_pos - n_neg, found[0][0] if naive else None)


def resolve_factor(factor: str, H: torch.Tensor) -> str:
    """``auto`` → ``blocked`` for a float64 matrix on CUDA (where cuSOLVER's sytrf is the slow part:
    ``scripts/bench_hessian.py``), ``bunch_kaufman`` otherwise (LAPACK's sytrf is fast on CPU, and
    float32 leaves the blocked growth bound too little room)."""
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
    if factor != "auto":
        return factor
    return "blocked" if H.device.type == "cuda" and H.dtype == torch.float64 else "bunch_kaufman"


def _bunch_kaufman_counts(H: torch.Tensor, tol: float, signs: list[int]) -> dict[int, list[int]]:
    """Inertia ``[pos, neg, zero]`` of H + sign·tol·I for each sign, by in-place sytrf; H put back."""
    found = {}
    saved = _LowerTriangle(H)
    try:
        for sign in signs:
            saved.restore(H)  # the factorisation reads H's upper triangle: make it the lower one
            if sign:
                H.diagonal().add_(sign * tol)
            found[sign] = _factor_in_place(H).tolist()
    finally:
        saved.restore(H)
    return found


def _blocked_counts(H: torch.Tensor, tols: torch.Tensor, signs: list[int]) -> dict[int, list[list[int]]]:
    """Inertia of H[k] + sign·tols[k]·I for each sign and each matrix of ``H`` ``[B, N, N]``, by
    :func:`pipeline.numerics.block_ldl.inertia_` (rounding within :data:`BLOCKED_ACCURACY` · tol), which works on
    the lower triangles while the upper ones keep H. Where a batch gives up, its matrices go one by one;
    where one matrix gives up, Bunch–Kaufman counts it. H is put back from its upper triangles."""
    found = {}
    block_ldl.mirror_(H, from_upper=False)  # H is its lower triangle mirrored, and the upper keeps it
    diag = H.diagonal(dim1=-2, dim2=-1).clone()
    tols = tols.to(H.device, H.dtype)
    try:
        for sign in signs:
            H.diagonal(dim1=-2, dim2=-1).copy_(diag + sign * tols[:, None])
            try:
                rows = block_ldl.inertia_(H, atol=BLOCKED_ACCURACY * tols)
            except torch.linalg.LinAlgError:  # an eigendecomposition that did not converge: give up too
                rows = None
            block_ldl.mirror_(H, from_upper=True)
            H.diagonal(dim1=-2, dim2=-1).copy_(diag)
            if rows is None and H.shape[0] > 1:
                rows = [_blocked_counts(H[k:k + 1], tols[k:k + 1], [sign])[sign][0] for k in range(H.shape[0])]
            elif rows is None:
                rows = [_bunch_kaufman_counts(H[0], float(tols[0]), [sign])[sign]]
            found[sign] = [list(r) for r in rows]
    finally:
        block_ldl.mirror_(H, from_upper=True)
        H.diagonal(dim1=-2, dim2=-1).copy_(diag)
    return found


def _factor_in_place(H: torch.Tensor) -> torch.Tensor:
    """Inertia ``[3]`` of symmetric ``H`` ``[N, N]`` from an LDLᵀ factorisation that overwrites ``H``.

    LAPACK and cuSOLVER factor column-major matrices in place; ``H.mT`` is exactly that view of a
    row-major symmetric ``H``, so handing it to ``ldl_factor_ex`` as its own output makes torch skip
    the copy it otherwise takes (about 1.0×H of resident memory; docs/performance.md).
    Reads ``H``'s upper triangle (its lower one when ``H`` is stored column-major). Afterwards ``H``
    holds the factor in that triangle: restore it before using it again.
    """
    if H.mT.is_contiguous():  # column-major already
        A = H
    elif H.is_contiguous():
        A = H.mT
    else:  # neither layout LAPACK can take in place: factor a copy
        return inertia(H)
    pivots = torch.empty(H.shape[-1], dtype=torch.int32, device=H.device)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    LD, pivots, _ = torch.linalg.ldl_factor_ex(A, check_errors=False, out=(A, pivots, info))
    return _inertia_of_factor(LD, pivots)


SAVED_BLOCKS = 16
SAVED_SHARE = (SAVED_BLOCKS + 1) / (2 * SAVED_BLOCKS)  # what _LowerTriangle keeps, in N² numbers: 17/32


class _LowerTriangle:
    """A copy of the lower triangle of ``H`` ``[N, N]`` (diagonal blocks whole) in 16 row blocks,
    about N²·17/32 numbers — enough to rebuild a symmetric ``H`` after a factorisation has overwritten it."""

    def __init__(self, H: torch.Tensor):
        n = H.shape[-1]
        self.block = max(1, -(-n // SAVED_BLOCKS))
        self.rows = [H[s:s + self.block, :s + self.block].clone() for s in range(0, n, self.block)]

    def restore(self, H: torch.Tensor) -> None:
        """Write the saved lower triangle back into ``H`` and mirror it into the upper one, from the saved
        copy: mirroring within H (:func:`pipeline.numerics.block_ldl.mirror_`) holds more resident memory
        (docs/performance.md)."""
        b = self.block
        for i, part in enumerate(self.rows):
            s = i * b
            H[s:s + b, :s].copy_(part[:, :s])
            for j in range(0, s, b):  # blocks left of the diagonal block, mirrored above it
                H[j:j + b, s:s + b].copy_(part[:, j:j + b].mT)
            diag = part[:, s:]  # small (b²): mirror its lower triangle into its upper one
            H[s:s + b, s:s + b].copy_(diag.tril() + diag.tril(-1).mT)


def extreme_eigenvalues(H: torch.Tensor, steps: int = 80, rtol: float = 1e-10) -> tuple[float, float]:
    """``(λmin, λmax)`` of symmetric ``H`` ``[N, N]`` by Lanczos with full reorthogonalisation.

    At most ``min(steps, N)`` matrix-vector products; stops early once the residual bound of both
    extreme Ritz values is ≤ ``rtol`` · max|θ| (checked every 5 steps), or on an invariant subspace
    (then the Ritz values are exact). Ritz values lie inside [λmin, λmax]. Used to set a relative
    tolerance and to report the extremes when no full spectrum is computed.
    """
    return extreme_eigenvalues_batch(H[None], steps, rtol)[0]


def extreme_eigenvalues_batch(H: torch.Tensor, steps: int = 80, rtol: float = 1e-10,
                              together: Optional[bool] = None) -> list[tuple[float, float]]:
    """:func:`extreme_eigenvalues` of each matrix of ``H`` ``[B, N, N]``: on a GPU at once, one batched
    matrix-vector product and one device sync per step for all B, so many small Hessians cost about
    one (a matrix that has converged keeps riding along until all have); elsewhere one matrix after
    another, which is faster there (docs/performance.md).
    ``together`` overrides that choice."""
    if not (H.device.type == "cuda" if together is None else together) and H.shape[0] > 1:
        return [ex for M in H for ex in _lanczos_extremes(M[None], steps, rtol)]
    return _lanczos_extremes(H, steps, rtol)


def _lanczos_extremes(H: torch.Tensor, steps: int, rtol: float) -> list[tuple[float, float]]:
    b, n = H.shape[0], H.shape[-1]
    m = min(steps, n)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(n, generator=gen, dtype=H.dtype).to(H.device)
    Q = torch.zeros(b, m, n, dtype=H.dtype, device=H.device)
    Q[:, 0] = q / torch.linalg.vector_norm(q)
    alpha = torch.zeros(b, m, dtype=H.dtype, device=H.device)
    beta = torch.zeros(b, m, dtype=H.dtype, device=H.device)
    found: list = [None] * b
    for j in range(m):
        w = (H @ Q[:, j, :, None])[..., 0]
        alpha[:, j] = (Q[:, j] * w).sum(-1)
        w = lanczos.reorthogonalize(w, Q[:, : j + 1])
        beta[:, j] = torch.linalg.vector_norm(w, dim=-1)
        a_host, b_host = alpha[:, : j + 1].cpu(), beta[:, : j + 1].cpu()  # one sync for the batch
        for k in range(b):
            if found[k] is not None:
                continue
            breakdown = bool(b_host[k, j] <= 1e-12 * a_host[k].abs().max())
            if (j + 1) % 5 == 0 or j + 1 == m or breakdown:
                ritz, done = _ritz(a_host[k], b_host[k], rtol)
                if done or breakdown or j + 1 == m:
                    found[k] = (float(ritz[0]), float(ritz[-1]))
        if all(f is not None for f in found):
            return found
        norm = torch.where(beta[:, j] > 0, beta[:, j], torch.ones_like(beta[:, j]))
        Q[:, j + 1] = w / norm[:, None]
    raise AssertionError("unreachable")  # pragma: no cover


def _ritz(alpha: torch.Tensor, beta: torch.Tensor, rtol: float) -> tuple[np.ndarray, bool]:
    """Ritz values (:func:`pipeline.numerics.lanczos.ritz`, ascending) of the tridiagonal (alpha, beta[:-1]) and
    whether both extremes have converged: residual ‖H y − θ y‖ = |beta[-1] · s_last| ≤ rtol · max|θ|, or
    beta[-1] ≈ 0 (invariant subspace)."""
    theta, _, resid = lanczos.ritz(alpha.double().numpy(), beta.double().numpy())
    scale = float(np.abs(theta).max())
    done = bool(beta[-1] <= 1e-12 * max(scale, 1e-300)) or bool((resid[[0, -1]] <= rtol * scale).all())
    return theta, done
