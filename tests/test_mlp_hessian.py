"""The closed-form MLP Hessian against torch.autograd.functional.hessian (float64) for every activation, both
losses, depths 0-3, with and without biases and weight decay; chunked equals unchunked; weighted batch terms
equal one batch; what `auto` picks; CUDA against CPU where a GPU exists."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import peak_rss_growth_mib
from pipeline.curvature import hessian as hs
from pipeline.curvature.data import Dataset
from pipeline.curvature.mlp_hessian import _bytes_per_sample, mlp_hessian
from pipeline.curvature.models import ACTIVATIONS, CNN, MLP
from pipeline.curvature.problem import MeanLoss, Problem

F64 = torch.float64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(model, n: int, loss: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, model.in_dim, generator=g, dtype=F64)
    if loss == "cross_entropy":
        return X, torch.randint(0, model.out_dim, (n,), generator=g)
    return X, torch.randn(n, model.out_dim, generator=g, dtype=F64)


def _close(a, b, tol=1e-12):
    scale = max(float(b.abs().max()), 1e-300)
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max()) / scale


GRID = list(itertools.product(sorted(ACTIVATIONS), ["mse", "cross_entropy"], [0, 1, 3], [True, False]))


@pytest.mark.parametrize("activation,loss,depth,bias", GRID,
                         ids=[f"{a}-{lo}-d{d}-{'b' if b else 'nob'}" for a, lo, d, b in GRID])
def test_closed_form_equals_autograd(activation, loss, depth, bias):
    model = MLP(5, 3, depth=depth, width=4, activation=activation, bias=bias)
    X, Y = _data(model, 23, loss, seed=depth)
    theta = model.init(depth + 7)
    for wd in (0.0, 0.03):
        f = MeanLoss(model, X, Y, loss, wd)
        got = mlp_hessian(model, theta, X, Y, loss, wd)
        _close(got, torch.autograd.functional.hessian(f, theta))
        assert torch.equal(got, got.T)


def test_chunks_of_samples_and_rows_change_nothing_but_rounding():
    """A workspace of a few hundred bytes forces one sample per chunk and one input row per product."""
    model = MLP(6, 4, depth=2, width=7, activation="tanh")
    X, Y = _data(model, 40, "mse")
    theta = model.init(2)
    whole = mlp_hessian(model, theta, X, Y, "mse", workspace_bytes=2**30)
    for budget in (300, 5_000, 200_000):
        _close(mlp_hessian(model, theta, X, Y, "mse", workspace_bytes=budget), whole, tol=1e-14)
    strided = torch.zeros(model.n_params, 2 * model.n_params, dtype=F64)[:, ::2]  # out may be any view
    _close(mlp_hessian(model, theta, X, Y, "mse", out=strided, workspace_bytes=2**30), whole, tol=0)


@pytest.mark.parametrize("loss,bias", [("mse", True), ("cross_entropy", False)])
def test_many_points_in_batched_gemms_equal_one_by_one(loss, bias):
    """θ [B, N] gives B Hessians in one build, whatever the workspace: all points and samples at once, a few
    points at a time, or one point with its samples in chunks; weighted terms accumulate the same way."""
    model = MLP(6, 3, depth=2, width=5, activation="softplus", bias=bias)
    X, Y = _data(model, 30, loss)
    thetas = torch.stack([model.init(s) for s in range(5)])
    one = torch.stack([mlp_hessian(model, t, X, Y, loss, 0.01) for t in thetas])
    per_point = 30 * _bytes_per_sample(model.blocks(), 8)  # one point's layer quantities, bytes
    for budget in (2 * 2.5 * per_point, 2**30, 300):  # half the workspace holds them: 2 points, all, 1 sample
        H = mlp_hessian(model, thetas, X, Y, loss, 0.01, workspace_bytes=budget)
        assert H.shape == (5, model.n_params, model.n_params)
        _close(H, one, tol=1e-14)
    prob = Problem(model, Dataset(X, Y, 3), loss, 0.01)
    _close(hs.hessians(prob.batched_loss_terms(7), thetas), one, tol=1e-13)
    n = model.n_params
    with pytest.raises(ValueError, match=rf"out must be \[5, {n}, {n}\]"):
        mlp_hessian(model, thetas, X, Y, loss, out=torch.empty(n, n, dtype=F64))


def test_weighted_batch_terms_accumulate_to_the_full_batch():
    """hessian() over batch terms (n_b/n, L2 counted once) takes the closed form for each and equals one
    batch — and the HVP build of the same terms."""
    model = MLP(4, 3, depth=2, width=5, activation="softplus")
    X, Y = _data(model, 50, "cross_entropy")
    prob = Problem(model, Dataset(X, Y, 3), "cross_entropy", 1e-3)
    theta = model.init(4)
    terms = prob.batched_loss_terms(16)
    assert len(terms) == 4 and hs.resolve_hvp("auto", theta.device, terms) == "closed_form"
    one = hs.hessian(prob.loss_fn(), theta)
    _close(hs.hessian(terms, theta), one)
    _close(hs.hessian(terms, theta, hvp="rev"), one)
    _close(one, torch.autograd.functional.hessian(prob.loss_fn(), theta))


def test_auto_picks_the_closed_form_only_where_the_loss_offers_one():
    mlp = MLP(4, 2, depth=1, width=3)
    X, Y = _data(mlp, 10, "mse")
    assert hs.resolve_hvp("auto", torch.device("cpu"), MeanLoss(mlp, X, Y, "mse")) == "closed_form"
    cnn = CNN(16, 2, conv_layers=1, channels=2)
    X, Y = _data(cnn, 10, "mse")
    cnn_loss = MeanLoss(cnn, X, Y, "mse")
    assert cnn_loss.closed_form is None
    assert hs.resolve_hvp("auto", torch.device("cpu"), cnn_loss) == "rev"
    assert hs.resolve_hvp("auto", torch.device("cpu"), lambda t: (t ** 4).sum()) == "rev"
    with pytest.raises(ValueError, match="closed_form"):
        hs.hessian(cnn_loss, cnn.init(0), hvp="closed_form")


def test_float32_closed_form_is_within_the_noise_floor():
    model = MLP(8, 3, depth=2, width=10, activation="tanh")
    X, Y = _data(model, 64, "mse")
    theta = model.init(5)
    ref = mlp_hessian(model, theta, X, Y, "mse")
    lam64 = torch.linalg.eigvalsh(ref)
    lam32 = torch.linalg.eigvalsh(mlp_hessian(model, theta.float(), X.float(), Y.float(), "mse").double())
    assert float((lam32 - lam64).abs().max()) <= hs.REL_NOISE_FLOOR[torch.float32] * float(lam64.abs().max())


def test_temporaries_stay_within_the_workspace():
    """Peak resident memory above H while building a 1,698-parameter Hessian from 4,000 samples with a 32 MiB
    workspace, in a fresh process whose allocator returns freed blocks at once (MALLOC_MMAP_THRESHOLD_):
    within the workspace. (Sizing the row chunks by the products alone once took 720 MiB here.)"""
    setup = (
        "from pipeline.curvature.models import MLP\n"
        "from pipeline.curvature.mlp_hessian import _bytes_per_sample, mlp_hessian\n"
        "m, n = MLP(200, 10, depth=1, width=8), 4000\n"
        "g = torch.Generator().manual_seed(0)\n"
        "X, Y = torch.randn(n, 200, generator=g, dtype=torch.float64), torch.randn(n, 10, generator=g, dtype=torch.float64)\n"
        "H = torch.ones(m.n_params, m.n_params, dtype=torch.float64)\n"  # pages touched before measuring
        "mlp_hessian(MLP(3, 2, 1, 2), MLP(3, 2, 1, 2).init(0), X[:4, :3], Y[:4, :2], 'mse')\n"
    )
    extra_mib = peak_rss_growth_mib(setup, "mlp_hessian(m, m.init(0), X, Y, 'mse', out=H, workspace_bytes=32 * 2**20)",
                                    env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert extra_mib <= 32 + 8, extra_mib


def test_dtypes_of_data_and_targets_follow_theta():
    """float32 θ with float64 targets builds in float32, as loss_value computes; float32 inputs with a float64 θ
    are taken in float64."""
    model = MLP(3, 4, depth=2, width=5)
    X, Y = _data(model, 7, "mse")
    theta = model.init(2)
    ref = mlp_hessian(model, theta, X, Y, "mse")
    low = mlp_hessian(model, theta.float(), X.float(), Y, "mse")
    assert low.dtype == torch.float32
    _close(low.double(), ref, tol=1e-5)
    x32 = X.float()
    _close(mlp_hessian(model, theta, x32, Y, "mse"),
           torch.autograd.functional.hessian(MeanLoss(model, x32.double(), Y, "mse"), theta))


def test_bad_theta_names_its_shape():
    model = MLP(3, 2, depth=1, width=4)
    X, Y = _data(model, 5, "mse")
    with pytest.raises(ValueError, match=r"flat \[26\] vector"):
        mlp_hessian(model, torch.zeros(25, dtype=F64), X, Y, "mse")
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        mlp_hessian(model, model.init(0), X, Y, "hinge")
    with pytest.raises(ValueError, match="at least one sample"):
        mlp_hessian(model, model.init(0), X[:0], Y[:0], "mse")


@pytest.mark.gpu
@cuda
def test_cuda_closed_form_equals_cpu():
    model = MLP(16, 4, depth=2, width=40, activation="tanh")
    X, Y = _data(model, 300, "cross_entropy")
    theta = model.init(3)
    cpu = mlp_hessian(model, theta, X, Y, "cross_entropy", 1e-4)
    gpu = mlp_hessian(model, theta.cuda(), X.cuda(), Y.cuda(), "cross_entropy", 1e-4)
    _close(gpu.cpu(), cpu, tol=1e-13)


def test_a_teacher_net_is_a_degenerate_global_minimum_as_science_md_says():
    """SCIENCE.md's case: a 1-128-1 ReLU net (385 parameters) at an exact global minimum. With targets made by
    the net itself from 6 inputs the loss is 0, the residuals vanish and H = JᵀJ/n has rank 6: 6 positive and
    379 zero eigenvalues, a gap of many decades between them, whatever the naive sign count says."""
    model = MLP(1, 1, depth=1, width=128, activation="relu")
    assert model.n_params == 385
    theta = model.init(3)
    X = torch.linspace(-1.5, 1.5, 6, dtype=F64)[:, None]
    f = MeanLoss(model, X, model.forward(theta, X), "mse")
    assert float(f(theta)) == 0.0
    exact = hs.spectrum_at(f, theta, method="eigh")
    counted = hs.spectrum_at(f, theta, method="inertia", tol=exact.tol)
    assert exact.tol_method == "gap"
    assert (exact.n_pos, exact.n_neg, exact.n_zero) == (counted.n_pos, counted.n_neg, counted.n_zero) == (6, 0, 379)
    assert exact.label == "degenerate_minimum" and exact.min_ratio == pytest.approx(6 / 385)
    assert exact.min_ratio_naive > 0.2  # the zeros' rounding signs: 0.506 here, SCIENCE.md's 0.504
