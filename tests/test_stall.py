"""Stall detection on synthetic loss curves: a pure function of the history."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.landscape import stall

STEPS = list(range(0, 5001, 10))


def _curve(f):
    return [float(f(s)) for s in STEPS]


def test_steady_descent_never_stalls():
    losses = _curve(lambda s: np.exp(-s / 400.0))
    assert stall.stall_steps(STEPS, losses, window=500, threshold=1e-3) == []


def test_plateau_stalls_once_the_window_is_flat():
    losses = _curve(lambda s: 1.0 if s >= 2000 else 1.0 + (2000 - s) / 1000.0)
    found = stall.stall_steps(STEPS, losses, window=500, threshold=1e-3, max_stalls=1)
    assert found == [2500]


def test_noisy_plateau_stalls_and_window_restarts_after_each_stall():
    rng = np.random.default_rng(0)
    losses = [0.5 + 1e-6 * rng.standard_normal() for _ in STEPS]
    found = stall.stall_steps(STEPS, losses, window=500, threshold=1e-3)
    assert found[:3] == [500, 1000, 1500]


def test_oscillation_with_no_net_progress_stalls():
    losses = _curve(lambda s: 1.0 + 0.3 * (s // 10 % 2))
    assert stall.stall_steps(STEPS, losses, window=500, threshold=1e-3, max_stalls=1) == [500]


def test_slow_but_real_progress_is_not_a_stall():
    # 1% per window improvement against a 0.1% threshold.
    losses = _curve(lambda s: 0.99 ** (s / 500.0))
    assert stall.stall_steps(STEPS, losses, window=500, threshold=1e-3) == []


def test_loss_reaching_zero_stalls():
    losses = _curve(lambda s: max(0.0, 1.0 - s / 1000.0))
    assert stall.stall_steps(STEPS, losses, window=500, threshold=1e-3, max_stalls=1) == [1500]


def test_needs_a_full_window_and_validates_arguments():
    assert not stall.is_stalled([0, 10], [1.0, 1.0], window=500, threshold=1e-3)
    with pytest.raises(ValueError, match="window"):
        stall.is_stalled([0], [1.0], window=0, threshold=1e-3)
    with pytest.raises(ValueError, match="differ in length"):
        stall.is_stalled([0, 1], [1.0], window=1, threshold=1e-3)
