"""A user's nn.Module and parameter subsets: the Hessian of the flat-θ loss against torch.autograd's, and
every refusal before any run (real Hydra composition, the real driver check)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import compose_config
from pipeline.curvature import params
from pipeline.orchestration.config import ConfigError, validate
from pipeline.curvature.hessian import hessian
from pipeline.orchestration.plan import expand
from pipeline.orchestration.sweep import check_problems
from pipeline.curvature.torch_model import ModelError, TorchModel, build_module, import_object, restore
from pipeline.orchestration.train import run_problem

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples" / "usernets")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

RESNET = {"in_channels": 1, "width": 3, "blocks": 1, "n_classes": 10}


class Dropper(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 10)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.lin(self.drop(x.flatten(1)))


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 10)

    def forward(self, x):
        return self.lin(x.flatten(1) + 0.1 * torch.randn_like(x.flatten(1)))


class Downcast(nn.Module):
    """Computes in float32 whatever θ's dtype: a float64 Hessian of it would carry float32 rounding."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 10)

    def forward(self, x):
        return self.lin(x.flatten(1)).float()


class Upcast(Downcast):
    """Computes in float64 whatever θ's dtype."""

    def forward(self, x):
        return self.lin(x.flatten(1)).double()


class Thresholded(nn.Module):
    """Integer outputs: no derivative reaches θ, so its Hessian would be exactly zero (a 'flat' point)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 10)

    def forward(self, x):
        return (self.lin(x.flatten(1)) > 0).long()


class NotAModule:
    def __init__(self):
        pass


def user_cfg(target: str, *extra: str):
    return compose_config(["model=torch", f"model._target_={target}", "data.n_samples=32", *extra])


# (config overrides, loss) cases: a module with BatchNorm in both buffer modes, an MLP as a module.
CASES = [
    (["model=torch", "model._target_=usernets.nets.SmallResNet", "+model.kwargs={in_channels: 1, width: 3, "
      "blocks: 1, n_classes: 10}", "model.loss=cross_entropy", "optim.weight_decay=1e-3"], "eval"),
    (["model=torch", "model._target_=usernets.nets.SmallResNet", "+model.kwargs={in_channels: 1, width: 3, "
      "blocks: 1, n_classes: 10}", "model.buffers=train"], "train"),
    (["model=torch", "model._target_=usernets.nets.Tiny", "+model.kwargs={in_features: 16, hidden: 6}"], "eval"),
]


@pytest.mark.parametrize("overrides,mode", CASES)
def test_user_module_hessian_equals_autograd(overrides, mode, one_thread):
    cfg = compose_config([*overrides, "data.n_samples=48"])
    validate(cfg)
    problem = run_problem(cfg, 3).to("cpu", torch.float64)
    assert isinstance(problem.model, TorchModel) and problem.model.buffers == mode
    assert problem.data.sample_shape == (1, 4, 4)
    theta = problem.model.init(3) + 0.05 * torch.randn(problem.model.n_params, dtype=torch.float64)
    f = problem.loss_fn()
    expected = torch.autograd.functional.hessian(f, theta)
    assert torch.allclose(hessian(f, theta), expected, atol=1e-10, rtol=0)
    # the same loss accumulated over data batches (data that do not fit at once), eval-mode buffers only:
    # train-mode batch statistics make a per-batch sum a different function (config refuses that pairing)
    if mode == "eval":
        assert torch.allclose(hessian(problem.batched_loss_terms(20), theta), expected, atol=1e-10, rtol=0)


def test_parameter_subset_hessian_is_the_block_of_the_full_one(one_thread):
    cfg = compose_config([*CASES[0][0], "data.n_samples=48", "hessian.params='^(head|blocks.0.bn)'"])
    problem = run_problem(cfg, 0)
    sub = params.select(problem.model.segments(), cfg.hessian.params)
    assert sub.names == ("blocks.0.bn.weight", "blocks.0.bn.bias", "head.weight", "head.bias")
    assert sub.n_params == 3 + 3 + 30 + 10
    theta = problem.model.init(0)
    f = problem.loss_fn()
    full = torch.autograd.functional.hessian(f, theta)
    got = hessian(params.restrict(problem.batched_loss_terms(0), theta, sub), sub.take(theta))
    assert torch.allclose(got, full[sub.index][:, sub.index], atol=1e-10, rtol=0)
    by_list = params.select(problem.model.segments(), ["head.bias", "head.weight"])
    assert torch.equal(by_list.index, torch.arange(sub.index[6], sub.index[-1] + 1))
    # the built-in MLP names its pieces too
    mlp = run_problem(compose_config(["hessian.params=[layers.1.bias]"]), 0).model
    assert params.select(mlp.segments(), ["layers.1.bias"]).n_params == 10


def test_restore_puts_theta_back_into_the_users_module():
    model = TorchModel("usernets.nets.Tiny", {"in_features": 16, "hidden": 6})
    theta = torch.linspace(-1, 1, model.n_params, dtype=torch.float64)
    module = restore(build_module("usernets.nets.Tiny", {"in_features": 16, "hidden": 6}).double(), theta)
    X = torch.randn(5, 16, dtype=torch.float64)
    assert torch.allclose(module(X), model.forward(theta, X), atol=1e-14)


def test_seeds_give_the_modules_own_initialisation():
    model = TorchModel("usernets.nets.Tiny", {"in_features": 16, "hidden": 6}, seed=5)
    torch.manual_seed(5)
    ref = import_object("usernets.nets.Tiny")(in_features=16, hidden=6)
    assert torch.equal(model.init(5), torch.cat([p.detach().reshape(-1).double() for p in ref.parameters()]))
    assert not torch.equal(model.init(5), model.init(6))


def _refused(cfg, *words):
    with pytest.raises(ConfigError) as err:
        validate(cfg)
        check_problems(expand(cfg))
    for w in words:
        assert w in str(err.value), str(err.value)


def test_import_path_that_does_not_resolve_is_refused():
    _refused(user_cfg("no_such_pkg.nets.Net"), "no_such_pkg.nets.Net", "no module 'no_such_pkg'")
    _refused(user_cfg("usernets.nets.NoSuchNet"), "usernets.nets.NoSuchNet", "'NoSuchNet'")


def test_class_that_is_not_a_module_is_refused():
    _refused(user_cfg("test_torch_model.NotAModule"), "test_torch_model.NotAModule", "not a torch.nn.Module")


def test_regex_matching_no_parameter_is_refused():
    _refused(compose_config(["hessian.params='^decoder'"]), "hessian.params='^decoder'", "matches no parameter",
             "layers.0.weight")
    _refused(compose_config(["hessian.params=[layers.7.bias]"]), "layers.7.bias")


def test_active_dropout_is_refused_and_eval_mode_is_not():
    _refused(user_cfg("test_torch_model.Dropper", "model.buffers=train"), "test_torch_model.Dropper",
             "active dropout", "drop")
    cfg = user_cfg("test_torch_model.Dropper")  # eval mode: dropout is the identity
    validate(cfg)
    check_problems(expand(cfg))


def test_random_numbers_inside_forward_are_refused():
    _refused(user_cfg("test_torch_model.Noisy"), "test_torch_model.Noisy", "differed between two evaluations")


def test_outputs_not_in_the_dtype_of_theta_are_refused():
    # A float64 Hessian must be float64 throughout: a module that casts down would give float32-accurate
    # eigenvalues under a float64 label and a float64 tolerance, and integer outputs a silent zero Hessian.
    _refused(user_cfg("test_torch_model.Downcast"), "test_torch_model.Downcast", "float32", "float64")
    _refused(user_cfg("test_torch_model.Thresholded"), "test_torch_model.Thresholded", "int64")
    model = TorchModel("test_torch_model.Downcast")
    X = torch.randn(4, 16, dtype=torch.float64)
    with pytest.raises(ModelError, match="float32"):
        model.forward(model.init(0), X)
    # in float32 throughout (training in optim.dtype=float32) the same module is fine
    assert model.forward(model.init(0, torch.float32), X.float()).dtype == torch.float32
    # and wider outputs lose nothing: float64 from float32 parameters is not refused
    wide = TorchModel("test_torch_model.Upcast")
    assert wide.forward(wide.init(0, torch.float32), X.float()).dtype == torch.float64


def test_wrong_output_width_is_refused():
    _refused(user_cfg("usernets.nets.Tiny", "+model.kwargs={in_features: 16, out_features: 3}"),
             "usernets.nets.Tiny", "(8, 3)", "[8, 10]")


def test_keys_nothing_reads_are_refused_by_name():
    _refused(compose_config(["+model._target_=usernets.nets.Tiny"]), "model._target_", "model=torch")
    _refused(compose_config(["+model.hidden=32"]), "model.hidden", "nothing would read it")
    _refused(compose_config(["+hessian.param=head"]), "hessian.param")


def test_train_mode_buffers_with_batched_data_are_refused():
    _refused(user_cfg("usernets.nets.Tiny", "model.buffers=train", "optim=sgd",
                      "data.batch_size=8"), "model.buffers")


def test_train_mode_buffers_with_data_parallel_hvps_are_refused():
    # Data-parallel HVPs sum (n_s/n)·H_s over shards; with batch statistics each shard's loss normalises by
    # its own rows, so the weighted terms are not the full-batch loss whose value and gradient the row holds.
    resnet = ["+model.kwargs={in_channels: 1, width: 3, blocks: 1, n_classes: 10}", "model.buffers=train"]
    problem = run_problem(expand(user_cfg("usernets.nets.SmallResNet", *resnet))[0].config, 0)
    theta = problem.model.init(0)
    halves = sum(w * f(theta) for w, f in problem.batched_loss_terms(problem.data.n // 2))
    assert abs(float(halves - problem.loss_fn()(theta))) > 1e-6
    _refused(user_cfg("usernets.nets.SmallResNet", *resnet, "hessian.method=estimate", "hessian.data_workers=2"),
             "model.buffers", "hessian.data_workers")


def test_run_ids_of_builtin_models_do_not_see_the_new_keys():
    from pipeline.orchestration.plan import run_id

    cfg = expand(compose_config([]))[0].config.sections()
    old = {s: dict(v) for s, v in cfg.items()}
    for k in ("_target_", "kwargs", "buffers"):
        old["model"].pop(k)
    for k in ("_target_", "kwargs", "root", "download", "split"):
        old["data"].pop(k)
    old["hessian"].pop("params")
    assert run_id(cfg, 0) == run_id(old, 0)
    moved = {**cfg, "data": {**cfg["data"], "root": "/elsewhere"}}
    assert run_id(moved, 0) == run_id(cfg, 0)


def test_import_object_names_a_missing_dependency_inside_the_users_module(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg.py").write_text("import not_installed_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="not_installed_dep"):
        import_object("brokenpkg.Net")


def test_split_build_in_every_mode_equals_autograd_and_auto_is_probed_once(one_thread):
    """A module's loss is built tensor by tensor (its split into parameter tensors); rev, fwd, the flat
    build of the same function, several points at once and weighted terms all give autograd's Hessian,
    and auto's probe picks one of the modes, once per loss structure."""
    from pipeline.curvature import hessian_build as hs
    from pipeline.curvature.hvp import MODES, split_of
    cfg = compose_config([*CASES[0][0], "data.n_samples=24"])
    problem = run_problem(cfg, 1).to("cpu", torch.float64)
    f = problem.loss_fn()
    assert split_of(f)[0] == [size for _, _, size in problem.model.segments()]
    theta = problem.model.init(1) + 0.05 * torch.randn(problem.model.n_params, dtype=torch.float64)
    expected = torch.autograd.functional.hessian(f, theta)
    scale = float(expected.abs().max())
    flat = lambda t: f(t)  # noqa: E731 — the same loss without the split: the row-block build
    for mode in MODES:
        for loss in (f, flat):
            assert float((hs.hessian(loss, theta, hvp=mode, chunk_size=7) - expected).abs().max()) <= 1e-12 * scale
    terms = problem.batched_loss_terms(10)
    thetas = torch.stack([theta, 0.5 * theta])
    both = hs.hessians(terms, thetas, hvp="fwd", chunk_size=9)
    assert float((both[0] - expected).abs().max()) <= 1e-12 * scale
    assert float((both[1] - torch.autograd.functional.hessian(f, thetas[1])).abs().max()) <= 1e-12 * scale
    hs.AUTO_PICKS.clear()
    assert float((hs.hessian(f, theta, chunk_size=5) - expected).abs().max()) <= 1e-12 * scale
    (key, (mode, seconds)), = hs.AUTO_PICKS.items()
    assert mode in MODES and set(seconds) == set(MODES) and mode == min(seconds, key=seconds.get)
    hs.AUTO_PICKS[key] = ("fwd" if mode == "rev" else "rev", seconds)  # a cached pick is used, not re-probed
    assert hs.resolve_hvp("auto", theta.device, f, theta, 5) != mode and len(hs.AUTO_PICKS) == 1
    assert hs.resolve_hvp("auto", theta.device, f, theta, problem.model.n_params) == hs.DEFAULT_HVP["cpu"]
    hs.AUTO_PICKS.clear()


def test_the_points_record_how_each_hessian_was_built(one_thread):
    """SpectrumResult.hvp, the points table's `hvp`: closed_form for the MLP, auto's pick for a module."""
    from pipeline.curvature.hessian import spectrum_at
    from pipeline.curvature.hvp import MODES
    from pipeline.orchestration.rows import spectrum_columns
    problem = run_problem(compose_config([*CASES[2][0], "data.n_samples=24"]), 0)
    theta = problem.model.init(0)
    assert spectrum_columns(spectrum_at(problem.loss_fn(), theta, hvp="fwd"))["hvp"] == "fwd"
    assert spectrum_at(problem.loss_fn(), theta, chunk_size=4).hvp in MODES  # probed: 172 columns, 43 blocks
    mlp = run_problem(compose_config(["data.n_samples=24"]), 0)
    assert spectrum_at(mlp.loss_fn(), mlp.model.init(0)).hvp == "closed_form"
    assert spectrum_at(mlp.loss_fn(), mlp.model.init(0), method="estimate", rel_tol=1e-2,
                       estimate={"n_probes": 4}).hvp is None  # no H built: no mode


def test_auto_measures_the_build_workspace_once_per_hessian(one_thread, monkeypatch):
    """With ``hvp=auto`` and the default chunk, the probe's chunk (a forward pass with saved-tensor hooks,
    :func:`column_bytes`) is handed on to the build rather than measured again, and a pass of many points
    hands it on to the next pass."""
    from pipeline.curvature import hessian_build as hs
    from pipeline.curvature.hessian import points_per_pass, spectra_at_many, spectrum_at
    from pipeline.curvature.hvp import MODES
    problem = run_problem(compose_config([*CASES[2][0], "data.n_samples=24"]), 0)
    theta = problem.model.init(0)
    measured = []
    real = hs.column_bytes  # the build's own measurements (the batched gradients measure theirs apart)
    monkeypatch.setattr(hs, "column_bytes", lambda *a, **k: measured.append(1) or real(*a, **k))
    hs.AUTO_PICKS.clear()
    # a 64 KiB workspace: a few columns per block, so auto probes (≥ 16 blocks of 172 columns)
    result = spectrum_at(problem.loss_fn(), theta, memory_budget_mb=1 / 16)
    assert result.hvp in MODES and len(hs.AUTO_PICKS) == 1 and len(measured) == 1
    measured.clear()
    hs.AUTO_PICKS.clear()
    loss = problem.loss_fn()
    thetas = torch.stack([theta, 0.9 * theta, 1.1 * theta])
    # counts by LDLᵀ in 1 MiB: passes of 2 points and 1 (points_per_pass), each built in one vmapped call or
    # point after point
    assert points_per_pass(172, 8, torch.device("cpu"), 1, "inertia", False) == 2
    for batch_points in (True, False):
        many, fallback = spectra_at_many(lambda device, dtype: loss, thetas, method="inertia", memory_budget_mb=1,
                                         batch_points=batch_points)
        assert fallback is None and len(many) == 3 and all(r.hvp in MODES for r in many)
        assert len(hs.AUTO_PICKS) == 1 and len(measured) == 1, (batch_points, len(measured))
        measured.clear()
        hs.AUTO_PICKS.clear()
