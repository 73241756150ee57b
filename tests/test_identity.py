"""One sweep name, one experiment: a sweep folder records the config that defines its runs, and a command
whose config differs is refused before any work unless it says sweep.extend=true."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline.orchestration import identity
from pipeline.orchestration.config import ConfigError
from pipeline.orchestration.storage import Store

TINY = ["sweep.seeds=1", "optim.max_steps=300", "figures=false"]


def test_identity_ignores_seeds_resources_and_grid_values(make_cfg):
    base = identity.of_config(make_cfg(TINY))
    same = identity.of_config(make_cfg(TINY + ["sweep.seeds=5", "hessian.num_gpus=0.5", "ray.num_cpus=1",
                                               "sweep.progress=none", "hessian.batch_checkpoints=2"]))
    assert identity.differences(base, same) == {}
    grid = identity.of_config(make_cfg(TINY + ["+sweep.grid={model.width:[4,16]}"]))
    assert grid.varied == ("model.width",) and identity.differences(base, grid) == {}
    assert identity.differences(base, identity.of_config(make_cfg(TINY + ["optim.lr=0.5"]))) == {}  # 0.5 is the default
    other = identity.of_config(make_cfg(TINY + ["optim.lr=0.25", "refine=newton_mr"]))
    assert set(identity.differences(base, other)) == {"optim.lr", "refine.method"}


def test_where_the_data_sit_and_keys_the_model_does_not_read_define_no_experiment(make_cfg):
    """A sweep started with data.download=true resumes without it (the set is there now), and on a machine
    whose data.root differs; an MLP sweep does not care about the CNN's keys. What a run reads still counts."""
    def recorded(name: str, *overrides: str):
        cfg = make_cfg(TINY + [f"sweep.name={name}", *overrides])
        store = Store.open(cfg.results_root)
        identity.save(store, name, identity.check(store, name, cfg))
        return store

    store = recorded("exp", "data.download=true", "data.root=/mnt/a")
    identity.check(store, "exp", make_cfg(TINY + ["sweep.name=exp", "data.root=/b", "model.conv_layers=3"]))
    with pytest.raises(ConfigError, match=r"model\.width=4 here, 8 there"):
        identity.check(store, "exp", make_cfg(TINY + ["sweep.name=exp", "model.width=4"]))
    store = recorded("cnn", "model=cnn")
    identity.check(store, "cnn", make_cfg(TINY + ["sweep.name=cnn", "model=cnn", "data.download=true"]))
    with pytest.raises(ConfigError, match=r"model\.kernel=1 here, 3 there"):
        identity.check(store, "cnn", make_cfg(TINY + ["sweep.name=cnn", "model=cnn", "model.kernel=1"]))
    store = recorded("both", "+sweep.grid={model.name:[mlp,cnn]}")  # a grid's CNN points read them
    with pytest.raises(ConfigError, match=r"model\.kernel=1 here, 3 there"):
        identity.check(store, "both", make_cfg(TINY + ["sweep.name=both", "+sweep.grid={model.name:[mlp,cnn]}",
                                                       "model.kernel=1"]))


def test_a_users_arguments_are_one_setting_and_unread_data_keys_none(make_cfg):
    """model.kwargs / data.kwargs: an argument added, removed, renamed or changed is a difference (one key
    per argument let {} and {hidden: 8} pass); a grid varying one argument varies only that one; data keys
    the kind of data does not read define nothing, as unread model keys do."""
    user = TINY + ["model=torch", "model._target_=usernets.nets.SmallResNet", "data=torch",
                   "data._target_=usernets.data.blobs"]
    store = Store.open(make_cfg()["results_root"])

    def record(name: str, *overrides: str) -> None:
        cfg = make_cfg(user + [f"sweep.name={name}", *overrides])
        identity.save(store, name, identity.check(store, name, cfg))

    def refused(name: str, *overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            identity.check(store, name, make_cfg(user + [f"sweep.name={name}", *overrides]))
        return str(err.value)

    record("m")
    assert "model.kwargs={'hidden': 16} here, {} there" in refused("m", "+model.kwargs={hidden: 16}")
    assert "sweep.name=m-hidden-16" in refused("m", "+model.kwargs={hidden: 16}")
    record("h", "+model.kwargs={hidden: 8}")
    identity.check(store, "h", make_cfg(user + ["sweep.name=h", "+model.kwargs={hidden: 8}"]))
    assert "{'depth': 3} here, {'hidden': 8} there" in refused("h", "+model.kwargs={depth: 3}")
    assert "{'hidden': 16} here, {'hidden': 8} there" in refused("h", "+model.kwargs={hidden: 16}")
    record("d")
    assert "sweep.name=d-method-newton_eig" in refused("d", "refine=newton_eig")  # not d-max_iters-200
    assert "data.kwargs={'n': 32} here, {} there" in refused("d", "+data.kwargs={n: 32}")
    assert "data.n_classes=3 here, 0 there" in refused("d", "data.n_classes=3")

    grid = ["+model.kwargs={hidden: 8, depth: 1}", "+sweep.grid={model.kwargs.hidden:[4,16]}"]
    record("g", *grid)
    identity.check(store, "g", make_cfg(user + ["sweep.name=g", "+model.kwargs={hidden: 2, depth: 1}",
                                                "+sweep.grid={model.kwargs.hidden:[4,16]}"]))
    assert "{'depth': 2} here, {'depth': 1} there" in refused("g", "+model.kwargs={hidden: 8, depth: 2}", grid[1])

    # A grid over an argument: a point of it, or the grid added to a sweep without one, is no difference (as
    # for a scalar key); the arguments beside it still are.
    record("gk", "+data.kwargs={n: 32, seed: 1}", "+sweep.grid={data.kwargs.n:[32,64]}")
    identity.check(store, "gk", make_cfg(user + ["sweep.name=gk", "+data.kwargs={n: 64, seed: 1}"]))
    assert "data.kwargs={'seed': 2} here, {'seed': 1} there" in refused("gk", "+data.kwargs={n: 64, seed: 2}")
    record("ng", "+data.kwargs={n: 32, seed: 1}")
    identity.check(store, "ng", make_cfg(user + ["sweep.name=ng", "+data.kwargs={n: 32, seed: 1}",
                                                 "+sweep.grid={data.kwargs.n:[32,64]}"]))

    # A record of format 1 (before 2026-12-07) held data.kwargs one key per argument and no model.kwargs: its
    # own command still resumes, and a changed data.kwargs is still refused.
    def format_1(name: str, fixed: dict, varied=()) -> None:
        store.write_bytes(f"{name}/{identity.RECORD}", json.dumps({"fixed": fixed, "varied": list(varied)}).encode())

    now = identity.of_config(make_cfg(user + ["sweep.name=o", "+data.kwargs={n: 32}", "+model.kwargs={hidden: 8}"]))
    old = {k: v for k, v in now.fixed.items() if k not in ("data.kwargs", "model.kwargs")}
    format_1("o", {**old, "data.kwargs.n": "32"})
    identity.check(store, "o", make_cfg(user + ["sweep.name=o", "+data.kwargs={n: 32}", "+model.kwargs={hidden: 8}"]))
    assert "data.kwargs={'n': 64} here, {'n': 32} there" in refused("o", "+data.kwargs={n: 64}")
    format_1("e", old)  # data.kwargs {} left no key
    assert "data.kwargs={'n': 32} here, {} there" in refused("e", "+data.kwargs={n: 32}")
    assert "format" not in json.loads(store.read_bytes("o/sweep.json"))  # check() only reads

    # The data keys a kind of data does not read define nothing; those it reads do.
    record("t")
    identity.check(store, "t", make_cfg(user + ["sweep.name=t", "data.n_features=10", "data.side=8"]))
    synthetic = TINY + ["data=synthetic", "sweep.name=s"]
    identity.save(store, "s", identity.check(store, "s", make_cfg(synthetic)))
    identity.check(store, "s", make_cfg(synthetic + ["data.side=2", "data.n_classes=4"]))
    with pytest.raises(ConfigError, match=r"data\.n_features=10 here, 4 there"):
        identity.check(store, "s", make_cfg(synthetic + ["data.n_features=10"]))


def test_extend_is_refused_where_the_command_would_add_nothing(make_cfg):
    """Settings outside the run id (the estimator's probes, the finder's tolerance) leave this command's runs
    those the folder holds, so sweep.extend=true would record them as varied and compute nothing new."""
    from pipeline.orchestration import tables
    from pipeline.orchestration.plan import expand

    cfg = make_cfg(TINY + ["sweep.name=exp", "refine=newton_eig"])
    store = Store.open(cfg.results_root)
    identity.save(store, "exp", identity.check(store, "exp", cfg))
    tables.write(store, "exp", "runs", [{"run_id": run.run_id, "status": "ok"} for run in expand(cfg)])

    def check(*extra):
        command = make_cfg(TINY + ["sweep.name=exp", "refine=newton_eig", "sweep.extend=true", *extra])
        return identity.check(store, "exp", command, [run.run_id for run in expand(command)])

    for inert in (["hessian.estimate_probes=60"], ["refine.gtol2=1e-12"], ["refine=newton_mr"]):
        with pytest.raises(ConfigError, match=r"sweep.extend=true would add nothing to sweep.name='exp': the "
                                              r"settings that differ \(.* here, .* there\) do not enter a run's id"):
            check(*inert)
    check("model.width=4", "refine.gtol2=1e-12")  # new runs: another width
    check("sweep.seeds=2", "hessian.estimate_probes=60")  # new runs: another seed, though seeds define nothing
    unrefined = make_cfg(TINY + ["sweep.name=plain"])
    identity.save(store, "plain", identity.check(store, "plain", unrefined))
    identity.check(store, "plain", make_cfg(TINY + ["sweep.name=plain", "refine=newton_eig", "sweep.extend=true"]))


def test_a_changed_config_is_refused_before_any_work_and_accepted_with_extend(make_cfg, ray_session):
    from pipeline.orchestration.sweep import run_sweep

    cfg = make_cfg(TINY + ["sweep.name=exp"])
    run_sweep(cfg)
    store, folder = Store.open(cfg.results_root), Path(cfg.results_root) / "exp"
    recorded = json.loads((folder / "sweep.json").read_text())
    assert recorded["fixed"]["model.width"] == "8" and recorded["varied"] == []
    runs_files = sorted((folder / "runs").iterdir())

    wider = make_cfg(TINY + ["sweep.name=exp", "model.width=4", "optim.lr=0.25"])
    with pytest.raises(ConfigError) as err:
        run_sweep(wider)
    msg = str(err.value)
    assert "sweep.name='exp' already holds runs of another config (2 setting(s) differ" in msg
    assert "model.width=4 here, 8 there" in msg and "optim.lr=0.25 here, 0.5 there" in msg
    assert "e.g. sweep.name=exp-width-4," in msg and "sweep.extend=true" in msg
    assert sorted((folder / "runs").iterdir()) == runs_files  # nothing ran, nothing was written
    assert identity.read(store, "exp").varied == ()

    summary = run_sweep(make_cfg(TINY + ["sweep.name=exp", "model.width=4", "optim.lr=0.25", "sweep.extend=true"]))
    assert summary.runs_total == 1 and summary.runs_skipped == 0
    assert sorted(pd.read_parquet(folder / "runs")["model_width"]) == [4, 8]
    assert identity.read(store, "exp").varied == ("model.width", "optim.lr")
    # Both experiments now belong to the sweep: each resumes without extend, a third one is still refused.
    assert run_sweep(make_cfg(TINY + ["sweep.name=exp"])).runs_skipped == 1
    with pytest.raises(ConfigError, match=r"model\.depth=2 here, 1 there"):
        run_sweep(make_cfg(TINY + ["sweep.name=exp", "model.depth=2"]))


@pytest.mark.slow
def test_multirun_jobs_get_a_sweep_each_and_the_log_file_holds_the_summary(multirun):
    # Every override but seeds and resources names the sweep: optim.max_steps too.
    assert sorted(p.name for p in (multirun.cwd / "results").iterdir()) == sorted(p.name for p in multirun.jobs.values())
    for job, tol in enumerate(("1e-6", "1e-2")):  # Hydra runs the jobs in the order typed
        folder = multirun.jobs[tol]
        runs, points = pd.read_parquet(folder / "runs"), pd.read_parquet(folder / "points")
        assert len(runs) == 1 and set(runs["status"]) == {"ok"} and list(runs["hessian_rel_tol"]) == [float(tol)]
        assert len(points) > 0
        record = OmegaConf.load(multirun.cwd / "multirun" / str(job) / ".hydra" / "config.yaml")
        assert record.sweep.name == folder.name  # Hydra's record of the job reproduces it
        (log_file,) = (multirun.cwd / "multirun" / str(job)).glob("*.log")
        logged = log_file.read_text()
        assert f"sweep '{folder.name}': 1 run in this command" in logged
        assert "min ratio min/median/max" in logged and "all runs" in logged and "tables: " in logged
    assert "Token authentication is enabled" not in multirun.stdout + multirun.stderr


def test_multirun_names_leave_out_every_key_that_defines_no_experiment():
    # A job's sweep name carries its overrides (override_dirname); a key that the experiment's identity leaves
    # out (resources, where the data sit, the Ray connection) must not split one experiment into several sweeps.
    import dataclasses

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.orchestration.config import RayConfig, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("pipeline.conf", version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    not_identity = identity.RESOURCE_KEYS | identity.WHERE_KEYS | {f"ray.{f.name}" for f in dataclasses.fields(RayConfig)}
    assert not_identity - excluded == set()
