"""Critical-point finders against oracles: MINRES against the pseudo-inverse, Newton-MR and GNM on the 2→1→2
linear autoencoder whose critical points and Hessian spectra are known in closed form (SCIENCE.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import compose_config
from pipeline.landscape import refine
from pipeline.orchestration.config import seeds_of, validate
from pipeline.landscape.critical import critical_label, critical_report
from pipeline.curvature.data import autoencoder
from pipeline.curvature.hessian import spectrum_at
from pipeline.curvature.models import MLP, loss_value
from pipeline.curvature.problem import MeanLoss

F64 = torch.float64
# XᵀX/4 = diag(3, 1) exactly in binary: the sample second moment is Σ with no rounding at all.
X_EXACT = torch.tensor([[3.0, 1.0], [1.0, -1.0], [1.0, -1.0], [1.0, -1.0]], dtype=F64)
SIGMA = np.diag([3.0, 1.0])
# θ = (W₁ᵀ [2], W₂ [2]) and f(x) = x W₁ᵀ W₂, i.e. the map x ↦ A x with A = W₂ᵀ W₁ = outer(θ[2:], θ[:2]).
AE = MLP(2, 2, depth=1, width=1, activation="linear", bias=False)


def ae_loss(theta):
    return loss_value(AE, theta, X_EXACT, X_EXACT, "mse")


def ae_map(theta) -> np.ndarray:
    t = theta.detach().cpu().numpy()
    return np.outer(t[2:], t[:2])


def closed_form_loss(theta) -> float:
    """½·tr[(I − A)Σ(I − A)ᵀ], the loss of SCIENCE.md."""
    E = np.eye(2) - ae_map(theta)
    return 0.5 * float(np.trace(E @ SIGMA @ E.T))


R2, R10 = math.sqrt(2), math.sqrt(10)
# name, critical point θ*, loss there, Hessian eigenvalues (SCIENCE.md), label, (n_pos, n_neg, n_zero)
POINTS = [
    ("origin", [0, 0, 0, 0], 2.0, [-3, -1, 1, 3], "saddle", (2, 2, 0)),
    ("pc1", [1, 0, 1, 0], 0.5, [0, 2 - R2, 2 + R2, 6], "degenerate_minimum", (3, 0, 1)),
    ("pc2", [0, 1, 0, 1], 1.5, [2 - R10, 0, 2, 2 + R10], "saddle", (2, 1, 1)),
]
IDS = [p[0] for p in POINTS]


def test_mse_on_the_autoencoder_is_the_trace_formula():
    assert torch.equal(X_EXACT.T @ X_EXACT / 4, torch.tensor(SIGMA, dtype=F64))
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        theta = torch.randn(4, generator=gen, dtype=F64)
        assert float(ae_loss(theta)) == pytest.approx(closed_form_loss(theta), rel=1e-13)


@pytest.mark.parametrize("name, point, loss, eigs, label, counts", POINTS, ids=IDS)
def test_autoencoder_spectra_match_closed_form(name, point, loss, eigs, label, counts):
    theta = torch.tensor(point, dtype=F64)
    res = spectrum_at(ae_loss, theta, method="eigh")
    np.testing.assert_allclose(res.eigenvalues, sorted(eigs), atol=1e-12)
    assert res.loss == pytest.approx(loss, abs=1e-14)
    assert res.grad_norm == 0.0
    assert res.label == label
    assert (res.n_pos, res.n_neg, res.n_zero) == counts


def test_autoencoder_data_has_the_requested_second_moment():
    # Random data, whitened: the general PC1 formula {2s₁, 0, (s₁+s₂ ± √(s₁²−2s₁s₂+5s₂²))/2} must hold.
    s1, s2 = 2.5, 0.7
    X, Y = autoencoder(seed=4, n_samples=40, variances=[s1, s2])
    np.testing.assert_allclose(X.T @ X / 40, np.diag([s1, s2]), atol=1e-13)
    assert np.array_equal(X, Y)
    Xt = torch.as_tensor(X)
    res = spectrum_at(lambda t: loss_value(AE, t, Xt, Xt, "mse"), torch.tensor([1.0, 0, 1, 0], dtype=F64),
                      method="eigh")
    root = math.sqrt(s1 * s1 - 2 * s1 * s2 + 5 * s2 * s2)
    np.testing.assert_allclose(res.eigenvalues, sorted([2 * s1, 0, (s1 + s2 + root) / 2, (s1 + s2 - root) / 2]),
                               atol=1e-12)
    with pytest.raises(ValueError, match="n_samples"):
        autoencoder(0, 1, [1.0, 2.0])


# -------------------------------------------------------------------------------------------------- MINRES


def _matrix(eigs, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=F64))
    return Q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ Q.T


INDEF = list(np.linspace(-3, 5, 30) + 0.05)
SINGULAR = list(np.linspace(-3, 5, 20)) + [0.0] * 10
MINRES_CASES = [  # name, eigenvalues, right-hand side in the range of A?, expected stop
    ("indefinite", INDEF, False, "solved"),
    ("singular_consistent", SINGULAR, True, "solved"),
    ("singular_inconsistent", SINGULAR, False, "least_squares"),
]


@pytest.mark.parametrize("name, eigs, in_range, stop", MINRES_CASES, ids=[c[0] for c in MINRES_CASES])
def test_minres_gives_the_minimum_length_least_squares_solution(name, eigs, in_range, stop):
    A = _matrix(eigs)
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(A.shape[0], generator=gen, dtype=F64)
    if in_range:
        b = A @ b
    res = refine.minres(lambda v: A @ v, b, rtol=1e-12)
    x_oracle = torch.linalg.pinv(A, rtol=1e-10) @ b  # minimum-length least-squares solution
    assert res.stopped_because == stop
    assert float(torch.linalg.vector_norm(res.x - x_oracle)) <= 1e-9 * float(torch.linalg.vector_norm(x_oracle))
    r_oracle = float(torch.linalg.vector_norm(b - A @ x_oracle) / torch.linalg.vector_norm(b))
    assert res.relative_residual == pytest.approx(r_oracle, abs=1e-10)
    if name == "singular_inconsistent":
        assert res.relative_residual > 0.1  # a real null-space part of b that no x can remove
        assert res.cokernel_residual < 1e-8  # ... and the residual is that null-space part
    else:
        assert res.relative_residual < 1e-12  # (r_H of a rounding-noise residual means nothing)


def test_minres_with_b_in_the_null_space_returns_zero():
    A = torch.diag(torch.tensor([0.0, 1.0, -2.0], dtype=F64))
    res = refine.minres(lambda v: A @ v, torch.tensor([2.0, 0.0, 0.0], dtype=F64))
    assert res.stopped_because == "invariant" and float(res.x.abs().max()) == 0.0
    assert res.relative_residual == 1.0 and res.cokernel_residual == 0.0


def test_minres_on_hessian_vector_products_matches_the_dense_hessian():
    model = MLP(3, 2, depth=1, width=4, activation="tanh")
    gen = torch.Generator().manual_seed(5)
    X, Y = torch.randn(16, 3, generator=gen, dtype=F64), torch.randn(16, 2, generator=gen, dtype=F64)
    f = lambda t: loss_value(model, t, X, Y, "mse")  # noqa: E731
    theta = model.init(0)
    H = torch.autograd.functional.hessian(f, theta)
    b = torch.randn(model.n_params, generator=gen, dtype=F64)
    res = refine.minres(refine.hvp_at(f, theta), b, rtol=1e-12, rcond=1e-14)
    assert float(torch.linalg.vector_norm(H @ res.x - b)) <= 1e-8 * float(torch.linalg.vector_norm(b))
    zero = refine.minres(lambda v: H @ v, torch.zeros(model.n_params, dtype=F64))
    assert zero.stopped_because == "zero_rhs" and float(zero.x.abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------ finders


def _start(point, scale=0.05, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor(point, dtype=F64) + scale * torch.randn(4, generator=gen, dtype=F64)


@pytest.mark.parametrize("operator", ["hvp", "dense"])
@pytest.mark.parametrize("name, point, loss, eigs, label, counts", POINTS, ids=IDS)
def test_newton_mr_converges_to_the_nearby_critical_point(name, point, loss, eigs, label, counts, operator):
    theta0 = _start(point)
    res = refine.newton_mr(ae_loss, theta0, operator=operator)
    assert res.stopped_because == "converged" and res.converged
    assert res.grad_norm2 < 1e-10
    assert res.loss == pytest.approx(loss, abs=1e-9)  # the closed-form loss of that critical point
    # Same map W₂ᵀW₁ as θ* (critical points of the same map differ only by the rescaling W₁ → aW₁, W₂ → W₂/a).
    np.testing.assert_allclose(ae_map(res.theta), ae_map(torch.tensor(point, dtype=F64)), atol=1e-6)
    assert res.distance == pytest.approx(float(torch.linalg.vector_norm(res.theta - theta0)), rel=1e-12)
    assert res.distance < 0.3
    assert res.loss_change == pytest.approx(res.loss - float(ae_loss(theta0)), abs=1e-14)
    assert len(res.history["grad_norm2"]) == res.iterations + 1
    spec = spectrum_at(ae_loss, res.theta, method="eigh")
    assert (spec.n_pos, spec.n_neg, spec.n_zero) == counts
    assert critical_label(res.grad_norm2, spec.label) == label


@pytest.mark.parametrize("name, point, loss, eigs, label, counts", POINTS, ids=IDS)
def test_gnm_baseline_runs_and_records_why_it_stopped(name, point, loss, eigs, label, counts):
    theta0 = _start(point)
    res = refine.gnm(ae_loss, theta0, max_iters=3000)
    assert res.stopped_because in refine.STOP_REASONS
    gn2 = res.history["grad_norm2"]
    assert len(gn2) == res.iterations + 1 and gn2[0] == res.grad_norm2_0 and gn2[-1] == res.grad_norm2
    assert all(b <= a for a, b in zip(gn2, gn2[1:]))  # the Armijo line search never increases ‖g‖²
    assert res.hvps >= res.iterations
    # On this small problem GNM gets there too, in many more steps than Newton-MR.
    assert res.stopped_because == "converged" and res.loss == pytest.approx(loss, abs=1e-5)
    assert res.iterations > refine.newton_mr(ae_loss, theta0).iterations

    short = refine.gnm(ae_loss, theta0, max_iters=3)
    assert short.stopped_because == "max_iters" and short.iterations == 3
    assert len(short.history["step"]) == 4
    fixed = refine.gnm(ae_loss, theta0, lr=1e-3, max_iters=20)
    assert fixed.stopped_because == "max_iters" and set(fixed.history["step"][1:]) == {1e-3}


def _flat_loss(a: float, b: float, seed: int = 0):
    """L(θ) = a·uᵀθ + b·w₁ᵀθ + ½θᵀHθ with Hu = 0: the gradient keeps a·u in the kernel of H forever."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=F64))
    u, w1 = Q[:, 0], Q[:, 1]
    H = Q @ torch.diag(torch.tensor([0.0, 1.0, 2.0, -1.5, 3.0], dtype=F64)) @ Q.T
    return lambda t: a * (u @ t) + b * (w1 @ t) + 0.5 * t @ H @ t


def test_newton_mr_stops_at_a_gradient_flat_point():
    f = _flat_loss(a=0.5, b=0.3)
    res = refine.newton_mr(f, torch.zeros(5, dtype=F64))
    assert res.stopped_because == "line_search_failed"
    assert res.grad_norm2 == pytest.approx(0.25, rel=1e-10)  # only a·u is left, and no step can remove it
    assert res.relative_residual == pytest.approx(1.0, abs=1e-10)
    assert res.cokernel_residual < 5e-4
    report = critical_report(f, res.theta)
    assert report.label == "gradient_flat" and report.spectrum_label == "saddle"
    assert report.shares.zero == pytest.approx(1.0, abs=1e-12)
    g = refine.gnm(f, torch.zeros(5, dtype=F64))
    assert g.stopped_because != "converged" and g.relative_residual > 0.9


def test_refine_dispatches_by_name():
    theta0 = _start(POINTS[1][1])
    assert refine.refine("newton_mr", ae_loss, theta0, max_iters=1).iterations == 1
    assert refine.refine("gnm", ae_loss, theta0, max_iters=2).method == "gnm"
    with pytest.raises(ValueError, match="newton_mr, gnm"):
        refine.refine("bfgs", ae_loss, theta0)
    with pytest.raises(ValueError, match="flat"):
        refine.newton_mr(ae_loss, theta0.reshape(2, 2))
    from pipeline.orchestration.config import RefineConfig

    section = RefineConfig(method="gnm", gtol2=1e-12, max_iters=7, forcing=0.01, operator="dense", num_gpus=0.5)
    mr = refine.options_for("newton_mr", section)
    assert set(mr) == set(refine.SETTINGS["newton_mr"])
    assert (mr["gtol2"], mr["max_iters"], mr["forcing"], mr["operator"]) == (1e-12, 7, 0.01, "dense")
    assert refine.options_for("gnm", section) == {k: getattr(section, k) for k in refine.SETTINGS["gnm"]}


def test_each_finders_settings_are_its_keyword_arguments_and_config_fields():
    import dataclasses
    import inspect

    from pipeline.orchestration.config import HessianCounting, RefineConfig
    from pipeline.landscape.newton_eig import newton_eig

    fields = {f.name for f in dataclasses.fields(RefineConfig)}
    counts = {f.name for f in dataclasses.fields(HessianCounting)}  # never a task's resources
    for method, finder in (("newton_mr", refine.newton_mr), ("gnm", refine.gnm), ("newton_eig", newton_eig)):
        params = inspect.signature(finder).parameters
        keyword = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert set(refine.SETTINGS[method]) <= keyword & fields
        assert keyword & fields <= set(refine.SETTINGS[method]), "a config setting the finder takes is not passed"
        assert set(refine.COUNT_SETTINGS[method]) <= keyword & counts
        assert keyword & (counts - fields) <= set(refine.COUNT_SETTINGS[method]), "a hessian setting is not passed"
    options = refine.options_for("newton_eig", RefineConfig(method="newton_eig", max_iters=9, forcing=0.1),
                                 HessianCounting(rel_tol=1e-7, tol_mode="gap", method="eigh"))
    assert set(options) == {*refine.SETTINGS["newton_eig"], *refine.COUNT_SETTINGS["newton_eig"]}
    assert (options["rel_tol"], options["tol_mode"], options["max_iters"]) == (1e-7, "gap", 9)
    assert "forcing" not in options and "method" not in options


@pytest.mark.parametrize("experiment, data_name", [("lecture_digits", "digits"), ("pennington_bahri", "gaussian"),
                                                   ("ratio_vs_loss", "digits")])
def test_experiment_configs_compose_with_the_real_config(experiment, data_name):
    cfg = compose_config([f"+experiment={experiment}"], shrink=False)
    validate(cfg)
    assert cfg.data.name == data_name and cfg.sweep.name == experiment
    assert cfg.hessian.method == "eigh" and cfg.hessian.dtype == "float64"
    if experiment == "lecture_digits":
        assert len(seeds_of(cfg.sweep.seeds)) >= 100
    if experiment == "ratio_vs_loss":  # one grid across width, data size and learning rate, one tolerance rule
        assert set(cfg.sweep.grid) == {"model.width", "data.n_samples", "optim.lr"}
        assert cfg.refine.method == "newton_eig" and cfg.hessian.tol_mode == "gap" and cfg.plot.hue


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("operator", ["hvp", "dense"])
def test_newton_mr_on_cuda(operator):
    Xc = X_EXACT.cuda()
    res = refine.newton_mr(lambda t: loss_value(AE, t, Xc, Xc, "mse"), _start(POINTS[2][1]).cuda(), operator=operator)
    assert res.theta.is_cuda and res.converged and res.loss == pytest.approx(1.5, abs=1e-9)
    model = MLP(4, 3, depth=2, width=8, activation="tanh")
    gen = torch.Generator().manual_seed(2)
    X, Y = torch.randn(64, 4, generator=gen, dtype=F64), torch.randn(64, 3, generator=gen, dtype=F64)
    theta0 = model.init(0)
    cpu = refine.newton_mr(lambda t: loss_value(model, t, X, Y, "mse"), theta0, max_iters=1, operator=operator)
    Xg, Yg = X.cuda(), Y.cuda()
    gpu = refine.newton_mr(lambda t: loss_value(model, t, Xg, Yg, "mse"), theta0.cuda(), max_iters=1,
                           operator=operator)
    assert gpu.grad_norm2 < gpu.grad_norm2_0
    assert gpu.grad_norm2 == pytest.approx(cpu.grad_norm2, rel=1e-6, abs=1e-14)


def test_auto_operator_builds_the_closed_form_for_small_mlps_only():
    """``auto``: dense (closed-form H per Newton step) for an MLP's MeanLoss up to AUTO_DENSE_MAX_N, HVPs for
    plain functions and bigger N; the dense and HVP Newton steps agree."""
    model = MLP(4, 3, depth=2, width=8, activation="tanh")
    gen = torch.Generator().manual_seed(5)
    X, Y = torch.randn(64, 4, generator=gen, dtype=F64), torch.randn(64, 3, generator=gen, dtype=F64)
    f, theta0 = MeanLoss(model, X, Y, "mse"), model.init(1)
    assert refine.resolve_operator("auto", f, theta0) == "dense"
    assert refine.resolve_operator("auto", lambda t: loss_value(model, t, X, Y, "mse"), theta0) == "hvp"
    big = MLP(4, 3, depth=1, width=refine.AUTO_DENSE_MAX_N["cpu"] // 8 + 1)
    assert big.n_params > refine.AUTO_DENSE_MAX_N["cpu"]
    assert refine.resolve_operator("auto", MeanLoss(big, X, Y, "mse"), big.init(0)) == "hvp"
    with pytest.raises(ValueError, match="unknown operator 'sparse'"):
        refine.resolve_operator("sparse", f, theta0)
    dense = refine.newton_mr(f, theta0, max_iters=3)
    hvp = refine.newton_mr(f, theta0, max_iters=3, operator="hvp")
    assert dense.iterations == hvp.iterations == 3
    assert dense.grad_norm2 == pytest.approx(hvp.grad_norm2, rel=1e-6, abs=1e-14)
