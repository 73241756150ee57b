"""Console output: progress bars that fit the terminal, plain log lines without one, an estimate of the time
left that counts the Hessian tail, and the end-of-sweep table."""
from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pandas as pd

from pipeline.orchestration.cli import summary_table
from pipeline.orchestration.progress import Progress, Work
from pipeline.orchestration.sweep import SweepSummary, by_grid_point

# A sweep's progress driven to its end with long counts, drawn on whatever terminal stderr is.
DRIVE = """
import time
from pipeline.orchestration.progress import Progress
p = Progress(total_runs=123456, skipped=1000, mode="auto", busy="CPU 15/16 GPU 1/2 busy")
p.work.train_s, p.work.point_s, p.work.checkpoints_per_run = [12.0], [3.0], [2]
for i in range(0, 122456, 9973):
    p.done, p.failed, p.diverged = i, i // 7, i // 11
    p.points_known, p.points_done, p.points_failed = 2 * i + 2, i, i // 13
    p.work.runs_left, p.work.points_left = 122456 - i, i
    p.update(force=True)
    time.sleep(0.01)
p.close()
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[78=>]")


def test_progress_bars_never_exceed_an_80_column_terminal():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "COLUMNS": "", "LINES": ""}
    proc = subprocess.Popen([sys.executable, "-c", DRIVE], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")[-2000:]
    text = ANSI.sub("", out.decode())
    pieces = [p for p in re.split(r"[\r\n]", text) if p.strip()]
    assert any(p.startswith("runs") for p in pieces) and any(p.startswith("checkpoints") for p in pieces), text[-2000:]
    assert max(len(p) for p in pieces) <= 80, max(pieces, key=len)
    assert any("eta" in p for p in pieces)


def test_plain_mode_logs_periodic_lines_with_every_count(caplog):
    class NotATerminal:
        def write(self, _):
            raise AssertionError("plain mode writes through logging, not to the stream")

        def isatty(self):
            return False

    caplog.set_level(logging.INFO, logger="minratio")
    p = Progress(total_runs=10, skipped=2, stream=NotATerminal(), busy="CPU 2/2 busy", every_s=3600)
    p.done, p.failed, p.points_known, p.points_done, p.points_failed = 5, 1, 12, 9, 1
    p.update()
    p.update()  # within every_s: no second line
    p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0] == lines[1]
    assert re.fullmatch(r"runs 6/8 eta \S+ \(\d+s so far\) \| ok 5, failed 1 \(\+2 done before\) \| CPU 2/2 busy \| "
                        r"checkpoints 10/12 \(1 failed\)", lines[0]), lines[0]


def test_eta_counts_the_hessian_tail_of_checkpoints_not_yet_written():
    work = Work(runs_left=4, points_left=0, train_s=[10.0], point_s=[], checkpoints_per_run=[])
    assert work.eta(slots=2) is None  # no Hessian has finished yet: the tail is unknown
    work.point_s, work.checkpoints_per_run = [5.0], [2, 2]
    assert work.eta(slots=2) == (4 * 10.0 + 4 * 2 * 5.0) / 2  # training, then the 8 points it will write
    work.runs_left, work.points_left = 0, 3
    assert work.eta(slots=2) == 3 * 5.0 / 2  # training done, only the tail left: not 0
    work.point_s = [1.0, 1.0, 1.0, 81.0]  # one slow refinement among quick ones: the tail's sum needs the mean
    assert work.eta(slots=2) == 3 * 21.0 / 2


def test_summary_is_a_table_with_one_row_per_grid_point():
    runs = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "status": ["ok", "ok", "ok", "failed"],
                         "overrides": ['{"model.width": 4}'] * 2 + ['{"model.width": 8}'] * 2})
    points = pd.DataFrame({"run_id": ["a", "a", "b", "c"], "status": ["ok", "ok", "ok", "failed"],
                           "label": ["saddle", "minimum", "saddle", None], "min_ratio": [0.9, 1.0, 0.95, None]})
    rows = by_grid_point(runs, points)
    s = SweepSummary(sweep="widths", root="/r", runs_total=4, runs_skipped=0, seconds=12.34, by_grid_point=rows)
    lines = summary_table(s).splitlines()
    assert lines[0] == "sweep 'widths': 4 runs in this command (0 finished earlier, skipped), 12.3s"
    assert lines[1].split() == ["grid", "point", "runs", "ok/all", "failed", "points", "failed",
                                "min", "ratio", "min/median/max", "labels"]
    assert lines[2].split() == ["model.width=4", "2/2", "0", "3", "0", "0.9000/0.9500/1.0000", "minimum", "1,",
                                "saddle", "2"]
    assert lines[3].split() == ["model.width=8", "1/2", "1", "0", "1", "-", "-"]
    assert "{" not in "\n".join(lines)  # no Python dicts
    wide = runs.assign(overrides=['{"model.width": 16}'] * 2 + ['{"model.width": 4}'] * 2)
    assert [r["grid"] for r in by_grid_point(wide, points)] == ["model.width=4", "model.width=16"]  # not as text
