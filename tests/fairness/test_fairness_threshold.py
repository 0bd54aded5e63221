"""One validation-chosen threshold: its curve equals the metrics, the choice is feasible, folding
it into the head keeps every decision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trustml.fairness.metrics import demographic_parity_difference, equal_opportunity_difference
from trustml.fairness.threshold import best_threshold, candidates, fold_threshold, threshold_curve


def _data(groups: int, n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, groups, n)
    y = (rng.random(n) < 0.2 + 0.1 * s / groups).astype(np.int64)
    scores = np.clip(0.3 * y + 0.1 * s / groups + rng.normal(0.3, 0.2, n), 0.001, 0.999)
    return scores, y, s


@pytest.mark.parametrize("groups", [2, 5])
@pytest.mark.parametrize("notion, metric", [("dp", demographic_parity_difference),
                                            ("eo", equal_opportunity_difference)])
def test_curve_equals_the_metrics_at_every_threshold(groups, notion, metric):
    scores, y, s = _data(groups)
    thresholds = candidates(scores)
    accuracy, gap = threshold_curve(scores, y, s, thresholds, notion)
    for i in range(0, len(thresholds), 17):
        pred = (scores >= thresholds[i]).astype(np.int64)
        assert accuracy[i] == pytest.approx((pred == y).mean())
        assert gap[i] == pytest.approx(metric(y, pred, s))


def test_best_threshold_is_the_most_accurate_feasible_one():
    scores, y, s = _data(2)
    thresholds = candidates(scores)
    accuracy, gap = threshold_curve(scores, y, s, thresholds)
    bound = float(np.quantile(gap, 0.3))
    t, acc, g = best_threshold(scores, y, s, bound)
    assert g <= bound and acc == pytest.approx(accuracy[gap <= bound].max())
    assert acc < accuracy.max()  # the unconstrained best breaks the bound on this data
    assert best_threshold(scores, y, s, -1.0) is None


def test_folded_threshold_gives_the_same_decisions_at_half():
    torch.manual_seed(0)
    head = nn.Linear(4, 2)
    z = torch.randn(500, 4)
    before = torch.softmax(head(z), -1)[:, 1].detach().numpy()
    t = float(np.quantile(before, 0.7))
    fold_threshold(head, t)
    after = torch.softmax(head(z), -1)[:, 1].detach().numpy()
    near = np.abs(before - t) < 1e-6  # float rounding at the boundary itself
    assert ((after >= 0.5) == (before >= t))[~near].all()
    assert (after >= 0.5).mean() == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="threshold"):
        fold_threshold(head, 1.0)
