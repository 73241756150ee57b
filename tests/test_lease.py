"""One command at a time per sweep folder (pipeline.orchestration.lease): a live holder refuses the others
before any work, a dead one is taken over, and a command whose lease was taken over stops.

Holders in other processes are real processes (killed for real); a holder on another host is a lease file
written as that host would write it."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
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
    return json.dumps({"token": token, "command": "minratio-sweep", "host": host, "pid": 4242, "machine": "b00t:4026",
                       "proc_start": "123", "started_at": "2026-12-07 09:00:00 UTC",
                       "beat_at": time.time() - age_s}).encode()


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


def test_a_holder_in_another_container_with_this_hosts_name_waits_for_its_heartbeat(tmp_path):
    """A container with the host's network (``--network host``, ``hostNetwork``) has the host's name but its own
    pids: a pid that is not ours to see says nothing about the holder."""
    store = Store.open(str(tmp_path / "results"))
    other = json.loads(foreign(socket.gethostname(), 5.0))
    store.write_bytes(f"s/{lease.LEASE}", json.dumps(dict(other, pid=4_194_000)).encode())  # no such pid here
    with pytest.raises(FolderBusy, match="pid 4194000"):
        Lease(store, "s", "minratio-sweep").acquire()


def test_a_pid_now_used_by_another_process_is_not_taken_for_the_holder(tmp_path):
    store = Store.open(str(tmp_path / "results"))
    mine = Lease(store, "s", "minratio-sweep").me  # this machine and this pid, which started at another time
    store.write_bytes(f"s/{lease.LEASE}", json.dumps(dict(mine.__dict__, proc_start="1", beat_at=time.time()),
                                                     ).encode())
    Lease(store, "s", "minratio-sweep").acquire().release()


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


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_minratio_sweep_and_compact_are_refused_on_a_folder_in_use(tmp_path, holder_process):
    root = tmp_path / "results"
    sweep = run_cli("-m", "pipeline", f"results_root={root}", "sweep.name=busy", "sweep.seeds=1",
                    f"hydra.run.dir={tmp_path / 'hydra'}")
    assert sweep.returncode == 2, sweep.stderr[-3000:]
    assert f"sweep 'busy' in {root} is being written by minratio-sweep (pid {holder_process.pid}" in sweep.stderr
    assert "Traceback" not in sweep.stderr
    assert sorted(p.name for p in (root / "busy").iterdir()) == [lease.LEASE]  # no work was done

    compact_cmd = ("-c", "from pipeline.orchestration.cli import compact_main; compact_main()", str(root / "busy"))
    compact = run_cli(*compact_cmd)  # before the sweep's first run is written: the holder is named all the same
    assert compact.returncode == 1, compact.stderr
    assert (f"minratio-compact: '{root / 'busy'}' has no runs/ table yet: it is being written by minratio-sweep "
            f"(pid {holder_process.pid}") in compact.stderr
    (root / "busy" / "runs").mkdir()  # a sweep's folder, as far as minratio-compact looks
    compact = run_cli(*compact_cmd)
    assert compact.returncode == 1 and "minratio-compact: sweep 'busy'" in compact.stderr, compact.stderr


def test_a_sweep_whose_lease_is_taken_over_stops_and_ends_its_tasks(ray_session, make_cfg, tmp_path, monkeypatch):
    """Another host takes the lease over while runs train: the driver stops with FolderBusy at its next turn
    of the loop and ends its tasks in flight (no run finishes after it stopped); the other host's lease stays."""
    from pipeline.orchestration.sweep import run_sweep
    from test_faults import wait_for, workers_running

    monkeypatch.setattr(lease, "BEAT_S", 0.05)
    store = Store.open(str(tmp_path / "results"))
    folder = tmp_path / "results" / "taken"

    def take_over():  # while its runs train (each of 20,000 steps takes seconds)
        wait_for(lambda: (folder / lease.LEASE).exists(), timeout_s=120)
        time.sleep(1.5)
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


def delay_lease_writes(monkeypatch, delay) -> None:
    """Before each lease write, ``delay(data)`` runs in the writing thread: a slow NFS server, an S3 retry, a
    machine cut off from the results root for a while."""
    real = Store.write_bytes

    def write(self, rel, data):
        if rel.endswith(lease.LEASE):
            delay(data)
        return real(self, rel, data)

    monkeypatch.setattr(Store, "write_bytes", write)


def test_when_a_write_outlasts_the_settle_the_first_heartbeat_leaves_one_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "BEAT_S", 1.0)  # after both read-backs: both commands hold the lease for a while
    both_read, first = threading.Barrier(2), set()

    def delay(data):  # both commands find the folder free; then one's write takes longer than the settle
        name = threading.current_thread().name
        if name in ("quick", "slow") and name not in first:
            first.add(name)
            both_read.wait()
            time.sleep(0.6 if name == "slow" else 0.0)

    delay_lease_writes(monkeypatch, delay)
    store, outcome = Store.open(str(tmp_path / "results")), {}

    def take():
        try:
            outcome[threading.current_thread().name] = Lease(store, "s", "minratio-sweep").acquire()
        except FolderBusy as err:
            outcome[threading.current_thread().name] = err

    threads = [threading.Thread(target=take, name=name) for name in ("quick", "slow")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [o for o in outcome.values() if isinstance(o, Lease)]
    try:
        assert len(held) == 2  # the slow write landed after the quick command's read-back
        # the slow write lands after the quick command's read-back: the quick one's next heartbeat (or the slow
        # one's read-back, if a heartbeat came first) sees two tokens, and one command gives way
        deadline = time.monotonic() + 30
        while sum(not h.broken for h in held) != 1:
            assert time.monotonic() < deadline, f"{sum(not h.broken for h in held)} commands hold the lease"
            time.sleep(0.01)
        time.sleep(0.5)  # a few more beats: the survivor keeps it
        survivors = [h for h in held if not h.broken]
        assert len(survivors) == 1 and len(outcome) == 2
        assert json.loads(store.read_bytes(f"s/{lease.LEASE}"))["token"] == survivors[0].me.token
        for lost in (h for h in held if h.broken):
            with pytest.raises(FolderBusy, match="took this command's lease over"):
                lost.check()
    finally:
        for h in held:
            h.release()


def test_a_renewal_landing_after_a_takeover_is_overwritten_and_its_writer_stops(tmp_path, monkeypatch):
    """A holder on another machine is cut off from the results root while renewing: its lease expires, another
    command takes the folder over, then the old renewal lands. The new holder keeps the folder; the old one,
    without a renewal for EXPIRES_S by its own clock, stops."""
    monkeypatch.setattr(lease, "BEAT_S", 0.1)
    monkeypatch.setattr(lease, "EXPIRES_S", 1.0)
    store = Store.open(str(tmp_path / "results"))
    old, hung = Lease(store, "s", "minratio-sweep"), []
    old.me = replace(old.me, host="node-7", machine="b00t:4026")

    def delay(data):  # the old holder's first renewal hangs for 2 s
        if old.me.token.encode() in data and threading.current_thread().name == "minratio-lease" and not hung:
            hung.append(data)
            time.sleep(2.0)

    delay_lease_writes(monkeypatch, delay)
    old.acquire()
    try:
        time.sleep(0.1 + 1.0 + 0.3)  # its renewal hangs; the lease expires
        new = Lease(store, "s", "minratio-sweep").acquire()
        try:
            time.sleep(2.0)  # the old renewal has landed, and new's heartbeat has seen it
            assert hung, "the old holder's renewal was not held up"
            assert json.loads(store.read_bytes(f"s/{lease.LEASE}"))["token"] == new.me.token
            assert not new.broken and old.broken
            with pytest.raises(FolderBusy, match="could not renew its lease"):
                old.check()
        finally:
            new.release()
    finally:
        old.release()


def test_a_renewal_stamped_after_a_takeover_by_the_displaced_holder_is_overwritten(tmp_path, monkeypatch):
    """The displaced holder was paused after deciding to renew and before stamping its write (a GC pause,
    SIGSTOP): its renewal carries a time after the takeover, and still the new holder keeps the folder."""
    monkeypatch.setattr(lease, "BEAT_S", 0.1)
    monkeypatch.setattr(lease, "EXPIRES_S", 1.0)
    store = Store.open(str(tmp_path / "results"))
    old, paused = Lease(store, "s", "minratio-sweep"), []
    old.me = replace(old.me, host="node-7", machine="b00t:4026")
    write = old._write

    def late_write():
        if threading.current_thread().name == "minratio-lease" and not paused:
            paused.append(1)
            time.sleep(2.0)
        return write()

    old._write = late_write
    old.acquire()
    try:
        time.sleep(1.4)  # its renewal is paused; the lease expires
        new = Lease(store, "s", "minratio-sweep").acquire()
        try:
            time.sleep(2.0)  # the late renewal has landed, stamped after new's takeover; new has seen it
            assert json.loads(store.read_bytes(f"s/{lease.LEASE}"))["token"] == new.me.token
            assert not new.broken and old.broken
        finally:
            new.release()
    finally:
        old.release()
    assert not store.exists(f"s/{lease.LEASE}")


def test_a_holder_whose_start_time_proc_hides_is_not_taken_for_dead(tmp_path, holder_process, monkeypatch):
    """With /proc mounted hidepid (or another user's process) a pid's start time cannot be read: the pid alone
    tells, and it is alive."""
    monkeypatch.setattr(lease, "_started", lambda pid: "" if pid == holder_process.pid else "0")
    with pytest.raises(FolderBusy, match=f"pid {holder_process.pid}"):
        Lease(Store.open(str(tmp_path / "results")), "busy", "minratio-sweep").acquire()


def test_a_compaction_whose_lease_is_taken_over_stops_between_tables(tmp_path, monkeypatch, capsys):
    from pipeline.orchestration import cli, tables

    monkeypatch.setattr(lease, "BEAT_S", 0.05)
    store = Store.open(str(tmp_path / "results"))
    store.makedirs("s/runs")
    real, done = tables.compact, []

    def compact(store, sweep, name):  # another host takes the folder over during the first table
        if not done:
            store.write_bytes(f"{sweep}/{lease.LEASE}", foreign("node-7", 0.0))
            time.sleep(0.5)
        done.append(name)
        return real(store, sweep, name)

    monkeypatch.setattr(tables, "compact", compact)
    monkeypatch.setattr(sys, "argv", ["minratio-compact", str(tmp_path / "results" / "s")])
    with pytest.raises(SystemExit) as stopped:
        cli.compact_main()
    assert stopped.value.code == 1 and done == ["runs"]
    assert "took this command's lease over" in capsys.readouterr().err


def test_a_sweep_that_fails_ends_its_tasks_before_it_frees_the_folder(ray_session, make_cfg, tmp_path, monkeypatch):
    """Any error in the driver (here one raised in its loop while runs train) ends the tasks in flight before
    the lease goes: no run of the failed sweep finishes after the folder is free for another command."""
    from pipeline.orchestration import sweep
    from test_faults import wait_for, workers_running

    real, first = sweep.Driver.show, []

    def show(self):  # 1 s after the first runs were submitted (each of 20,000 steps takes seconds)
        real(self)
        if self.in_flight and not first:
            first.append(time.monotonic())
        if first and time.monotonic() - first[0] > 1.0:
            raise OSError("the results root went away")

    monkeypatch.setattr(sweep.Driver, "show", show)
    folder = tmp_path / "results" / "failing"
    with pytest.raises(OSError, match="went away"):
        sweep.run_sweep(make_cfg(["sweep.name=failing", "sweep.seeds=4", "optim.max_steps=20000",
                                  "stall.window=500", "figures=false"]))
    assert not (folder / lease.LEASE).exists()
    runs = lambda: len(list((folder / "runs").glob("*.parquet")))
    at_stop = runs()
    wait_for(lambda: not workers_running("_train_task"), timeout_s=60)
    time.sleep(1.0)
    assert runs() == at_stop < 4, "a run of the failed sweep finished after it freed the folder"
