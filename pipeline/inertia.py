"""Exact eigenvalue counts without eigenvalues: the inertia of a Bunch–Kaufman LDLᵀ factorisation.

By Sylvester's law of inertia, A = L D Lᵀ has as many positive / negative / zero eigenvalues as the
block-diagonal D (1×1 and 2×2 blocks). So #{λ > tol} is the positive count of H − tol·I and
#{λ < −tol} the negative count of H + tol·I: two factorisations (N³/3 flops each) instead of an
eigendecomposition (about 9N³ on CPU). Works on CPU (LAPACK sytrf) and CUDA (cuSOLVER), batched.
"""
from __future__ import annotations

import torch

from pipeline.spectrum import Counts


def inertia(A: torch.Tensor) -> torch.Tensor:
    """``(n_pos, n_neg, n_zero)`` of symmetric ``A`` ``[..., N, N]``, as an int64 tensor ``[..., 3]``."""
    LD, pivots = torch.linalg.ldl_factor(A)
    d = LD.diagonal(dim1=-2, dim2=-1)  # [..., N]
    e = torch.nn.functional.pad(LD.diagonal(offset=-1, dim1=-2, dim2=-1), (0, 1))  # sub-diagonal, [..., N]
    neg_piv = pivots < 0  # LAPACK: a 2×2 block at rows k, k+1 has negative pivots at both
    # Inside a run of negative pivots, blocks pair up from the run's start: k is a block start when
    # an even number of negative pivots precede it within the run.
    run_pos = _position_in_run(neg_piv)
    start2 = neg_piv & (run_pos % 2 == 0)
    one = ~neg_piv
    pos = ((d > 0) & one).sum(-1)
    neg = ((d < 0) & one).sum(-1)
    # 2×2 block [[a, b], [b, c]]: det < 0 → one of each sign; det > 0 → both of the sign of a;
    # det = 0 → one zero and one of the sign of a + c.
    a = d
    c = torch.roll(d, -1, dims=-1)
    det = a * c - e * e
    tr = a + c
    pos = pos + (start2 & (det < 0)).sum(-1) + 2 * (start2 & (det > 0) & (a > 0)).sum(-1) \
        + (start2 & (det == 0) & (tr > 0)).sum(-1)
    neg = neg + (start2 & (det < 0)).sum(-1) + 2 * (start2 & (det > 0) & (a < 0)).sum(-1) \
        + (start2 & (det == 0) & (tr < 0)).sum(-1)
    n = A.shape[-1]
    return torch.stack([pos, neg, n - pos - neg], dim=-1)


def _position_in_run(mask: torch.Tensor) -> torch.Tensor:
    """For a boolean ``[..., N]``, each True's 0-based position within its run of consecutive Trues."""
    idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    # Index of the last False at or before k (−1 if none): the run started right after it.
    last_false = torch.where(~mask, idx, torch.full_like(idx, -1)).cummax(dim=-1).values
    return idx - last_false - 1


def counts(H: torch.Tensor, tol: float) -> Counts:
    """Tolerance-aware counts of symmetric ``H`` ``[N, N]``: #{λ > tol}, #{λ < −tol}, the rest, #{λ > 0}.

    The shifts are applied to ``H``'s diagonal in place and undone, so memory stays at ``H`` plus one
    factor; ``H`` is unchanged on return (up to rounding of the diagonal, ±tol then ∓tol).
    """
    if tol < 0:
        raise ValueError(f"tol must be ≥ 0, got {tol}")
    n = H.shape[-1]
    diag = H.diagonal()
    naive = inertia(H)
    if tol == 0:
        n_pos, n_neg = int(naive[0]), int(naive[1])
    else:
        diag.sub_(tol)
        n_pos = int(inertia(H)[0])
        diag.add_(2 * tol)
        n_neg = int(inertia(H)[1])
        diag.sub_(tol)
    return Counts(n_pos, n_neg, n - n_pos - n_neg, int(naive[0]))


def extreme_eigenvalues(H: torch.Tensor, steps: int = 80) -> tuple[float, float]:
    """``(λmin, λmax)`` of symmetric ``H`` ``[N, N]`` from Lanczos with full reorthogonalisation.

    ``min(steps, N)`` matrix-vector products; exact when N ≤ steps, otherwise the extreme Ritz values,
    which converge first and lie inside [λmin, λmax]. Used to set a relative tolerance and to report the
    extremes when no full spectrum is computed.
    """
    n = H.shape[0]
    m = min(steps, n)
    g = torch.Generator(device="cpu").manual_seed(0)
    Q = torch.zeros(m, n, dtype=H.dtype, device=H.device)
    q = torch.randn(n, generator=g, dtype=H.dtype).to(H.device)
    Q[0] = q / torch.linalg.vector_norm(q)
    alpha = torch.zeros(m, dtype=H.dtype, device=H.device)
    beta = torch.zeros(m, dtype=H.dtype, device=H.device)
    k = m
    for j in range(m):
        w = H @ Q[j]
        alpha[j] = Q[j] @ w
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)  # twice is enough (Kahan–Parlett)
        if j + 1 < m:
            b = torch.linalg.vector_norm(w)
            if b <= 1e-12 * alpha[: j + 1].abs().max().clamp_min(1e-300):
                k = j + 1  # invariant subspace found: the Ritz values are exact
                break
            beta[j] = b
            Q[j + 1] = w / b
    T = torch.diag(alpha[:k]) + torch.diag(beta[: k - 1], 1) + torch.diag(beta[: k - 1], -1)
    ritz = torch.linalg.eigvalsh(T.cpu())
    return float(ritz[0]), float(ritz[-1])
