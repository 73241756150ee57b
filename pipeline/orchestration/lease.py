"""One command at a time writes a sweep folder: a lease, the file ``<sweep>/_driver.json``.

Two ``minratio-sweep`` commands on one folder would train every run twice, and ``minratio-compact`` beside
a running sweep may leave its new rows unmerged, or shown twice to readers without de-duplication. So a
command that writes the folder holds a lease first: a small JSON file naming the command, its host, its pid
and a random token, rewritten every :data:`BEAT_S` seconds by a background thread and deleted when the
command ends. Another command that finds a live lease is refused before any work (:class:`FolderBusy`),
naming the holder.

A lease is dead, and is taken over, when its holder's process is gone from this host, or when it has not
been rewritten for :data:`EXPIRES_S` seconds (a holder on another host that died; the hosts' clocks must
agree to within a few seconds, as NTP keeps them). Taking a lease writes it, then reads it back
:data:`SETTLE_S` later: of two commands starting together the one whose write landed last holds it and the
other is refused. Only whole-file writes are needed, so the lease holds on object stores too, where there
is no file lock. The name starts with ``_``, so pyarrow, pandas, DuckDB and polars skip it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.orchestration.storage import Store

log = logging.getLogger("minratio")

LEASE = "_driver.json"
BEAT_S = 10.0  # seconds between two writes of a held lease
EXPIRES_S = 60.0  # a lease not rewritten for this long is dead (six missed beats)


class FolderBusy(RuntimeError):
    """Another live command holds the sweep folder's lease (raised before any work), or took it over from
    this one (raised by :meth:`Lease.check` in the command that lost it)."""


@dataclass(frozen=True)
class Holder:
    """What a lease file says: the ``command`` holding it, on ``host`` as ``pid``, since ``started_at`` (UTC,
    ISO 8601), last rewritten at ``beat_at`` (seconds since the epoch, the holder's clock)."""

    token: str
    command: str
    host: str
    pid: int
    started_at: str
    beat_at: float

    def age_s(self) -> float:
        return time.time() - self.beat_at

    def gone(self) -> bool:
        """Dead: its process is gone from this host, or it has not beaten for :data:`EXPIRES_S` seconds."""
        if self.age_s() > EXPIRES_S:
            return True
        return self.host == socket.gethostname() and not _alive(self.pid)

    def describe(self) -> str:
        return (f"{self.command} (pid {self.pid} on host {self.host}, started {self.started_at}, "
                f"last heartbeat {max(self.age_s(), 0.0):.0f} s ago)")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _settle_s(store: Store) -> float:
    """How long a write is left to land before it is read back: a rename on a local or shared filesystem is
    seen at once; an object store's PUT takes a round trip, a second one's start a little more."""
    return 0.2 if store.atomic_rename else 1.0


def holder(store: Store, sweep: str) -> Holder | None:
    """The live holder of ``sweep``'s lease, None when the folder has no lease or a dead one. An unreadable
    lease file (a writer stopped by a full disk) counts as none."""
    found = _read(store, sweep)
    return None if found is None or found.gone() else found


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


class Lease:
    """The lease of one sweep folder held by this process: :meth:`acquire` it, :meth:`check` it now and
    then (it raises if another command took it over), :meth:`release` it at the end. Also a context manager."""

    def __init__(self, store: Store, sweep: str, command: str):
        self.store, self.sweep = store, sweep
        self.me = Holder(token=uuid.uuid4().hex, command=command, host=socket.gethostname(), pid=os.getpid(),
                         started_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), beat_at=0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: Holder | None = None  # who took the lease over, once the heartbeat has seen it
        self._made_folder = False

    @property
    def rel(self) -> str:
        return f"{self.sweep}/{LEASE}"

    def _refuse(self, other: Holder) -> FolderBusy:
        return FolderBusy(
            f"sweep {self.sweep!r} in {self.store.location()} is being written by {other.describe()}; wait for it "
            f"to end, or stop it (Ctrl-C, `ray job stop`). A command that died frees the folder at once on its own "
            f"host, and {EXPIRES_S:.0f} s after its last heartbeat seen from another host")

    def _write(self) -> None:
        me = dict(self.me.__dict__, beat_at=time.time())
        self.store.write_bytes(self.rel, json.dumps(me, indent=1).encode())

    def acquire(self) -> "Lease":
        """Take the lease, or raise :class:`FolderBusy` naming the live command that holds it."""
        self._made_folder = not self.store.exists(self.sweep)
        other = _read(self.store, self.sweep)
        if other is not None and not other.gone():
            raise self._refuse(other)
        if other is not None:
            log.info(f"the folder's previous command, {other.describe()}, is gone: taking its lease over")
        self._write()
        try:
            time.sleep(_settle_s(self.store))
            now = _read(self.store, self.sweep)
        except BaseException:  # Ctrl-C in the pause: leave no lease behind
            self.release()
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
            try:
                now = _read(self.store, self.sweep)
                if now is not None and now.token != self.me.token:
                    self.lost = now
                    return
                self._write()
            except Exception as err:  # noqa: BLE001 — a full disk, a lost object store: the next beat tries again
                log.warning(f"could not renew the lease {self.store.location(self.rel)}: {err}")

    def check(self) -> None:
        """Raise :class:`FolderBusy` when another command has taken the lease over (this one missed
        :data:`EXPIRES_S` seconds of beats: a suspended process, a host cut off from the results root)."""
        if self.lost is not None:
            raise FolderBusy(
                f"sweep {self.sweep!r} in {self.store.location()}: {self.lost.describe()} took this command's lease "
                f"over after more than {EXPIRES_S:.0f} s without a heartbeat from it (was it suspended, or cut off "
                f"from the results root?); stopping here, and the other command goes on")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this command's (and the sweep folder, when
        this command made it and left nothing else in it: a command refused before any work leaves no trace)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
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
