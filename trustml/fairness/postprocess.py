"""Wasserstein-barycenter fair post-processing (Chzhen, Denis, Hebiri, Oneto, Pontil, NeurIPS 2020).

Any predictor g(x, s) (a regression output or a classifier score) is mapped to

    g'(x, s) = sum_s' pi_s' * Q_s'( F_s( g(x, s) + jitter ) )

where F_s / Q_s are the empirical CDF / quantile function of the jittered predictions of group s on
a calibration split and pi_s the group frequencies. Every group's output then follows the same
distribution (the Wasserstein-2 barycenter of the group distributions), which is the optimal fair
predictor under demographic parity for the squared loss. The jitter breaks ties so that F_s(g) is
uniform within a group even when the predictor outputs repeated values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trustml.fairness.metrics import as_vector


def ks_distance(values: Any, sensitive: Any) -> float:
    """Largest two-sample Kolmogorov-Smirnov statistic sup_t |F_a(t) - F_b(t)| over group pairs."""
    values, sensitive = (
        as_vector(values, "values").astype(np.float64),
        as_vector(sensitive, "sensitive"),
    )
    if len(values) != len(sensitive):
        raise ValueError(
            f"values and sensitive differ in length: {len(values)} vs {len(sensitive)}"
        )
    samples = [np.sort(values[sensitive == g]) for g in np.unique(sensitive)]
    grid = np.sort(values)
    cdfs = [np.searchsorted(v, grid, side="right") / len(v) for v in samples]
    return float(
        max((np.abs(a - b).max() for i, a in enumerate(cdfs) for b in cdfs[i + 1 :]), default=0.0)
    )


class WassersteinBarycenterFair:
    """Estimator with ``fit(pred_calib, s_calib)`` and ``transform(pred, s)``.

    ``jitter``: half-width of the uniform noise added to predictions (tie breaking; keep it far
    below the scale of the predictions). ``seed`` makes the noise reproducible.
    """

    def __init__(self, jitter: float = 1e-5, seed: int = 0) -> None:
        if jitter < 0:
            raise ValueError(f"jitter: expected >= 0, got {jitter}")
        self.jitter, self.seed = float(jitter), seed
        self.groups_: np.ndarray | None = None

    def _noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(-self.jitter, self.jitter, n) if self.jitter else np.zeros(n)

    def fit(self, pred_calib: Any, s_calib: Any) -> WassersteinBarycenterFair:
        pred, s = as_vector(pred_calib, "pred_calib").astype(np.float64), as_vector(s_calib, "s_calib")
        if len(pred) != len(s):
            raise ValueError(f"pred_calib and s_calib differ in length: {len(pred)} vs {len(s)}")
        rng = np.random.default_rng(self.seed)
        self.groups_ = np.unique(s)
        self.sorted_ = [
            np.sort(pred[s == g] + self._noise(int((s == g).sum()), rng)) for g in self.groups_
        ]
        self.weights_ = np.array([len(v) for v in self.sorted_], dtype=np.float64) / len(pred)
        return self

    def transform(self, pred: Any, s: Any) -> np.ndarray:
        if self.groups_ is None:
            raise ValueError("WassersteinBarycenterFair: call fit() before transform()")
        pred, s = as_vector(pred, "pred").astype(np.float64), as_vector(s, "s")
        unseen = np.setdiff1d(np.unique(s), self.groups_)
        if unseen.size:
            raise ValueError(f"s: groups {unseen.tolist()} were not in the calibration data")
        rng = np.random.default_rng(self.seed + 1)
        noisy = pred + self._noise(len(pred), rng)
        out = np.empty_like(noisy)
        for g, calib in zip(self.groups_, self.sorted_):
            m = s == g
            level = np.searchsorted(calib, noisy[m], side="right") / len(calib)  # F_s
            out[m] = sum(w * self.quantile(q, level) for w, q in zip(self.weights_, self.sorted_))
        return out

    @staticmethod
    def quantile(sorted_values: np.ndarray, level: np.ndarray) -> np.ndarray:
        """Q(t) = inf {v : F(v) >= t} of an empirical distribution given by its sorted sample."""
        index = np.ceil(level * len(sorted_values)).astype(np.int64) - 1
        return sorted_values[np.clip(index, 0, len(sorted_values) - 1)]

    def fit_transform(self, pred: Any, s: Any) -> np.ndarray:
        return self.fit(pred, s).transform(pred, s)
