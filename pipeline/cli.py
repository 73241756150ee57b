"""Entry points: thin wrappers that parse the command line and call importable functions.

- ``minratio-sweep`` / ``python -m pipeline``: a Hydra app; every Hydra override, ``--cfg job``,
  ``--help`` and ``--multirun`` work as usual. It runs (or resumes) the sweep, prints a summary and
  writes the figures.
- ``minratio-analyze <results>/<sweep>`` / ``python -m pipeline.analysis``: figures and summary of a sweep.
- ``minratio-compact <results>/<sweep>``: merge each table's small files into one.
"""
from __future__ import annotations

import argparse
import sys

import hydra
from omegaconf import DictConfig

from pipeline.config import ConfigError, register_configs

register_configs()


def run(cfg: DictConfig) -> int:
    """Run the sweep described by a composed config; print the summary; write figures. Exit code."""
    from pipeline import analysis, sweep

    try:
        summary = sweep.run_sweep(cfg)
    except ConfigError as err:
        print(f"minratio: configuration error: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:
        print(f"minratio: {err}", file=sys.stderr)
        return 2
    folder = f"{summary.root.rstrip('/')}/{summary.sweep}"
    print(f"sweep {summary.sweep!r}: {summary.runs_total} runs in this command ({summary.runs_skipped} finished "
          f"earlier, skipped), {summary.seconds:.1f}s; the sweep's tables now hold runs {summary.run_status}, "
          f"{summary.points} analysed points ({summary.points_failed} failed), labels {summary.labels}")
    print(f"tables: {folder}/{{runs,points,spectra,curves}}/")
    if cfg.figures:  # also when every point failed: the summary says so, and the loss curves still help
        store, name = analysis.open_results(folder)
        text, figs = analysis.analyze(store, name, hue=cfg.plot.hue or None, full_range=cfg.plot.full_range)
        print(text)
        print("figures:\n  " + "\n  ".join(figs))
    failed_runs, failed_points = summary.runs_failed_planned, summary.points_failed_planned
    others = summary.run_status.get("failed", 0) - failed_runs + summary.points_failed - failed_points
    if others:
        print(f"the folder also holds {others} failed row(s) of runs this command did not plan (another grid "
              f"or seeds under the same sweep.name); the command that planned them retries them")
    if failed_runs or failed_points:
        print(f"minratio: {failed_runs} failed run(s), {failed_points} failed point(s): see the `error` column of "
              f"{folder}/runs and /points; running this command again retries them", file=sys.stderr)
        return 1
    return 0


_MULTIRUN_CODE = 0  # the worst exit code of the jobs of a --multirun so far


@hydra.main(version_base="1.3", config_path="pkg://pipeline.conf", config_name="config")
def sweep_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    global _MULTIRUN_CODE
    code = run(cfg)
    # Under --multirun a job's failures are reported above and the next job still runs (exiting would
    # end the multirun): main() exits with the worst code once all have run. A single run exits here.
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        _MULTIRUN_CODE = max(_MULTIRUN_CODE, code)
    elif code:
        sys.exit(code)


def main() -> None:
    """``minratio-sweep`` and ``python -m pipeline``: the Hydra app, exiting non-zero when runs or points
    of the sweep failed (under ``--multirun``, after every job has run)."""
    sweep_main()
    sys.exit(_MULTIRUN_CODE)


def _folder_arg(description: str, checkpoint: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("folder", help="a sweep's results folder, <results_root>/<sweep.name> (path or URI)")
    if checkpoint:
        p.add_argument("--checkpoint", help="RUN_ID:STEP[:STAGE] whose eigenvalue histogram to draw (without "
                       "STAGE, the point where training stopped rather than its refined one)")
        p.add_argument("--hue", help="a config key whose value colours the minimum-ratio figure, e.g. model.width "
                       "(default: the point's label)")
        p.add_argument("--full-range", action="store_true", help="minimum-ratio axes from 0 to 1, not fitted")
    return p.parse_args()


def analyze_main() -> None:
    from pipeline import analysis

    args = _folder_arg("Write figures and print the summary of a minratio sweep.", checkpoint=True)
    try:
        store, sweep = analysis.open_results(args.folder)
        text, figs = analysis.analyze(store, sweep, args.checkpoint, args.hue, args.full_range)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"minratio-analyze: {err}")
    print(text)
    print("figures:\n  " + "\n  ".join(figs))


def compact_main() -> None:
    from pipeline import analysis, tables

    args = _folder_arg("Merge the small Parquet files of each table of a sweep into one file per table (failed "
                       "rows keep their own files, which the resume that retries them replaces). Run it when no "
                       "sweep is writing to the folder.")
    try:
        store, sweep = analysis.open_results(args.folder)
    except FileNotFoundError as err:
        sys.exit(f"minratio-compact: {err}")
    for name in tables.TABLES:
        before, rows = tables.compact(store, sweep, name)
        after = len(store.list_files(f"{sweep}/{name}", ".parquet"))
        print(f"{name}: {before} file(s) -> {after}, {rows} rows")
