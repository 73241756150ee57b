"""Progress of a sweep as results arrive: two tqdm bars (runs, checkpoints) on a terminal, plain log
lines otherwise, and an estimate of the time left that includes the Hessian and refinement tail.

The driver (:mod:`pipeline.orchestration.sweep`) owns the counts; this module only shows them. Bars are cut to the
terminal's width (tqdm's ``dynamic_ncols``), so a narrow terminal never wraps them.
"""
from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("minratio")
_BAR = "{desc} {n_fmt}/{total_fmt} {bar:16} "  # then the bar's own text (tqdm cuts the line to the terminal)


def seconds(s: float) -> str:
    """``75`` → ``'1m15s'``: a short duration for a progress line."""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class Work:
    """What is left and how long each kind of task took so far (seconds a task ran, from the task)."""

    runs_left: int = 0
    points_left: int = 0  # known checkpoints not yet analysed (including refinements)
    train_s: list = field(default_factory=list)
    point_s: list = field(default_factory=list)  # per point: a Hessian task's seconds / its points
    checkpoints_per_run: list = field(default_factory=list)

    def eta(self, slots: float) -> float | None:
        """Seconds left if ``slots`` tasks run at once; None until the kinds of task still to come have
        each finished once (the tail is the Hessians of checkpoints runs have not written yet). Each kind's
        remaining count times its mean time so far: what is left is a sum, and its slow tasks (a
        refinement at the widest net of a grid can take 50× the median) belong in it."""
        future_points = self.runs_left * (statistics.mean(self.checkpoints_per_run)
                                          if self.checkpoints_per_run else 0)
        need_train = self.runs_left > 0
        need_points = self.points_left + future_points > 0 or (need_train and not self.checkpoints_per_run)
        if (need_train and not self.train_s) or (need_points and not self.point_s):
            return None
        task_s = (self.runs_left * (statistics.fmean(self.train_s) if need_train else 0)
                  + (self.points_left + future_points) * (statistics.fmean(self.point_s) if need_points else 0))
        return task_s / max(slots, 1.0)


@dataclass
class Progress:
    """Counts of a sweep in progress; ``update()`` shows them, ``close()`` leaves the last state shown."""

    total_runs: int
    mode: str = "auto"  # auto | live | plain | none
    stream: object = None
    skipped: int = 0
    done: int = 0
    failed: int = 0
    diverged: int = 0
    points_done: int = 0
    points_failed: int = 0
    points_known: int = 0  # checkpoints known so far (the checkpoint bar's total grows as runs finish)
    busy: str = ""  # what Ray reports busy, e.g. "CPU 2/2"
    work: Work = field(default_factory=Work)
    slots: float = 1.0
    every_s: float = 10.0  # plain mode: seconds between lines
    started: float = field(default_factory=time.monotonic)
    _last_plain: float = float("-inf")
    _bars: tuple = ()

    def __post_init__(self):
        self.stream = self.stream or sys.stderr
        if self.mode == "auto":
            self.mode = "live" if getattr(self.stream, "isatty", lambda: False)() else "plain"

    @property
    def runs_finished(self) -> int:
        return self.done + self.failed + self.diverged

    def eta(self) -> str:
        todo = self.total_runs - self.skipped
        if self.runs_finished >= todo and self.points_done + self.points_failed >= self.points_known:
            return "0s"
        left = self.work.eta(self.slots)
        return "?" if left is None else seconds(left)

    def runs_text(self) -> str:
        """The runs bar's text, most wanted first: a narrow terminal cuts it from the right."""
        bad = (f", diverged {self.diverged}" if self.diverged else "") + (f", failed {self.failed}" if self.failed else "")
        skipped = f" (+{self.skipped} done before)" if self.skipped else ""
        return (f"eta {self.eta()} ({seconds(time.monotonic() - self.started)} so far) | ok {self.done}{bad}{skipped}"
                f" | {self.busy}")

    def line(self) -> str:
        """One plain line with every count (the log's record of the sweep's progress)."""
        todo = self.total_runs - self.skipped
        pts = self.points_done + self.points_failed
        failed = f" ({self.points_failed} failed)" if self.points_failed else ""
        return f"runs {self.runs_finished}/{todo} {self.runs_text()} | checkpoints {pts}/{self.points_known}{failed}"

    def _open_bars(self) -> None:
        from tqdm import tqdm

        common = dict(file=self.stream, dynamic_ncols=True, leave=True, mininterval=0.5, bar_format=_BAR)
        self._bars = (tqdm(total=self.total_runs - self.skipped, desc="runs       ", position=0, **common),
                      tqdm(total=0, desc="checkpoints", position=1, **common))

    def update(self, force: bool = False) -> None:
        if self.mode == "none":
            return
        if self.mode == "live":
            if not self._bars:
                self._open_bars()
            runs, points = self._bars
            runs.n, points.total, points.n = self.runs_finished, self.points_known, self.points_done + self.points_failed
            runs.bar_format = _BAR + self.runs_text().replace("{", "{{").replace("}", "}}")
            points.bar_format = _BAR + (f"failed {self.points_failed}" if self.points_failed else "")
            for bar in self._bars:
                bar.refresh() if force else bar.update(0)
            return
        now = time.monotonic()
        if force or now - self._last_plain >= self.every_s:
            self._last_plain = now
            log.info(self.line())

    def close(self) -> None:
        """Show the final state; the log keeps one line of it in every mode."""
        if self.mode == "live" and self._bars:
            self.update(force=True)
            for bar in reversed(self._bars):
                bar.close()
            self._bars = ()
        if self.mode in ("live", "plain"):
            self._last_plain = float("-inf")
            log.info(self.line())
