"""SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler) stop a real ``minratio-sweep`` driver cleanly: Ray shut
down, one line on stderr (interrupted, what is saved, re-run to resume), no traceback, exit 130 / 143; the
same sweep then completes to the keys of an uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import MID_SWEEP, compose_config
from pipeline.orchestration import tables
from pipeline.orchestration.sweep import run_sweep

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def uninterrupted_keys(uninterrupted_mid_sweep):
    return keys(uninterrupted_mid_sweep)


def keys(folder: Path) -> dict[str, list]:
    out = {}
    for name in tables.TABLES:
        df = pd.read_parquet(folder / name)
        key = list(tables.KEYS[name])
        assert not df.duplicated(key).any(), f"duplicate keys in {name}"
        out[name] = sorted(map(tuple, df[key].itertuples(index=False)))
    return out


def runs_written(folder: Path) -> int:
    return len(list((folder / "runs").glob("*.parquet"))) if (folder / "runs").exists() else 0


SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


@pytest.fixture(scope="module")
def signalled(tmp_path_factory) -> dict:
    """Two ``minratio-sweep`` drivers of ``MID_SWEEP``, started together (each with its own local Ray), each
    stopped by its signal once its first run is written: signal → (results root, exit code, stdout, stderr,
    runs written when it exited)."""
    drivers = {}
    for signum, name in SIGNALS.items():
        root = tmp_path_factory.mktemp(name) / "results"
        cmd = [sys.executable, "-m", "pipeline", f"results_root={root}", *MID_SWEEP, "sweep.progress=plain",
               "ray.num_cpus=2", f"hydra.run.dir={root.parent / 'hydra'}"]
        drivers[signum] = root, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True, start_new_session=True)
    try:
        waiting, deadline = dict(drivers), time.monotonic() + 240
        while waiting and time.monotonic() < deadline:
            for signum, (root, driver) in list(waiting.items()):
                if runs_written(root / "mid") < 1 and driver.poll() is None:
                    continue
                assert driver.poll() is None, f"{SIGNALS[signum]}: the sweep ended before the signal"
                if signum == signal.SIGINT:
                    os.killpg(driver.pid, signum)  # Ctrl-C in a terminal: the driver's whole process group
                else:
                    os.kill(driver.pid, signum)  # `kill PID`, or a scheduler stopping the job
                del waiting[signum]
            time.sleep(0.02)
        assert not waiting, f"no run was written within 240 s by {[SIGNALS[s] for s in waiting]}"
        out = {}
        for signum, (root, driver) in drivers.items():
            stdout, stderr = driver.communicate(timeout=120)
            out[signum] = root, driver.returncode, stdout, stderr, runs_written(root / "mid")
        return out
    finally:  # a failed wait leaves no driver, nor the local Ray it started, running
        for _, driver in drivers.values():
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("signum", list(SIGNALS), ids=list(SIGNALS.values()))
def test_a_signal_stops_the_driver_cleanly_and_a_rerun_completes(signalled, uninterrupted_keys, signum):
    root, returncode, out, err, finished = signalled[signum]
    assert returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("minratio: interrupted")]
    assert len(lines) == 1, err[-3000:]
    name = signal.Signals(signum).name
    assert f"interrupted by {name}" in lines[0] and "run the same command again to resume" in lines[0]
    assert " of 4 runs and " in lines[0] and str(root / "mid") in lines[0]
    assert 1 <= finished < 4, f"to be interrupted mid-sweep, {finished} of 4 runs had finished"

    # The same sweep resumed, here on the session's Ray: tests/test_faults.py re-runs the same command as a
    # process of its own after a killed driver.
    summary = run_sweep(compose_config([f"results_root={root}", *MID_SWEEP]))
    assert summary.run_status == {"ok": 4} and summary.points_failed == 0
    assert keys(root / "mid") == uninterrupted_keys


def test_an_interrupt_wrapped_by_ray_is_still_an_interrupt():
    """A signal that lands inside Ray's compiled ``ray.wait`` surfaces as a SystemError whose context is the
    handler's Interrupted (seen once in a clean-clone CI run): it must stop the sweep like a bare one."""
    from pipeline.orchestration import cli

    def wrapped():
        try:
            raise cli.Interrupted(signal.SIGINT)
        except cli.Interrupted:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set")

    with pytest.raises(SystemError) as info:
        wrapped()
    assert cli._interrupt_in(info.value).signum == signal.SIGINT
    assert cli._interrupt_in(RuntimeError("not a signal")) is None
