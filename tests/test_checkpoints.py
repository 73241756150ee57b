"""Checkpoints are verified artefacts: each has a record (size and SHA-256) beside it; a resume checks
every checkpoint of a finished run against it, names a missing or damaged file in one line, trains that
run again from its start and lets everything else go on; the tables end equal to an undamaged sweep's."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.orchestration import jobs, tables
from pipeline.orchestration.plan import expand
from pipeline.orchestration.storage import Store
from pipeline.orchestration.sweep import plan_resume, run_sweep

SWEEP = ["sweep.name=ck", "sweep.seeds=2", "optim.max_steps=1500", "stall.window=300", "figures=false"]


# Training in this process on one thread: two intra-op threads on a loaded 2-core machine spin-wait.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory):
    """A finished sweep (its config and results folder), to be copied by each test before damaging it."""
    from conftest import compose_config

    root = tmp_path_factory.mktemp("finished")
    cfg = compose_config([f"results_root={root}", *SWEEP])
    summary = run_sweep(cfg)
    assert summary.run_status == {"ok": 2} and summary.points_failed == 0
    return cfg, root


def copy_of(finished, tmp_path):
    from conftest import compose_config

    cfg, root = finished
    shutil.copytree(root, tmp_path / "r")
    cfg = compose_config([f"results_root={tmp_path / 'r'}", *SWEEP])
    return cfg, Store.open(str(tmp_path / "r")), tmp_path / "r" / "ck"


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoints/*/*.pt"))


def point_rows(folder: Path) -> pd.DataFrame:
    return tables.read(Store.open(str(folder.parent)), "ck", "points").to_pandas()


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    volatile = ["written_at", "seconds", "build_seconds", "count_seconds", "node", "node_id", "wall_seconds"]
    keys = [k for k in ("run_id", "step") if k in df.columns]
    return df.drop(columns=volatile, errors="ignore").sort_values(keys).reset_index(drop=True)


def test_every_checkpoint_has_a_record_of_its_size_and_hash(finished):
    _, root = finished
    files = checkpoints(root / "ck")
    assert len(files) >= 2
    for f in files:
        record = json.loads(Path(str(f) + ".json").read_text())
        data = f.read_bytes()
        assert record["bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["step"] == torch.load(f, weights_only=True)["step"]


@pytest.mark.parametrize("damage", ["deleted", "corrupted", "deleted with its record"])
def test_a_damaged_checkpoint_of_an_analysed_point_is_named_and_its_run_redone(finished, tmp_path, caplog, damage):
    cfg, store, folder = copy_of(finished, tmp_path)
    victim = checkpoints(folder)[0]
    run_id = victim.parent.name
    if damage == "corrupted":  # the same size, a few bytes changed: only the hash tells
        data = bytearray(victim.read_bytes())
        data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
        if damage == "deleted with its record":
            Path(str(victim) + ".json").unlink()
    with caplog.at_level(logging.WARNING):
        todo, missing = plan_resume(store, "ck", expand(cfg))
    assert [run.run_id for run in todo] == [run_id] and missing == []
    lines = [r.getMessage() for r in caplog.records if str(victim.relative_to(tmp_path)) in r.getMessage()]
    assert len(lines) == 1 and ("missing" in lines[0] or "damaged" in lines[0]) and "trained again" in lines[0]


def test_a_truncated_checkpoint_of_a_point_not_yet_analysed_is_named_and_the_rest_goes_on(finished, tmp_path, caplog):
    """The issue's case: the re-run used to stop with a raw PytorchStreamReader traceback from plan_resume."""
    cfg, store, folder = copy_of(finished, tmp_path)
    want_points = comparable(point_rows(folder))
    want_runs = comparable(tables.read(store, "ck", "runs").to_pandas())
    files = checkpoints(folder)
    victim = files[0]
    other = next(f for f in files if f.parent != victim.parent)  # a point of the other run, also not analysed
    for f in (victim, other):
        step = int(f.stem.split("-")[1])
        stage = "stalled" if json.loads(Path(str(f) + ".json").read_text())["stalled"] else "final"
        (folder / "points" / f"{f.parent.name}-{step}-{stage}.parquet").unlink()
    victim.write_bytes(victim.read_bytes()[:100])

    with caplog.at_level(logging.WARNING):
        todo, missing = plan_resume(store, "ck", expand(cfg))
    assert [run.run_id for run in todo] == [victim.parent.name]
    assert [(m.run_id, m.path) for m in missing] == [(other.parent.name, str(other.relative_to(tmp_path / "r")))]
    assert any(str(victim.relative_to(tmp_path)) in r.getMessage() and "damaged" in r.getMessage()
               for r in caplog.records)

    summary = run_sweep(cfg)  # the damaged run is trained again, the other run's point analysed
    assert summary.run_status == {"ok": 2} and summary.points_failed == 0
    jobs.checked_bytes(store, str(victim.relative_to(tmp_path / "r")))  # re-made, matching its new record
    pd.testing.assert_frame_equal(comparable(point_rows(folder)), want_points, check_exact=False, rtol=1e-9)
    runs = comparable(tables.read(store, "ck", "runs").to_pandas())
    pd.testing.assert_frame_equal(runs.drop(columns="resumed_from_step"), want_runs.drop(columns="resumed_from_step"))


def test_a_deleted_checkpoint_of_an_analysed_point_is_made_again_by_the_rerun(finished, tmp_path):
    cfg, store, folder = copy_of(finished, tmp_path)
    want = comparable(point_rows(folder))
    victim = checkpoints(folder)[-1]
    data = victim.read_bytes()
    victim.unlink()
    summary = run_sweep(cfg)
    assert summary.run_status == {"ok": 2} and summary.points_failed == 0
    assert victim.read_bytes() == data  # training is deterministic: the same bytes again
    pd.testing.assert_frame_equal(comparable(point_rows(folder)), want, check_exact=False, rtol=1e-9)


def test_a_run_redone_after_compaction_leaves_every_key_once_for_plain_readers(finished, tmp_path):
    """Compaction merges the finished rows into part files; a run trained again later (its checkpoint was
    damaged) writes key-named files, and its old rows must leave the part files, or pandas, DuckDB and polars
    see its keys twice and minratio-verify calls the folder damaged."""
    from pipeline.orchestration import verify

    cfg, store, folder = copy_of(finished, tmp_path)
    for name in tables.TABLES:
        tables.compact(store, "ck", name)
    want = {name: len(pd.read_parquet(folder / name)) for name in tables.TABLES}
    victim = checkpoints(folder)[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"x")
    summary = run_sweep(cfg)
    assert summary.run_status == {"ok": 2} and summary.points_failed == 0
    for name in tables.TABLES:
        plain = pd.read_parquet(folder / name)
        assert len(plain) == want[name] and not plain.duplicated(list(tables.KEYS[name])).any(), name
        assert victim.parent.name in set(plain["run_id"])
    assert verify.verify(store, "ck").clean


def test_a_hessian_task_given_a_damaged_checkpoint_fails_that_point_alone_naming_the_file(make_cfg):
    from conftest import two_stalls

    store, refs = two_stalls(make_cfg, "bad")
    path = Path(store.path(refs[0].path))
    path.write_bytes(path.read_bytes()[:-10])
    assert jobs.hessian_job(store.uri, "bad", refs[:2]) == 1
    points = tables.read(store, "bad", "points").to_pandas().set_index("step")
    assert points.loc[refs[1].step, "status"] == "ok"
    error = points.loc[refs[0].step, "error"]
    assert points.loc[refs[0].step, "status"] == "failed" and str(path) in error and "damaged" in error


def test_a_resumed_training_task_rewrites_its_damaged_checkpoints_from_the_saved_state(make_cfg, caplog):
    from pipeline.orchestration.train import train

    cfg = make_cfg(["sweep.seeds=1", "optim.max_steps=1500", "stall.window=100"])
    (run,) = expand(cfg)
    store, states = Store.open(cfg.results_root), []
    train(run.config, run.seed, on_state=states.append, state_every_s=0.0)
    state = next(s for s in states if s.checkpoints)
    for ck in state.checkpoints:
        jobs.save_checkpoint(store, "s", run, ck)
    jobs.save_state(store, "s", run.run_id, state)
    first = jobs.checkpoint_path("s", run.run_id, state.checkpoints[0].step)
    good = store.read_bytes(first)
    store.write_bytes(first, b"garbage")
    with caplog.at_level(logging.WARNING):
        status, refs = jobs.train_job(store.uri, "s", run)
    assert status == "ok" and store.read_bytes(first) == good
    assert any(first in r.getMessage() and "saved training state" in r.getMessage() for r in caplog.records)


def test_an_unreadable_training_state_is_named_and_the_run_starts_again(make_cfg, caplog):
    cfg = make_cfg(["sweep.seeds=1", "optim.max_steps=300", "stall.window=100"])
    (run,) = expand(cfg)
    store = Store.open(cfg.results_root)
    store.write_bytes(jobs.state_path("s", run.run_id), b"PK\x03\x04 cut off")
    with caplog.at_level(logging.WARNING):
        status, _ = jobs.train_job(store.uri, "s", run)
    assert status == "ok"
    assert any(jobs.state_path("s", run.run_id) in r.getMessage() and "step 0" in r.getMessage()
               for r in caplog.records)
    assert tables.read(store, "s", "runs").column("resumed_from_step").to_pylist() == [None]


# --------------------------------------------------------------------------------------------------
# minratio-verify: the whole folder checked, each problem named with the rows that refer to it.

def verify_cli(folder: Path, capsys) -> subprocess.CompletedProcess:
    """``minratio-verify FOLDER`` run in this process (tests/test_s3.py runs it as its own process): its exit
    code, stdout and stderr."""
    from pipeline.orchestration.cli import verify_main

    argv, sys.argv = sys.argv, ["minratio-verify", str(folder)]
    try:
        with pytest.raises(SystemExit) as exit_:
            verify_main()
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["minratio-verify", str(folder)], exit_.value.code, out.out, out.err)


def test_verify_reports_a_clean_sweep_as_clean(finished, tmp_path, capsys):
    _, store, folder = copy_of(finished, tmp_path)
    out = verify_cli(folder, capsys)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "clean:" in out.stdout and "DAMAGED" not in out.stdout
    assert f"checkpoints: {len(checkpoints(folder))} checked" in out.stdout


def test_verify_names_each_damaged_file_and_the_rows_that_refer_to_it(finished, tmp_path, capsys):
    _, store, folder = copy_of(finished, tmp_path)
    first, second = checkpoints(folder)[:2]
    data = bytearray(first.read_bytes())
    data[-30] ^= 0xFF  # one bit pattern changed, same size
    first.write_bytes(bytes(data))
    second.unlink()
    Path(str(second) + ".json").unlink()
    cut = sorted((folder / "curves").glob("*.parquet"))[0]
    cut.write_bytes(cut.read_bytes()[:200])
    run_file = sorted((folder / "runs").glob("*.parquet"))[0]
    shutil.copy(run_file, folder / "runs" / "copy-by-hand.parquet")

    out = verify_cli(folder, capsys)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()

    def line_with(*parts):
        found = [ln for ln in lines if all(p in ln for p in parts)]
        assert len(found) == 1, (parts, out.stdout)
        return found[0]

    step1, step2 = (int(f.stem.split("-")[1]) for f in (first, second))
    line_with(str(first.relative_to(tmp_path / "r")), "damaged", f"run_id={first.parent.name}, step={step1}")
    line_with(str(second.relative_to(tmp_path / "r")), "missing", f"run_id={second.parent.name}, step={step2}")
    line_with(f"curves file ck/curves/{cut.name}", "not a readable Parquet file")
    line_with(f"key run_id={run_file.stem}", "2 rows", run_file.name, "copy-by-hand.parquet")
    assert "DAMAGED: 4 problem(s)" in out.stdout


def test_verify_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    out = verify_cli(tmp_path, capsys)
    assert out.returncode == 2 and "not a sweep results folder" in out.stderr


def test_stall_tags_saved_before_schema_10_are_read_against_the_momentum_limit(make_cfg):
    """Since schema 10 stall_sharpness is λmax·lr/(2(1 + μ)); a checkpoint or training state saved by an
    older version holds λmax·lr/2 and no tag_limit stamp, and a resumed sweep rescales it, so one table
    never mixes the two definitions."""
    import io

    from pipeline.orchestration import rows
    from pipeline.orchestration.train import train

    cfg = make_cfg(["sweep.seeds=1", "optim.max_steps=1500", "stall.window=100", "optim.momentum=0.5"])
    (run,) = expand(cfg)
    store, states = Store.open(cfg.results_root), []
    train(run.config, run.seed, on_state=states.append, state_every_s=0.0)
    state = next(s for s in states if any(ck.tag is not None for ck in s.checkpoints))
    ck = next(c for c in state.checkpoints if c.tag is not None)
    sharp = ck.tag.sharpness
    assert sharp > 0
    saved = torch.load(io.BytesIO(store.read_bytes(jobs.save_checkpoint(store, "s", run, ck).path)), weights_only=True)
    assert saved["tag_limit"] == rows.TAG_LIMIT
    assert rows.current_tag_columns(saved["tag"], saved, 0.5)["stall_sharpness"] == sharp  # stamped: as saved
    old = {**saved["tag"], "stall_sharpness": sharp * 1.5}  # what λmax·lr/2 was for μ = 0.5
    assert rows.current_tag_columns(old, {"tag": old}, 0.5)["stall_sharpness"] == pytest.approx(sharp, rel=1e-15)
    assert rows.current_tag_columns(old, {"tag": old}, 0.0) == old  # without momentum both definitions agree
    # a training state saved by an older version: the same rescaling when a retry reads it
    jobs.save_state(store, "s", run.run_id, state)
    path = jobs.state_path("s", run.run_id)
    d = torch.load(io.BytesIO(store.read_bytes(path)), weights_only=True)
    assert jobs.load_state(store, "s", run.run_id, 0.5).checkpoints[state.checkpoints.index(ck)].tag.sharpness == sharp
    del d["tag_limit"]
    for c in d["checkpoints"]:
        if c["tag"]:
            c["tag"]["stall_sharpness"] *= 1.5
    buf = io.BytesIO()
    torch.save(d, buf)
    store.write_bytes(path, buf.getvalue())
    restored = jobs.load_state(store, "s", run.run_id, 0.5).checkpoints[state.checkpoints.index(ck)].tag
    assert restored.sharpness == pytest.approx(sharp, rel=1e-15)
