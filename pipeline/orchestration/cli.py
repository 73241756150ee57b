"""Entry points: thin wrappers that parse the command line and call importable functions.

- ``minratio-sweep`` / ``python -m pipeline``: a Hydra app; every Hydra override, ``--cfg job``,
  ``--help`` and ``--multirun`` work as usual. It runs (or resumes) the sweep, prints a summary and
  writes the figures.
- ``minratio-analyze <results>/<sweep>`` / ``python -m pipeline.orchestration.analysis``: figures and summary of a sweep.
- ``minratio-compact <results>/<sweep>``: merge each table's small files into one.
- ``minratio-verify <results>/<sweep>``: check a sweep folder (tables readable, keys unique, checkpoints
  present with their hashes); exit 1 on damage.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from typing import Iterable

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.orchestration.config import ConfigError, check_deleted_keys, register_configs
from pipeline.orchestration.lease import FolderBusy, Lease, writer
from pipeline.orchestration.storage import StorageError, join_uri, public_uri

register_configs()


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while the sweep ran (a BaseException, so no ``except Exception`` on the
    way up swallows it, as KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals():
    """While inside, SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler) raise :class:`Interrupted` in the
    main thread. Without this SIGINT is a raw KeyboardInterrupt traceback, and SIGTERM meets the handler
    ``ray.init`` installs (``sys.exit``), which ends in Ray's C++ abort."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt_in(err: BaseException) -> "Interrupted | None":
    """:class:`Interrupted` if ``err`` is one or was raised while handling one. A signal that lands inside
    Ray's compiled ``ray.wait`` comes back as a ``SystemError`` ("returned a result with an exception set")
    whose context is our :class:`Interrupted`."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Interrupted):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def interrupted(cfg: DictConfig, signum: int) -> int:
    """Stop after :class:`Interrupted`: shut Ray down (a local Ray's workers end; a cluster's tasks of
    this driver are cancelled), say in one line what is saved and how to resume; return 128 + signum."""
    import ray

    from pipeline.orchestration import sweep, tables
    from pipeline.orchestration.plan import expand
    from pipeline.orchestration.storage import Store

    for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the shutdown short
        signal.signal(s, signal.SIG_IGN)
    try:
        if ray.is_initialized():
            ray.shutdown()
        name = str(cfg.sweep.name)
        store = Store.open(sweep.resolve_root(cfg))
        planned = {run.run_id for run in expand(cfg)}
        runs = len({key[0] for key in tables.done_keys(store, name, "runs")} & planned)
        points = sum(key[0] in planned for key in tables.done_keys(store, name, "points"))
        saved = (f"{runs} of {len(planned)} runs and {points} analysed points of sweep {name!r} are saved "
                 f"under {store.location(name)}")
    except Exception as err:  # noqa: BLE001 — the line below must come out whatever the tables say
        saved = f"what finished is saved in the sweep's folder (could not count it: {type(err).__name__})"
    print(f"minratio: interrupted by {signal.Signals(signum).name}: {saved}; in-flight work was stopped "
          "and is redone on resume; run the same command again to resume", file=sys.stderr)
    return 128 + signum


log = logging.getLogger("minratio")


class BelowWarning(logging.Filter):
    """Lets through records below WARNING: the console handler on stdout (``conf/config.yaml``) leaves
    warnings and errors to the one on stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def from_original_cwd(cfg: DictConfig) -> None:
    """Make a relative local ``results_root`` absolute from the directory the command ran in: under
    ``hydra.job.chdir=true`` the job runs in its own time-stamped output folder, where the next command
    would not find the sweep to resume (Hydra's advice for such paths: ``to_absolute_path``). A relative
    ``data.root`` too, when Hydra changed the directory: the local Ray's workers start there, and would
    look for (or download) the data set in each command's new folder; without a change it is left as
    written, each node's workers reading it from their own directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    if not HydraConfig.initialized():  # composed in code (compose, a test): no directory was changed
        return
    root = os.path.expanduser(str(cfg.results_root))
    if "://" not in root and not os.path.isabs(root):
        cfg.results_root = to_absolute_path(root)
    data_root = os.path.expanduser(str(cfg.data.root))
    if not os.path.isabs(data_root) and os.path.realpath(os.getcwd()) != os.path.realpath(get_original_cwd()):
        cfg.data.root = to_absolute_path(data_root)


def run(cfg: DictConfig, set_keys: Iterable[str] = ()) -> int:
    """Run the sweep described by a composed config; log the summary; write figures. Exit code.
    ``set_keys``: the dotted keys the command line sets (a new sweep's model and data must read each)."""
    from pipeline.orchestration import analysis, sweep

    try:
        check_deleted_keys(cfg)  # before the keys are read here: '~results_root' is refused, not a traceback
        from_original_cwd(cfg)
        with stop_on_signals():
            summary = sweep.run_sweep(cfg, set_keys)
    except ConfigError as err:
        log.error(f"minratio: configuration error: {err}")
        return 2
    except (PermissionError, FolderBusy) as err:
        log.error(f"minratio: {err}")
        return 2
    except StorageError as err:  # a full disk, or the results root failing a write: one line, no traceback
        log.error(f"minratio: {err}")
        return 1
    except BaseException as err:  # noqa: BLE001 — an interrupt may arrive wrapped, see _interrupt_in
        stop = _interrupt_in(err)
        if stop is None:
            raise
        return interrupted(cfg, stop.signum)
    folder = public_uri(join_uri(summary.root, summary.sweep))  # as shown: no credentials, no query
    log.info(summary_table(summary))
    log.info(f"tables: {folder}/{{runs,points,spectra,curves}}/")
    if cfg.figures:  # also when every point failed: the summary says so, and the loss curves still help
        store, name = analysis.open_results(join_uri(summary.root, summary.sweep))
        text, figs = analysis.analyze(store, name, hue=cfg.plot.hue or None, full_range=cfg.plot.full_range)
        log.info(text)
        log.info("figures:\n  " + "\n  ".join(figs))
    failed_runs, failed_points = summary.runs_failed_planned, summary.points_failed_planned
    others = summary.run_status.get("failed", 0) - failed_runs + summary.points_failed - failed_points
    if others:
        log.warning(f"the folder also holds {others} failed row(s) of runs this command did not plan (another "
                    f"grid or seeds under the same sweep.name); the command that planned them retries them")
    if failed_runs or failed_points:
        log.error(f"minratio: {failed_runs} failed run(s), {failed_points} failed point(s): see the `error` column "
                  f"of {folder}/runs and /points; running this command again retries them")
        return 1
    return 0


def summary_table(s) -> str:
    """The end-of-sweep summary: one line on this command, then one row per grid point of the sweep's
    tables (one row without a grid) with the minimum ratio's min / median / max over the analysed points."""
    head = (f"sweep {s.sweep!r}: {s.runs_total} run{'s' * (s.runs_total != 1)} in this command "
            f"({s.runs_skipped} finished earlier, skipped), {s.seconds:.1f}s")
    cols = ("grid point", "runs ok/all", "failed", "points", "failed", "min ratio min/median/max", "labels")
    rows = [(r["grid"], f"{r['runs_ok']}/{r['runs']}", str(r["runs_failed"]), str(r["points"]),
             str(r["points_failed"]), "/".join(f"{v:.4f}" for v in r["ratio"]) if r["ratio"] else "-",
             ", ".join(f"{k} {v}" for k, v in sorted(r["labels"].items())) or "-") for r in s.by_grid_point]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    fmt = lambda row: "  ".join(v.ljust(w) if i in (0, 6) else v.rjust(w)
                                for i, (v, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([head, fmt(cols), *map(fmt, rows)])


def overridden_keys(overrides: Iterable[str]) -> list[str]:
    """The dotted config keys that Hydra command-line ``overrides`` set (``model.width=16``,
    ``+model.kwargs.width=16``); a group choice (``model=torch``) sets no key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))
            if not o.is_delete() and "." in o.key_or_group]


_MULTIRUN_CODE = 0  # the worst exit code of the jobs of a --multirun so far
_MAIN_PID: int | None = None  # the process that ran main(); a launcher may run the jobs in others


class JobFailed(RuntimeError):
    """A ``--multirun`` job that a launcher ran in another process (joblib, submitit, Ray's) failed: raised
    there, because its exit code cannot reach :data:`_MULTIRUN_CODE`, so that Hydra marks the job failed and
    the multirun exits non-zero once its jobs have run."""


def multirun_name(cfg: DictConfig) -> None:
    """Under ``--multirun``, give each job its own sweep: ``<sweep.name>,<override_dirname>`` unless the
    command sets ``sweep.name`` itself (``'sweep.name=w${model.width}'`` names them as it likes)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if any(o.lstrip("+~").startswith("sweep.name=") for o in hc.overrides.task):
        return
    if hc.job.override_dirname:
        # Only characters that no path, URI or glob (DuckDB, polars) reads as syntax.
        cfg.sweep.name = re.sub(r"[^\w.,+-]", "_", f"{cfg.sweep.name},{hc.job.override_dirname}")
        if hc.output_subdir is not None:  # Hydra's record of the job (saved before it ran) names its sweep too
            OmegaConf.save(cfg, os.path.join(hc.runtime.output_dir, hc.output_subdir, "config.yaml"))


@hydra.main(version_base="1.3", config_path="pkg://pipeline.conf", config_name="config")
def sweep_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    global _MULTIRUN_CODE
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:
        multirun_name(cfg)
    code = run(cfg, overridden_keys(HydraConfig.get().overrides.task))
    # Under --multirun a job's failures are reported above and the next job still runs (exiting would
    # end the multirun): main() exits with the worst code once all have run. A single run exits here.
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        sys.exit(code)  # an interrupt ends a --multirun too, not only its current job
    if multirun and code and os.getpid() != _MAIN_PID:
        raise JobFailed(f"minratio-sweep job {HydraConfig.get().job.num} ended with exit code {code} (its messages "
                        f"are above)")
    if multirun:
        _MULTIRUN_CODE = max(_MULTIRUN_CODE, code)
    elif code:
        sys.exit(code)


def main() -> None:
    """``minratio-sweep`` and ``python -m pipeline``: the Hydra app, exiting non-zero when runs or points
    of the sweep failed (under ``--multirun``, after every job has run)."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    sweep_main()
    sys.exit(_MULTIRUN_CODE)


def analyze_main() -> None:
    from pipeline.orchestration import analysis  # imported here: matplotlib is slow to load for the other commands

    analysis.main()


def _open_sweep(prog: str, code: int, description: str):
    """The ``(store, sweep)`` named by a command's folder argument; a folder that is not a sweep's is one
    line on stderr and exit ``code``."""
    from pipeline.orchestration import analysis

    store, sweep = analysis.locate(analysis.folder_args(description).folder)
    try:
        return analysis.check_results(store, sweep)
    except FileNotFoundError as err:
        holder = writer(store, sweep)
        if holder is not None:  # a sweep that has not written its first run yet
            err = (f"{store.location(sweep)!r} has no runs/ table yet: it is being written by {holder.describe()}; "
                   f"run this once that has ended")
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(code)


def compact_main() -> None:
    from pipeline.orchestration import tables

    store, sweep = _open_sweep("minratio-compact", 1, "Merge the small Parquet files of each table of a sweep into one "
                               "file per table (failed rows keep their own files, which the resume that retries them "
                               "replaces). Refused while a sweep is writing to the folder.")
    try:
        with Lease(store, sweep, "minratio-compact") as lease:
            for name in tables.TABLES:
                lease.check()  # a compaction that lost its lease stops between tables (each is whole)
                before, rows = tables.compact(store, sweep, name)
                after = len(store.list_files(f"{sweep}/{name}", ".parquet"))
                print(f"{name}: {before} file(s) -> {after}, {rows} rows")
    except FolderBusy as err:
        print(f"minratio-compact: {err}", file=sys.stderr)
        sys.exit(1)


def verify_main() -> None:
    """``minratio-verify``: print :func:`pipeline.orchestration.verify.verify`'s report; exit 1 on damage, 2 when the
    folder is not a sweep's."""
    from pipeline.orchestration import verify

    store, sweep = _open_sweep("minratio-verify", 2, "Check a minratio sweep folder: every table file readable, every "
                               "key once, every checkpoint present with the size and SHA-256 recorded when it was "
                               "written. Exits 1 on damage (each problem names the file and the rows that refer to "
                               "it), 0 when clean.")
    report = verify.verify(store, sweep)
    print(report.text())
    sys.exit(0 if report.clean else 1)
