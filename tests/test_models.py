"""Models: the CNN against torch.nn (forward) and torch.autograd (Hessian), its configs, and a CNN sweep."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import compose_config
from pipeline.orchestration.config import ConfigError, validate
from pipeline.curvature.hessian import hessian, hessians
from pipeline.curvature.models import CNN, MLP, loss_value, make_model
from pipeline.orchestration.plan import expand
from pipeline.orchestration.train import run_problem

F64 = torch.float64
NN_ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "swish": nn.SiLU, "relu": nn.ReLU,
                  "linear": nn.Identity}

# One row per architecture: (side, conv_layers, channels, kernel, depth, width, activation, bias).
CNN_CASES = [
    (4, 2, 3, 3, 0, 5, "tanh", True),
    (4, 1, 2, 5, 1, 6, "softplus", True),
    (3, 3, 2, 1, 2, 4, "swish", False),
    (8, 2, 4, 3, 0, 8, "tanh", True),
]


def nn_oracle(model: CNN, theta: torch.Tensor) -> nn.Sequential:
    """The same network built from torch.nn layers, loaded with ``theta`` by hand (the documented layout)."""
    act = NN_ACTIVATIONS[model.activation]
    layers, i = [], 0
    for c_in, c_out in model.conv_dims:
        conv = nn.Conv2d(c_in, c_out, model.kernel, padding=model.kernel // 2, bias=model.bias, dtype=F64)
        with torch.no_grad():
            conv.weight.copy_(theta[i:i + conv.weight.numel()].reshape(conv.weight.shape))
            i += conv.weight.numel()
            if model.bias:
                conv.bias.copy_(theta[i:i + c_out])
                i += c_out
        layers += [conv, act()]
    layers.append(nn.Flatten())
    dense = model.head.layer_dims
    for k, (fan_in, fan_out) in enumerate(dense):
        lin = nn.Linear(fan_in, fan_out, bias=model.bias, dtype=F64)
        with torch.no_grad():
            lin.weight.copy_(theta[i:i + fan_in * fan_out].reshape(fan_in, fan_out).T)
            i += fan_in * fan_out
            if model.bias:
                lin.bias.copy_(theta[i:i + fan_out])
                i += fan_out
        layers.append(lin)
        if k < len(dense) - 1:
            layers.append(act())
    assert i == theta.numel() == model.n_params
    return nn.Sequential(*layers)


def _data(n: int, side: int, out_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, side * side, generator=gen, dtype=F64),
            torch.randn(n, out_dim, generator=gen, dtype=F64))


@pytest.mark.parametrize("case", CNN_CASES)
def test_cnn_forward_equals_torch_nn(case, one_thread):
    side, conv_layers, channels, kernel, depth, width, activation, bias = case
    model = CNN(side * side, 7, conv_layers, channels, kernel, depth, width, activation, bias)
    theta = model.init(3)
    X, _ = _data(11, side, 7)
    oracle = nn_oracle(model, theta)
    assert model.n_params == sum(p.numel() for p in oracle.parameters())
    expected = oracle(X.reshape(-1, 1, side, side))
    torch.testing.assert_close(model.forward(theta, X), expected, rtol=1e-12, atol=1e-12)


def test_cnn_init_is_seeded_and_uniform_within_each_layers_fan_in_bound():
    model = CNN(16, 10, conv_layers=2, channels=8, kernel=3, depth=1, width=32)
    theta = model.init(5)
    assert theta.dtype == F64 and theta.shape == (model.n_params,)
    assert torch.equal(theta, model.init(5)) and not torch.equal(theta, model.init(6))
    assert model.init(5, torch.float32).dtype == torch.float32
    oracle = nn_oracle(model, theta)
    for layer in oracle:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            bound = 1 / math.sqrt(layer.weight[0].numel())  # nn's default: U(±1/√fan_in)
            for p in (layer.weight, layer.bias):
                assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound


def test_cnn_rejects_what_it_cannot_build():
    with pytest.raises(ValueError, match="side²"):
        CNN(15, 10)
    with pytest.raises(ValueError, match="odd"):
        CNN(16, 10, kernel=2)
    with pytest.raises(ValueError, match="channels"):
        CNN(16, 10, channels=0)
    with pytest.raises(ValueError, match="activation"):
        CNN(16, 10, activation="sigmoidal")


def _tiny_cnn_loss(loss: str, activation: str = "tanh"):
    model = CNN(9, 3, conv_layers=2, channels=3, kernel=3, depth=1, width=4, activation=activation)
    X, Y = _data(13, 3, 3, seed=1)
    if loss == "cross_entropy":
        Y = torch.arange(13) % 3
    return model, (lambda t: loss_value(model, t, X, Y, loss, weight_decay=1e-3))


@pytest.mark.parametrize("loss,activation", [("mse", "tanh"), ("cross_entropy", "softplus")])
@pytest.mark.parametrize("hvp", ["rev", "fwd"])
def test_cnn_hessian_equals_autograd(loss, activation, hvp, one_thread):
    model, f = _tiny_cnn_loss(loss, activation)
    assert model.n_params <= 300
    theta = model.init(0)
    expected = torch.autograd.functional.hessian(f, theta)
    H = hessian(f, theta, hvp=hvp, chunk_size=37)  # a chunk that does not divide N: a partial last block
    assert H.dtype == F64 and H.shape == (model.n_params, model.n_params)
    torch.testing.assert_close(H, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("hvp", ["rev", "fwd"])
def test_cnn_hessians_vmapped_over_points_equal_one_by_one(hvp, one_thread):
    # conv2d under vmap with a batched weight (one θ per point) goes through functorch's batching rules.
    model, f = _tiny_cnn_loss("mse")
    thetas = torch.stack([model.init(s) for s in range(3)])
    many = hessians(f, thetas, hvp=hvp, chunk_size=64)
    for b in range(3):
        torch.testing.assert_close(many[b], hessian(f, thetas[b], hvp=hvp), rtol=0, atol=1e-13)
    assert not torch.allclose(many[0], many[1])  # three different points, not one repeated


# ------------------------------------------------------------------------------------------- configs


def test_cnn_config_builds_the_cnn_it_describes():
    cfg = compose_config(["model=cnn", "data.side=8", "model.channels=5", "model.kernel=5",
                          "model.conv_layers=3", "model.depth=1", "model.width=7"], shrink=False)
    validate(cfg)
    model = make_model(cfg.model, 64, 10)
    assert model == CNN(64, 10, conv_layers=3, channels=5, kernel=5, depth=1, width=7)
    problem = run_problem(cfg, 0)
    assert isinstance(problem.model, CNN) and problem.model.in_dim == problem.data.in_dim == 64


def test_default_cnn_config_and_its_parameter_count():
    cfg = compose_config(["model=cnn"], shrink=False)
    validate(cfg)
    assert (cfg.model.conv_layers, cfg.model.channels, cfg.model.kernel, cfg.model.depth) == (2, 4, 3, 0)
    side = cfg.data.side
    # conv 1→4 (4·9 + 4), conv 4→4 (16·9 + 4), linear 4·side² → 10: the counts stated in conf/model/cnn.yaml.
    assert make_model(cfg.model, side * side, 10).n_params == 40 + 148 + 4 * side * side * 10 + 10 == 838
    assert make_model(cfg.model, 64, 10).n_params == 2758


BAD_CNN = [
    ("model=cnn data=synthetic", "data.name"),
    ("model=cnn data=gaussian", "data.name"),
    ("model=cnn model.kernel=4", "model.kernel"),
    ("model=cnn model.kernel=0", "model.kernel"),
    ("model=cnn model.kernel=9", "model.kernel"),  # 4×4 images: a 9×9 kernel has weights that see no pixel
    ("model=cnn model.channels=0", "model.channels"),
    ("model=cnn model.conv_layers=0", "model.conv_layers"),
    ("model.name=convnet", "model.name"),
    ("model=cnn +sweep.grid={model.kernel:[3,2]}", "model.kernel"),
]


@pytest.mark.parametrize("override,field", BAD_CNN)
def test_bad_cnn_configs_are_rejected_with_the_field_named(override, field):
    cfg = compose_config(override.split(" "), shrink=False)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        validate(cfg)
    assert "expected" in str(info.value)


def test_cnn_keys_change_cnn_run_ids_but_not_mlp_run_ids():
    ids = lambda overrides: [r.run_id for r in expand(compose_config(overrides, shrink=False))]  # noqa: E731
    assert ids(["model.channels=5"]) == ids([])  # an MLP does not read them
    assert ids(["model=cnn", "model.channels=5"]) != ids(["model=cnn"])
    assert ids(["model=cnn", "model.kernel=5"]) != ids(["model=cnn"])


def test_wide_mlp_config_has_the_stated_parameter_count():
    cfg = compose_config(["model=wide_mlp", "data.side=8"], shrink=False)
    validate(cfg)
    model = make_model(cfg.model, 64, 10)
    assert isinstance(model, MLP) and (model.depth, model.width) == (1, 1333)
    assert model.n_params == 64 * 1333 + 1333 + 1333 * 10 + 10 == 99_985
    assert make_model(cfg.model, 16, 10).n_params == 36_001  # on the default 4×4 digits


def test_large_estimate_experiment_composes_at_about_1e5_parameters():
    cfg = compose_config(["+experiment=large_estimate"], shrink=False)
    validate(cfg)
    assert cfg.sweep.name == "large_estimate" and cfg.hessian.method == "estimate"
    assert cfg.hessian.tol_mode == "rel" and cfg.data.name == "digits"
    problem = run_problem(cfg, 0)  # builds the data too: 8×8 digits, 64 inputs
    assert problem.data.in_dim == 64 and problem.model.n_params == 99_985


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cnn_sweep_end_to_end(make_cfg, ray_session):
    """model=cnn through the real pipeline on Ray: train → stall → Hessian → tables; one spectrum checked
    against torch.autograd's Hessian at the saved checkpoint."""
    from pipeline.orchestration.jobs import load_checkpoint
    from pipeline.orchestration.storage import Store
    from pipeline.orchestration.sweep import run_sweep

    cfg = make_cfg(["model=cnn", "sweep.name=cnn", "sweep.seeds=2", "data.n_samples=64", "model.channels=2",
                    "model.conv_layers=1", "optim.max_steps=400", "stall.window=100", "stall.max_stalls=1",
                    "figures=false"])
    validate(cfg)
    run_sweep(cfg)
    folder = f"{cfg.results_root}/cnn"
    runs = pd.read_parquet(f"{folder}/runs")
    points = pd.read_parquet(f"{folder}/points")
    spectra = pd.read_parquet(f"{folder}/spectra").set_index(["run_id", "step", "stage"])
    n_params = CNN(16, 10, conv_layers=1, channels=2).n_params  # conv 1→2 (20) + linear 32 → 10 (330)
    assert n_params == 350
    assert list(runs["status"]) == ["ok", "ok"] and (runs["n_params"] == n_params).all()
    assert (runs["model_name"] == "cnn").all() and (runs["model_channels"] == 2).all()
    assert (runs["model_kernel"] == 3).all() and (runs["model_conv_layers"] == 1).all()
    assert len(points) == runs["n_checkpoints"].sum() >= 2  # a stall or the last state of each run
    assert (points["status"] == "ok").all() and (points["method"] == "eigh").all()
    assert ((points["n_pos"] + points["n_neg"] + points["n_zero"]) == n_params).all()
    row = points.iloc[0]
    lam = np.asarray(spectra.loc[(row["run_id"], row["step"], row["stage"]), "eigenvalues"])
    ck = load_checkpoint(Store.open(cfg.results_root), f"cnn/checkpoints/{row['run_id']}/step-{row['step']:09d}.pt")
    seed = int(runs.set_index("run_id").loc[row["run_id"], "seed"])
    f = run_problem(cfg, seed).loss_fn()
    expected = np.linalg.eigvalsh(torch.autograd.functional.hessian(f, ck["theta"].to(F64)).numpy())
    np.testing.assert_allclose(lam, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    assert int((lam > row["tol"]).sum()) == row["n_pos"]
