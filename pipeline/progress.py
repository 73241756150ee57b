"""Progress of a sweep as results arrive: a live line on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    total_runs: int
    mode: str = "auto"  # auto | live | plain | none
    stream: object = None
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    diverged: int = 0
    skipped: int = 0
    points_done: int = 0
    points_failed: int = 0
    points_pending: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_plain: float = 0.0

    def __post_init__(self):
        self.stream = self.stream or sys.stderr
        if self.mode == "auto":
            self.mode = "live" if getattr(self.stream, "isatty", lambda: False)() else "plain"

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        finished = self.done + self.failed + self.diverged
        todo = self.total_runs - self.skipped
        eta = "?"
        if finished and todo > finished:
            eta = f"{elapsed / finished * (todo - finished):.0f}s"
        elif todo <= finished:
            eta = "0s"
        return (f"runs {finished}/{todo} (queued {self.queued}, running {self.running}, ok {self.done}, "
                f"diverged {self.diverged}, failed {self.failed}"
                + (f", skipped {self.skipped} already done" if self.skipped else "")
                + f") | checkpoints analysed {self.points_done}"
                + (f" (failed {self.points_failed})" if self.points_failed else "")
                + f", waiting {self.points_pending} | elapsed {elapsed:.0f}s, eta {eta}")

    def update(self, force: bool = False) -> None:
        if self.mode == "none":
            return
        if self.mode == "live":
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
            return
        now = time.monotonic()
        if force or now - self._last_plain >= 5.0:
            self._last_plain = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.mode == "live":
            self.stream.write("\r\033[K" + self.line() + "\n")
            self.stream.flush()
        elif self.mode == "plain":
            self.update(force=True)
