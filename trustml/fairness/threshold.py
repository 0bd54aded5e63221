"""One decision threshold for every group, chosen on validation subject to the fairness constraint.

A model trained towards parity still thresholds its score at 0.5, which is rarely the most accurate
threshold that keeps the gap under the target. :func:`threshold_curve` gives validation accuracy
and gap at every candidate threshold in one vectorised pass, and :func:`best_threshold` picks the
most accurate feasible one. Unlike Fairlearn's ThresholdOptimizer it is the *same* threshold for
all groups, so the sensitive attribute is still not needed at prediction time.
:func:`fold_threshold` moves it into the head's bias, so ``P(y=1) >= 0.5`` of the saved model is
``score >= t`` of the trained one and every evaluator reads the chosen decision unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

CANDIDATES = 199  # thresholds at the validation scores' quantiles 0.005 ... 0.995, plus 0.5


def threshold_curve(scores: np.ndarray, y: np.ndarray, s: np.ndarray, thresholds: np.ndarray,
                    notion: str = "dp") -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, gap) of ``scores >= t`` for every ``t`` in ``thresholds``.

    The gap is the demographic parity difference (``dp``) or the equal opportunity difference
    (``eo``), max - min over the groups where the rate is defined, as in
    :mod:`trustml.fairness.metrics`.
    """
    if notion not in ("dp", "eo"):
        raise ValueError(f"notion: expected 'dp' or 'eo', got {notion!r}")
    hits = scores[None, :] >= thresholds[:, None]  # (T, n)
    accuracy = (hits == (y[None, :] == 1)).mean(1)
    rates = []
    for g in np.unique(s):
        members = (s == g) & (y == 1) if notion == "eo" else s == g
        if members.any():
            rates.append(hits[:, members].mean(1))
    if len(rates) < 2:
        return accuracy, np.zeros_like(accuracy)
    stacked = np.stack(rates)
    return accuracy, stacked.max(0) - stacked.min(0)


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
