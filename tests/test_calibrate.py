"""The unsure band's rule (calibrate.unsure_band): confident calls right 95 % of the time, and
at most REAL_CALLED_FAKE_MAX of the real validation faces called fake."""

import numpy as np
import pytest

import calibrate


def scores(n=1000, seed=0):
    """Validation-like scores: reals mostly low, fakes mostly high, with a tail of reals that
    look fake (the case the cap is for)."""
    rng = np.random.default_rng(seed)
    real = np.r_[rng.beta(2, 8, n - 30), rng.uniform(0.7, 1.0, 30)]  # 3 % of reals score high
    fake = rng.beta(8, 2, n)
    return np.r_[real, fake], np.r_[np.zeros(n, int), np.ones(n, int)]


def test_precision_rule_alone_lets_through_more_reals_than_the_cap():
    prob, labels = scores()
    low, high, stats = calibrate.unsure_band(prob, labels, 0.5, max_real_called_fake=None)
    assert stats["fake_precision"] >= 0.95 and stats["real_precision"] >= 0.95
    assert stats["real_called_fake"] > 0.01  # the precision rule tolerates these reals


def test_the_default_caps_reals_called_fake_at_the_tightest_bound():
    prob, labels = scores()
    low, high, stats = calibrate.unsure_band(prob, labels, 0.5)
    real = prob[labels == 0]
    assert stats["max_real_called_fake"] == calibrate.REAL_CALLED_FAKE_MAX == 0.01
    assert (real >= high).mean() <= 0.01
    assert stats["real_called_fake"] == pytest.approx((real >= high).mean())
    # The bound is the lowest score that meets both rules: the next score down breaks one.
    below = prob[prob < high].max()
    calls = prob >= below
    assert (real >= below).mean() > 0.01 or (labels[calls] == 1).mean() < 0.95
    # The real side is untouched by the cap.
    assert low == calibrate.unsure_band(prob, labels, 0.5, max_real_called_fake=None)[0]


def test_the_cap_changes_nothing_where_precision_already_keeps_reals_out():
    rng = np.random.default_rng(1)
    prob = np.r_[rng.uniform(0, 0.4, 500), rng.uniform(0.6, 1, 500)]
    labels = np.r_[np.zeros(500, int), np.ones(500, int)]
    capped = calibrate.unsure_band(prob, labels, 0.5)
    plain = calibrate.unsure_band(prob, labels, 0.5, max_real_called_fake=None)
    assert capped[:2] == plain[:2]
    assert capped[2]["real_called_fake"] == 0.0
