"""Stage 6 — stall detection: a pure function of the loss history.

A run has stalled at step t when the loss improved by less than ``threshold`` (relative) over the last
``window`` steps: ``(L[t - window] - L[t]) / |L[t - window]| < threshold``. A loss that went *up* over the
window (oscillation, divergence) also counts as no improvement.
"""
from __future__ import annotations

import math
from typing import Sequence


def relative_improvement(before: float, after: float) -> float:
    """``(before - after) / |before|``; 0 when both are 0 (nothing left to improve)."""
    if before == 0.0:
        return 0.0 if after == 0.0 else -math.inf
    return (before - after) / abs(before)


def is_stalled(steps: Sequence[int], losses: Sequence[float], window: int, threshold: float,
               since: int = 0) -> bool:
    """Whether the history ``(steps[i], losses[i])`` (steps ascending) shows a stall at its last entry.

    Only entries at steps ≥ ``since`` are used, so after a stall the window must fill again before the
    next one can be declared. Needs an entry exactly ``window`` steps or more before the last one.
    """
    if len(steps) != len(losses):
        raise ValueError(f"steps and losses differ in length: {len(steps)} vs {len(losses)}")
    if window < 1 or threshold <= 0:
        raise ValueError(f"need window ≥ 1 and threshold > 0, got window={window}, threshold={threshold}")
    if not steps:
        return False
    t = steps[-1]
    # The latest recorded entry at least `window` steps before t, not earlier than `since`.
    ref = None
    for s, loss in zip(reversed(steps), reversed(losses)):
        if s < since:
            break
        if s <= t - window:
            ref = loss
            break
    if ref is None:
        return False
    return relative_improvement(ref, losses[-1]) < threshold


def stall_steps(steps: Sequence[int], losses: Sequence[float], window: int, threshold: float,
                max_stalls: int | None = None) -> list[int]:
    """Every step at which a stall is declared when the history is scanned in order (offline twin of
    what training does online): after each stall the window restarts at that step."""
    out: list[int] = []
    since = steps[0] if steps else 0
    for i in range(len(steps)):
        if is_stalled(steps[: i + 1], losses[: i + 1], window, threshold, since=since):
            out.append(steps[i])
            since = steps[i]
            if max_stalls is not None and len(out) >= max_stalls:
                break
    return out
