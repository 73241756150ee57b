"""The HVP-only count estimator against known spectra (operators given only as matvecs) and exact MLP counts."""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
import torch

from pipeline.curvature import estimate
from pipeline.numerics.chebyshev import SmoothedSteps, chebyshev_moments, jackson, resolution
from pipeline.curvature.data import synthetic
from pipeline.curvature.hessian import spectrum_at
from pipeline.curvature.models import MLP, loss_value

SEEDS, PROBES = 40, 10  # 40 independent estimates of 10 probes each, for the coverage checks


pytestmark = pytest.mark.usefixtures("one_thread")


def operator(eigenvalues: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    A = torch.as_tensor((Q * eigenvalues) @ Q.T)
    return lambda V: A @ V


def _spectrum(bulk, pos, neg, outliers, seed=0, bulk_scale=1e-4, pos_range=(0.01, 1.0), neg_range=(-0.25, -0.01)):
    rng = np.random.default_rng(seed)
    return np.concatenate([bulk_scale * rng.standard_normal(bulk), rng.uniform(*pos_range, pos),
                           rng.uniform(*neg_range, neg), outliers])


OUTLIERS = np.array([60.0, 30.0, 20.0, 15.0, 10.0, 8.0, 6.0, 5.0])
# name: (eigenvalues, tol, degree). A bulk at zero, a continuum of both signs and a few outliers — the shape of a
# network Hessian; the same with 60 eigenvalues parked just above tol, inside the ambiguous band; and a
# positive semidefinite one, where zero sits at the bottom edge of the range.
CASES = {
    "network_like": (_spectrum(110, 110, 72, OUTLIERS), 0.05, 300),
    "ambiguous_band": (np.concatenate([_spectrum(110, 60, 62, OUTLIERS), np.full(60, 0.056)]), 0.05, 300),
    "semidefinite": (_spectrum(150, 142, 0, OUTLIERS, bulk_scale=0.0), 0.004, 300),
}


def truth(lam: np.ndarray, tol: float) -> dict:
    return {"n_pos": int((lam > tol).sum()), "n_neg": int((lam < -tol).sum()),
            "n_zero": int((np.abs(lam) <= tol).sum())}


@lru_cache(maxsize=None)
def sketched(name: str):
    """One deflation and one sketch of SEEDS·PROBES probes per case (shared by the tests below)."""
    lam, tol, degree = CASES[name]
    mv = operator(lam)
    d = estimate.deflation(mv, lam.size, deflate=8, seed=0)
    return d, estimate.sketch(mv, lam.size, d, degree=degree, n_probes=SEEDS * PROBES, seed=1)


@pytest.fixture(params=sorted(CASES))
def case(request):
    """A case's sketch split into SEEDS independent estimates of PROBES probes each."""
    lam, tol, _ = CASES[request.param]
    _, sk = sketched(request.param)
    parts = [replace(sk, moments=sk.moments[s * PROBES:(s + 1) * PROBES]) for s in range(SEEDS)]
    return request.param, lam, tol, parts


def test_interval_covers_the_truth_at_the_stated_rate(case):
    name, lam, tol, parts = case
    exact = truth(lam, tol)
    ests = [estimate.counts(p, tol=tol, confidence=0.95) for p in parts]
    for key in ("n_pos", "n_neg", "n_zero"):
        hits = [e_ci[0] <= exact[key] <= e_ci[1] for e_ci in (getattr(e, key + "_ci") for e in ests)]
        assert np.mean(hits) >= 0.9, f"{name}: {key}={exact[key]} covered in {np.mean(hits):.0%} of {SEEDS} seeds"
    # informative, not vacuous: the minimum-ratio interval is a few percent wide
    width = np.mean([e.min_ratio_ci[1] - e.min_ratio_ci[0] for e in ests])
    assert width < 0.35 if name == "ambiguous_band" else width < 0.15, f"{name}: mean width {width:.3f}"
    assert all(e.resolution <= tol for e in ests)


def test_outliers_are_deflated_and_counted_exactly(case):
    name, lam, tol, parts = case
    e = estimate.counts(parts[0], tol=tol)
    np.testing.assert_allclose(np.sort(e.deflated), np.sort(OUTLIERS), rtol=1e-10)
    assert e.deflation_error < 1e-8
    assert e.lam_max == pytest.approx(lam.max(), rel=1e-10)
    assert e.lam_min == pytest.approx(lam.min(), abs=e.lam_min_residual + 1e-12)
    # the deflated range no longer contains the outliers: that is what buys the resolution
    assert e.spectral_range[1] < 1.1 * np.sort(lam)[-OUTLIERS.size - 1] + 1e-3


def test_the_bias_term_is_what_keeps_the_interval_honest():
    # With 60 eigenvalues inside the ambiguous band, the smoothed step's trace is biased; an interval from
    # probe variance alone would miss the truth most of the time.
    lam, tol, degree = CASES["ambiguous_band"]
    d, sk = sketched("ambiguous_band")
    steps = SmoothedSteps(degree, *d.spectral_range, 1e-3)
    samples = sk.moments @ steps.coefficients(steps.phi_at(tol)) + (d.values > tol).sum()
    exact = truth(lam, tol)["n_pos"]
    naive_hits, honest_hits = [], []
    for s in range(SEEDS):
        x = samples[s * PROBES:(s + 1) * PROBES]
        half = 2.262 * x.std(ddof=1) / np.sqrt(PROBES)  # t(0.975, 9)
        naive_hits.append(abs(x.mean() - exact) <= half)
        lo, hi = estimate.counts(replace(sk, moments=sk.moments[s * PROBES:(s + 1) * PROBES]), tol=tol).n_pos_ci
        honest_hits.append(lo <= exact <= hi)
    assert np.mean(naive_hits) < 0.5
    assert np.mean(honest_hits) >= 0.9


def test_a_tolerance_finer_than_the_resolution_is_refused():
    lam, _, _ = CASES["network_like"]
    mv = operator(lam)
    with pytest.raises(ValueError, match=r"tol=0\.001 is finer than the resolution .* of degree 100"):
        estimate.estimate_counts(mv, lam.size, tol=1e-3, degree=100, n_probes=4)
    with pytest.raises(ValueError, match=r"tol=0 is finer than the resolution"):
        estimate.estimate_counts(mv, lam.size, tol=0.0, degree=100, n_probes=4)
    with pytest.raises(ValueError, match=r"tol=1e-30 cannot be resolved .* by any degree"):
        estimate.estimate_counts(mv, lam.size, tol=1e-30, degree=0, n_probes=4)
    with pytest.raises(ValueError, match="exactly one of tol and rel_tol"):
        estimate.estimate_counts(mv, lam.size, degree=100, n_probes=4)


def test_a_spectrum_outside_the_range_is_caught():
    lam = np.linspace(-1.0, 1.0, 50)
    mv = operator(lam)
    d = estimate.deflation(mv, lam.size, deflate=0)
    wrong = replace(d, spectral_range=(-0.5, 0.5))
    with pytest.raises(RuntimeError, match="leaves the estimated range"):
        estimate.sketch(mv, lam.size, wrong, degree=200, n_probes=4)


# ---------------------------------------------------------------- the numerical pieces


def test_smoothed_steps_stay_in_unit_interval_and_keep_their_one_sided_promises():
    for m, (a, b) in [(12, (-1.0, 1.0)), (150, (-0.3, 1.0)), (400, (-1e-5, 0.02))]:
        s = SmoothedSteps(m, a, b, 1e-3)
        assert jackson(m)[0] == pytest.approx(1.0)
        theta = np.linspace(0, np.pi, 64 * m + 1)  # 4× finer than the internal grid, direct cosine sums
        lam = s.to_lam(np.cos(theta))
        basis = np.cos(np.outer(theta, np.arange(m + 1)))
        for t in np.linspace(a, b, 6)[1:-1]:
            p_lo, p_hi = basis @ s.coefficients(s.below(t)), basis @ s.coefficients(s.above(t))
            assert p_lo[lam <= t].max() <= 1e-3 and p_hi[lam >= t].min() >= 1 - 1e-3
            for p in (p_lo, p_hi):
                assert p.min() > -1e-12 and p.max() < 1 + 1e-12


def test_resolution_shrinks_with_degree_and_near_the_edge():
    mid = [resolution(m, -1.0, 1.0, 0.5) for m in (100, 200, 400)]
    assert mid[0] > 1.8 * mid[1] > 3.2 * mid[2]
    assert resolution(400, -0.01, 1.0, 0.05) < 0.5 * resolution(400, -0.5, 0.5, 0.05)


def test_chebyshev_moments_match_the_dense_oracle():
    rng = np.random.default_rng(0)
    lam = rng.uniform(-0.9, 0.9, 40)
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    A = (Q * lam) @ Q.T
    Z = torch.as_tensor(rng.choice([-1.0, 1.0], size=(40, 3)))
    mu = chebyshev_moments(lambda V: torch.as_tensor(A) @ V, Z, 9, -1.0, 1.0)
    k = np.arange(10)
    Tk = np.cos(np.outer(np.arccos(lam), k))  # T_k(λ_i), [40, 10]
    W = (Q.T @ Z.numpy()) ** 2  # squared components of each probe in the eigenbasis
    np.testing.assert_allclose(mu, W.T @ Tk, atol=1e-10)


# ---------------------------------------------------------------- Hessians of a real model


def _mlp_problem(steps=60, depth=2, width=16):
    X, Y = synthetic(0, 64, 4, 1, 8)
    X, Y = torch.as_tensor(X), torch.as_tensor(Y)
    model = MLP(4, 1, depth=depth, width=width, activation="tanh")
    theta = model.init(0).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=1e-2)
    for _ in range(steps):  # a little training: a saddle-rich point with both signs of curvature
        opt.zero_grad()
        loss_value(model, theta, X, Y, "mse").backward()
        opt.step()
    return model, X, Y, theta.detach()


def test_hvp_matvec_matches_the_dense_hessian():
    model, X, Y, theta = _mlp_problem(steps=5, depth=1, width=8)
    loss = lambda t: loss_value(model, t, X, Y, "mse")  # noqa: E731
    H = torch.autograd.functional.hessian(loss, theta)
    V = torch.randn(theta.numel(), 7, dtype=torch.float64)
    for mode in ("rev", "fwd"):
        torch.testing.assert_close(estimate.hvp_matvec(loss, theta, mode=mode)(V), H @ V, rtol=1e-10, atol=1e-12)
    halves = [(0.5, lambda t: loss_value(model, t, X[:32], Y[:32], "mse")),
              (0.5, lambda t: loss_value(model, t, X[32:], Y[32:], "mse"))]
    torch.testing.assert_close(estimate.hvp_matvec(halves, theta, chunk_size=3)(V), H @ V, rtol=1e-10, atol=1e-12)


def test_estimate_on_an_mlp_agrees_with_exact_counts():
    model, X, Y, theta = _mlp_problem()
    loss = lambda t: loss_value(model, t, X, Y, "mse")  # noqa: E731
    e = estimate.estimate_counts(estimate.hvp_matvec(loss, theta), theta.numel(), rel_tol=1e-3, degree=0,
                                 n_probes=20, seed=0)  # degree 0: chosen so that the resolution is ≤ tol/4
    exact = spectrum_at(loss, theta, method="eigh", tol=e.tol)
    assert e.resolution <= 0.26 * e.tol
    assert exact.n_neg > 10 and exact.n_pos > 10 and exact.n_zero > 100  # all three counts are non-trivial
    for key in ("n_pos", "n_neg", "n_zero"):
        lo, hi = getattr(e, key + "_ci")
        assert lo <= getattr(exact, key) <= hi, f"{key}={getattr(exact, key)} outside [{lo}, {hi}]"
    assert e.min_ratio_ci[0] <= exact.min_ratio <= e.min_ratio_ci[1]
    assert e.min_ratio_ci[1] - e.min_ratio_ci[0] < 0.1
    assert abs(e.lam_min - exact.lam_min) <= e.lam_min_residual + 1e-10
    assert e.lam_max == pytest.approx(exact.lam_max, rel=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_estimate_on_cuda_agrees_with_exact_counts():
    model, X, Y, theta = _mlp_problem()
    Xc, Yc, tc = X.cuda(), Y.cuda(), theta.cuda()
    loss_c = lambda t: loss_value(model, t, Xc, Yc, "mse")  # noqa: E731
    e = estimate.estimate_counts(estimate.hvp_matvec(loss_c, tc), tc.numel(), rel_tol=1e-3, degree=300,
                                 n_probes=20, seed=0, device="cuda")
    exact = spectrum_at(lambda t: loss_value(model, t, X, Y, "mse"), theta, method="eigh", tol=e.tol)
    for key in ("n_pos", "n_neg", "n_zero"):
        lo, hi = getattr(e, key + "_ci")
        assert lo <= getattr(exact, key) <= hi
