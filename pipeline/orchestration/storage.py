"""Where results live: a root that is a local path, a shared-filesystem path or a ``pyarrow.fs`` URI
(``file://``, ``s3://``, ``gs://``). Every file is written whole or not at all, so a reader never sees half.

On filesystems with an atomic rename (local and shared POSIX filesystems) a file is written to a hidden
temporary name and renamed. The temporary name starts with ``.`` (pyarrow and pandas skip hidden files)
and ends in ``.tmp``, not ``.parquet``: DuckDB's ``read_parquet('folder/*.parquet')`` globs hidden files
too, so a temporary file left by a crashed writer must not match the pattern. On object stores a single
PUT already replaces the object atomically, so the file is written directly.
"""
from __future__ import annotations

import errno
import os
import posixpath
import shutil
import time
import urllib.parse
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs


def temp_name(target: str) -> str:
    """The hidden name ``target`` is written under before the rename: ``<dir>/.<name>.<uuid>.tmp``."""
    folder, name = posixpath.split(target)
    return posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")


class StorageError(OSError):
    """An operation under the results root failed; the message names the root and the operation."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class StorageFull(StorageError):
    """The results root has no room (ENOSPC, or EDQUOT: a quota): no run is at fault, so the sweep stops
    with this one message, naming the root, the write and the free space it needed."""


FULL = (errno.ENOSPC, errno.EDQUOT)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def join_uri(uri: str, rel: str) -> str:
    """``rel`` appended to the path of ``uri``, before any ``?query`` (pyarrow's S3 and GCS options)."""
    base, sep, query = uri.partition("?")
    joined = base.rstrip("/") + ("/" + rel.strip("/") if rel.strip("/") else "")
    return joined + sep + query


def public_uri(uri: str) -> str:
    """``uri`` without ``user:secret@`` and without its ``?query``."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or "://" not in uri:
        return uri
    return urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


@dataclass(frozen=True)
class Store:
    """A results root: ``fs`` is a ``pyarrow.fs.FileSystem``, ``root`` a path inside it."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @staticmethod
    def open(uri: str) -> "Store":
        """Open a results root. A plain path is made absolute (so Ray workers agree on it)."""
        if "://" not in uri:
            uri = os.path.abspath(os.path.expanduser(uri))
        fs, root = pafs.FileSystem.from_uri(uri)
        return Store(fs, root.rstrip("/") or "/", uri)

    def location(self, rel: str = "") -> str:
        """``rel`` under the root as messages show it: a path, or a URI without its credentials and
        query (``s3://bucket/prefix/rel``), so that no secret reaches a log or a table."""
        return join_uri(public_uri(self.uri), rel)

    def uri_of(self, rel: str) -> str:
        """The full URI (credentials and query kept) of ``rel`` under the root: what :meth:`open` and
        the command-line tools take for a sweep folder."""
        return join_uri(self.uri, rel)

    @property
    def atomic_rename(self) -> bool:
        return self.fs.type_name == "local"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def free_bytes(self) -> int | None:
        """Free space where the root lives (local filesystems only; None on object stores)."""
        if not self.atomic_rename:
            return None
        path = self.root
        while not os.path.exists(path) and path != os.path.dirname(path):
            path = os.path.dirname(path)
        return shutil.disk_usage(path).free

    def error(self, err: OSError, operation: str, nbytes: int | None = None) -> StorageError:
        """``err`` of ``operation`` (e.g. ``writing sweep/runs/x.parquet``) as one message naming the root;
        a full disk or quota is a :class:`StorageFull` saying the free space the write needed."""
        code = err.errno if err.errno is not None else errno.EIO
        if code in FULL:
            free = self.free_bytes()
            room = "" if free is None else f"; {_size(free)} free there"
            need = f" ({_size(nbytes)})" if nbytes is not None else ""
            return StorageFull(code, f"results root {self.location()} is full: {operation}{need} failed{room}; free at "
                                     f"least {_size(nbytes or 0)} (a sweep's remaining runs need more) and run the "
                                     f"same command again to resume ({os.strerror(code)})")
        return StorageError(code, f"results root {self.location()}: {operation} failed: {err}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` (relative to the root) atomically, replacing any old file. Raises
        :class:`StorageError` (:class:`StorageFull` when out of room) naming the root and the file;
        nothing is left half-written."""
        try:
            self._write(rel, data)
        except StorageError:
            raise
        except OSError as err:
            raise self.error(err, f"writing {rel}", len(data)) from None

    def _write(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        folder = posixpath.dirname(target)
        self.fs.create_dir(folder, recursive=True)
        if not self.atomic_rename:
            with self.fs.open_output_stream(target) as out:
                out.write(data)
            return
        tmp = temp_name(target)
        try:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, target)
        finally:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def list_files(self, rel: str, suffix: str = "") -> list[str]:
        """Relative paths of the visible files directly under ``rel`` ending in ``suffix`` (sorted)."""
        return sorted(self.stamps(rel, suffix))

    def stamp(self, rel: str) -> tuple | None:
        """``(size, mtime)`` of one file as :meth:`stamps` gives it, None when there is none."""
        info = self.fs.get_file_info(self.path(rel))
        return (info.size, info.mtime_ns) if info.type == pafs.FileType.File else None

    def stamps(self, rel: str, suffix: str = "") -> dict[str, tuple]:
        """``{relative path: (size, mtime)}`` of the files :meth:`list_files` lists: what tells whether a
        file was rewritten since (an atomic rewrite replaces the file, so both change)."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        out = {}
        for info in self.fs.get_file_info(sel):
            name = posixpath.basename(info.path)
            if info.type == pafs.FileType.File and not name.startswith((".", "_")) and name.endswith(suffix):
                out[posixpath.join(rel, name)] = (info.size, info.mtime_ns)
        return out

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def remove_stale_temps(self, rel: str, older_than_s: float = 3600.0) -> int:
        """Delete temporary files (``.*.tmp``) under ``rel`` left by writers that crashed more than
        ``older_than_s`` seconds ago (a live writer renames its file within seconds). Returns how many."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        cutoff = time.time() - older_than_s
        removed = 0
        for info in self.fs.get_file_info(sel):
            name = posixpath.basename(info.path)
            if (info.type == pafs.FileType.File and name.startswith(".") and name.endswith(".tmp")
                    and info.mtime is not None and info.mtime.timestamp() < cutoff):
                self.fs.delete_file(info.path)
                removed += 1
        return removed

    def check_writable(self) -> None:
        """Raise ``PermissionError`` naming the root when a probe file cannot be written and removed."""
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.makedirs("")
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except StorageFull:
            raise
        except OSError as err:
            raise PermissionError(f"results root {self.location()!r} is not writable: {err}") from None
