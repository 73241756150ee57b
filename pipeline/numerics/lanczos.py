"""Extreme eigenpairs of a symmetric operator known only through matrix-vector products.

Lanczos with full reorthogonalisation (every new basis vector is Gram–Schmidt-ed twice against all
earlier ones), so no spurious copies of converged Ritz values appear and the Ritz vectors stay
orthonormal — which the deflation in :mod:`pipeline.curvature.estimate` relies on. Memory: the basis, ``[N, steps]``.

The operator is a callable ``matvec(V) -> A @ V`` on column blocks ``[N, k] -> [N, k]`` (for a Hessian:
a vmapped Hessian-vector product, :func:`pipeline.curvature.hvp.hvp_matvec`). Nothing here knows of models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]  # a symmetric operator: V [N, k] -> A V [N, k] (or v [N] -> A v)


@dataclass
class Eigenpairs:
    """Ritz pairs ``values`` ``[k]`` (float64) and ``vectors`` ``[N, k]`` (orthonormal columns), with the
    explicitly computed residuals ``‖A v − θ v‖`` ``[k]`` and ``converged`` ``[k]``: residual ≤ ``rtol``·scale.
    An exact eigenvalue lies within ``residual`` of each ``value``."""

    values: np.ndarray
    vectors: torch.Tensor
    residuals: np.ndarray
    converged: np.ndarray


@dataclass
class Extremes:
    """``top``: the k algebraically largest Ritz pairs, descending; ``bottom``: the k smallest, ascending.
    ``scale``: max |θ| over all Ritz values (the spectral-norm estimate residuals are measured against);
    ``steps``: Lanczos steps taken (fewer than asked when the Krylov space became invariant);
    ``matvecs``: operator columns applied."""

    top: Eigenpairs
    bottom: Eigenpairs
    scale: float
    steps: int
    matvecs: int


def lanczos(matvec: MatVec, n: int, steps: int, *, v0: Optional[torch.Tensor] = None, seed: int = 0,
            dtype: torch.dtype = torch.float64, device: Union[str, torch.device] = "cpu"
            ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """``steps`` Lanczos steps from ``v0`` ``[N]`` (default: a seeded Gaussian vector).

    Returns the tridiagonal ``alpha`` ``[s]``, ``beta`` ``[s]`` (``beta[j]`` couples steps j and j+1;
    ``beta[s-1]`` is the size of the remainder, used for residual estimates) and the orthonormal basis
    ``Q`` ``[N, s]``, with ``s ≤ steps`` when an invariant subspace is found early.
    """
    if steps < 1 or n < 1:
        raise ValueError(f"Lanczos needs steps ≥ 1 and n ≥ 1, got steps={steps}, n={n}")
    steps = min(steps, n)
    if v0 is None:
        g = torch.Generator().manual_seed(int(seed))
        v0 = torch.randn(n, generator=g, dtype=torch.float64)
    q = v0.to(device=device, dtype=dtype).reshape(n)
    q = q / torch.linalg.vector_norm(q)
    Q = torch.zeros(n, steps, dtype=dtype, device=device)
    alpha, beta = np.zeros(steps), np.zeros(steps)
    scale = 0.0
    for j in range(steps):
        Q[:, j] = q
        w = matvec(q[:, None])[:, 0]
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"NaN or inf in the Hessian-vector product at Lanczos step {j}")
        alpha[j] = float(q @ w)
        w = reorthogonalize(w, Q[:, :j + 1].T)
        beta[j] = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(alpha[j]) + beta[j])
        if beta[j] <= 1e-12 * max(scale, 1e-300):  # invariant subspace: the Ritz values are exact
            return alpha[:j + 1], beta[:j + 1], Q[:, :j + 1]
        q = w / beta[j]
    return alpha, beta, Q


def reorthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``w`` ``[..., N]`` without its components along the orthonormal rows of ``basis`` ``[..., k, N]``
    (batch dimensions broadcast): two passes of classical Gram–Schmidt, since one pass loses orthogonality
    once Ritz values converge (Kahan–Parlett: twice is enough). Every Lanczos loop of the package uses it."""
    for _ in range(2):
        w = w - (basis.mT @ (basis @ w[..., None]))[..., 0]
    return w


def ritz(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values ``[s]`` (ascending), the tridiagonal's eigenvectors ``[s, s]`` and the Lanczos residual
    estimates ``|beta[s-1] · last component|`` ``[s]``."""
    s = alpha.size
    T = np.diag(alpha) + np.diag(beta[:s - 1], 1) + np.diag(beta[:s - 1], -1)
    theta, S = np.linalg.eigh(T)
    return theta, S, np.abs(beta[s - 1] * S[s - 1])


def extreme_eigenpairs(matvec: MatVec, n: int, k: int = 1, *, steps: int = 0, rtol: float = 1e-6,
                       v0: Optional[torch.Tensor] = None, seed: int = 0, dtype: torch.dtype = torch.float64,
                       device: Union[str, torch.device] = "cpu") -> Extremes:
    """The ``k`` largest and ``k`` smallest eigenpairs of symmetric ``A`` (given as ``matvec``) of size ``n``.

    ``steps`` (default ``max(60, 6k)``, at most ``n``) Lanczos steps; top and bottom come from the same
    Krylov space. Residuals are recomputed exactly with one ``[N, 2k]`` matvec; a pair is ``converged``
    when its residual is ≤ ``rtol`` · max|θ|.
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    steps = min(n, steps or max(60, 6 * k))
    alpha, beta, Q = lanczos(matvec, n, steps, v0=v0, seed=seed, dtype=dtype, device=device)
    theta, S, _ = ritz(alpha, beta)
    s = theta.size
    k = min(k, s)
    scale = float(np.abs(theta).max()) if s else 0.0
    Sd = torch.as_tensor(S, dtype=dtype, device=Q.device)
    top_idx, bottom_idx = np.arange(s - 1, s - 1 - k, -1), np.arange(k)
    # Both ends may overlap when the Krylov space is small: compute each distinct vector once.
    idx = np.unique(np.concatenate([top_idx, bottom_idx]))
    Y = Q @ Sd[:, idx]
    R = matvec(Y) - Y * torch.as_tensor(theta[idx], dtype=dtype, device=Q.device)
    res = dict(zip(idx.tolist(), torch.linalg.vector_norm(R, dim=0).double().cpu().numpy()))
    cols = {i: c for c, i in enumerate(idx.tolist())}

    def pairs(which: np.ndarray) -> Eigenpairs:
        r = np.array([res[i] for i in which])
        return Eigenpairs(theta[which].copy(), Y[:, [cols[i] for i in which]], r, r <= rtol * max(scale, 1e-300))

    return Extremes(pairs(top_idx), pairs(bottom_idx), scale, s, s + idx.size)
