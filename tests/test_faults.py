"""Faults: a killed driver, a killed training worker, a killed Hessian worker, NaN losses and runs that
raise. After any of them the tables hold every key exactly once, with the values of an uninterrupted run.

Processes are killed by id: the driver's own process group, or Ray workers that descend from this test
process (never a process found by name alone, which could be someone else's).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import MID_SWEEP, two_stalls
from pipeline.orchestration import jobs, tables
from pipeline.orchestration.plan import expand
from pipeline.orchestration.storage import Store
from pipeline.orchestration.sweep import run_sweep
from pipeline.orchestration.train import train

REPO = Path(__file__).resolve().parent.parent
# Values that legitimately differ between two executions of the same run.
VOLATILE = ["written_at", "wall_seconds", "seconds", "build_seconds", "count_seconds", "node", "node_id",
            "resumed_from_step"]


# Training in this process on one thread: two intra-op threads on a loaded 2-core machine spin-wait.
pytestmark = pytest.mark.usefixtures("one_thread")


def raw_tables(folder: Path) -> dict[str, pd.DataFrame]:
    """Every row on disk, without the project reader's de-duplication: duplicates would show here."""
    out = {}
    for name in tables.TABLES:
        df = pd.read_parquet(folder / name)
        assert not df.duplicated(list(tables.KEYS[name])).any(), f"duplicate keys in {name}"
        out[name] = df.drop(columns=VOLATILE, errors="ignore").sort_values(
            list(tables.KEYS[name])).reset_index(drop=True)
    return out


def assert_same_tables(got: Path, want: Path) -> None:
    a, b = raw_tables(got), raw_tables(want)
    for name in ("runs", "points", "curves"):
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-9, obj=name)
    without = [df.drop(columns="eigenvalues") for df in (a["spectra"], b["spectra"])]
    pd.testing.assert_frame_equal(*without, obj="spectra")
    for x, y in zip(a["spectra"]["eigenvalues"], b["spectra"]["eigenvalues"]):
        np.testing.assert_allclose(x, y, rtol=1e-8, atol=1e-10 * np.abs(y).max())


def count_files(folder: Path) -> int:
    return len(list(folder.glob("*.parquet"))) if folder.exists() else 0


@pytest.mark.slow
def test_driver_killed_mid_sweep_then_rerun_equals_an_uninterrupted_sweep(tmp_path, uninterrupted_mid_sweep):
    root = tmp_path / "results"
    cmd = [sys.executable, "-m", "pipeline", f"results_root={root}", *MID_SWEEP, "sweep.progress=plain",
           "ray.num_cpus=2", f"hydra.run.dir={tmp_path / 'hydra'}"]
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 240
    while count_files(root / "mid" / "runs") < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    crash(driver)
    finished = count_files(root / "mid" / "runs")
    assert 2 <= finished < 4, f"the driver was to be killed mid-sweep, {finished} of 4 runs had finished"

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(rf"4 runs in this command \({finished} finished earlier, skipped\)", rerun.stdout), rerun.stdout
    assert_same_tables(root / "mid", uninterrupted_mid_sweep)
    assert not list((root / "mid" / "state").glob("*.pt"))  # finished runs leave no training state


# --------------------------------------------------------------------------------------------------
# Killing Ray workers of the shared Ray while they run a task.

def crash(driver: subprocess.Popen) -> None:
    """A machine crash: the driver (started with ``start_new_session``), the local Ray it started and that
    Ray's workers (which run in process groups of their own) all die at once."""
    doomed = descendants(driver.pid)
    os.killpg(driver.pid, signal.SIGKILL)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    driver.wait(timeout=30)


def descendants(pid: int) -> list[int]:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        out += frontier
    return out


def workers_running(task_name: str) -> list[int]:
    """Pids of Ray workers of this test process executing ``task_name`` (Ray sets the process title)."""
    out = []
    for pid in descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{task_name}".encode()):
                out.append(pid)
        except OSError:
            continue
    return out


def wait_for(condition, timeout_s: float = 180.0, every_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {condition.__name__}")


# Two runs of a few seconds that never stall (window > max_steps), a Hessian task per checkpoint.
WORKER_KILL = ["sweep.name=workers", "sweep.seeds=2", "model.width=48", "optim.max_steps=4000",
               "stall.window=20000", "ray.state_every_s=0.3", "hessian.batch_checkpoints=1", "figures=false"]


@pytest.mark.slow
def test_killed_workers_are_retried_training_resumes_from_its_saved_state(ray_session, make_cfg, tmp_path):
    cfg = make_cfg(WORKER_KILL)
    folder = tmp_path / "results" / "workers"
    result, killed = {}, {}
    sweep = threading.Thread(target=lambda: result.update(summary=run_sweep(cfg)))
    sweep.start()
    try:
        def training_worker_with_saved_state():
            # Every run in training has saved a state (each run has at most one state file), so the
            # worker killed is one that can resume.
            states = list((folder / "state").glob("*.pt")) if (folder / "state").exists() else []
            workers = workers_running("_train_task")
            return workers[0] if workers and len(states) >= len(workers) else None

        def hessian_worker():
            return (workers_running("_hessian_task") or [None])[0]

        killed["train"] = wait_for(training_worker_with_saved_state)
        os.kill(killed["train"], signal.SIGKILL)
        killed["hessian"] = wait_for(hessian_worker, every_s=0.002)
        os.kill(killed["hessian"], signal.SIGKILL)
    finally:
        sweep.join(timeout=300)
    summary = result["summary"]
    assert summary.run_status == {"ok": 2} and summary.points == 2

    runs = pd.read_parquet(folder / "runs").set_index("run_id")
    resumed = runs[runs["resumed_from_step"].notna()]
    assert len(resumed) >= 1 and (resumed["resumed_from_step"] > 0).all()
    # Training is deterministic: the resumed run ends exactly where an uninterrupted one does.
    by_id = {r.run_id: r for r in expand(cfg)}
    curves = pd.read_parquet(folder / "curves")
    for run_id, row in resumed.iterrows():
        ref = train(by_id[run_id].config, by_id[run_id].seed)
        assert row["steps"] == ref.steps and row["final_loss"] == pytest.approx(ref.final_loss, rel=1e-10)
        got = curves[curves["run_id"] == run_id].sort_values("step")
        assert got["step"].tolist() == ref.curves.step
        np.testing.assert_allclose(got["loss"], ref.curves.loss, rtol=1e-10)
    raw = raw_tables(folder)  # asserts no key twice, after a retried Hessian task
    assert len(raw["points"]) == len(raw["spectra"]) == 2 and set(raw["points"]["status"]) == {"ok"}


RESUME_CASES = [  # optimizers whose state (momentum, moments, sampler RNG) must survive a restart
    ["optim.momentum=0.9"],
    ["optim=sgd", "data.batch_size=32"],
    ["optim=adam"],
]


@pytest.mark.parametrize("overrides", RESUME_CASES, ids=lambda o: o[0])
def test_training_resumed_from_a_saved_state_ends_where_an_uninterrupted_run_does(make_cfg, tmp_path, overrides):
    cfg = make_cfg(["sweep.seeds=1", "model.width=4", "optim.max_steps=600", "stall.window=200", *overrides])
    run = expand(cfg)[0]
    whole = train(run.config, run.seed)
    store, states = Store.open(str(tmp_path / "r")), []
    train(run.config, run.seed, on_state=states.append, state_every_s=0.0)
    jobs.save_state(store, "s", run.run_id, states[len(states) // 2])  # through the file, as a retry reads it
    state = jobs.load_state(store, "s", run.run_id)
    assert 0 < state.step < whole.steps
    resumed = train(run.config, run.seed, resume=state)
    assert resumed.steps == whole.steps and resumed.final_loss == whole.final_loss
    assert resumed.curves.loss == whole.curves.loss
    assert [c.step for c in resumed.checkpoints] == [c.step for c in whole.checkpoints]
    for a, b in zip(resumed.checkpoints, whole.checkpoints):
        assert torch.equal(a.theta, b.theta)


# --------------------------------------------------------------------------------------------------
# Failures stay local: NaN → diverged, an exception → failed with its error; the sweep goes on.

@pytest.mark.slow
def test_diverged_and_failed_runs_become_rows_and_the_sweep_goes_on(ray_session, make_cfg, tmp_path):
    cfg = make_cfg(["sweep.name=mixed", "sweep.seeds=2", "model.width=4", "optim.max_steps=600",
                    "stall.window=200", "+sweep.grid={optim.lr:[0.5,50.0]}", "figures=false"])
    runs = expand(cfg)
    ok_runs = [r for r in runs if r.overrides["optim.lr"] == 0.5]
    # A real fault for one run: its checkpoint folder cannot be created (a file sits at its path).
    blocked = tmp_path / "results" / "mixed" / "checkpoints" / ok_runs[0].run_id
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way")

    summary = run_sweep(cfg)
    assert summary.run_status == {"ok": 1, "diverged": 2, "failed": 1}
    df = pd.read_parquet(tmp_path / "results" / "mixed" / "runs").set_index("run_id")
    diverged = df[df["status"] == "diverged"]
    assert (diverged["optim_lr"] == 50.0).all() and diverged["error"].str.contains("loss became").all()
    assert (~np.isfinite(diverged["final_loss"])).all()
    failed = df.loc[ok_runs[0].run_id]
    assert failed["status"] == "failed" and ok_runs[0].run_id in failed["error"]
    points = pd.read_parquet(tmp_path / "results" / "mixed" / "points")
    assert set(points["run_id"]) == {ok_runs[1].run_id}  # only the ok run has analysed points
    assert points["fallback"].isna().all()  # written, and empty: nothing ran out of memory

    blocked.unlink()  # the fault is repaired: the same command redoes only the failed run
    again = run_sweep(cfg)
    assert again.runs_skipped == 3 and again.run_status == {"ok": 2, "diverged": 2}


def test_a_hessian_task_that_dies_keeps_the_points_it_wrote(ray_session, make_cfg, tmp_path):
    """A Hessian task whose worker dies after writing one of its two points: the driver records the other
    as failed and leaves the written one ok (every points key is one file, so a failed row would replace it)."""
    import ray

    from pipeline.orchestration.progress import Progress
    from pipeline.orchestration.sweep import _finish_hessian

    store, refs = two_stalls(make_cfg, "dies")

    @ray.remote(max_retries=0)
    def analyse_one_then_die(uri, refs):
        jobs.hessian_job(uri, "dies", refs[:1])
        os._exit(1)  # the worker process dies: the driver sees a RayError

    prog = Progress(total_runs=1, mode="none")
    _finish_hessian(store, "dies", analyse_one_then_die.remote(store.uri, refs[:2]), refs[:2], prog)
    points = tables.read(store, "dies", "points").to_pandas().set_index("step")
    assert points.loc[refs[0].step, "status"] == "ok"
    assert points.loc[refs[1].step, "status"] == "failed" and "Error" in points.loc[refs[1].step, "error"]
    assert (prog.points_done, prog.points_failed) == (1, 1)
