"""Labels beyond the spectrum, against oracles: gradient shares and the gradient-flat test on constructed
Hessians, the escape check on the linear autoencoder's saddles (½ε²λmin), stall tags for gradient descent at
the edge of stability, and power iteration against eigvalsh."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import grad

from pipeline.landscape import critical, refine, stall
from pipeline.orchestration import rows
from pipeline.landscape.critical import critical_label, critical_report, escape_check, gradient_shares
from pipeline.curvature.hessian import hessian
from pipeline.curvature.models import MLP, loss_value
from pipeline.landscape.stall import gradient_cosine, power_lambda_max, stall_tag
from pipeline.orchestration.train import run_problem, train

F64 = torch.float64


def _orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]


def test_gradient_shares_split_the_squared_norm_by_eigenspace():
    Q = _orthogonal(4)
    lam = torch.tensor([-2.0, 0.0, 1e-9, 3.0], dtype=F64)
    g = Q @ torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=F64)  # coordinates in the eigenbasis
    s = gradient_shares(g, lam, Q, tol=1e-6)
    total = 1 + 4 + 0.25 + 9
    assert (s.neg, s.zero, s.pos) == pytest.approx((1 / total, 4.25 / total, 9 / total), abs=1e-14)
    assert s.neg + s.zero + s.pos == pytest.approx(1.0, abs=1e-14)
    s0 = gradient_shares(g, lam, Q, tol=0.0)  # with no tolerance, 1e-9 is positive
    assert s0.pos == pytest.approx(9.25 / total, abs=1e-14)
    assert math.isnan(gradient_shares(torch.zeros(4, dtype=F64), lam, Q, 1e-6).zero)
    with pytest.raises(ValueError, match="eigvecs"):
        gradient_shares(g, lam, Q[:3], 1e-6)


def _quadratic_with_kernel(a: float, b: float):
    """L(θ) = a·uᵀθ + b·w₁ᵀθ + ½θᵀHθ, H = Q diag(0, 1, 2, −1.5, 3) Qᵀ, u = Q e₀ spans ker H."""
    Q = _orthogonal(5, seed=7)
    H = Q @ torch.diag(torch.tensor([0.0, 1.0, 2.0, -1.5, 3.0], dtype=F64)) @ Q.T
    u, w1 = Q[:, 0], Q[:, 1]
    return (lambda t: a * (u @ t) + b * (w1 @ t) + 0.5 * t @ H @ t), H


H_FRO = math.sqrt(0 + 1 + 4 + 2.25 + 9)  # ‖H‖_F of _quadratic_with_kernel

FLAT_CASES = [  # a (kernel part of g), b (range part, λ = 1), label at θ = 0
    ("in_kernel", 1.0, 0.02, "gradient_flat"),  # r = 1/(‖H‖_F·0.02 + ‖g‖) = 0.925
    # 96 % of ‖g‖ is in the kernel, but the Newton step p* = −0.3·w₁ is not small: Frye's r = 0.44, not flat
    # (the bare null-space share ‖ρ‖/‖g‖ = 0.958 would pass a 0.9 threshold).
    ("kernel_share_but_big_step", 1.0, 0.3, "not_critical"),
    ("mostly_range", 1.0, 1.0, "not_critical"),
    ("tiny_gradient", 3e-6, 1e-6, "saddle"),  # ‖g‖² = 1e-11 < 1e-10: critical, whatever its direction
]


@pytest.mark.parametrize("name, a, b, label", FLAT_CASES, ids=[c[0] for c in FLAT_CASES])
def test_gradient_flat_detection_on_a_constructed_kernel(name, a, b, label):
    f, H = _quadratic_with_kernel(a, b)
    theta = torch.zeros(5, dtype=F64)
    report = critical_report(f, theta)
    share = a / math.hypot(a, b)  # ‖ρ‖/‖g‖: ρ = a·u, the kernel part of g
    r = a / (H_FRO * b + math.hypot(a, b))  # Frye et al.: ‖Hp* + g‖/(‖H‖_F‖p*‖ + ‖g‖), p* = −b·w₁
    assert report.flatness.relative_residual == pytest.approx(r, abs=1e-12)
    assert report.flatness.cokernel_residual < 1e-12  # the residual is exactly the kernel part a·u
    assert report.shares.zero == pytest.approx(share * share, abs=1e-12)
    assert report.spectrum_label == "saddle" and report.label == label
    assert report.grad_curvature == pytest.approx(b * b / (3 * (a * a + b * b)), abs=1e-14)  # gᵀHg = b²·1, max|λ| = 3
    # The MINRES route (what the finders record): its minimum-length solution is the same p*, so Frye's r
    # computed from it matches the eigendecomposition; its own relative_residual is the share ‖ρ‖/‖g‖.
    g = -grad(f)(theta)
    sol = refine.minres(lambda v: H @ v, g, rtol=1e-12)
    frye_r = float(torch.linalg.vector_norm(sol.residual)) / (
        float(torch.linalg.norm(H)) * float(torch.linalg.vector_norm(sol.x)) + float(torch.linalg.vector_norm(g)))
    assert frye_r == pytest.approx(r, abs=1e-10)
    assert sol.relative_residual == pytest.approx(share, abs=1e-10)
    assert sol.cokernel_residual < 5e-4


def test_flatness_is_frye_relres_not_the_null_space_share():
    Q = _orthogonal(4, seed=3)
    lam = torch.tensor([0.0, 1e-3, 2.0, 4.0], dtype=F64)
    h_fro = math.sqrt(1e-6 + 4 + 16)
    # All of g in the kernel: p* = 0, r = 1 and r_H = 0.
    fl = critical.flatness_from_spectrum(Q[:, 0], lam, Q, tol=1e-6)
    # (abs 1e-12: rounding in the range coefficients of g is amplified by 1/λ = 1e3.)
    assert (fl.relative_residual, fl.cokernel_residual) == (pytest.approx(1.0, abs=1e-12), 0.0)
    # 99.5 % of ‖g‖ in the kernel, the rest on λ = 1e-3 just above tol: p* is huge, so r is small.
    c = torch.tensor([1.0, 0.1, 0.0, 0.0], dtype=F64)
    fl = critical.flatness_from_spectrum(Q @ c, lam, Q, tol=1e-6)
    assert fl.relative_residual == pytest.approx(1.0 / (h_fro * 100.0 + math.hypot(1.0, 0.1)), rel=1e-12)
    assert fl.relative_residual < 0.003 and not critical.is_gradient_flat(fl.relative_residual, fl.cokernel_residual)
    # Counting λ = 1e-3 as zero (tol 1e-2): all of g is "null", r = 1, and r_H = ‖Hρ‖/(‖H‖_F‖ρ‖) sees it.
    fl = critical.flatness_from_spectrum(Q @ c, lam, Q, tol=1e-2)
    assert fl.relative_residual == pytest.approx(1.0, abs=1e-12)
    assert fl.cokernel_residual == pytest.approx(1e-4 / (h_fro * math.hypot(1.0, 0.1)), rel=1e-12)
    # H = 0: the loss is linear, every direction is null.
    linear = critical.flatness_from_spectrum(Q[:, 1], torch.zeros(4, dtype=F64), Q, 0.0)
    assert linear.relative_residual == pytest.approx(1.0, abs=1e-15) and linear.cokernel_residual == 0.0
    assert math.isnan(critical.flatness_from_spectrum(torch.zeros(4, dtype=F64), lam, Q, 1e-6).relative_residual)
    with pytest.raises(ValueError, match="eigvecs"):
        critical.flatness_from_spectrum(Q[:, 0], lam, Q[:3], 1e-6)
    with pytest.raises(ValueError, match="tol"):
        critical.flatness_from_spectrum(Q[:, 0], lam, Q, -1.0)


def test_critical_label_rules():
    assert critical_label(1e-12, "saddle", math.nan, math.nan) == "saddle"
    assert critical_label(1e-3, "saddle", 0.95, 1e-5) == "gradient_flat"
    assert critical_label(1e-3, "saddle", 0.95, 1e-2) == "not_critical"  # residual not in the kernel
    assert critical_label(1e-3, "minimum", 0.5, 1e-6) == "not_critical"
    assert critical_label(1e-3, "minimum", math.nan, math.nan) == "not_critical"
    assert critical_label(1e-9, "minimum", gtol2=1e-8) == "minimum"
    with pytest.raises(ValueError, match="spectrum label"):
        critical_label(0.0, "bowl")
    with pytest.raises(ValueError, match="grad_norm2"):
        critical_label(math.nan, "saddle")


X_EXACT = torch.tensor([[3.0, 1.0], [1.0, -1.0], [1.0, -1.0], [1.0, -1.0]], dtype=F64)  # XᵀX/4 = diag(3, 1)
AE = MLP(2, 2, depth=1, width=1, activation="linear", bias=False)


def ae_loss(theta):
    return loss_value(AE, theta, X_EXACT, X_EXACT, "mse")


@pytest.mark.parametrize("point, lam_min", [([0, 0, 0, 0], -3.0), ([0, 1, 0, 1], 2 - math.sqrt(10))],
                         ids=["origin", "pc2"])
def test_escape_check_goes_down_from_a_saddle_as_predicted(point, lam_min):
    theta = torch.tensor(point, dtype=F64)
    report = critical_report(ae_loss, theta)
    assert report.label == "saddle" and report.lam_min == pytest.approx(lam_min, abs=1e-12)
    esc = report.escape
    assert esc is not None and esc.drops
    assert all(d < 0 for d in esc.delta)
    # Second order: L(θ ± εv) − L(θ) = ½ε²λmin + O(ε³) at a critical point.
    assert esc.delta[0] / esc.predicted[0] == pytest.approx(1.0, abs=1e-2)
    assert esc.grad_dot_v == 0.0
    row = rows.critical_columns(report)
    assert row["escape_drops"] is True and row["critical_label"] == "saddle"
    assert row["escape_delta"] == min(esc.delta)


def test_escape_check_does_not_go_down_at_a_strict_minimum():
    H = torch.diag(torch.tensor([0.5, 2.0], dtype=F64))
    f = lambda t: 0.5 * t @ H @ t  # noqa: E731
    esc = escape_check(f, torch.zeros(2, dtype=F64), torch.tensor([3.0, 0.0], dtype=F64), 0.5, steps=(1e-2, 0.1))
    assert not esc.drops
    np.testing.assert_allclose(esc.delta, esc.predicted, rtol=1e-12)  # exact for a quadratic
    with pytest.raises(ValueError, match="shape"):
        escape_check(f, torch.zeros(2, dtype=F64), torch.ones(3, dtype=F64), 0.5)


def _gd(f, theta0, lr, steps):
    """Plain full-batch gradient descent; returns the iterates [steps+1, N] and losses [steps+1]."""
    g = grad(f)
    thetas, theta = [theta0], theta0
    for _ in range(steps):
        theta = theta - lr * g(theta)
        thetas.append(theta)
    return torch.stack(thetas), [float(f(t)) for t in thetas]


def _tag_at_stall(f, theta0, lr, window, threshold):
    thetas, losses = _gd(f, theta0, lr, 400)
    steps = list(range(len(losses)))
    at = stall.stall_steps(steps, losses, window, threshold, max_stalls=1)
    assert at, "gradient descent did not stall"
    s = at[0]
    g = grad(f)
    g_s, g_next = g(thetas[s]), g(thetas[s + 1])
    lam = power_lambda_max(f, thetas[s], iters=300, rtol=1e-13)
    return stall_tag(float(g_s.norm()), float(g(theta0).norm()), gradient_cosine(g_s, g_next), lam.lam_max, lr), lam


def test_gradient_descent_just_under_two_over_lambda_max_stalls_and_oscillates():
    Q = _orthogonal(3, seed=2)
    H = Q @ torch.diag(torch.tensor([1.0, 0.6, 0.3], dtype=F64)) @ Q.T
    f = lambda t: 0.5 * t @ H @ t  # noqa: E731
    lr = 2 * (1 - 1e-6) / 1.0  # the top mode is multiplied by −(1 − 2e-6) each step: it never decays
    tag, lam = _tag_at_stall(f, torch.ones(3, dtype=F64), lr, window=100, threshold=1e-3)
    assert lam.lam_max == pytest.approx(1.0, rel=1e-6)
    assert tag.tag == "oscillating"
    assert tag.cosine == pytest.approx(-1.0, abs=1e-6)
    assert tag.sharpness == pytest.approx(1.0, abs=1e-5)
    assert tag.grad_ratio > 0.1
    assert "cosine" in tag.reasons and "lam_max" in tag.reasons and "grad_ratio" in tag.reasons


def test_gradient_descent_with_a_small_step_stalls_at_a_small_gradient():
    H = torch.diag(torch.tensor([1.0, 0.6, 0.3], dtype=F64))
    f = lambda t: 0.5 * t @ H @ t + 1.0  # noqa: E731 — a minimum value of 1 keeps relative improvements finite
    tag, _ = _tag_at_stall(f, torch.ones(3, dtype=F64), 0.5, window=100, threshold=1e-6)
    assert tag.tag == "small_gradient"
    assert tag.grad_ratio < 1e-2 and tag.cosine > 0 and tag.sharpness == pytest.approx(0.25, rel=1e-6)
    row = rows.stall_tag_columns(tag)
    assert row["stall_tag"] == "small_gradient" and row["stall_grad_ratio"] == tag.grad_ratio


def test_stall_tag_skips_what_was_not_measured():
    assert stall_tag(1e-6, 1.0).tag == "small_gradient"  # no cosine, no λmax: the gradient alone decides
    adam = stall_tag(1e-6, 1.0, cosine=0.5, lam_max=1e3, lr=None)  # Adam: no 2/lr limit
    assert adam.tag == "small_gradient" and math.isnan(adam.sharpness)
    assert stall_tag(1e-6, 1.0, cosine=-0.2).tag == "oscillating"
    assert stall_tag(0.5, 1.0, cosine=0.9).tag == "oscillating"  # a large gradient is evidence enough


def test_sharpness_alone_does_not_make_a_stall_oscillate():
    # The lecture run at lr 0.5 that converged smoothly: cosine +1.0, ‖g‖/‖g₀‖ = 5e-4, λmax·lr/2 = 0.92.
    smooth = stall_tag(5e-4, 1.0, cosine=1.0, lam_max=3.68, lr=0.5)
    assert smooth.tag == "small_gradient"
    assert smooth.sharpness == pytest.approx(0.92) and "lam_max*lr/2=0.92" in smooth.reasons
    # The same sharpness with gradients that point against each other is a bounce.
    bounce = stall_tag(5e-4, 1.0, cosine=-0.3, lam_max=3.68, lr=0.5)
    assert bounce.tag == "oscillating" and "cosine" in bounce.reasons and "lam_max" in bounce.reasons
    with pytest.raises(ValueError, match="grad_norm"):
        stall_tag(-1.0, 1.0)


def test_real_training_at_the_edge_of_stability_is_tagged_oscillating(make_cfg):
    # A linear model (no hidden layer) has a quadratic loss: gradient descent with lr just under 2/λmax
    # keeps the top mode bouncing, the loss stops falling, and train()'s stall rule fires.
    cfg = make_cfg(["data=synthetic", "data.n_samples=64", "model.depth=0", "model.activation=linear",
                    "stall.window=200", "stall.threshold=1e-3", "stall.max_stalls=1", "optim.max_steps=1000"])
    problem = run_problem(cfg, 0)
    f = problem.loss_fn()
    theta0 = problem.model.init(0)
    lam_max = float(torch.linalg.eigvalsh(hessian(f, theta0))[-1])
    cfg.optim.lr = 2 * (1 - 1e-6) / lam_max
    result = train(cfg, 0)
    ck = result.checkpoints[0]
    assert ck.stalled
    g = grad(f)
    g_s = g(ck.theta)
    g_next = g(ck.theta - cfg.optim.lr * g_s)
    power = power_lambda_max(f, ck.theta, iters=2000, rtol=1e-13)
    assert power.lam_max == pytest.approx(lam_max, rel=1e-4)
    tag = stall_tag(ck.grad_norm, float(g(theta0).norm()), gradient_cosine(g_s, g_next), power.lam_max,
                    cfg.optim.lr)
    assert tag.tag == "oscillating" and tag.cosine < -0.99
    # The same tag from the checkpoint alone (what a Hessian or refine task has at hand).
    again = stall.stall_tag_at(f, ck.theta, float(g(theta0).norm()), cfg.optim.lr, power_iters=2000)
    assert again.tag == "oscillating" and again.cosine == pytest.approx(tag.cosine, abs=1e-12)


def test_power_iteration_finds_the_largest_algebraic_eigenvalue():
    model = MLP(3, 2, depth=1, width=4, activation="tanh")
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(20, 3, generator=gen, dtype=F64), torch.randn(20, 2, generator=gen, dtype=F64)
    f = lambda t: loss_value(model, t, X, Y, "mse")  # noqa: E731
    theta = model.init(1)
    lam = np.linalg.eigvalsh(torch.autograd.functional.hessian(f, theta).numpy())
    res = power_lambda_max(f, theta, iters=500, rtol=1e-12)
    assert res.lam_max == pytest.approx(lam[-1], rel=1e-6)
    assert float(res.vector.norm()) == pytest.approx(1.0)
    # A dominant negative eigenvalue: the shifted second run still returns the top (algebraic) one.
    Hn = torch.diag(torch.tensor([-5.0, 1.0, 2.0], dtype=F64))
    neg = power_lambda_max(lambda t: 0.5 * t @ Hn @ t, torch.zeros(3, dtype=F64), iters=300, rtol=1e-12)
    assert neg.lam_max == pytest.approx(2.0, rel=1e-6)


def test_gradient_cosine():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])
    assert gradient_cosine(a, b) == -1.0
    assert gradient_cosine(a, torch.tensor([1.0, 1.0])) == pytest.approx(math.sqrt(0.5))
    assert math.isnan(gradient_cosine(a, torch.zeros(2)))


def test_report_at_a_non_critical_point_is_not_critical():
    theta = torch.tensor([0.05, 1.0, 0.0, 1.0], dtype=F64)  # near the PC2 saddle, gradient clearly non-zero
    report = critical_report(ae_loss, theta)
    assert report.grad_norm2 > 1e-6 and report.label == "not_critical"
    row = rows.critical_columns(report)
    assert set(row) >= {"critical_label", "grad_norm2", "grad_share_neg", "grad_share_zero", "grad_share_pos",
                        "flat_residual", "flat_cokernel", "grad_curvature", "escape_drops", "escape_delta", "escape_predicted"}
    assert row["grad_share_neg"] + row["grad_share_zero"] + row["grad_share_pos"] == pytest.approx(1.0)
    assert critical.CRITICAL_LABELS[:2] == ("not_critical", "gradient_flat")


@pytest.mark.parametrize("where", ["ae_saddle", "ae_near_saddle", "tanh_mlp"])
def test_report_from_the_pipelines_decomposition_equals_the_dense_report(where):
    """The pipeline's pass keeps only Vᵀg and v_min of its eigh (spectrum_at(..., vectors=True)); the report
    built from them (report_from_eigen) equals critical_report's, which takes its own eigh of the Hessian."""
    from pipeline.curvature.hessian import spectrum_at

    if where == "tanh_mlp":
        model = MLP(3, 2, depth=1, width=5, activation="tanh")
        gen = torch.Generator().manual_seed(0)
        X, Y = torch.randn(30, 3, generator=gen, dtype=F64), torch.randn(30, 2, generator=gen, dtype=F64)
        f, theta = (lambda t: loss_value(model, t, X, Y, "mse")), model.init(0)
    else:
        f, theta = ae_loss, torch.tensor([0.0, 0.0, 0.0, 0.0] if where == "ae_saddle" else [0.05, 1, 0, 1], dtype=F64)
    res = spectrum_at(f, theta, method="eigh", vectors=True)
    got = rows.critical_columns(critical.report_from_eigen(f, theta, res.eigenvalues, res.grad_coeffs, res.v_min,
                                                            tol=res.tol))
    want = rows.critical_columns(critical_report(f, theta, tol=res.tol))
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key
        else:
            assert got[key] == value, key
    with pytest.raises(ValueError, match="theta's shape"):
        critical.report_from_eigen(f, theta, res.eigenvalues, res.grad_coeffs[:-1], res.v_min)


def test_an_exact_minimum_is_small_gradient_whatever_its_rounding_noise_cosine():
    # Zero-loss least squares: at θ* the computed gradient is rounding noise, and so is the cosine between it
    # and the next GD step's gradient — a negative noise cosine must not make the point "oscillating".
    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 12, generator=g, dtype=torch.float64)
    theta_star = torch.randn(12, generator=g, dtype=torch.float64)
    y = (X * theta_star).sum(1)  # another summation order than X @ θ: residuals of rounding size

    def f(theta):
        return ((X @ theta - y) ** 2).mean()

    g_star = torch.func.grad(f)(theta_star)
    g0 = float(torch.func.grad(f)(torch.zeros(12, dtype=torch.float64)).norm())
    ratio = float(g_star.norm()) / g0
    assert 0 < ratio < stall.NOISE_EPS * torch.finfo(torch.float64).eps  # the path under test: noise, not zero
    tag = stall.stall_tag_at(f, theta_star, g0, lr=0.1, power_iters=20)
    assert tag.tag == "small_gradient" and math.isfinite(tag.cosine)
    assert "not used: gradient at rounding level" in tag.reasons
    # Whatever sign the noise takes, a negative cosine at the rounding level is not evidence of a bounce …
    assert stall_tag(1e-17, 1.0, cosine=-0.9, noise_ratio=2.2e-13).tag == "small_gradient"
    assert "not used" in stall_tag(1e-17, 1.0, cosine=-0.9, noise_ratio=2.2e-13).reasons
    # … while the same cosine above the rounding level still is.
    assert stall_tag(1e-9, 1.0, cosine=-0.9, noise_ratio=2.2e-13).tag == "oscillating"


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_sharpness_is_one_at_the_stability_limit_of_the_optimizer_that_trained(momentum, make_cfg):
    # torch's SGD with heavy-ball momentum μ is stable on ½λx² iff lr·λ < 2(1 + μ) (Cohen et al. 2021's
    # edge of stability for momentum): sharpness 1 must mark that limit, not plain GD's 2/lr.
    lam = 3.0
    for factor, stable in ((0.99, True), (1.01, False)):
        x = torch.ones(1, dtype=F64, requires_grad=True)
        lr = factor * 2 * (1 + momentum) / lam
        opt = torch.optim.SGD([x], lr=lr, momentum=momentum)
        for _ in range(3000):
            opt.zero_grad()
            (0.5 * lam * x * x).sum().backward()
            opt.step()
        assert (abs(float(x.detach())) < 1.0) == stable
        sharp = stall_tag(1e-6, 1.0, cosine=1.0, lam_max=lam, lr=lr, momentum=momentum).sharpness
        assert sharp == pytest.approx(factor) and (sharp < 1.0) == stable
    # train() tags its checkpoints with the momentum it trained with
    cfg = make_cfg(["data=synthetic", "data.n_samples=64", "model.depth=0", "model.activation=linear",
                    "optim.max_steps=50", f"optim.momentum={momentum}"])
    problem = run_problem(cfg, 0)
    ck = train(cfg, 0).checkpoints[-1]
    top = power_lambda_max(problem.loss_fn(), ck.theta, iters=cfg.stall.power_iters).lam_max
    assert ck.tag.sharpness == pytest.approx(top * cfg.optim.lr / (2 * (1 + momentum)), rel=1e-6)
