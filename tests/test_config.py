"""Config stage: every group composes; bad values stop the program before any run, naming the field."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Optional

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import compose_config
from pipeline.orchestration.config import Config, ConfigError, new_sweep_refusals, seeds_of, validate
from pipeline.orchestration.plan import expand, run_id

GROUP_OPTIONS = [
    ("data", "synthetic"), ("data", "digits"), ("data", "gaussian"), ("model", "mlp"), ("model", "cnn"),
    ("model", "wide_mlp"), ("optim", "gd"),
    ("optim", "sgd"), ("optim", "adam"), ("stall", "default"), ("hessian", "exact"), ("sweep", "default"),
    ("ray", "local"), ("ray", "cluster"), ("refine", "none"), ("refine", "newton_mr"), ("refine", "gnm"),
    ("refine", "newton_eig"),
]


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_group_option_composes_and_validates(group, option):
    extra = ["data.batch_size=16"] if (group, option) == ("optim", "sgd") else []
    cfg = compose_config([f"{group}={option}", *extra], shrink=False)
    validate(cfg)
    assert cfg[group] is not None


BAD = [
    ("optim.lr=-0.1", "optim.lr"),
    ("model.width=0", "model.width"),
    ("model.activation=sigmoidal", "model.activation"),
    ("data.name=imagenet", "data.name"),
    ("sweep.seeds=0", "sweep.seeds"),
    ("data.n_samples=5000", "data.n_samples"),  # digits has 1,797
    ("sweep.seeds=[1,1]", "sweep.seeds"),
    ("stall.threshold=0", "stall.threshold"),
    ("hessian.method=magic", "hessian.method"),
    ("hessian.num_gpus=-1", "hessian.num_gpus"),
    ("refine.method=newton", "refine.method"),
    ("hessian.method=estimate hessian.tol_mode=gap", "hessian.tol_mode"),
    ("hessian.estimate_probes=1", "hessian.estimate_probes"),
    ("refine=newton_mr refine.forcing=1.5", "refine.forcing"),
    ("stall.curvature_every=-1", "stall.curvature_every"),
    ("data=synthetic model.loss=cross_entropy", "model.loss"),  # synthetic data is regression
    ("+sweep.grid={model.widht:[4,8]}", "model.widht"),
    ("+sweep.grid={model.width:[4,0]}", "model.width"),
    ("+sweep.grid={model.width:[4,8.5]}", "model.width=8.5"),  # typed like the config, not truncated to 8
    ("+sweep.grid={model.width:[4,abc]}", "model.width='abc'"),
    # each key's values are valid, one combination is not: a CNN needs image data
    ("+sweep.grid={model.name:[mlp,cnn],data.name:[digits,synthetic]}", "'model.name': 'cnn', 'data.name': 'synth"),
    ("+sweep.grid={hessian.estimate_probes:[4,8]}", "hessian.estimate_probes"),  # not in the run id
    ("refine=newton_mr refine.num_gpus=1.5", "refine.num_gpus"),
    ("sweep.name=..", "sweep.name"),
    ("sweep.name=.", "sweep.name"),
    ("ray.num_cpus=-1", "ray.num_cpus"),
    ("ray.train_num_gpus=-0.25", "ray.train_num_gpus"),
    ("ray.train_num_gpus=1.5", "ray.train_num_gpus"),  # a fraction of one GPU, or whole GPUs
    ("+sweep.grid={optim.lr:[0.1,inf]}", "optim.lr=inf"),  # a grid point's float is checked like the config's
    ("plot.hue=model.widht", "plot.hue"),
    ("plot.hue=model", "plot.hue"),  # a section, not a setting
    ("plot.hue=hessian.params", "plot.hue"),  # free-form: no runs column to colour by (the figure is drawn last)
    ("+model.kwargs.hidden=32", "model.kwargs"),  # a built-in MLP reads no kwargs: not silently dropped
    ("+data.kwargs.n=100", "data.kwargs"),
]


@pytest.mark.parametrize("key", ["hessian.num_gpus", "hessian.num_cpus", "refine.num_gpus", "refine.num_cpus",
                                 "ray.train_num_gpus", "ray.train_num_cpus"])
def test_resource_shares_with_more_decimals_than_ray_keeps_are_refused(key):
    """Ray refuses a task asking for 0.33333 GPUs when the task is submitted (mid-sweep): refused here,
    naming the key and Ray's precision; 4 decimal places pass."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + r"=0\.33333.*4 decimal places"):
        validate(compose_config([f"{key}=0.33333"], shrink=False))
    validate(compose_config([f"{key}=0.3333"], shrink=False))


def test_a_gap_tolerance_with_inertia_is_accepted():
    """inertia finds the gap from zero counts (one rule across sizes); only the estimator cannot."""
    validate(compose_config(["hessian.method=inertia", "hessian.tol_mode=gap", "plot.hue=model.width"],
                            shrink=False))


def test_plot_hue_accepts_every_setting_the_runs_table_has_a_column_for():
    validate(compose_config(["plot.hue=model._target_"], shrink=False))  # the column model_target
    validate(compose_config(["plot.hue=data.seed"], shrink=False))  # null allowed


@pytest.mark.parametrize("override,field", BAD)
def test_bad_values_are_rejected_with_the_field_named(override, field):
    cfg = compose_config(override.split(" "), shrink=False)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(cfg)


def _schema_float_fields() -> list[str]:
    """``section.key`` of every float field of the typed schema, read from the dataclasses themselves."""
    return [f"{section}.{name}" for section, schema in typing.get_type_hints(Config).items()
            if dataclasses.is_dataclass(schema)
            for name, kind in typing.get_type_hints(schema).items() if kind in (float, Optional[float])]


FLOAT_FIELDS = _schema_float_fields()


def test_the_schema_has_the_float_fields_the_finite_check_covers():
    assert {"optim.lr", "data.noise", "stall.cosine_tol", "hessian.rel_tol", "refine.rcond",
            "ray.state_every_s"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_every_float_setting_refuses_inf_and_nan_naming_the_key(key, value):
    cfg = compose_config([f"{key}={value}"], shrink=False)
    assert repr(OmegaConf.select(cfg, key)) == value  # Hydra read the override as that float
    with pytest.raises(ConfigError, match=re.escape(f"{key}={value} is not allowed: expected a finite number")):
        validate(cfg)


def test_unknown_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["model.depht=2"], shrink=False)
    assert "depht" in str(info.value.__cause__ or info.value)


@pytest.mark.parametrize("deleted", ["figures", "plot", "results_root"])
def test_a_key_deleted_with_tilde_is_refused_naming_it(deleted):
    """Hydra's ``~key`` removes these top-level keys from the typed config (nested ones it refuses itself);
    every key is read, so the deletion is refused by name before anything runs, not met as an attribute
    error later (for ``figures``: after the whole sweep)."""
    cfg = compose_config([f"~{deleted}"], shrink=False)
    assert deleted not in cfg
    with pytest.raises(ConfigError, match=rf"^{deleted}: deleted with '~'"):
        validate(cfg)


def test_wrong_type_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as info:
        compose_config(["model.width=wide"], shrink=False)
    assert "width" in str(info.value) + str(info.value.__cause__)


def test_seeds_count_or_list():
    assert seeds_of(3) == [0, 1, 2]
    assert seeds_of([7, 3]) == [7, 3]
    with pytest.raises(ConfigError, match="sweep.seeds"):
        seeds_of(-2)


def test_plan_expands_seeds_times_grid_with_stable_ids():
    cfg = compose_config(["sweep.seeds=[0,1]", "+sweep.grid={model.width:[3,5],optim.lr:[0.1,0.2]}"], shrink=False)
    validate(cfg)
    runs = expand(cfg)
    assert len(runs) == 8
    assert len({r.run_id for r in runs}) == 8
    again = expand(compose_config(["sweep.seeds=[0,1]", "+sweep.grid={model.width:[3,5],optim.lr:[0.1,0.2]}"],
                                  shrink=False))
    assert [r.run_id for r in runs] == [r.run_id for r in again]
    widths = sorted({r.config.model.width for r in runs})
    assert widths == [3, 5]
    # Resources and the sweep's name do not change what a run computes, hence not its id.
    moved = expand(compose_config(["sweep.seeds=[0,1]", "sweep.name=other", "hessian.num_gpus=0.5",
                                   "+sweep.grid={model.width:[3,5],optim.lr:[0.1,0.2]}"], shrink=False))
    assert [r.run_id for r in moved] == [r.run_id for r in runs]


def test_grid_values_reach_the_settings_that_interpolate_them():
    """``model.width: ${data.n_features}`` follows a grid over data.n_features: the grid point is set before
    interpolations are resolved, as a Hydra override would be."""
    cfg = compose_config(["data=synthetic", "sweep.seeds=1", "+sweep.grid={data.n_features:[4,9]}",
                          "model.width=${data.n_features}"],
                         shrink=False)
    validate(cfg)
    assert [(r.config.data.n_features, r.config.model.width) for r in expand(cfg)] == [(4, 4), (9, 9)]


def test_grid_run_ids_are_pinned():
    """A run's id names its rows: if it changed, a resumed sweep would compute its runs again under new ids.
    These are the ids of the commit before grid points were type-checked (0 and 1 on float fields)."""
    cfg = compose_config(["sweep.seeds=1", "+sweep.grid={optim.weight_decay:[0,1e-4],optim.lr:[1,0.5]}"],
                         shrink=False)
    assert [r.run_id for r in expand(cfg)] == ["0720aabab50a", "2452c0d8c63c", "019829e3c569", "40f85ce30035"]
    assert expand(compose_config(["sweep.seeds=1"], shrink=False))[0].run_id == "90d7926add0e"  # no grid
    # two spellings of one learning rate are one run; 0/1 on a bool field become the bool
    same = compose_config(["sweep.seeds=1", "+sweep.grid={optim.lr:[1,1.0],model.bias:[1,0]}"], shrink=False)
    validate(same)
    runs = expand(same)
    assert [r.config.model.bias for r in runs] == [True, False]


def test_run_id_is_a_pure_function_of_config_and_seed():
    cfg = compose_config([], shrink=False)
    run = expand(cfg)[0]
    assert run_id(run.config.sections(), run.seed) == run.run_id
    assert run_id(run.config.sections(), run.seed + 1) != run.run_id


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_cli_bad_value_exits_before_any_run(tmp_path):
    res = _cli("optim.lr=-1", f"results_root={tmp_path}/r", cwd=tmp_path)
    assert res.returncode == 2
    assert "optim.lr=-1" in res.stderr and "> 0" in res.stderr
    assert not (tmp_path / "r" / "default" / "runs").exists()


def test_a_primary_config_of_ones_own_without_the_schema_is_refused_saying_what_to_add(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    (tmp_path / "mine.yaml").write_text("sweep:\n  name: mine\nmodel:\n  width: 4\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        cfg = compose("mine")
    with pytest.raises(ConfigError, match=r"lacks keys of minratio's schema \(data, model\.name, .* more\): put base_config "
                                          r"first in its defaults list"):
        validate(cfg)


def test_cli_tilde_deletion_exits_before_any_run(tmp_path):
    res = _cli("~figures", f"results_root={tmp_path}/r", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "figures: deleted with '~'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r").exists()
    res = _cli("~results_root", cwd=tmp_path)  # read by the CLI itself, before the sweep's checks
    assert res.returncode == 2 and "results_root: deleted with '~'" in res.stderr and "Traceback" not in res.stderr


def test_a_relative_results_root_stays_where_the_command_ran_under_hydra_job_chdir(tmp_path):
    """With hydra.job.chdir=true the job runs in outputs/<name>/<time>/; the sweep must still be found under
    ./results, or every command would start a fresh sweep there. The recorded experiment refuses this command
    (before the unreachable Ray address is tried) only if its folder is the one found."""
    from pipeline.orchestration import identity
    from pipeline.orchestration.storage import Store

    store = Store.open(str(tmp_path / "results"))
    identity.save(store, "x", identity.of_config(compose_config(["sweep.name=x"])))
    res = _cli("hydra.job.chdir=true", "sweep.name=x", "model.width=4", "results_root=results", "ray=cluster",
               "ray.address=127.0.0.1:9", cwd=tmp_path)
    assert res.returncode == 2
    assert "sweep.name='x' already holds runs of another config" in res.stderr, res.stderr


def test_a_relative_data_root_is_read_from_where_the_command_ran_under_hydra_job_chdir(tmp_path):
    """data=mnist data.root=mydata under hydra.job.chdir=true looked for (or downloaded) the set under
    outputs/<name>/<time>/mydata, a new folder each command; it is the command's ./mydata, refused before Ray."""
    res = _cli("hydra.job.chdir=true", "data=mnist", "data.root=mydata", "sweep.name=x", "ray=cluster",
               "ray.address=127.0.0.1:9", cwd=tmp_path)
    assert res.returncode == 2
    assert f"folder {tmp_path / 'mydata' / 'MNIST' / 'raw'} does not exist" in res.stderr, res.stderr


def test_cli_cfg_job_and_help_work_as_hydra_users_expect(tmp_path):
    res = _cli("--cfg", "job", "model.width=11", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "width: 11" in res.stdout
    res = _cli("--help", cwd=tmp_path)
    assert res.returncode == 0 and "minratio-sweep" in res.stdout and "synthetic" in res.stdout


def test_a_run_carries_one_typed_config_that_pickles():
    """plan.expand builds one RunConfig per run, the form every task reads: typed values (a grid's 1 on a
    float field is 1.0 there, while the id keeps hashing the grid's spelling), the hessian section split
    into counting settings and the task's resources, and a round trip through the runs table's record."""
    import pickle

    from pipeline.orchestration.config import HessianConfig, HessianCounting, HessianResources, RunConfig

    (run,) = expand(compose_config(["sweep.seeds=1", "hessian.num_gpus=0.25", "+sweep.grid={optim.lr:[1]}"],
                                   shrink=False))
    c = run.config
    assert isinstance(c, RunConfig) and type(c.optim.lr) is float and c.optim.lr == 1.0
    assert c.hessian_task.num_gpus == 0.25 and not hasattr(c.hessian, "num_gpus") and c.hessian.rel_tol == 1e-6
    counting, task = ({f.name for f in dataclasses.fields(k)} for k in (HessianCounting, HessianResources))
    assert not counting & task and counting | task == {f.name for f in dataclasses.fields(HessianConfig)}
    assert pickle.loads(pickle.dumps(run)) == run
    assert RunConfig.from_sections(c.sections()) == c
    assert run_id({**c.sections(), "optim": {**c.sections()["optim"], "lr": 1}}, run.seed) == run.run_id


def test_a_key_the_model_or_data_does_not_read_is_refused_where_the_command_sets_it():
    """``model.width=16`` with model=torch, or a grid over it, would change the run ids and nothing else."""
    torch_model = ["model=torch", "model._target_=usernets.nets.SmallResNet"]
    cfg = compose_config(torch_model)
    assert new_sweep_refusals(cfg, ["model.width"]) == [
        "model.width: model.name=torch does not read it (it reads model.{name, loss, _target_, kwargs, buffers}); "
        "a user's module takes its arguments under model.kwargs"]
    # read by their kinds, where the data sit, read through an interpolation: nothing to refuse
    assert new_sweep_refusals(cfg, ["model.kwargs.width", "model.loss", "optim.lr", "data.side", "data.root",
                                    "data.download"]) == []
    assert new_sweep_refusals(compose_config(torch_model + ["+model.kwargs={w: '${model.width}'}"]),
                              ["model.width"]) == []
    both = new_sweep_refusals(cfg, ["model.width", "data.n_features", "data.seed"])
    assert both[0].startswith("model.width: model.name=torch does not read it")
    assert both[1] == ("data.n_features, data.seed: data.name=digits does not read them (it reads data.{name, "
                       "n_samples, batch_size, standardize, side})")  # no hint about kwargs for a built-in kind
    grid = compose_config(torch_model + ["+sweep.grid={model.width:[4,16]}"])
    validate(grid)
    assert new_sweep_refusals(grid)[0].startswith("model.width: model.name=torch")
    assert new_sweep_refusals(compose_config(["+sweep.grid={model.name:[mlp,cnn],model.kernel:[1,3]}"])) == []
    assert new_sweep_refusals(compose_config(["data.batch_size=16"])) == [
        "data.batch_size=16 with optim.name=gd: gd is full-batch gradient descent; mini-batches are optim=sgd"]
    assert new_sweep_refusals(compose_config(["data.batch_size=16", "optim=sgd"])) == []


def test_a_sweep_of_an_earlier_version_that_set_an_unread_key_still_resumes(make_cfg, ray_session):
    """Its run ids hold the key, so dropping it would train every run again under new ids: the same command
    resumes (with a warning); a new sweep with it is refused before any work."""
    from pipeline.orchestration.sweep import run_sweep

    old = make_cfg(["sweep.name=old", "sweep.seeds=1", "optim.max_steps=300", "figures=false", "data.seed=3"])
    run_sweep(old)  # as an earlier version ran it: nothing said what the command line set
    again = run_sweep(old, ["data.seed"])
    assert again.runs_skipped == 1
    with pytest.raises(ConfigError, match=r"data\.seed: data\.name=digits does not read it"):
        run_sweep(make_cfg(["sweep.name=new", "sweep.seeds=1", "figures=false", "data.seed=3"]), ["data.seed"])
    assert not (Path(old.results_root) / "new").exists()


def test_cli_refuses_a_key_its_model_does_not_read_before_any_run(tmp_path):
    res = _cli("model=torch", "model._target_=usernets.nets.SmallResNet", "model.width=16",
               f"results_root={tmp_path}/r", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "model.width: model.name=torch does not read it" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r").exists()


def test_hydra_logging_options_replace_minratios_own(tmp_path):
    """minratio's logging is an option of hydra/job_logging, so Hydra's own options replace it whole (a
    config merged onto theirs made `disabled` fail to configure its handlers)."""
    for option in ("disabled", "none"):
        res = _cli(f"hydra/job_logging={option}", "optim.lr=-1", f"results_root={tmp_path}/r", cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (option, res.stderr[-2000:])
    res = _cli("optim.lr=-1", f"results_root={tmp_path}/r", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("minratio: configuration error: optim.lr=-1"), res.stderr
    log = next((tmp_path / "outputs" / "default").glob("*/cli.log")).read_text()
    assert "][minratio][ERROR] - minratio: configuration error: optim.lr=-1" in log


def test_a_grid_may_vary_a_constructor_argument_the_base_config_does_not_give():
    cfg = compose_config(["model=torch", "model._target_=usernets.nets.SmallResNet",
                          "+sweep.grid={model.kwargs.width:[4,16]}"])
    validate(cfg)
    runs = expand(cfg)
    assert [r.config.model.kwargs for r in runs[::3]] == [{"width": 4}, {"width": 16}]
    assert len({r.run_id for r in runs}) == len(runs) == 6
    with pytest.raises(ConfigError, match=r"sweep\.grid='model\.width2' is not allowed: expected a key that exists"):
        validate(compose_config(["+sweep.grid={model.width2:[4,16]}"]))
