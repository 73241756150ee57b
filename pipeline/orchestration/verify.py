"""Check a sweep's results folder as a whole (``minratio-verify <results_root>/<sweep>``): every table's
files readable, every key in one row only, every checkpoint present with the size and SHA-256 recorded
when it was written, and every checkpoint the tables refer to present. A report names each damaged file
and the rows that refer to it; the command exits 1 on damage, 0 when the folder is clean.

A resume of the sweep re-makes what can be re-made (a damaged table file's keys are redone, a damaged
checkpoint's run trained again); this command only reads.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline.orchestration import jobs, tables
from pipeline.orchestration.storage import Store


@dataclass
class Report:
    """What :func:`verify` found: ``problems`` are one line each (a file, what is wrong, which rows)."""

    folder: str
    counts: dict = field(default_factory=dict)  # table -> (files, rows)
    checkpoints: int = 0  # checkpoints checked (against their records, by loading, or found missing)
    problems: list = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"minratio-verify {self.folder}"]
        lines += [f"  {name}: {files} file(s), {rows} row(s)" for name, (files, rows) in self.counts.items()]
        lines.append(f"  checkpoints: {self.checkpoints} checked")
        if self.clean:
            lines.append("clean: every table file readable, every key once, every checkpoint present with its hash")
        else:
            lines.append(f"DAMAGED: {len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems]
            lines.append("running the sweep's command again re-makes the damaged rows' work and checkpoints")
        return "\n".join(lines)


def _keys_text(name: str, keys) -> str:
    return "; ".join(", ".join(f"{k}={v}" for k, v in zip(tables.KEYS[name], key)) for key in keys)


def check_tables(store: Store, sweep: str, report: Report) -> dict:
    """Tables readable and keys unique; returns each table's rows (key columns, status) as a list of dicts."""
    out = {}
    for name in tables.TABLES:
        extra = [c for c in ("status", "n_checkpoints") if c in tables.SCHEMAS[name].names]
        raw, good, bad = tables.read_files(store, sweep, name, columns=[*tables.KEYS[name], *extra, "__filename"])
        report.counts[name] = (len(good) + len(bad), raw.num_rows)
        for rel in bad:
            report.problems.append(f"{sweep}/{name} file {rel}: not a readable Parquet file ({_parquet_error(store, rel)}); "
                                   "its rows are lost until the sweep's command runs again")
        rows = raw.to_pylist()
        where = collections.defaultdict(list)
        for row in rows:
            where[tuple(row[k] for k in tables.KEYS[name])].append(row["__filename"].rsplit("/", 1)[-1])
        for key, files in where.items():
            if len(files) > 1:
                report.problems.append(f"{sweep}/{name}: key {_keys_text(name, [key])} is in {len(files)} rows, "
                                       f"files {', '.join(sorted(files))}")
        out[name] = rows
    return out


def _parquet_error(store: Store, rel: str) -> str:
    try:
        with store.fs.open_input_file(store.path(rel)) as fh:
            pq.read_metadata(fh)
    except Exception as err:  # noqa: BLE001 — whatever the reader says is the report
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return "the schema does not match"


def check_checkpoints(store: Store, sweep: str, rows: dict, report: Report) -> None:
    """Every run's checkpoints verified; those analysed points and ``runs.n_checkpoints`` refer to present."""
    referenced = collections.defaultdict(list)  # checkpoint path -> keys of the ok points rows using it
    for row in rows["points"]:
        if row["status"] == "ok":
            sub = "refined" if row["stage"] == "refined" else "checkpoints"
            path = f"{sweep}/{sub}/{row['run_id']}/step-{row['step']:09d}.pt"
            referenced[path].append((row["run_id"], row["step"], row["stage"]))
    run_ids = {r["run_id"] for r in rows["runs"]} | {key[0] for keys in referenced.values() for key in keys}
    good, bad = {}, {}
    for run_id in sorted(run_ids):
        g, b = jobs.check_folder(store, f"{sweep}/checkpoints/{run_id}")
        good.update(g)
        bad.update(b)
    for path in sorted({p for p in referenced if p.startswith(f"{sweep}/refined/")}):
        try:
            jobs.load_checkpoint(store, path)
            good[path] = None
        except jobs.CheckpointError as err:
            bad[path] = str(err)
    for path, keys in referenced.items():
        if path not in good and path not in bad:
            bad[path] = f"checkpoint {store.location(path)} is missing"
    report.checkpoints = len(good) + len(bad)
    for path, problem in sorted(bad.items()):
        refs = referenced.get(path)
        report.problems.append(problem + (f"; points rows {_keys_text('points', refs)} refer to it" if refs else ""))
    counts = collections.Counter(p.split("/")[-2] for p in list(good) + list(bad) if f"{sweep}/checkpoints/" in p)
    for row in rows["runs"]:
        expected = row.get("n_checkpoints")
        if row["status"] in ("ok", "diverged") and expected is not None and counts[row["run_id"]] < expected:
            report.problems.append(f"{sweep}/runs row run_id={row['run_id']} says {expected} checkpoint(s), "
                                   f"{counts[row['run_id']]} are under {sweep}/checkpoints/{row['run_id']}/")


def verify(store: Store, sweep: str) -> Report:
    """Check the sweep folder ``<store>/<sweep>``; see the module docstring."""
    report = Report(f"{store.location(sweep)}")
    rows = check_tables(store, sweep, report)
    check_checkpoints(store, sweep, rows, report)
    return report
