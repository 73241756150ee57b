"""Parquet tables: concurrent writers lose nothing, crash leftovers are never data, old files keep their
columns, every common reader sees the same rows, and ``compact`` neither loses nor duplicates a row."""
from __future__ import annotations

import io
import os
import warnings

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.orchestration import tables
from pipeline.orchestration.storage import Store, temp_name

SWEEP = "s"


def run_rows(n: int, status: str = "ok", offset: int = 0) -> list[dict]:
    return [{"run_id": f"run{i:03d}", "seed": i, "status": status, "final_loss": 0.5 * i, "steps": 10 * i}
            for i in range(offset, offset + n)]


def write_each(store: Store, rows: list[dict], name: str = "runs") -> None:
    for row in rows:
        tables.write(store, SWEEP, name, [row])


def by_key(table: pa.Table, name: str = "runs") -> pd.DataFrame:
    df = table.to_pandas() if isinstance(table, pa.Table) else table
    return df.sort_values(list(tables.KEYS[name])).reset_index(drop=True)


def test_many_ray_tasks_writing_one_table_lose_nothing(ray_session, tmp_path):
    ray = ray_session
    store = Store.open(str(tmp_path))

    def write_run(uri: str, i: int, value: float):
        tables.write(Store.open(uri), SWEEP, "runs", [{"run_id": f"run{i:03d}", "status": "ok",
                                                      "final_loss": value}])

    task = ray.remote(num_cpus=0.5)(write_run)  # four writers at a time on two CPUs
    distinct = [task.remote(store.uri, i, float(i)) for i in range(32)]
    # Eight attempts of one task (retries, a zombie first attempt) racing on the same key.
    racing = [task.remote(store.uri, 999, 100.0 + k) for k in range(8)]
    ray.get(distinct + racing)

    df = by_key(tables.read(store, SWEEP, "runs"))
    assert len(df) == 33 and df["run_id"].is_unique
    assert df.set_index("run_id")["final_loss"].drop("run999").tolist() == [float(i) for i in range(32)]
    assert df.set_index("run_id").loc["run999", "final_loss"] in [100.0 + k for k in range(8)]
    assert len(os.listdir(tmp_path / SWEEP / "runs")) == 33  # one file per key, no temporaries left


def test_a_temporary_file_left_by_a_crashed_writer_is_never_read(tmp_path):
    store = Store.open(str(tmp_path))
    write_each(store, run_rows(3))
    # What a writer killed mid-write leaves behind: the first half of a Parquet file under its temp name.
    buf = io.BytesIO()
    pq.write_table(tables.to_table("runs", run_rows(1, offset=7)), buf)
    target = store.path(f"{SWEEP}/runs/run007.parquet")
    with open(temp_name(target), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])

    folder = store.path(f"{SWEEP}/runs")
    expected = ["run000", "run001", "run002"]
    assert sorted(tables.read(store, SWEEP, "runs").column("run_id").to_pylist()) == expected
    assert sorted(pd.read_parquet(folder)["run_id"]) == expected
    assert sorted(ds.dataset(folder, format="parquet").to_table().column("run_id").to_pylist()) == expected
    got = duckdb.sql(f"select run_id from read_parquet('{folder}/*.parquet') order by run_id").fetchall()
    assert [r[0] for r in got] == expected


@pytest.mark.parametrize("batch_files", [2, tables.READ_BATCH_FILES])
def test_a_visible_file_cut_off_is_skipped_with_a_warning_then_rewritten(tmp_path, monkeypatch, batch_files):
    monkeypatch.setattr(tables, "READ_BATCH_FILES", batch_files)  # files are read in batches of this many
    store = Store.open(str(tmp_path))
    write_each(store, run_rows(3))
    path = tmp_path / SWEEP / "runs" / "run001.parquet"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 40])  # a copy interrupted by hand: footer missing

    with pytest.warns(UserWarning, match="run001.parquet: not a readable Parquet file"):
        ids = tables.read(store, SWEEP, "runs").column("run_id").to_pylist()
    assert sorted(ids) == ["run000", "run002"]
    with pytest.warns(UserWarning):
        assert ("run001",) not in tables.done_keys(store, SWEEP, "runs")  # so a resume redoes it

    write_each(store, run_rows(1, offset=1))  # the redone run replaces the damaged file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(tables.read(store, SWEEP, "runs").column("run_id").to_pylist()) == [
            "run000", "run001", "run002"]


def older_points_schema() -> pa.Schema:
    """The ``points`` schema of version 1, before ``node_id`` existed."""
    return pa.schema([f for f in tables.SCHEMAS["points"] if f.name != "node_id"])


def test_a_column_missing_from_older_files_reads_as_null_and_is_not_lost(tmp_path):
    store = Store.open(str(tmp_path))
    old = tables.to_table("points", [{"run_id": "old", "step": 5, "stage": "final", "n_pos": 3,
                                      "min_ratio": 0.75}]).select(older_points_schema().names)
    old = old.set_column(old.schema.get_field_index("schema_version"), "schema_version",
                         pa.array([1], pa.int32()))
    folder = tmp_path / SWEEP / "points"
    folder.mkdir(parents=True)
    pq.write_table(old, folder / "aaa-old-first.parquet")  # sorts first: a reader could take its schema
    tables.write(store, SWEEP, "points", [{"run_id": "new", "step": 5, "stage": "final", "n_pos": 4,
                                           "min_ratio": 1.0, "node_id": "abc123"}])

    df = by_key(tables.read(store, SWEEP, "points"), "points").set_index("run_id")
    assert df.loc["new", "node_id"] == "abc123" and pd.isna(df.loc["old", "node_id"])
    assert df.loc["old", "n_pos"] == 3 and df.loc["old", "schema_version"] == 1
    assert df.loc["new", "schema_version"] == tables.SCHEMA_VERSION

    # Readers outside the project: give them the declared schema, or union the files by name.
    pdf = pd.read_parquet(folder, schema=tables.SCHEMAS["points"])
    assert pdf.set_index("run_id").loc["new", "node_id"] == "abc123"
    got = duckdb.sql(f"select run_id, node_id from read_parquet('{folder}/*.parquet', union_by_name=true) "
                     "order by run_id").fetchall()
    assert got == [("new", "abc123"), ("old", None)]
    import polars as pl

    schema = pl.from_arrow(tables.SCHEMAS["points"].empty_table()).schema
    got = pl.read_parquet(f"{folder}/*.parquet", missing_columns="insert", schema=schema).sort("run_id")
    assert got.select("run_id", "node_id").rows() == [("new", "abc123"), ("old", None)]
    # After compaction one file holds the full schema, so even a plain read keeps the column.
    tables.compact(store, SWEEP, "points")
    assert pd.read_parquet(folder).set_index("run_id").loc["new", "node_id"] == "abc123"


def test_compact_gives_a_failed_rows_old_file_the_current_columns(tmp_path):
    """A failed row keeps its own key-named file through compaction, but an older version's file (no
    node_id) sorting first would hand plain readers its columns: compact rewrites it with all of them,
    once."""
    store = Store.open(str(tmp_path))
    old = tables.to_table("points", [{"run_id": "0a1b2c3d4e5f", "step": 5, "stage": "stalled",
                                      "status": "failed"}]).select(older_points_schema().names)
    folder = tmp_path / SWEEP / "points"
    folder.mkdir(parents=True)
    pq.write_table(old, folder / "0a1b2c3d4e5f-5-stalled.parquet")
    for i in range(3):
        tables.write(store, SWEEP, "points", [{"run_id": f"r{i}", "step": 5, "stage": "stalled", "status": "ok",
                                               "node_id": "abc"}])
    tables.compact(store, SWEEP, "points")
    assert "node_id" in pd.read_parquet(folder).columns
    assert "node_id" in duckdb.sql(f"select * from read_parquet('{folder}/*.parquet')").df().columns
    stamps = store.stamps(f"{SWEEP}/points", ".parquet")
    assert len(stamps) == 2  # the merged ok rows and the failed row's own file
    tables.compact(store, SWEEP, "points")
    assert store.stamps(f"{SWEEP}/points", ".parquet") == stamps  # nothing left to do


def test_a_column_from_a_newer_version_does_not_break_reading(tmp_path):
    store = Store.open(str(tmp_path))
    newer = tables.to_table("runs", run_rows(1)).append_column("added_later", pa.array([1.5]))
    (tmp_path / SWEEP / "runs").mkdir(parents=True)
    pq.write_table(newer, tmp_path / SWEEP / "runs" / "run000.parquet")
    write_each(store, run_rows(2, offset=1))
    table = tables.read(store, SWEEP, "runs")
    assert table.schema.equals(tables.SCHEMAS["runs"]) and table.num_rows == 3


def test_pandas_pyarrow_duckdb_and_the_project_reader_see_the_same_rows(tmp_path):
    store = Store.open(f"file://{tmp_path}")  # a URI root, as on a cluster
    write_each(store, run_rows(12))
    folder = str(tmp_path / SWEEP / "runs")
    ours = by_key(tables.read(store, SWEEP, "runs"))[["run_id", "final_loss"]]
    pandas_df = by_key(pd.read_parquet(folder))[["run_id", "final_loss"]]
    arrow_df = by_key(ds.dataset(folder, format="parquet").to_table())[["run_id", "final_loss"]]
    duck_df = by_key(duckdb.sql(f"select * from read_parquet('{folder}/*.parquet')").df())[
        ["run_id", "final_loss"]]
    assert len(ours) == 12
    for other in (pandas_df, arrow_df, duck_df):
        pd.testing.assert_frame_equal(ours, other)


def test_the_latest_row_of_a_key_wins(tmp_path):
    store = Store.open(str(tmp_path))
    tables.write(store, SWEEP, "runs", [{"run_id": "r", "status": "failed", "error": "boom"}], stem="attempt1")
    tables.write(store, SWEEP, "runs", [{"run_id": "r", "status": "ok"}], stem="attempt2")
    table = tables.read(store, SWEEP, "runs")
    assert table.num_rows == 1 and table.column("status").to_pylist() == ["ok"]
    assert tables.read(store, SWEEP, "runs", dedupe=False).num_rows == 2
    assert tables.done_keys(store, SWEEP, "runs") == {("r",)}


def test_reading_some_columns_keeps_the_key_and_the_latest_row(tmp_path):
    store = Store.open(str(tmp_path))
    write_each(store, run_rows(3, status="failed"))
    tables.write(store, SWEEP, "runs", [run_rows(1, status="ok", offset=1)[0]], stem="retry")
    table = tables.read(store, SWEEP, "runs", columns=["status"])
    assert table.column_names == ["run_id", "status", "written_at"]
    assert dict(zip(*table.select(["run_id", "status"]).to_pydict().values())) == {
        "run000": "failed", "run001": "ok", "run002": "failed"}
    assert tables.read(Store.open(str(tmp_path / "empty")), SWEEP, "runs", columns=["status"]).num_rows == 0


def test_compact_loses_and_duplicates_nothing(tmp_path):
    store = Store.open(str(tmp_path))
    write_each(store, run_rows(20, status="failed"))
    for row in run_rows(5, status="ok", offset=3):  # rewritten keys in other files (e.g. an earlier part)
        tables.write(store, SWEEP, "runs", [row], stem=f"part-rerun-{row['run_id']}")
    before = by_key(tables.read(store, SWEEP, "runs"))

    assert tables.compact(store, SWEEP, "runs") == (25, 20)
    files = store.list_files(f"{SWEEP}/runs", ".parquet")
    # the 5 finished rows in one merged file; the 15 failed ones keep the files their retries will replace
    failed = [f"{SWEEP}/runs/run{i:03d}.parquet" for i in range(20) if not 3 <= i < 8]
    merged = [f for f in files if f not in failed]
    assert len(files) == 16 and len(merged) == 1 and pq.read_table(store.path(merged[0])).num_rows == 5
    after = by_key(tables.read(store, SWEEP, "runs"))
    pd.testing.assert_frame_equal(before, after)
    assert (after["status"] == "ok").sum() == 5
    assert tables.compact(store, SWEEP, "runs") == (16, 20)  # idempotent: nothing left to merge
    assert store.list_files(f"{SWEEP}/runs", ".parquet") == files

    # A crash after a merged file was written but before the small files went: duplicates on disk, one
    # row per key when read, and the next compact removes them.
    tables.write(store, SWEEP, "runs", run_rows(5, status="ok", offset=3), stem="part-leftover")
    write_each(store, run_rows(1, status="ok", offset=30))
    assert tables.read(store, SWEEP, "runs").num_rows == 21
    assert tables.compact(store, SWEEP, "runs") == (18, 21)
    final = by_key(tables.read(store, SWEEP, "runs"))
    assert final["run_id"].is_unique and len(final) == 21
    assert len(store.list_files(f"{SWEEP}/runs", ".parquet")) == 16


def test_a_retry_after_compaction_leaves_one_row_per_key_for_every_reader(tmp_path):
    """pandas, DuckDB and polars do not de-duplicate: a failed row merged into a part file would stay
    beside its retry's row. Compaction leaves failed rows in their own files (and moves one out of an
    older part file), which the retry then replaces."""
    import polars as pl

    store = Store.open(str(tmp_path))
    write_each(store, run_rows(2, status="ok"))
    write_each(store, run_rows(2, status="failed", offset=2))
    tables.write(store, SWEEP, "runs", run_rows(1, status="failed", offset=4), stem="part-older-compaction")
    tables.compact(store, SWEEP, "runs")
    write_each(store, run_rows(3, status="ok", offset=2))  # the resume retries the failed keys
    folder = tmp_path / SWEEP / "runs"
    for reader, df in (("pandas", pd.read_parquet(folder)),
                       ("duckdb", duckdb.sql(f"select * from read_parquet('{folder}/*.parquet')").df()),
                       ("polars", pl.read_parquet(f"{folder}/*.parquet").to_pandas())):
        assert sorted(df["run_id"]) == [f"run{i:03d}" for i in range(5)], reader
        assert (df["status"] == "ok").all(), reader


def test_compact_leaves_alone_what_a_writer_changed_after_it_read(tmp_path, monkeypatch):
    """A file rewritten between compact's read and its deletes is neither deleted nor overwritten."""
    store = Store.open(str(tmp_path))
    write_each(store, run_rows(2, status="ok"))
    tables.write(store, SWEEP, "runs", run_rows(1, status="failed", offset=2), stem="part-older-compaction")
    read_files = tables._read_files

    def then_a_sweep_writes(*args, **kwargs):
        out = read_files(*args, **kwargs)
        tables.write(store, SWEEP, "runs", [{**run_rows(1, offset=1)[0], "final_loss": -1.0}])
        write_each(store, run_rows(1, status="ok", offset=2))  # run002's retry, in its own file
        return out

    monkeypatch.setattr(tables, "_read_files", then_a_sweep_writes)
    tables.compact(store, SWEEP, "runs")
    monkeypatch.undo()
    files = store.list_files(f"{SWEEP}/runs", ".parquet")
    assert f"{SWEEP}/runs/run000.parquet" not in files  # merged and deleted
    assert {f"{SWEEP}/runs/run001.parquet", f"{SWEEP}/runs/run002.parquet"} <= set(files)
    df = by_key(tables.read(store, SWEEP, "runs")).set_index("run_id")
    assert df.loc["run001", "final_loss"] == -1.0 and df.loc["run002", "status"] == "ok"


def test_unknown_columns_are_an_error_naming_them():
    with pytest.raises(KeyError, match="final_los"):
        tables.to_table("runs", [{"run_id": "r", "final_los": 1.0}])


def test_the_runs_row_leaves_keys_its_model_and_data_do_not_read_empty():
    from omegaconf import OmegaConf

    from conftest import compose_config

    cfg = compose_config(["model=torch", "model._target_=usernets.nets.SmallResNet", "data=torch",
                          "data._target_=usernets.data.blobs"])
    cols = tables.config_columns(OmegaConf.to_container(cfg, resolve=True))
    assert cols["model_width"] is None and cols["data_n_features"] is None and cols["data_side"] is None
    assert cols["model_target"] == "usernets.nets.SmallResNet" and cols["data_n_classes"] == 0
    digits = tables.config_columns(OmegaConf.to_container(compose_config(), resolve=True))
    assert digits["data_side"] == 4 and digits["data_n_classes"] is None and digits["model_width"] == 8
