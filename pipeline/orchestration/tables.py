"""Stage 8 — results: the one owner of the Parquet schemas. Every writer and reader goes through here.

Four tables live under ``<results_root>/<sweep.name>/``, one folder each (``runs/``, ``points/``,
``spectra/``, ``curves/``), readable with ``pandas.read_parquet(folder)``, ``pyarrow.dataset`` or DuckDB's
``read_parquet('folder/*.parquet')``. Each task writes its own file, named after its key, so a retried
task replaces its file instead of adding rows; :func:`read` applies the declared schema (a column added in
a later version is never lost) and keeps one row per key; :func:`compact` merges small files.
"""
from __future__ import annotations

import collections
import io
import posixpath
import re
import time
import uuid
import warnings

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.orchestration import config as C
from pipeline.orchestration.storage import Store

# Bump the version whenever a column is added or a column's definition changes; files of an older version
# read with nulls in the columns they lack (see `read`). Each version's changes: docs/performance.md.
SCHEMA_VERSION = 11
TABLES = ("runs", "points", "spectra", "curves")

_PA_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def column_name(section: str, key: str) -> str:
    """The ``runs`` column of config key ``section.key``: ``model_width``; ``model._target_`` → ``model_target``."""
    return f"{section}_{key.strip('_')}"


def _config_fields() -> list[pa.Field]:
    return [pa.field(column_name(*key.split(".", 1)), _PA_TYPES[kind]) for key, kind in C.recorded_keys().items()]


_META = [pa.field("schema_version", pa.int32()), pa.field("written_at", pa.timestamp("us", tz="UTC"))]

SCHEMAS: dict[str, pa.Schema] = {
    "runs": pa.schema([
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("sweep", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("status", pa.string()),  # ok | diverged | failed
        pa.field("steps", pa.int64()),
        pa.field("final_loss", pa.float64()),
        pa.field("final_grad_norm", pa.float64()),
        pa.field("n_params", pa.int64()),
        pa.field("n_checkpoints", pa.int64()),
        pa.field("n_stalls", pa.int64()),
        pa.field("wall_seconds", pa.float64()),
        pa.field("node", pa.string()),  # host name of the worker that trained the run
        pa.field("node_id", pa.string()),  # Ray node id of that worker
        pa.field("device", pa.string()),  # where the run trained: cpu, cuda:0 (ray.train_num_gpus)
        pa.field("resumed_from_step", pa.int64()),  # a retried task went on from its saved state here
        pa.field("error", pa.string()),
        pa.field("overrides", pa.string()),  # the grid point of this run, JSON
        pa.field("config_json", pa.string()),  # the run's full resolved config
        *_config_fields(),
        *_META,
    ]),
    "points": pa.schema([
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # stalled | final
        pa.field("seed", pa.int64()),
        pa.field("stalled", pa.bool_()),
        pa.field("stall_reason", pa.string()),
        pa.field("status", pa.string()),  # ok | failed
        pa.field("error", pa.string()),
        pa.field("loss", pa.float64()),  # full-batch training loss at the point
        pa.field("grad_norm", pa.float64()),  # ‖∇L‖ at the point
        pa.field("n_params", pa.int64()),  # parameters the Hessian is taken over (param_subset's)
        pa.field("param_subset", pa.string()),  # hessian.params: all, a regex, or a JSON list of names
        pa.field("n_pos", pa.int64()),
        pa.field("n_neg", pa.int64()),
        pa.field("n_zero", pa.int64()),
        pa.field("n_pos_naive", pa.int64()),
        pa.field("min_ratio", pa.float64()),
        pa.field("min_ratio_naive", pa.float64()),
        pa.field("min_ratio_curved", pa.float64()),
        pa.field("index", pa.float64()),
        pa.field("label", pa.string()),
        pa.field("lam_min", pa.float64()),
        pa.field("lam_max", pa.float64()),
        pa.field("tol", pa.float64()),
        pa.field("tol_method", pa.string()),  # gap | rel | abs | given
        pa.field("method", pa.string()),  # eigh | inertia
        pa.field("hvp", pa.string()),  # how H was built: closed_form | rev | fwd; null for estimate
        pa.field("dtype", pa.string()),
        pa.field("device", pa.string()),
        pa.field("build_seconds", pa.float64()),
        pa.field("count_seconds", pa.float64()),
        pa.field("seconds", pa.float64()),
        pa.field("fallback", pa.string()),  # what was done when the first try ran out of memory
        pa.field("node", pa.string()),  # host name of the worker that analysed the point
        pa.field("node_id", pa.string()),  # Ray node id of that worker
        # hessian.method=estimate only: intervals (at estimate_confidence) and the estimator's settings.
        pa.field("n_pos_lo", pa.int64()),
        pa.field("n_pos_hi", pa.int64()),
        pa.field("n_neg_lo", pa.int64()),
        pa.field("n_neg_hi", pa.int64()),
        pa.field("n_zero_lo", pa.int64()),
        pa.field("n_zero_hi", pa.int64()),
        pa.field("min_ratio_lo", pa.float64()),
        pa.field("min_ratio_hi", pa.float64()),
        pa.field("estimate_resolution", pa.float64()),  # δ: eigenvalues within ~δ of ±tol are ambiguous
        pa.field("estimate_degree", pa.int64()),
        pa.field("estimate_probes", pa.int64()),
        pa.field("estimate_confidence", pa.float64()),
        # Stall tag (stalled/final rows): why training stopped improving — see pipeline.landscape.stall.stall_tag.
        pa.field("stall_tag", pa.string()),  # small_gradient | oscillating
        pa.field("stall_grad_ratio", pa.float64()),  # ‖g‖ / ‖g at step 0‖
        pa.field("stall_cosine", pa.float64()),  # cos∠(∇L(θ), ∇L(θ − lr·∇L(θ))); −1 = bouncing across a valley
        pa.field("stall_sharpness", pa.float64()),  # λmax·lr/(2(1+μ)); 1 = (S)GD's stability limit, momentum μ
        pa.field("stall_tag_reasons", pa.string()),
        # Honest labels (pipeline.landscape.critical): is the point critical at all?
        pa.field("grad_norm2", pa.float64()),  # ‖g‖²; critical when < refine.gtol2 (1e-10)
        pa.field("grad_norm2_all", pa.float64()),  # ‖∇L‖² over all of θ: grad_norm2 unless hessian.params is a subset
        pa.field("critical_label", pa.string()),  # not_critical | gradient_flat | the spectrum label
        pa.field("grad_share_neg", pa.float64()),  # share of ‖g‖² in eigenspaces with λ < −tol
        pa.field("grad_share_zero", pa.float64()),  # … with |λ| ≤ tol
        pa.field("grad_share_pos", pa.float64()),  # … with λ > tol
        pa.field("flat_residual", pa.float64()),  # r = ‖g + Hp*‖/(‖H‖_F‖p*‖ + ‖g‖), p* = −H⁺g (Frye's relres)
        pa.field("flat_cokernel", pa.float64()),  # r_H = ‖H(Hp* + g)‖/(‖H‖_F‖Hp* + g‖) (Frye's relAres)
        pa.field("grad_curvature", pa.float64()),  # gᵀHg / (‖g‖² max|λ|)
        pa.field("escape_drops", pa.bool_()),  # a step along ±v_min lowers the loss (saddles)
        pa.field("escape_step", pa.float64()),  # ε of that step
        pa.field("escape_delta", pa.float64()),  # loss change at ε
        pa.field("escape_predicted", pa.float64()),  # ½ε²λmin
        pa.field("escape_ratio_smallest", pa.float64()),  # Δloss / (½ε²λmin) at the smallest ε
        # Refinement (stage=refined rows): the critical-point finder's record.
        pa.field("refine_method", pa.string()),
        pa.field("refine_iterations", pa.int64()),
        pa.field("refine_stopped_because", pa.string()),  # refine_result.STOP_REASONS, e.g. converged | gradient_flat
        pa.field("refine_distance", pa.float64()),  # ‖θ_refined − θ_stalled‖
        pa.field("refine_loss_change", pa.float64()),
        pa.field("refine_grad_norm2_start", pa.float64()),
        pa.field("refine_grad_norm2", pa.float64()),
        pa.field("refine_relative_residual", pa.float64()),
        pa.field("refine_cokernel_residual", pa.float64()),
        pa.field("refine_hvps", pa.int64()),
        pa.field("refine_grads", pa.int64()),
        pa.field("refine_seconds", pa.float64()),
        *_META,
    ]),
    "spectra": pa.schema([
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("n_params", pa.int64()),
        pa.field("eigenvalues", pa.list_(pa.float64())),  # ascending
        *_META,
    ]),
    "curves": pa.schema([
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("loss", pa.float64()),
        pa.field("grad_norm", pa.float64()),
        pa.field("lam_max", pa.float64()),  # NaN unless stall.curvature_every divides the step
        pa.field("grad_cosine", pa.float64()),
        *_META,
    ]),
}

KEYS = {"runs": ("run_id",), "points": ("run_id", "step", "stage"), "spectra": ("run_id", "step", "stage"),
        "curves": ("run_id", "step")}


def config_columns(run_cfg) -> dict:
    """The ``runs`` columns of a run's resolved config: ``{"model_width": 8, ...}``; model and data keys its
    kind of model or data does not read (:func:`pipeline.orchestration.config.reads`) are null."""
    return {column_name(s, k): (v if C.reads(s, run_cfg[s].get("name"), k) else None)
            for s in C.RUN_SECTIONS for k, v in run_cfg[s].items() if column_name(s, k) in SCHEMAS["runs"].names}


def to_table(name: str, rows: list[dict]) -> pa.Table:
    """Rows → a table of ``name``'s declared schema. Unknown columns are an error (a typo would
    otherwise vanish); missing ones are null. Metadata columns are filled in."""
    schema = SCHEMAS[name]
    now = time.time()
    for row in rows:
        unknown = set(row) - set(schema.names)
        if unknown:
            raise KeyError(f"{name} table has no column(s) {sorted(unknown)}")
    cols = {}
    for f in schema:
        if f.name == "schema_version":
            cols[f.name] = [SCHEMA_VERSION] * len(rows)
        elif f.name == "written_at":
            cols[f.name] = [int(now * 1e6)] * len(rows)
        else:
            cols[f.name] = [row.get(f.name) for row in rows]
    return pa.table(cols, schema=schema)


def file_name(name: str, row: dict) -> str:
    """A file name built from the row's key: a retry of the same task replaces the same file."""
    return "-".join(str(row[k]) for k in KEYS[name]) + ".parquet"


def write(store: Store, sweep: str, name: str, rows: list[dict], stem: str | None = None) -> None:
    """Write ``rows`` of table ``name`` as one Parquet file, atomically. ``stem`` names the file; by
    default the first row's key (the usual case: one task, one key)."""
    if not rows:
        return
    fname = f"{stem}.parquet" if stem else file_name(name, rows[0])
    _put(store, f"{sweep}/{name}/{fname}", to_table(name, rows))


def _put(store: Store, rel: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(rel, buf.getvalue())


def read(store: Store, sweep: str, name: str, dedupe: bool = True, columns: list | None = None) -> pa.Table:
    """Table ``name`` of a sweep with the declared schema (files of older versions get nulls for new
    columns); with ``dedupe``, one row per key, the most recently written. ``columns``: read only these
    (plus the key and ``written_at``), so that a big sweep's driver does not load every column."""
    if columns is not None:
        columns = list(dict.fromkeys([*KEYS[name], *columns, "written_at"]))
    table, _, _ = _read_files(store, sweep, name, columns)
    if dedupe and table.num_rows:
        table = _latest_per_key(table, KEYS[name])
    return table


def read_files(store: Store, sweep: str, name: str, columns: list | None = None) -> tuple[pa.Table, list, list]:
    """Every row of table ``name``'s files, not de-duplicated, and ``(files read, files not readable)``:
    what ``minratio-verify`` checks. ``columns`` may name ``__filename`` (each row's file, full path)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller reports unreadable files itself
        return _read_files(store, sweep, name, columns)


# Files per pyarrow dataset when reading: one dataset over thousands of small files holds hundreds of MB,
# batches of this many hold tens, at the same speed (docs/performance.md).
READ_BATCH_FILES = 64


def _read_files(store: Store, sweep: str, name: str, columns: list | None = None,
                attempts: int = 3) -> tuple[pa.Table, list, list]:
    """All rows of a table's files, with the declared schema. Returns ``(table, files read, files skipped)``.
    ``columns`` may name pyarrow's ``__filename`` (each row's file, as a full path).

    A file that is not valid Parquet is skipped with a warning naming it, never read as data. Our own
    writers cannot leave one (they rename whole files into place), but a copy cut off by hand can; a
    resumed sweep redoes the keys it held, which rewrites the file. A file that vanishes while being read
    (a concurrent :func:`compact` merged it) makes the listing start again.
    """
    schema = SCHEMAS[name]
    declared = [c for c in columns if c in schema.names] if columns is not None else None
    empty = schema.empty_table() if columns is None else schema.empty_table().select(declared)
    if columns is not None and "__filename" in columns:
        empty = empty.append_column("__filename", pa.array([], pa.string()))
    for _ in range(attempts):
        files = store.list_files(f"{sweep}/{name}", ".parquet")
        parts, good, bad = [], [], []
        try:
            for i in range(0, len(files), READ_BATCH_FILES):
                _read_batch(store, files[i:i + READ_BATCH_FILES], schema, columns, parts, good, bad)
        except FileNotFoundError:
            continue
        return (pa.concat_tables(parts) if parts else empty), good, bad
    raise RuntimeError(f"files of table {sweep}/{name} under {store.location()} kept vanishing while being read "
                       f"({attempts} attempts); is a compact running?")


def _read_batch(store: Store, files: list, schema: pa.Schema, columns: list | None, parts: list, good: list,
                bad: list) -> None:
    """Read ``files`` as one dataset into ``parts``; if one is unreadable, file by file, skipping it."""
    try:
        parts.append(_dataset(store, files, schema).to_table(columns=columns))
        good += files
        return
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError):
        pass  # one or more unreadable files: read them one by one to find which
    for f in files:
        try:
            parts.append(_dataset(store, [f], schema).to_table(columns=columns))
            good.append(f)
        except FileNotFoundError:
            raise
        except (pa.ArrowInvalid, OSError) as err:
            warnings.warn(f"skipping {store.location(f)}: not a readable Parquet file ({err})")
            bad.append(f)


def _dataset(store: Store, files: list, schema: pa.Schema) -> ds.Dataset:
    return ds.dataset([store.path(f) for f in files], schema=schema, format="parquet", filesystem=store.fs)


def _latest_per_key(table: pa.Table, key: tuple) -> pa.Table:
    idx = pa.array(range(table.num_rows))
    t = table.append_column("__i", idx).sort_by([("written_at", "descending"), ("__i", "descending")])
    seen, keep = set(), []
    cols = [t.column(k).to_pylist() for k in key]
    for i, k in enumerate(zip(*cols)):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    out = t.take(keep).sort_by([("__i", "ascending")]).drop_columns(["__i"])
    return out


def compact(store: Store, sweep: str, name: str) -> tuple[int, int]:
    """Merge a table's finished rows into one file, keeping one row per key. Returns
    ``(files_before, rows_after)``.

    A row not finished (``status`` failed: a resume retries it) stays in a file of its own, named after
    its key — the name the retry writes — so readers without de-duplication (pandas, DuckDB, polars)
    never see a failed row beside its retry. The merged file is written (atomically) before any small
    file is deleted, and it holds every key of the files it replaces, so a crash at any moment loses no
    row; duplicates it leaves behind for a moment are removed by :func:`read`'s de-duplication. Only
    files that were read and have not changed since are deleted or rewritten (a file written meanwhile,
    or an unreadable one, stays). Temporary files of writers that crashed long ago go. Meant for a
    folder no sweep is writing to (``minratio-compact`` holds the folder's lease,
    :mod:`pipeline.orchestration.lease`): a sweep's new rows are never lost, but they may stay unmerged.
    """
    folder = f"{sweep}/{name}"
    store.remove_stale_temps(folder)
    stamps = store.stamps(folder, ".parquet")
    raw, files, _ = _read_files(store, sweep, name, columns=[*SCHEMAS[name].names, "__filename"])
    rel = {store.path(f): f for f in files}
    table = _latest_per_key(raw, KEYS[name]) if raw.num_rows else raw
    sources = [rel[p] for p in table.column("__filename").to_pylist()]
    table = table.drop_columns(["__filename"])
    keys = table.select(list(KEYS[name])).to_pylist()
    targets = [f"{folder}/{file_name(name, k)}" if waiting else None
               for k, waiting in zip(keys, _unfinished(name, table))]
    # a failed row in its own file stays there, unless the file lacks some of today's columns (plain
    # readers could take that file's columns for the folder's): then it is rewritten with all of them
    stay = {src for src, t in zip(sources, targets) if t == src and _has_all_columns(store, src, name)}
    moves = [(i, t) for i, t in enumerate(targets) if t is not None and t not in stay]
    merged = table.filter(pa.array([t is None for t in targets], pa.bool_()))
    rest = [f for f in files if f not in stay]
    raw_rows = collections.Counter(rel[p] for p in raw.column("__filename").to_pylist())
    if not moves and len(rest) <= 1 and all(raw_rows[f] == merged.num_rows for f in rest):
        return len(files), table.num_rows  # already one merged file and the failed rows' own files

    def unchanged(f: str) -> bool:
        return f in stamps and store.stamp(f) == stamps[f]

    if merged.num_rows:
        _put(store, f"{folder}/part-{uuid.uuid4().hex}.parquet", merged)
    for i, target in moves:
        if (target not in files and not store.exists(target)) or (target in files and unchanged(target)):
            _put(store, target, table.slice(i, 1))
    written = {t for _, t in moves}
    for f in rest:
        if f not in written and unchanged(f):
            store.delete(f)
    return len(files), table.num_rows


# A file named after its key (:func:`file_name`) starts with the run id: 12 hex digits, then "-" or ".".
_KEY_FILE = re.compile(r"[0-9a-f]{12}[-.]")


def drop_runs(store: Store, sweep: str, name: str, run_ids: set) -> None:
    """Remove the rows of ``run_ids`` from the files of table ``name`` not named after a key (the merged
    ``part-*`` files of :func:`compact`), rewriting each one that holds any, atomically. A run trained
    again after compaction then writes its rows to key-named files only (replacing its own old ones), so
    readers without de-duplication (pandas, DuckDB, polars) never see one of its keys twice. Meant for the
    moment before the retrained run's tasks start; a crash in between leaves the run without rows, which
    the next resume trains."""
    if not run_ids:
        return
    folder = f"{sweep}/{name}"
    for f in store.list_files(folder, ".parquet"):
        if _KEY_FILE.match(posixpath.basename(f)):
            continue
        table = _dataset(store, [f], SCHEMAS[name]).to_table()
        gone = pc.is_in(table.column("run_id"), value_set=pa.array(sorted(run_ids), pa.string()))
        if not pc.any(gone).as_py():
            continue
        kept = table.filter(pc.invert(gone))
        if kept.num_rows:
            _put(store, f, kept)
        else:
            store.delete(f)


def _has_all_columns(store: Store, rel: str, name: str) -> bool:
    """Whether ``rel`` has every column of the table's schema (a file gone since the read: leave it be)."""
    try:
        with store.fs.open_input_file(store.path(rel)) as fh:
            return set(SCHEMAS[name].names) <= set(pq.read_schema(fh).names)
    except FileNotFoundError:
        return True


def _unfinished(name: str, table: pa.Table) -> list[bool]:
    """Per row: not finished (a ``status`` other than ok or diverged), so a resume will retry its key."""
    if "status" not in table.column_names:
        return [False] * table.num_rows
    return [s not in ("ok", "diverged") for s in table.column("status").to_pylist()]


def done_keys(store: Store, sweep: str, name: str, where_ok: bool = True) -> set:
    """Keys of rows already complete (``status`` ok/diverged where the table has one)."""
    has_status = "status" in SCHEMAS[name].names
    table = read(store, sweep, name, columns=["status"] if has_status else [])
    if table.num_rows == 0:
        return set()
    if where_ok and has_status:
        table = table.filter(pa.array([not u for u in _unfinished(name, table)], pa.bool_()))
    cols = [table.column(k).to_pylist() for k in KEYS[name]]
    return set(zip(*cols))
