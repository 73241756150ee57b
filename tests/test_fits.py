"""The index power-law fit against data with a known exponent and critical loss."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.landscape.fits import index_power_fit


@pytest.mark.parametrize("p_true,eps_c", [(1.5, 0.2), (1.0, 0.05), (2.0, 0.5)])
def test_recovers_a_planted_exponent_and_critical_loss(p_true, eps_c):
    rng = np.random.default_rng(int(p_true * 10))
    eps = eps_c + rng.uniform(0.01, 1.0, 60)
    alpha = 0.4 * (eps - eps_c) ** p_true * np.exp(rng.normal(0, 0.05, eps.size))  # 5 % scatter
    fit = index_power_fit(eps, alpha)
    assert fit.p == pytest.approx(p_true, abs=0.1)
    assert fit.p_ci[0] <= p_true <= fit.p_ci[1]
    assert fit.eps_c == pytest.approx(eps_c, abs=0.02)
    assert fit.A == pytest.approx(0.4, rel=0.2) and fit.n == 60


def test_points_with_zero_index_are_left_out_and_too_few_points_refused():
    eps = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    alpha = np.array([0.0, 0.0, 0.01, 0.03, 0.05, 0.08])
    with pytest.raises(ValueError, match="got 3 points at 3 losses"):
        index_power_fit(eps[:5], alpha[:5])  # two of the five have index 0
    fit = index_power_fit(eps, alpha)
    assert fit.n == 4 and fit.eps_c < 0.3
    with pytest.raises(ValueError, match="1-D of one length"):
        index_power_fit(eps, alpha[:3])


def test_spearman_matches_scipy_and_its_interval_covers_the_truth():
    from scipy.stats import spearmanr

    from pipeline.landscape.fits import spearman

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 80)
    y = -x + rng.normal(0, 0.3, 80)
    y[:5] = y[0]  # ties
    res = spearman(x, y, n_boot=400)
    assert res.rho == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert res.ci[0] < res.rho < res.ci[1] and res.ci[1] < 0 and res.n == 80
    # Independent data: the interval straddles 0.
    free = spearman(rng.uniform(size=200), rng.uniform(size=200), n_boot=400)
    assert free.ci[0] < 0 < free.ci[1]
    assert spearman(np.arange(5.0), np.array([1, 2, np.nan, 4, 5.0])).n == 4
    with pytest.raises(ValueError, match="got 2"):
        spearman([1.0, 2.0], [3.0, 4.0])
