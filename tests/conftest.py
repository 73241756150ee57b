"""Shared fixtures: one real local Ray for the whole session, and the real Hydra config, composed and shrunk."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from pipeline.orchestration.config import register_configs

# Small enough for 2 cores: a few seeds, short training; everything else is the real default config.
SHRINK = ["sweep.seeds=3", "optim.max_steps=1200", "stall.window=300", "sweep.progress=plain"]
# The sweep that the fault and signal tests stop mid-way: runs of about a second each, four of them two at a
# time, so a driver stopped after its first finished runs still has others training.
MID_SWEEP = ["sweep.name=mid", "sweep.seeds=4", "optim.max_steps=4000", "stall.window=500",
             "hessian.batch_checkpoints=2", "figures=false"]


def compose_config(overrides: list[str] | None = None, shrink: bool = True):
    """The real ``conf/config.yaml`` composed by Hydra with ``overrides`` (after the test shrink)."""
    register_configs()
    GlobalHydra.instance().clear()
    overrides = (SHRINK if shrink else []) + list(overrides or [])
    if importlib.util.find_spec("pipeline.conf") is None:  # a source tree on PYTHONPATH, not installed
        with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            return compose("config", overrides=overrides)
    with initialize_config_module("pipeline.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def peak_rss_growth_mib(setup: str, measured: str, env: dict | None = None) -> float:
    """Run the Python source ``setup``, then ``measured``, in a fresh one-thread interpreter (with ``torch``
    imported); return how much its peak resident set grew during ``measured``, in MiB."""
    import subprocess
    import sys

    peak = "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"
    code = (f"import resource, torch\ntorch.set_num_threads(1)\n{setup}\nbase = {peak}\n{measured}\n"
            f"print(({peak} - base) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=None if env is None else {**os.environ, **env})
    return float(out.stdout.strip().splitlines()[-1])


def two_stalls(make_cfg, sweep: str):
    """One run of the default net trained in this process (no Ray) until it has stalled twice: its store
    and its two checkpoints, one group of the Hessian stage."""
    from pipeline.orchestration import jobs
    from pipeline.orchestration.plan import expand
    from pipeline.orchestration.storage import Store

    cfg = make_cfg([f"sweep.name={sweep}", "sweep.seeds=1", "optim.max_steps=1500", "stall.window=100"])
    store = Store.open(cfg.results_root)
    (run,) = expand(cfg)
    status, refs = jobs.train_job(store.uri, sweep, run)
    assert status == "ok" and len(refs) >= 2 and len({r.group for r in refs}) == 1, (status, refs)
    return store, refs


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg([...overrides])`` → a composed config whose results go under this test's tmp dir."""
    def make(overrides=None, shrink=True):
        return compose_config([f"results_root={tmp_path / 'results'}"] + list(overrides or []), shrink)
    return make


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices run as fast on one torch thread, and two threads spin-wait on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def uninterrupted_mid_sweep(ray_session, tmp_path_factory) -> Path:
    """The folder of ``MID_SWEEP`` run once without interruption on the shared Ray: what every stopped and
    resumed copy of it must end equal to."""
    from pipeline.orchestration.sweep import run_sweep

    root = tmp_path_factory.mktemp("uninterrupted")
    assert run_sweep(compose_config([f"results_root={root}", *MID_SWEEP])).run_status == {"ok": 4}
    return root / "mid"


@dataclass
class Multirun:
    """What :func:`multirun` left: its working directory, exit code, output, and each job's sweep folder."""

    cwd: Path
    returncode: int
    stdout: str
    stderr: str
    jobs: dict[str, Path]  # hessian.rel_tol as typed → that job's sweep folder


# Two jobs: the estimator cannot resolve a tolerance of 1e-6·λmax (every point fails, with its reason), it can
# resolve 1e-2·λmax. Each job's sweep is named by the command's overrides, Hydra's normalised values included.
MULTIRUN = ["-m", "hessian.rel_tol=1e-6,1e-2", "hessian.method=estimate", "hessian.tol_mode=rel",
            "hessian.estimate_probes=4", "sweep.seeds=1", "optim.max_steps=300", "figures=false",
            "sweep.progress=plain"]
MULTIRUN_NAME = ("default,hessian.estimate_probes-4,hessian.method-estimate,hessian.rel_tol-{},"
                 "hessian.tol_mode-rel,optim.max_steps-300")


@pytest.fixture(scope="session")
def multirun(tmp_path_factory) -> Multirun:
    """One Hydra ``--multirun`` of :data:`MULTIRUN`, run once as the process a user starts (its own local Ray)
    from a fresh working directory: the multirun tests of test_e2e and test_identity read it."""
    cwd = tmp_path_factory.mktemp("multirun")
    res = subprocess.run([sys.executable, "-m", "pipeline", *MULTIRUN, f"results_root={cwd}/results",
                          f"hydra.sweep.dir={cwd}/multirun"], cwd=cwd, capture_output=True, text=True, timeout=600)
    jobs = {tol: cwd / "results" / MULTIRUN_NAME.format(norm) for tol, norm in (("1e-6", "1e-06"), ("1e-2", "0.01"))}
    return Multirun(cwd, res.returncode, res.stdout, res.stderr, jobs)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray shared by every test that needs it (starting Ray takes seconds)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        # address="local": a Ray of its own, even where `ray start` left a cluster this ray.init would join
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
