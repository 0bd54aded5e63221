"""Canary generation and exposure on constructed rankings."""

import math

import numpy as np
import pytest
from scipy import stats

from trustml.attacks.exposure import (
    CanaryFormat,
    exposure_by_rank,
    exposure_skewnorm,
    make_canaries,
)


def test_canaries_distinct_formatted_and_excluded():
    fmt = CanaryFormat(template="pin {}", alphabet="01", length=4)
    canaries = make_canaries(fmt, 10, seed=0)
    assert len(set(canaries)) == 10 and all(c.startswith("pin ") for c in canaries)
    rest = make_canaries(fmt, 6, seed=1, exclude=tuple(canaries))
    assert not set(rest) & set(canaries)
    assert fmt.log2_space == 4
    with pytest.raises(ValueError, match="cannot draw"):
        make_canaries(fmt, 7, seed=2, exclude=tuple(canaries))


def test_exposure_by_rank_constructed():
    # the full space of 2^10 secrets: canary at rank 1, rank 5 and rank 1024 (worst)
    others = np.arange(1.0, 1024.0)
    got = exposure_by_rank([0.5, 4.5, 2000.0], others)
    np.testing.assert_allclose(got, [10.0, 10.0 - math.log2(5), 0.0])


def test_skewnorm_extrapolates_beyond_sampled_candidates():
    cand = stats.skewnorm.rvs(4.0, loc=10, scale=2, size=20000, random_state=0)
    canary = 8.0  # far below every candidate's typical value
    truth = -stats.skewnorm.logcdf(canary, 4.0, 10, 2) / math.log(2)
    assert exposure_skewnorm(canary, cand)[0] == pytest.approx(truth, rel=0.1)
    assert truth > exposure_by_rank(canary, cand)[0]  # rank saturates at log2(n + 1)
