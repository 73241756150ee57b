"""The results root: whole-file writes, hidden temporary names, URIs, and the writable check."""
from __future__ import annotations

import os
import threading
import time

import pytest

from pipeline.orchestration.storage import Store, temp_name


def test_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    store = Store.open(str(tmp_path / "root"))
    store.write_bytes("sweep/runs/a.parquet", b"first version")
    store.write_bytes("sweep/runs/a.parquet", b"second")
    assert store.read_bytes("sweep/runs/a.parquet") == b"second"
    assert sorted(os.listdir(tmp_path / "root" / "sweep" / "runs")) == ["a.parquet"]


def test_concurrent_writers_of_one_file_leave_one_complete_payload(tmp_path):
    # A retried task and its zombie first attempt may write the same file at once.
    store = Store.open(str(tmp_path))
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=store.write_bytes, args=("t/x.parquet", p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.read_bytes("t/x.parquet") in payloads
    assert os.listdir(tmp_path / "t") == ["x.parquet"]


def test_temporary_names_are_hidden_and_do_not_match_the_parquet_glob():
    name = os.path.basename(temp_name("/r/sweep/points/abc-10-final.parquet"))
    assert name.startswith(".") and name.endswith(".tmp") and "abc-10-final.parquet" in name
    assert temp_name("/r/x.parquet") != temp_name("/r/x.parquet")


def test_listing_skips_hidden_and_underscore_files(tmp_path):
    store = Store.open(str(tmp_path))
    for name in ["b.parquet", "a.parquet", "notes.txt", "_SUCCESS", ".a.parquet.123.tmp", ".hidden.parquet"]:
        (tmp_path / name).write_bytes(b"x")
    assert store.list_files("", ".parquet") == ["a.parquet", "b.parquet"]
    assert store.list_files("missing-folder") == []


def test_stale_temporaries_are_removed_fresh_ones_and_data_kept(tmp_path):
    store = Store.open(str(tmp_path))
    old, fresh, data = tmp_path / ".a.parquet.1.tmp", tmp_path / ".b.parquet.2.tmp", tmp_path / "c.parquet"
    for p in (old, fresh, data):
        p.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert store.remove_stale_temps("", older_than_s=3600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.parquet.2.tmp", "c.parquet"]


def test_file_uri_and_relative_path(tmp_path, monkeypatch):
    store = Store.open(f"file://{tmp_path}/uri-root")
    assert store.atomic_rename  # file:// is the local filesystem: temp file + rename
    store.write_bytes("s/x.bin", b"payload")
    assert (tmp_path / "uri-root" / "s" / "x.bin").read_bytes() == b"payload"
    assert store.exists("s/x.bin") and not store.exists("s/y.bin")

    monkeypatch.chdir(tmp_path)
    rel = Store.open("results")
    assert rel.uri == str(tmp_path / "results")  # absolute, so Ray workers in other cwds agree


def test_writable_check_passes_and_leaves_nothing(tmp_path):
    store = Store.open(str(tmp_path / "new-root"))
    store.check_writable()
    assert os.listdir(tmp_path / "new-root") == []


def test_unwritable_root_is_refused_naming_it(tmp_path):
    # A path below a regular file can never be created, even by root (chmod would not stop root).
    (tmp_path / "a-file").write_text("not a folder")
    store = Store.open(str(tmp_path / "a-file" / "results"))
    with pytest.raises(PermissionError, match="a-file/results.*not writable"):
        store.check_writable()
