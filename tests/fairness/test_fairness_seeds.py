"""Mean and 95% t-interval over seeds, and the paired difference of two methods, against a hand
computation and scipy.stats."""

import math

import numpy as np
import pytest
from scipy import stats

from trustml.fairness.seeds import finite_or_none, paired_difference, t_interval


def test_t_interval_by_hand_and_against_scipy():
    mean, lo, hi = t_interval([0.85, 0.86, 0.87])  # sd 0.01, t(0.975, 2) = 4.302653
    assert mean == pytest.approx(0.86)
    assert hi - mean == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-6)
    assert lo == pytest.approx(2 * mean - hi)
    values = [0.031, 0.047, 0.019, 0.026]
    want = stats.t.interval(0.9, 3, loc=np.mean(values), scale=stats.sem(values))
    assert t_interval(values, level=0.9)[1:] == pytest.approx(want)


def test_paired_difference_is_scipy_ttest_rel_interval():
    fair, plain = [0.033, 0.021, 0.046], [0.150, 0.146, 0.154]
    mean, lo, hi = paired_difference(fair, plain)
    ci = stats.ttest_rel(fair, plain).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ci.low, ci.high))
    assert mean == pytest.approx(np.mean(fair) - np.mean(plain))
    # pairing matters: the unpaired spread of the two columns gives a wider interval
    shared = [0.10, 0.20, 0.30]
    a, b = [s + 0.01 for s in shared], [s + 0.02 + 0.001 * k for k, s in enumerate(shared)]
    _, plo, phi = paired_difference(a, b)
    _, alo, ahi = t_interval(np.array(a) - np.mean(b))
    assert phi - plo < (ahi - alo) / 10 and phi < 0


def test_one_seed_has_no_interval_and_bad_input_is_refused():
    mean, lo, hi = t_interval([0.5])
    assert mean == 0.5 and math.isnan(lo) and math.isnan(hi)
    assert finite_or_none(lo) is None and finite_or_none(0.25) == 0.25
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="level"):
        t_interval([0.1, 0.2], level=95)
    with pytest.raises(ValueError, match="non-empty"):
        t_interval([])
