"""Lanczos extremes against numpy.linalg.eigvalsh on matrices with known spectra, given only as matvecs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.numerics.lanczos import extreme_eigenpairs, lanczos, ritz


pytestmark = pytest.mark.usefixtures("one_thread")


def operator(eigenvalues: np.ndarray, seed: int = 0):
    """A dense symmetric matrix Q diag(λ) Qᵀ with a random orthogonal Q, and its ``[N, k]`` matvec."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    A = torch.as_tensor((Q * eigenvalues) @ Q.T)
    return A, (lambda V: A @ V)


SPECTRA = {
    # outliers over a bulk at zero, with a negative tail: the shape of a network Hessian
    "bulk_outliers": np.concatenate([np.zeros(150), np.linspace(0.01, 1.0, 100), -np.linspace(0.01, 0.3, 40),
                                     [40.0, 25.0, 12.0, 6.0, 3.0]]),
    "uniform": np.linspace(-1.0, 2.0, 300),
    "separated_negative": np.concatenate([[-5.0, -4.0, -3.5], np.random.default_rng(3).uniform(0, 1, 250)]),
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_extremes_match_eigvalsh(name):
    lam = SPECTRA[name]
    A, mv = operator(lam)
    exact = np.linalg.eigvalsh(A.numpy())
    k = 3
    ext = extreme_eigenpairs(mv, lam.size, k=k, steps=120, seed=1)
    scale = np.abs(exact).max()
    np.testing.assert_allclose(ext.top.values, exact[::-1][:k], atol=1e-8 * scale)
    np.testing.assert_allclose(ext.bottom.values, exact[:k], atol=1e-8 * scale)
    for pairs in (ext.top, ext.bottom):
        assert pairs.converged.all()
        assert (pairs.residuals < 1e-6 * scale).all()
        # the reported residuals are the true ones, and the vectors are orthonormal
        R = A @ pairs.vectors - pairs.vectors * torch.as_tensor(pairs.values)
        np.testing.assert_allclose(torch.linalg.vector_norm(R, dim=0).numpy(), pairs.residuals,
                                   atol=1e-12 * scale)
        G = (pairs.vectors.T @ pairs.vectors).numpy()
        np.testing.assert_allclose(G, np.eye(k), atol=1e-10)


def test_residual_flags_an_unconverged_pair():
    # A dense uniform spectrum: after a few steps the extremes are not yet converged, and the flags say so,
    # while each Ritz value still lies within its residual of an eigenvalue.
    lam = np.linspace(0.0, 1.0, 400)
    A, mv = operator(lam, seed=2)
    ext = extreme_eigenpairs(mv, lam.size, k=2, steps=8, seed=0, rtol=1e-8)
    assert not ext.top.converged.all()
    for value, res in zip(np.concatenate([ext.top.values, ext.bottom.values]),
                          np.concatenate([ext.top.residuals, ext.bottom.residuals])):
        assert np.abs(lam - value).min() <= res * (1 + 1e-9)


def test_full_reorthogonalisation_keeps_the_basis_orthonormal():
    lam = SPECTRA["bulk_outliers"]
    A, mv = operator(lam)
    alpha, beta, Q = lanczos(mv, lam.size, 150, seed=4)
    np.testing.assert_allclose((Q.T @ Q).numpy(), np.eye(Q.shape[1]), atol=1e-10)
    # no spurious copies of the converged top eigenvalue (what plain Lanczos produces)
    theta, _, _ = ritz(alpha, beta)
    assert np.sum(np.abs(theta - 40.0) < 1e-6) == 1


def test_invariant_subspace_stops_early_with_exact_values():
    lam = np.repeat([-2.0, 0.5, 3.0], 50)  # three distinct eigenvalues: the Krylov space has dimension 3
    _, mv = operator(lam)
    ext = extreme_eigenpairs(mv, lam.size, k=1, steps=40, seed=0)
    assert ext.steps == 3
    assert ext.top.values[0] == pytest.approx(3.0, abs=1e-10)
    assert ext.bottom.values[0] == pytest.approx(-2.0, abs=1e-10)


def test_float32_operator():
    lam = SPECTRA["uniform"]
    A, _ = operator(lam)
    A32 = A.float()
    ext = extreme_eigenpairs(lambda V: A32 @ V, lam.size, k=1, steps=150, dtype=torch.float32, rtol=1e-4)
    assert ext.top.vectors.dtype == torch.float32
    assert ext.top.values[0] == pytest.approx(2.0, abs=1e-5)
    assert ext.bottom.values[0] == pytest.approx(-1.0, abs=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="k must be ≥ 1, got 0"):
        extreme_eigenpairs(lambda V: V, 10, k=0)
    with pytest.raises(ValueError, match="steps=0"):
        lanczos(lambda V: V, 10, 0)
