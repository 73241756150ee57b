"""One sweep at a time writes a sweep folder: a lease, the file ``<sweep>/_driver.json``.

Two ``minratio-sweep`` commands on one folder would train every run twice, and ``minratio-compact`` beside
a running sweep may leave its new rows unmerged, or shown twice to readers without de-duplication. So each
of them holds a lease first: a small JSON file naming the command, its host, its process and a random
token, rewritten every :data:`BEAT_S` seconds by a background thread and deleted when the command ends.
Another command that finds a live lease is refused before any work (:class:`FolderBusy`), naming the holder.

A lease is dead, and is taken over, when its holder's process is gone from this machine (same boot, same
process namespace: a container sharing the host's name does not count), or when it has not been rewritten
for :data:`EXPIRES_S` seconds (a holder elsewhere that died; the machines' clocks must agree to within a
few seconds, as NTP keeps them). Taking a lease writes it, then reads it back a moment later
(:func:`_settle_s`): of two commands starting together the one whose write landed last holds it and the
other is refused. Should a write take longer than that moment, both go on until the first heartbeat, whose
read sees the other's token: the one whose write was first then stops and ends its tasks. A holder that has
not renewed its lease for half of :data:`EXPIRES_S` by its own clock stops too, and a renewal by the holder
a command displaced, arriving late, is overwritten. Only whole-file writes are needed,
so the lease holds on object stores, where there is no file lock. The name starts with ``_``, so pyarrow,
pandas, DuckDB and polars skip it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace

import pyarrow.fs as pafs

from pipeline.orchestration.storage import Store

log = logging.getLogger("minratio")

LEASE = "_driver.json"
BEAT_S = 10.0  # seconds between two writes of a held lease
EXPIRES_S = 60.0  # a lease not rewritten for this long is dead (six missed beats)
# A holder stops once it has not renewed for EXPIRES_S / 2 (three missed beats) by its own clock: the other
# half leaves room for clocks a few seconds apart, for the driver's next look at its lease and for the
# :data:`CANCEL_WAIT_S` its tasks may take to end, all before anyone may take the lease over.
CANCEL_WAIT_S = 20.0


def _clock() -> float:
    """Seconds on a clock that also runs while the machine sleeps (a suspended laptop or VM must find its
    lease expired on waking): CLOCK_BOOTTIME on Linux, the monotonic clock elsewhere."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


class FolderBusy(RuntimeError):
    """Another live command holds the sweep folder's lease (raised before any work), or this command lost
    its own (raised by :meth:`Lease.check`)."""


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _machine() -> str:
    """This kernel's boot and process namespace (``boot_id:pidns``; empty without ``/proc``): two processes
    see each other's pids only when both agree."""
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""
    return f"{_read_text('/proc/sys/kernel/random/boot_id')}:{pidns}"


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the process name (field 3, the state, first); empty without
    ``/proc`` or where it hides the process."""
    return _read_text(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()


def _started(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (field 22 of ``/proc/<pid>/stat``; empty
    without ``/proc``): a pid reused by another process has another start."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True)
class Holder:
    """What a lease file says: the ``command`` holding it, on ``host`` as ``pid`` (``machine`` and ``proc_start``
    as :func:`_machine` and :func:`_started` give them), since ``started_at`` (UTC), last rewritten at
    ``beat_at`` (seconds since the epoch, the holder's clock)."""

    token: str
    command: str
    host: str
    pid: int
    machine: str
    proc_start: str
    started_at: str
    beat_at: float

    def age_s(self) -> float:
        return time.time() - self.beat_at

    def gone(self) -> bool:
        """Dead: not rewritten for :data:`EXPIRES_S` seconds, or its process is gone from this machine."""
        if self.age_s() > EXPIRES_S:
            return True
        here = _machine()
        if not here or self.machine != here or self.host != socket.gethostname():
            return False  # another machine or container: only the heartbeat tells
        started = _started(self.pid)  # "" where /proc hides it (hidepid): then the pid alone tells
        return not _alive(self.pid) or (started != "" and started != self.proc_start)

    def describe(self) -> str:
        return (f"{self.command} (pid {self.pid} on host {self.host}, started {self.started_at}, "
                f"last heartbeat {max(self.age_s(), 0.0):.0f} s ago)")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    state = _stat(pid)
    return not state or state[0] != "Z"


def _settle_s(store: Store) -> float:
    """How long a lease just written is left before it is read back: a rename on a filesystem is seen at
    once by this machine; an object store's PUT takes a round trip, a second one's start a little more."""
    return 0.2 if store.atomic_rename else 1.0


def _read(store: Store, sweep: str) -> Holder | None:
    try:
        data = json.loads(store.read_bytes(f"{sweep}/{LEASE}"))
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        log.warning(f"the lease {store.location(f'{sweep}/{LEASE}')} is unreadable ({type(err).__name__}); "
                    f"it is taken to be dead")
        return None


def writer(store: Store, sweep: str) -> Holder | None:
    """The live command holding the sweep folder's lease, if any: what a reader of the folder names when it
    finds no table yet."""
    holder = _read(store, sweep)
    return holder if holder is not None and not holder.gone() else None


class Lease:
    """The lease of one sweep folder held by this process: :meth:`acquire` it, :meth:`check` it now and
    then (it raises once the lease is lost), :meth:`release` it at the end. Also a context manager."""

    def __init__(self, store: Store, sweep: str, command: str):
        self.store, self.sweep = store, sweep
        pid = os.getpid()
        self.me = Holder(token=uuid.uuid4().hex, command=command, host=socket.gethostname(), pid=pid,
                         machine=_machine(), proc_start=_started(pid),
                         started_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), beat_at=0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: Holder | None = None  # who took the lease over, once the heartbeat has seen it
        self._taken_at = 0.0  # beat_at of this command's first write (its clock)
        self._displaced: str | None = None  # the token of the dead lease this command took over
        self._renewed = 0.0  # _clock() when the last renewal that landed began
        self._made_folder = False  # whether acquire made the sweep folder (release removes it if left empty)

    @property
    def rel(self) -> str:
        return f"{self.sweep}/{LEASE}"

    def _refuse(self, other: Holder) -> FolderBusy:
        return FolderBusy(
            f"sweep {self.sweep!r} in {self.store.location()} is being written by {other.describe()}; wait for it "
            f"to end, or stop it (Ctrl-C, `ray job stop`). A command that died frees the folder at once on its own "
            f"machine, and {EXPIRES_S:.0f} s after its last heartbeat seen from another")

    def _write(self) -> float:
        """Write this command's lease; return its ``beat_at``."""
        now = time.time()
        self.store.write_bytes(self.rel, json.dumps(replace(self.me, beat_at=now).__dict__, indent=1).encode())
        return now

    def acquire(self) -> "Lease":
        """Take the lease, or raise :class:`FolderBusy` naming the live command that holds it."""
        self._made_folder = not self.store.exists(self.sweep)
        other = _read(self.store, self.sweep)
        if other is not None and not other.gone():
            raise self._refuse(other)
        if other is not None:
            log.info(f"the folder's previous command, {other.describe()}, is gone: taking its lease over")
        self._displaced = other.token if other is not None else None
        try:
            self._renewed = _clock()
            self._taken_at = self._write()
            time.sleep(_settle_s(self.store))
            now = _read(self.store, self.sweep)
        except BaseException:  # Ctrl-C, a full disk: leave no lease behind
            self._remove()
            raise
        if now is None or now.token != self.me.token:  # a command that started at the same moment won
            raise self._refuse(now) if now is not None else FolderBusy(
                f"sweep {self.sweep!r} in {self.store.location()}: the lease just written is gone; is another "
                f"command starting on this folder?")
        self._thread = threading.Thread(target=self._beat, name="minratio-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            if self.expired():
                return  # another command may hold it by now: write nothing more
            began = _clock()
            try:
                now = _read(self.store, self.sweep)
                if now is not None and now.token != self.me.token:
                    # a late renewal by the holder this command displaced, or one written before it took over
                    if now.token != self._displaced and now.beat_at >= self._taken_at:
                        self.lost = now
                        return
                    log.warning(f"the lease {self.store.location(self.rel)} held a renewal by {now.describe()} "
                                f"from before this command took it over; writing this command's again")
                if self.expired():  # paused between the read and the write: write nothing more
                    return
                self._write()
                self._renewed = began
            except Exception as err:  # noqa: BLE001 — a full disk, a lost object store: the next beat tries again
                log.warning(f"could not renew the lease {self.store.location(self.rel)}: {err}")

    def expired(self) -> bool:
        """Whether this command's last renewal that landed began more than :data:`EXPIRES_S` / 2 seconds ago
        by this machine's clock (:func:`_clock`): it must stop well before others may take the lease over."""
        return _clock() - self._renewed > EXPIRES_S / 2

    @property
    def broken(self) -> bool:
        """Whether the lease is lost (taken over, or expired): :meth:`check` raises."""
        return self.lost is not None or self.expired()

    def check(self) -> None:
        """Raise :class:`FolderBusy` when the lease is lost: another command took it over, or this one could not
        renew it for :data:`EXPIRES_S` / 2 seconds (a suspended process, a machine cut off from the results root)."""
        if self.lost is not None:
            raise FolderBusy(
                f"sweep {self.sweep!r} in {self.store.location()}: {self.lost.describe()} took this command's lease "
                f"over (it found no heartbeat of this one for {EXPIRES_S:.0f} s, or it started at the same moment and "
                f"its lease was written after this one's); stopping here, and the other command goes on")
        if self.expired():
            raise FolderBusy(
                f"sweep {self.sweep!r} in {self.store.location()}: this command could not renew its lease "
                f"{self.store.location(self.rel)} for more than {EXPIRES_S / 2:.0f} s (was it suspended, or cut off "
                f"from the results root?); another command may take the folder over {EXPIRES_S:.0f} s after the last "
                f"renewal, so this one stops here. Run the same command again to resume")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this command's (and the sweep folder, when
        this command made it and left nothing else in it: a command refused before any work leaves no trace)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._remove()

    def _remove(self) -> None:
        try:
            now = _read(self.store, self.sweep)
            if now is not None and now.token == self.me.token:
                self.store.delete(self.rel)
            if self._made_folder and self.store.exists(self.sweep) and self._empty():
                self.store.fs.delete_dir(self.store.path(self.sweep))
        except OSError as err:  # the folder stays usable: a dead lease is taken over
            log.warning(f"could not remove the lease {self.store.location(self.rel)}: {err}")

    def _empty(self) -> bool:
        sel = pafs.FileSelector(self.store.path(self.sweep), allow_not_found=True)
        return not self.store.fs.get_file_info(sel)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
