"""Spread over training seeds: the mean with its t-interval, and paired differences.

Three seeds are a sample of three. Mean +- sd says where one more seed may land; the 95%
t-interval (t(0.975, 2) = 4.30, so about +-2.5 sd at three seeds) says how well they pin the mean,
which is what a claim such as "the fair encoder is lower" is about. Two methods trained on the same
seeds (same split, same initialisation stream) are compared pairwise: the seed-to-seed variation
they share cancels in the per-seed difference, and the interval is that of the differences.
The README's results table uses the same interval (``scripts/readme_results.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided ``level`` Student-t interval of the mean of ``values``.

    One value has no spread to estimate: its interval is (nan, nan)."""
    if not 0 < level < 1:
        raise ValueError(f"level: expected a probability in (0, 1), got {level!r}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values: expected a non-empty 1-D sequence, got shape {x.shape}")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_difference(first: Sequence[float], second: Sequence[float],
                      level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of ``first - second`` seed by seed (a paired t-interval)."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same seeds, got {a.shape} and {b.shape}")
    return t_interval(a - b, level)


def finite_or_none(value: float) -> float | None:
    """JSON-safe: a NaN bound (one seed) is written as null."""
    return None if math.isnan(value) else float(value)
