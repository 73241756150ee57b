"""The one definition of counts, tolerance, ratios and labels (pipeline.curvature.spectrum)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.curvature import spectrum


def test_counts_with_tolerance_are_inclusive_at_zero():
    c = spectrum.count(np.array([-2.0, -1e-9, 0.0, 1e-9, 1e-3, 3.0]), tol=1e-6)
    assert (c.n_pos, c.n_neg, c.n_zero, c.n_pos_naive) == (2, 1, 3, 3)
    edge = spectrum.count(np.array([-1e-6, 1e-6]), tol=1e-6)
    assert (edge.n_pos, edge.n_neg, edge.n_zero) == (0, 0, 2)


@pytest.mark.parametrize("lam,label", [
    ([1.0, 2.0], "minimum"),
    ([0.0, 2.0], "degenerate_minimum"),
    ([-1.0, 2.0], "saddle"),
    ([-1.0, 0.0, 2.0], "saddle"),
    ([-1.0, -2.0], "maximum"),
    ([-1.0, 0.0], "degenerate_maximum"),
    ([0.0, 0.0], "flat"),
])
def test_labels(lam, label):
    assert spectrum.label(spectrum.count(np.array(lam), tol=1e-8)) == label


def test_all_zero_hessian_is_flat_with_every_eigenvalue_zero():
    s = spectrum.summarize(np.zeros(7))
    assert s.counts.n_zero == 7 and s.label == "flat" and s.tol == 0.0


def test_ratios_definitions():
    c = spectrum.Counts(n_pos=6, n_neg=0, n_zero=379, n_pos_naive=194)
    r = spectrum.ratios(c)
    assert r["min_ratio"] == pytest.approx(6 / 385)
    assert r["min_ratio_naive"] == pytest.approx(194 / 385)
    assert r["min_ratio_curved"] == 1.0
    assert r["index"] == 0.0
    assert np.isnan(spectrum.ratios(spectrum.Counts(0, 0, 3, 0))["min_ratio_curved"])


def test_global_minimum_with_rounding_noise_is_not_a_saddle():
    """SCIENCE.md: 6 positive and 379 zero eigenvalues (gap 1.2e5); the naive share looks like a saddle."""
    rng = np.random.default_rng(0)
    lam = np.concatenate([rng.uniform(0.5, 40.0, 6), rng.normal(0, 4e-14, 379)])
    s = spectrum.summarize(lam)
    assert s.tol_method == "gap"
    assert (s.counts.n_pos, s.counts.n_neg, s.counts.n_zero) == (6, 0, 379)
    assert s.label == "degenerate_minimum"
    naive = spectrum.ratios(s.counts)["min_ratio_naive"]
    assert 0.4 < naive < 0.6  # the lecture's count calls this a saddle


def test_gap_finds_small_real_eigenvalues_below_the_relative_rule():
    # Real eigenvalues at 1e-8·max stand 1e5 above rounding noise: the gap keeps them, rel_tol=1e-6 would not.
    lam = np.array([-3e-8, 2e-8, 5e-8, 1.0, 2.0, -0.5, 1e-16, -2e-16, 3e-17])
    tol, how = spectrum.choose_tol(np.abs(lam))
    assert how == "gap" and 2e-16 < tol < 2e-8
    c = spectrum.count(lam, tol)
    assert (c.n_pos, c.n_neg, c.n_zero) == (4, 2, 3)
    rel_tol, how = spectrum.choose_tol(np.abs(lam), mode="rel")
    assert how == "rel" and spectrum.count(lam, rel_tol).n_zero == 6


def test_gap_never_calls_zero_what_the_relative_rule_calls_nonzero():
    # A big gap between 1e-3 and 10 must not make 1e-3 (a real eigenvalue) zero.
    lam = np.array([1e-3, 2e-3, 10.0, 20.0])
    tol, how = spectrum.choose_tol(np.abs(lam))
    assert how == "rel" and tol == pytest.approx(2e-5)
    assert spectrum.count(lam, tol).n_zero == 0


def test_no_gap_falls_back_to_relative_tolerance():
    lam = np.linspace(-1, 1, 100)  # no eigenvalue at 0, spacing 0.02: no clear gap anywhere
    tol, how = spectrum.choose_tol(np.abs(lam), rel_tol=1e-6)
    assert how == "rel" and tol == pytest.approx(1e-6)


def test_exact_zeros_measure_their_gap_from_the_rounding_level():
    lam = np.array([0.0, 0.0, 0.5, -1.0, 2.0])
    tol, how = spectrum.choose_tol(np.abs(lam))
    assert how == "gap" and 1e-14 < tol < 1e-6
    assert spectrum.count(lam, tol).n_zero == 2


def test_abs_mode_and_given_tol():
    assert spectrum.choose_tol(np.array([1.0]), mode="abs", abs_tol=0.3) == (0.3, "abs")
    s = spectrum.summarize(np.array([-0.2, 0.5]), tol=0.25)
    assert s.tol_method == "given" and s.counts.n_zero == 1
    with pytest.raises(ValueError, match="mode"):
        spectrum.choose_tol(np.array([1.0]), mode="loose")
    with pytest.raises(ValueError, match="tol must be"):
        spectrum.count(np.array([1.0]), -1.0)


def test_nonfinite_spectrum_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        spectrum.summarize(np.array([1.0, np.nan]))


def test_ratio_vs_tol_matches_direct_counts():
    rng = np.random.default_rng(1)
    lam = rng.normal(size=200) * np.logspace(-12, 0, 200)
    rels = np.logspace(-12, -1, 12)
    top = np.abs(lam).max()
    expected = [(lam > r * top).mean() for r in rels]
    np.testing.assert_allclose(spectrum.ratio_vs_tol(lam, rels), expected)
    assert np.all(np.diff(spectrum.ratio_vs_tol(lam, rels)) <= 0)
