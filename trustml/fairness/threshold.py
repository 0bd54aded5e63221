"""One decision threshold for every group, chosen on validation subject to the fairness constraint.

A model trained towards parity still thresholds its score at 0.5, which is rarely the most accurate
threshold that keeps the gap under the target. :func:`cutoff_curve` gives validation accuracy
and gap at every threshold from one sort (:mod:`trustml.fairness.posterior` selects its decision
on it too), :func:`threshold_curve` reads it at the candidate thresholds, and
:func:`best_threshold` picks the most accurate feasible one. Unlike Fairlearn's
ThresholdOptimizer it is the *same* threshold for all groups, so the sensitive attribute is still
not needed at prediction time. :func:`fold_threshold` moves it into the head's bias, so
``P(y=1) >= 0.5`` of the saved model is ``score >= t`` of the trained one and every evaluator
reads the chosen decision unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

CANDIDATES = 199  # thresholds at the validation scores' quantiles 0.005 ... 0.995, plus 0.5


def cutoff_curve(scores: np.ndarray, y: np.ndarray, s: np.ndarray, notion: str = "dp"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every row of ``scores`` (C, n) and every cut k = 0..n (the top k scores predicted 1):
    accuracy, fairness gap, whether the cut falls between distinct scores (so a threshold can
    realise it), and that threshold (a midpoint). All (C, n + 1).

    Why cuts: one stable sort and cumulative counts give the accuracy and every group's rate at
    all n + 1 cuts in O(n log n) per row, where comparing each score with each threshold costs
    (thresholds x n), and a whole grid of score rows (:mod:`trustml.fairness.posterior`'s
    coefficients) is one call. It is exact at ties: ``score >= t`` selects the top
    k = #(score >= t), a cut between distinct scores, and the rates there are integer counts over
    group sizes. The gap is the demographic parity difference (``dp``) or the equal opportunity
    difference (``eo``): max - min over the groups where the rate is defined (a group without
    positives has no true positive rate), 0 when fewer than two are, as in
    :mod:`trustml.fairness.metrics`.
    """
    if notion not in ("dp", "eo"):
        raise ValueError(f"notion: expected 'dp' or 'eo', got {notion!r}")
    rows, n = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, 1)
    zero = np.zeros((rows, 1))
    positives = np.concatenate([zero, np.cumsum(y[order], 1)], 1)
    k = np.arange(n + 1)
    accuracy = (2 * positives - k + (n - y.sum())) / n  # selected positives + unselected negatives
    high = low = None  # running max and min over groups: no (groups, C, n + 1) array
    for g in np.unique(s):
        members = (s == g) & (y == 1) if notion == "eo" else s == g
        if members.any():
            rate = np.concatenate([zero, np.cumsum(members[order], 1)], 1) / members.sum()
            high = rate if high is None else np.maximum(high, rate)
            low = rate if low is None else np.minimum(low, rate)
    gap = np.zeros_like(accuracy) if high is None else high - low
    valid = np.ones((rows, n + 1), dtype=bool)
    valid[:, 1:n] = ranked[:, :-1] > ranked[:, 1:]
    thresholds = np.concatenate([ranked[:, :1] + 1.0, (ranked[:, :-1] + ranked[:, 1:]) / 2,
                                 ranked[:, -1:] - 1.0], 1)
    return accuracy, gap, valid, thresholds


def threshold_curve(scores: np.ndarray, y: np.ndarray, s: np.ndarray, thresholds: np.ndarray,
                    notion: str = "dp") -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, gap) of ``scores >= t`` for every ``t`` in ``thresholds``: :func:`cutoff_curve`
    read at the cut each threshold makes."""
    accuracy, gap, _, _ = cutoff_curve(scores[None], y, s, notion)
    cut = len(scores) - np.searchsorted(np.sort(scores), thresholds, side="left")
    return accuracy[0, cut], gap[0, cut]


def candidates(scores: np.ndarray) -> np.ndarray:
    """Thresholds worth trying: the validation scores' quantiles and 0.5."""
    grid = np.quantile(scores, np.linspace(0.005, 0.995, CANDIDATES))
    return np.unique(np.clip(np.append(grid, 0.5), 1e-6, 1 - 1e-6))


def best_threshold(scores: np.ndarray, y: np.ndarray, s: np.ndarray, bound: float,
                   notion: str = "dp") -> tuple[float, float, float] | None:
    """(threshold, accuracy, gap) of the most accurate threshold with gap <= ``bound``; None if no
    candidate meets it. Ties go to the threshold nearest 0.5."""
    thresholds = candidates(scores)
    accuracy, gap = threshold_curve(scores, y, s, thresholds, notion)
    feasible = np.flatnonzero(gap <= bound)
    if feasible.size == 0:
        return None
    order = np.lexsort((np.abs(thresholds[feasible] - 0.5), -accuracy[feasible]))
    i = feasible[order[0]]
    return float(thresholds[i]), float(accuracy[i]), float(gap[i])


def fold_threshold(head: nn.Linear, threshold: float) -> None:
    """Shift a two-logit head so that softmax P(y=1) >= 0.5 exactly when the old P(y=1) >= t.

    P(y=1) = sigmoid(l1 - l0), so ``P >= t`` is ``l1 - l0 >= logit(t)``: subtract logit(t) from the
    class-1 bias.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a probability in (0, 1), got {threshold!r}")
    if head.out_features != 2 or head.bias is None:
        raise ValueError("fold_threshold: needs a two-logit linear head with a bias")
    with torch.no_grad():
        head.bias[1] -= math.log(threshold / (1 - threshold))
