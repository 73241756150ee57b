"""Results on a real S3 protocol: a local S3-compatible server (moto's server mode, on 127.0.0.1, started
and stopped by a fixture), reached through pyarrow's S3 filesystem with an endpoint override. The whole
sweep runs against it: files appear whole (a reader polling during the sweep never fails), a driver killed
mid-sweep resumes to the tables of an uninterrupted sweep, compaction works, and pandas, DuckDB and polars
read the tables from it. Credentials travel in the URI (in-process sweep) or in AWS_* variables (a
``minratio-sweep`` process, whose Ray workers inherit them)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from pipeline.orchestration import tables
from pipeline.orchestration.storage import Store
from pipeline.orchestration.sweep import run_sweep
from test_faults import crash

REPO = Path(__file__).resolve().parent.parent
BUCKET, KEY, SECRET = "minratio", "testing", "testing-secret"
SWEEP = ["sweep.name=s3", "sweep.seeds=4", "optim.max_steps=4000", "stall.window=500", "figures=false"]
VOLATILE = ["written_at", "wall_seconds", "seconds", "build_seconds", "count_seconds", "node", "node_id",
            "resumed_from_step"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """``host:port`` of a moto S3 server holding an empty bucket ``minratio``; stopped after the session."""
    import moto

    version = tuple(int(x) for x in moto.__version__.split(".")[:3])
    # moto 5.2.1's CompleteMultipartUpload reply is refused by pyarrow's S3 client (getmoto/moto#10055)
    assert version >= (5, 2, 6), f"moto {moto.__version__} is installed; the [test] extra asks for >=5.2.6"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the moto server did not start"
            time.sleep(0.1)
    endpoint = f"127.0.0.1:{port}"
    fs, _ = pafs.FileSystem.from_uri(uri(endpoint, "") + "&allow_bucket_creation=true")
    fs.create_dir(BUCKET)
    yield endpoint
    server.terminate()
    server.wait(timeout=30)


def uri(endpoint: str, prefix: str) -> str:
    """A results root on the server, credentials and endpoint in the URI (pyarrow's S3 URI options)."""
    return f"s3://{KEY}:{SECRET}@{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def s3fs(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(access_key=KEY, secret_key=SECRET, endpoint_override=endpoint, scheme="http",
                             region="us-east-1")


def env_credentials(endpoint: str) -> dict:
    """The same server through the environment, as a cluster's nodes would be configured."""
    return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{endpoint}", "AWS_EC2_METADATA_DISABLED": "true"}


def frame(fs, folder: str, name: str) -> pd.DataFrame:
    df = pd.read_parquet(f"{folder}/{name}", filesystem=fs)
    assert not df.duplicated(list(tables.KEYS[name])).any(), f"duplicate keys in {name}"
    return df.drop(columns=VOLATILE, errors="ignore").sort_values(list(tables.KEYS[name])).reset_index(drop=True)


def assert_same_tables(fs, got: str, want: str) -> None:
    for name in ("runs", "points", "curves"):
        pd.testing.assert_frame_equal(frame(fs, got, name), frame(fs, want, name), check_exact=False, rtol=1e-9,
                                      obj=name)
    a, b = frame(fs, got, "spectra"), frame(fs, want, "spectra")
    pd.testing.assert_frame_equal(a.drop(columns="eigenvalues"), b.drop(columns="eigenvalues"), obj="spectra")
    for x, y in zip(a["eigenvalues"], b["eigenvalues"]):
        np.testing.assert_allclose(x, y, rtol=1e-8, atol=1e-10 * np.abs(y).max())


# Training in this process on one thread: two intra-op threads on a loaded 2-core machine spin-wait.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def s3_sweep(ray_session, s3_endpoint):
    """The sweep run once on S3 while a reader polls its tables: ``(summary, what the reader saw)``."""
    from conftest import compose_config

    fs, folder, seen = s3fs(s3_endpoint), f"{BUCKET}/whole/s3", {"reads": 0, "errors": [], "temporaries": []}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for name in ("runs", "points"):
                try:
                    infos = fs.get_file_info(pafs.FileSelector(f"{folder}/{name}", allow_not_found=True))
                    seen["temporaries"] += [i.path for i in infos if i.path.endswith(".tmp")]
                    if any(i.path.endswith(".parquet") for i in infos):
                        pd.read_parquet(f"{folder}/{name}", filesystem=fs)
                        seen["reads"] += 1
                except FileNotFoundError:
                    pass  # a file listed, then replaced by its task's retry: not a partial file
                except Exception as err:  # noqa: BLE001 — any other failure is what this test looks for
                    seen["errors"].append(f"{type(err).__name__}: {err}")
            time.sleep(0.05)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        summary = run_sweep(compose_config([f"results_root='{uri(s3_endpoint, 'whole')}'", *SWEEP]))
    finally:
        stop.set()
        reader.join()
    return summary, seen


def test_a_sweep_on_s3_writes_whole_files_a_reader_can_always_read(s3_sweep):
    summary, seen = s3_sweep
    assert summary.run_status == {"ok": 4} and summary.points_failed == 0 and summary.points >= 4
    assert summary.root.startswith("s3://") and "minratio/whole" in summary.root
    assert seen["reads"] > 0 and seen["errors"] == [] and seen["temporaries"] == []


def test_pandas_duckdb_and_polars_read_the_tables_from_s3(s3_sweep, s3_endpoint):
    import duckdb
    import polars as pl

    summary, _ = s3_sweep
    fs, folder = s3fs(s3_endpoint), f"{BUCKET}/whole/s3"
    want = tables.read(Store.open(uri(s3_endpoint, "whole")), "s3", "points").num_rows
    assert want == summary.points
    assert len(pd.read_parquet(f"{folder}/points", filesystem=fs)) == want
    points = ds.dataset(f"{folder}/points", filesystem=fs, format="parquet")  # noqa: F841 — DuckDB scans it
    assert duckdb.sql("select count(*) from points where status = 'ok'").fetchall() == [(want,)]
    options = {"aws_access_key_id": KEY, "aws_secret_access_key": SECRET, "aws_region": "us-east-1",
               "aws_endpoint_url": f"http://{s3_endpoint}", "aws_allow_http": "true"}
    df = pl.read_parquet(f"s3://{folder}/points/*.parquet", storage_options=options)
    assert df.height == want and set(df["status"]) == {"ok"}


def test_compaction_on_s3_keeps_every_row_and_the_folder_verifies(s3_sweep, s3_endpoint):
    s3_sweep  # noqa: B018 — the sweep must have run
    store, fs = Store.open(uri(s3_endpoint, "whole")), s3fs(s3_endpoint)
    folder = f"{BUCKET}/whole/s3"
    before = {name: frame(fs, folder, name) for name in tables.TABLES}
    for name in tables.TABLES:
        files, rows = tables.compact(store, "s3", name)
        assert files > 1 and rows == len(before[name])
        assert len(store.list_files(f"s3/{name}", ".parquet")) == 1  # no failed rows: one merged file
        pd.testing.assert_frame_equal(frame(fs, folder, name), before[name], obj=name)
    verify = subprocess.run([sys.executable, "-c", "from pipeline.orchestration.cli import verify_main; verify_main()",
                             store.uri_of("s3")], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and "clean:" in verify.stdout, verify.stdout + verify.stderr
    assert SECRET not in verify.stdout  # messages show the URI without its credentials


def objects(fs, folder: str) -> int:
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sum(i.path.endswith(".parquet") for i in infos)


@pytest.mark.slow
def test_a_driver_killed_mid_sweep_on_s3_resumes_to_the_uninterrupted_tables(s3_sweep, s3_endpoint, tmp_path):
    """The driver's credentials and endpoint come from AWS_* variables: its local Ray workers see them."""
    s3_sweep  # noqa: B018 — the uninterrupted tables to compare with
    fs = s3fs(s3_endpoint)
    cmd = [sys.executable, "-m", "pipeline", f"results_root=s3://{BUCKET}/killed", *SWEEP, "sweep.progress=plain",
           "ray.num_cpus=2", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, **env_credentials(s3_endpoint)}
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 240
    while objects(fs, f"{BUCKET}/killed/s3/runs") < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    crash(driver)  # the driver, its local Ray and that Ray's workers die at once
    finished = objects(fs, f"{BUCKET}/killed/s3/runs")
    assert 2 <= finished < 4, f"the driver was to be killed mid-sweep, {finished} of 4 runs had finished"

    # Resumed in this process on the session's Ray, credentials in the URI (tests/test_faults.py re-runs the
    # same command as a process of its own).
    from conftest import compose_config

    summary = run_sweep(compose_config([f"results_root='{uri(s3_endpoint, 'killed')}'", *SWEEP]))
    assert (summary.runs_total, summary.runs_skipped) == (4, finished)
    assert summary.run_status == {"ok": 4} and summary.points_failed == 0
    assert summary.root.startswith("s3://") and "minratio/killed" in summary.root
    assert_same_tables(fs, f"{BUCKET}/killed/s3", f"{BUCKET}/whole/s3")


def test_the_folder_lease_holds_on_s3(s3_sweep, s3_endpoint, caplog):
    """Of commands starting together on an object store (no rename, no file lock) one holds the folder and
    the others are refused naming it; a finished sweep has left no lease behind."""
    from pipeline.orchestration.lease import LEASE, Lease
    from test_lease import race

    s3_sweep  # noqa: B018 — the sweep must have run
    store = Store.open(uri(s3_endpoint, "whole"))
    assert store.exists("s3/runs") and not store.exists(f"s3/{LEASE}")
    winners, refused = race(store, "s3")
    assert len(winners) == 1 and len(refused) == 2, (winners, refused)
    assert all("is being written by minratio-sweep" in str(err) for err in refused)
    assert SECRET not in " ".join(map(str, refused))  # the message names the root without its credentials
    winners[0].release()
    assert not store.exists(f"s3/{LEASE}") and store.exists("s3/runs")

    caplog.set_level("INFO", logger="minratio")
    Lease(store, "refused", "minratio-sweep").acquire().release()  # a command refused before any work
    assert not store.exists("refused") and "lease" not in caplog.text
