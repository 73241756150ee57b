"""The eigendecomposition finder (pipeline.landscape.newton_eig) against the closed-form critical points of the 2→1→2
linear autoencoder (SCIENCE.md), a planted gradient-flat quadratic, and the real config."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import compose_config
from pipeline.landscape import refine
from pipeline.orchestration import rows
from pipeline.orchestration.config import ConfigError, validate
from pipeline.orchestration.plan import expand
from pipeline.landscape.critical import critical_label
from pipeline.curvature.hessian import spectrum_at
from pipeline.landscape.newton_eig import descent_step, lm_step, newton_eig
from test_refine import F64, IDS, POINTS, _flat_loss, _start, ae_loss, ae_map


@pytest.mark.parametrize("continuation", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name, point, loss, eigs, label, counts", POINTS, ids=IDS)
def test_newton_eig_converges_to_the_nearby_critical_point(name, point, loss, eigs, label, counts, seed,
                                                           continuation):
    theta0 = _start(point, scale=0.05, seed=seed)
    res = newton_eig(ae_loss, theta0, continuation=continuation)
    assert res.stopped_because == "converged" and res.grad_norm2 < 1e-10
    assert res.iterations <= 20  # Newton near a critical manifold of constant rank: a handful of steps
    assert res.loss == pytest.approx(loss, abs=1e-9)
    # The same map W₂ᵀW₁ as θ*: critical points of one map differ only by the rescaling W₁ → aW₁,
    # W₂ → W₂/a, whose Hessians are congruent, so the counts (Sylvester) and label must be the closed form's.
    np.testing.assert_allclose(ae_map(res.theta), ae_map(torch.tensor(point, dtype=F64)), atol=1e-6)
    spec = spectrum_at(ae_loss, res.theta, method="eigh")
    assert (spec.n_pos, spec.n_neg, spec.n_zero) == counts
    assert critical_label(res.grad_norm2, spec.label) == label
    assert set(res.history["phase"][1:]) == {"newton"}  # saddles are reached by Newton steps, not descent
    gn2 = res.history["grad_norm2"]
    assert len(gn2) == res.iterations + 1 and all(b < a for a, b in zip(gn2, gn2[1:]))  # trust region on ‖g‖²


def test_from_the_exact_point_it_stops_at_once():
    res = newton_eig(ae_loss, torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=F64))
    assert res.converged and res.iterations == 0 and res.distance == 0.0


def test_steps_in_the_eigenbasis_match_dense_linear_algebra():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
    lam = np.array([-2.0, -1e-9, 1e-9, 0.5, 1.0, 4.0])
    H = Q @ torch.diag(torch.as_tensor(lam)) @ Q.T
    g = torch.randn(6, generator=gen, dtype=F64)
    c = (Q.T @ g).numpy()
    q, pred = lm_step(lam, c, tol=1e-6, mu=0.0)
    p = Q @ torch.as_tensor(q)
    np.testing.assert_allclose(p, -torch.linalg.pinv(H, atol=1e-6) @ g, atol=1e-12)  # minimum-norm Newton
    assert pred == pytest.approx(float(torch.sum((g + H @ p) ** 2)), rel=1e-10)
    q, _ = lm_step(lam, c, tol=0.0, mu=0.3)
    np.testing.assert_allclose(Q @ torch.as_tensor(q), -torch.linalg.solve(H @ H + 0.3 * torch.eye(6, dtype=F64),
                                                                           H @ g), atol=1e-12)
    q, dec = descent_step(lam, c, nu=0.1)
    p = Q @ torch.as_tensor(q)
    assert dec == pytest.approx(-float(g @ p + 0.5 * p @ H @ p), rel=1e-12) and dec > 0


def test_a_planted_gradient_flat_point_is_reported_as_such():
    # The gradient's part a·u lies in H's kernel: no Newton step removes it.
    f = _flat_loss(a=0.5, b=0.3)
    res = newton_eig(f, torch.zeros(5, dtype=F64), continuation=False)
    assert res.stopped_because == "gradient_flat" and res.iterations >= 1
    assert res.grad_norm2 == pytest.approx(0.25, rel=1e-8)
    assert res.relative_residual == pytest.approx(1.0, abs=1e-8) and res.cokernel_residual < 5e-4
    # With continuation, descent steps run down the slope along u, which this quadratic never ends: no
    # convergence may be claimed.
    run = newton_eig(f, torch.zeros(5, dtype=F64), max_iters=40)
    assert "descent" in run.history["phase"] and not run.converged
    assert run.stopped_because in refine.STOP_REASONS and run.grad_norm2 >= 0.2


def test_refine_method_newton_eig_from_the_real_config():
    cfg = compose_config(["refine=newton_eig"], shrink=False)
    validate(cfg)
    run = expand(cfg)[0].config
    opts = refine.options_for("newton_eig", run.refine, dataclasses.replace(run.hessian, rel_tol=1e-7))
    assert opts["max_iters"] == 200 and opts["rel_tol"] == 1e-7 and opts["continuation"] is True
    assert "inner_rtol" not in opts and "num_cpus" not in opts
    res = refine.refine("newton_eig", ae_loss, _start(POINTS[2][1]), **opts)
    assert res.method == "newton_eig" and res.converged and rows.refine_columns(res)["refine_stopped_because"] == "converged"
    with pytest.raises(ConfigError, match="refine.progress"):
        validate(compose_config(["refine=newton_eig", "refine.progress=1.0"], shrink=False))


def test_an_absolute_tolerance_cuts_the_pseudo_inverse_as_it_cuts_the_counts():
    # hessian.tol_mode=abs with hessian.abs_tol=1e-2: the counts call λ = 1e-4 zero, so the finder must not
    # invert it either (one rule for the counts and the pseudo-inverse, docs/critical_points.md). A tolerance
    # of 0 instead would take the 1e4-long Newton step along it and claim a critical point.
    from pipeline.orchestration.config import HessianCounting, RefineConfig

    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=F64))
    H = Q @ torch.diag(torch.tensor([1e-4, 1.0, 2.0, -1.5, 3.0], dtype=F64)) @ Q.T
    u = Q[:, 0]

    def f(t):
        return 0.5 * (u @ t) + 0.5 * t @ H @ t

    opts = refine.options_for("newton_eig", RefineConfig(method="newton_eig", continuation=False, max_iters=5),
                              HessianCounting(tol_mode="abs", abs_tol=1e-2))
    res = refine.refine("newton_eig", f, torch.zeros(5, dtype=F64), **opts)
    assert not res.converged and res.stopped_because == "gradient_flat"
    assert res.grad_norm2 == pytest.approx(0.25, rel=1e-6) and res.distance == 0.0
    assert spectrum_at(f, res.theta, tol=1e-2, tol_mode="abs").n_zero == 1
