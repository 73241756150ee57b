"""A results root on a full disk: one message naming the root, the write and the free space it needed; no
half-written file; the driver never crashes while recording a failure; freeing room and running the same
command again completes the sweep. The disk is a real, small tmpfs mounted by the test (root only)."""
from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from pipeline.orchestration import tables
from pipeline.orchestration.storage import Store, StorageFull


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {out.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs, unmounted after the test."""
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_tmpfs(disk, "4m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` with one file until ``leave`` bytes or fewer are free; return the file."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > leave:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_write_to_a_full_disk_names_the_root_the_file_and_the_room_it_needed(small_disk):
    store = Store.open(str(small_disk / "results"))
    store.write_bytes("s/runs/before.parquet", b"kept")
    fill(small_disk)
    with pytest.raises(StorageFull) as caught:
        store.write_bytes("s/runs/a.parquet", b"x" * 200_000)
    message = str(caught.value)
    assert message.startswith(f"results root {store.uri} is full: writing s/runs/a.parquet (200.0 kB) failed")
    assert "free at least 200.0 kB" in message and "No space left on device" in message
    assert "\n" not in message
    # nothing half-written: neither the file nor its temporary; what was there before is intact
    assert sorted(os.listdir(small_disk / "results" / "s" / "runs")) == ["before.parquet"]
    assert store.read_bytes("s/runs/before.parquet") == b"kept"


# Training in this process on one thread: two intra-op threads on a loaded 2-core machine spin-wait.
pytestmark = pytest.mark.usefixtures("one_thread")


SWEEP = ["sweep.name=full", "sweep.seeds=4", "optim.max_steps=4000", "stall.window=500", "figures=false"]


def test_a_sweep_that_fills_the_disk_stops_with_one_message_and_resumes_once_there_is_room(
        ray_session, small_disk, capsys, caplog):
    from conftest import compose_config
    from pipeline.orchestration import cli

    cfg = compose_config([f"results_root={small_disk / 'results'}", *SWEEP])
    folder = small_disk / "results" / "full"
    filled = {}

    def fill_after_the_first_run():
        deadline = time.monotonic() + 300
        while not list(folder.glob("runs/*.parquet")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        filled["file"] = fill(small_disk)

    filler = threading.Thread(target=fill_after_the_first_run)
    filler.start()
    code = cli.run(cfg)
    filler.join()
    err = capsys.readouterr().err
    assert "file" in filled, "the sweep ended before the disk was filled"
    assert code == 1, err
    # the CLI's messages go through logging (Hydra sends warnings and errors to stderr)
    lines = [r.getMessage() for r in caplog.records
             if r.levelno >= logging.WARNING and r.getMessage().startswith("minratio: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"results root {small_disk / 'results'} is full: writing full/" in lines[0]
    assert "free at least" in lines[0] and "run the same command again" in lines[0]
    # nothing half-written: every Parquet file reads, no temporary is left behind
    assert not [p for p in folder.rglob(".*.tmp")]
    for name in tables.TABLES:
        if (folder / name).exists():
            pd.read_parquet(folder / name)

    filled["file"].unlink()  # room again: the same command completes the sweep
    assert cli.run(cfg) == 0
    runs = pd.read_parquet(folder / "runs")
    assert sorted(runs["status"]) == ["ok"] * 4 and not runs.duplicated("run_id").any()
    points = pd.read_parquet(folder / "points")
    assert set(points["status"]) == {"ok"} and not points.duplicated(["run_id", "step", "stage"]).any()
