"""Percentile bootstrap intervals for metrics of (y_true, y_pred, sensitive) on a test split.

A fairness gap measured on a test set of a few hundred minority-group samples moves by about
+-0.02 between resamples; a figure without its interval invites reading noise as progress.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def bootstrap_interval(metric: Metric, y_true: np.ndarray, y_pred: np.ndarray,
                       sensitive: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """(low, high) percentile interval of ``metric`` over ``n_boot`` row resamples."""
    if not 0 < level < 1:
        raise ValueError(f"level: expected a probability in (0, 1), got {level!r}")
    y_true, y_pred, sensitive = (np.asarray(a) for a in (y_true, y_pred, sensitive))
    rng = np.random.default_rng(seed)
    n = len(y_true)
    draws = np.array([metric(y_true[i], y_pred[i], sensitive[i])
                      for i in (rng.integers(0, n, n) for _ in range(n_boot))])
    draws = draws[~np.isnan(draws)]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))
