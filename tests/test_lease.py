"""One command at a time per sweep folder (pipeline.orchestration.lease): a live holder refuses the others
before any work, a dead one is taken over, and a command whose lease was taken over stops.

Holders in other processes are real processes (killed for real); a holder on another host is a lease file
written as that host would write it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.orchestration import lease
from pipeline.orchestration.lease import FolderBusy, Lease
from pipeline.orchestration.storage import Store

REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from pipeline.orchestration.lease import Lease
from pipeline.orchestration.storage import Store
Lease(Store.open(sys.argv[1]), sys.argv[2], "minratio-sweep").acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder_process(tmp_path):
    """A real process on this host holding sweep ``busy``'s lease under ``tmp_path/results``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "results"), "busy"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def foreign(host: str, age_s: float, token: str = "f" * 32) -> bytes:
    """A lease file as a command on ``host`` writes it, last renewed ``age_s`` seconds ago."""
    return json.dumps({"token": token, "command": "minratio-sweep", "host": host, "pid": 4242,
                       "started_at": "2026-12-07 09:00:00 UTC", "beat_at": time.time() - age_s}).encode()


def test_a_live_holder_refuses_a_second_command_and_a_killed_one_is_taken_over_at_once(tmp_path, holder_process,
                                                                                        caplog):
    store = Store.open(str(tmp_path / "results"))
    with pytest.raises(FolderBusy) as refused:
        Lease(store, "busy", "minratio-compact").acquire()
    assert f"minratio-sweep (pid {holder_process.pid} on host {os.uname().nodename}" in str(refused.value)
    assert "wait for it to end" in str(refused.value)

    holder_process.send_signal(signal.SIGKILL)
    holder_process.wait(timeout=30)
    caplog.set_level("INFO", logger="minratio")
    with Lease(store, "busy", "minratio-compact"):  # the same host sees its process gone: no wait
        held = json.loads((tmp_path / "results" / "busy" / lease.LEASE).read_text())
        assert held["command"] == "minratio-compact" and held["pid"] == os.getpid()
    assert f"pid {holder_process.pid}" in caplog.text and "is gone: taking its lease over" in caplog.text
    assert not (tmp_path / "results" / "busy" / lease.LEASE).exists()


@pytest.mark.parametrize("age_s, taken", [(5.0, False), (lease.EXPIRES_S + 5, True)])
def test_a_holder_on_another_host_is_dead_only_after_its_heartbeat_expires(tmp_path, age_s, taken):
    store = Store.open(str(tmp_path / "results"))
    store.write_bytes(f"s/{lease.LEASE}", foreign("node-7", age_s))
    if taken:
        Lease(store, "s", "minratio-sweep").acquire().release()
    else:
        with pytest.raises(FolderBusy, match=r"pid 4242 on host node-7, .* last heartbeat [56] s ago"):
            Lease(store, "s", "minratio-sweep").acquire()
        assert json.loads(store.read_bytes(f"s/{lease.LEASE}"))["host"] == "node-7"  # left as it was


def test_the_heartbeat_renews_the_lease_and_a_command_whose_lease_was_taken_over_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "BEAT_S", 0.05)
    store = Store.open(str(tmp_path / "results"))
    held = Lease(store, "s", "minratio-sweep").acquire()
    try:
        first = json.loads(store.read_bytes(f"s/{lease.LEASE}"))["beat_at"]
        deadline = time.monotonic() + 30
        while json.loads(store.read_bytes(f"s/{lease.LEASE}"))["beat_at"] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.01)
        held.check()  # still this command's

        store.write_bytes(f"s/{lease.LEASE}", foreign("node-7", 0.0))  # taken over by another host
        while held.lost is None:
            assert time.monotonic() < deadline, "the heartbeat never noticed the takeover"
            time.sleep(0.01)
        with pytest.raises(FolderBusy, match=r"pid 4242 on host node-7.* took this command's lease over"):
            held.check()
    finally:
        held.release()
    assert json.loads(store.read_bytes(f"s/{lease.LEASE}"))["host"] == "node-7"  # not deleted: not ours


def test_a_command_refused_before_any_work_leaves_no_folder(tmp_path):
    store = Store.open(str(tmp_path / "results"))
    Lease(store, "new", "minratio-sweep").acquire().release()
    assert not (tmp_path / "results" / "new").exists()
    (tmp_path / "results" / "old").mkdir()
    Lease(store, "old", "minratio-sweep").acquire().release()
    assert (tmp_path / "results" / "old").is_dir() and not list((tmp_path / "results" / "old").iterdir())


def race(store: Store, sweep: str, commands: int = 3) -> tuple[list[Lease], list[FolderBusy]]:
    """``commands`` threads taking ``sweep``'s lease at the same moment: ``(who holds it, who was refused)``."""
    start, outcome = threading.Barrier(commands), []

    def take():
        start.wait()
        try:
            outcome.append(Lease(store, sweep, "minratio-sweep").acquire())
        except FolderBusy as err:
            outcome.append(err)

    threads = [threading.Thread(target=take) for _ in range(commands)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for o in outcome if isinstance(o, Lease)], [o for o in outcome if isinstance(o, FolderBusy)]


def test_of_commands_starting_together_exactly_one_holds_the_folder(tmp_path):
    store = Store.open(str(tmp_path / "results"))
    for attempt in range(4):
        winners, refused = race(store, f"race{attempt}")
        assert len(winners) == 1 and len(refused) == 2, (winners, refused)
        assert json.loads(store.read_bytes(f"race{attempt}/{lease.LEASE}"))["token"] == winners[0].me.token
        winners[0].release()


def run_cli(*args, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_minratio_sweep_and_compact_are_refused_on_a_folder_in_use(tmp_path, holder_process):
    root = tmp_path / "results"
    sweep = run_cli("-m", "pipeline", f"results_root={root}", "sweep.name=busy", "sweep.seeds=1",
                    f"hydra.run.dir={tmp_path / 'hydra'}", tmp_path=tmp_path)
    assert sweep.returncode == 2, sweep.stderr[-3000:]
    assert f"sweep 'busy' in {root} is being written by minratio-sweep (pid {holder_process.pid}" in sweep.stderr
    assert "Traceback" not in sweep.stderr
    assert sorted(p.name for p in (root / "busy").iterdir()) == [lease.LEASE]  # no work was done

    (root / "busy" / "runs").mkdir()  # a sweep's folder, as far as minratio-compact looks
    compact = run_cli("-c", "from pipeline.orchestration.cli import compact_main; compact_main()",
                      str(root / "busy"), tmp_path=tmp_path)
    assert compact.returncode == 1 and "minratio-compact: sweep 'busy'" in compact.stderr, compact.stderr


def test_a_sweep_whose_lease_is_taken_over_stops_and_ends_its_tasks(ray_session, make_cfg, tmp_path, monkeypatch):
    """Another host takes the lease over while runs train: the driver stops with FolderBusy at its next turn
    of the loop and ends its tasks in flight (no run finishes after it stopped); the other host's lease stays."""
    from pipeline.orchestration.sweep import run_sweep
    from test_faults import wait_for, workers_running

    monkeypatch.setattr(lease, "BEAT_S", 0.05)
    store = Store.open(str(tmp_path / "results"))
    folder = tmp_path / "results" / "taken"

    def take_over():  # once training has written its first checkpoint
        deadline = time.monotonic() + 120
        while not list(folder.glob("checkpoints/*/*.pt")) and time.monotonic() < deadline:
            time.sleep(0.005)
        store.write_bytes(f"taken/{lease.LEASE}", foreign("node-7", 0.0))

    thief = threading.Thread(target=take_over)
    thief.start()
    try:
        with pytest.raises(FolderBusy, match=r"pid 4242 on host node-7.* took this command's lease over"):
            run_sweep(make_cfg(["sweep.name=taken", "sweep.seeds=4", "optim.max_steps=20000", "stall.window=500"]))
    finally:
        thief.join()
    runs = lambda: len(list((folder / "runs").glob("*.parquet")))
    at_stop = runs()
    wait_for(lambda: not workers_running("_train_task"), timeout_s=60)
    time.sleep(1.0)
    assert runs() == at_stop < 4, "a run of the stopped sweep finished after it stopped"
    assert json.loads((folder / lease.LEASE).read_text())["host"] == "node-7"
