"""The accuracy / gap curve over thresholds equals a brute-force loop, our metrics and Fairlearn's
(ties, several groups, a group without positives); one validation-chosen threshold: the choice is
feasible, folding it into the head keeps every decision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trustml.fairness.metrics import demographic_parity_difference, equal_opportunity_difference
from trustml.fairness.threshold import (
    best_threshold,
    candidates,
    cutoff_curve,
    fold_threshold,
    threshold_curve,
)


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


def _tied(groups: int, seed: int, no_positives: bool, n: int = 400):
    """Scores on a 0.05 grid (many ties); with ``no_positives`` the last group has no y = 1."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, groups, n)
    y = (rng.random(n) < 0.35).astype(np.int64)
    if no_positives:
        y[s == groups - 1] = 0
    scores = np.clip(np.round((0.25 * y + 0.05 * s + rng.normal(0.4, 0.2, n)) * 20) / 20, 0, 1)
    return scores, y, s


def _brute(scores, y, s, t, notion):
    """Accuracy and gap of ``scores >= t``, one threshold at a time: the gap is max - min of the
    selection rate (dp) or true positive rate (eo) over the groups where it is defined, 0 when
    fewer than two are."""
    pred = scores >= t
    rates = []
    for g in np.unique(s):
        base = (s == g) & (y == 1) if notion == "eo" else s == g
        if base.any():
            rates.append(pred[base].mean())
    gap = max(rates) - min(rates) if len(rates) > 1 else 0.0
    return (pred == (y == 1)).mean(), gap


@pytest.mark.parametrize("groups", [2, 3, 5])
@pytest.mark.parametrize("notion", ["dp", "eo"])
@pytest.mark.parametrize("no_positives", [False, True])
def test_threshold_curve_equals_brute_force_with_ties(groups, notion, no_positives):
    scores, y, s = _tied(groups, groups, no_positives)
    distinct = np.unique(scores)
    thresholds = np.concatenate([distinct, (distinct[1:] + distinct[:-1]) / 2, [-1.0, 2.0],
                                 candidates(scores)])  # at, between and beyond the ties
    accuracy, gap = threshold_curve(scores, y, s, thresholds, notion)
    for i, t in enumerate(thresholds):
        want_accuracy, want_gap = _brute(scores, y, s, t, notion)
        assert accuracy[i] == pytest.approx(want_accuracy, abs=1e-12)
        assert gap[i] == pytest.approx(want_gap, abs=1e-12)


def test_threshold_curve_without_two_groups_with_positives_has_no_gap():
    """Equal opportunity compares true positive rates: a group without positives has none and is
    left out (as in trustml.fairness.metrics); with fewer than two such groups the gap is 0."""
    scores, y, s = _tied(2, 0, no_positives=True)
    thresholds = np.unique(scores)
    assert (threshold_curve(scores, y, s, thresholds, "eo")[1] == 0).all()
    assert (threshold_curve(scores, np.zeros_like(y), s, thresholds, "eo")[1] == 0).all()
    assert threshold_curve(scores, y, s, thresholds, "dp")[1].max() > 0


@pytest.mark.parametrize("groups", [2, 3, 5])
@pytest.mark.parametrize("notion, metric", [("dp", demographic_parity_difference),
                                            ("eo", equal_opportunity_difference)])
@pytest.mark.parametrize("no_positives", [False, True])
def test_cutoff_curve_equals_brute_force_at_every_realisable_threshold(groups, notion, metric,
                                                                       no_positives):
    scores, y, s = _tied(groups, 10 + groups, no_positives)
    rows = np.stack([scores, scores[::-1], np.round(scores * 4) / 4])  # three score rows at once
    accuracy, gap, valid, thresholds = cutoff_curve(rows, y, s, notion)
    for r, row in enumerate(rows):
        realisable = {0} | {int((row >= v).sum()) for v in np.unique(row)}
        assert set(np.flatnonzero(valid[r]).tolist()) == realisable  # the cuts a threshold makes
        for k in np.flatnonzero(valid[r]):
            pred = row >= thresholds[r, k]
            assert pred.sum() == k
            want_accuracy, want_gap = _brute(row, y, s, thresholds[r, k], notion)
            assert accuracy[r, k] == pytest.approx(want_accuracy, abs=1e-12)
            assert gap[r, k] == pytest.approx(want_gap, abs=1e-12)
            assert gap[r, k] == pytest.approx(metric(y, pred.astype(np.int64), s), abs=1e-12)
    with pytest.raises(ValueError, match="notion"):
        cutoff_curve(rows, y, s, "eodds")


@pytest.mark.parametrize("groups", [2, 3])
def test_threshold_curve_matches_fairlearn(groups):
    """Fairlearn counts a group without positives as TPR 0; the curve, like our metrics, leaves it
    out, so the reference is taken where every group has positives."""
    fairlearn_metrics = pytest.importorskip("fairlearn.metrics")
    scores, y, s = _tied(groups, 20 + groups, no_positives=False)
    thresholds = np.array([0.3, 0.45, 0.5, 0.62, 0.8])
    for notion, reference in [("dp", fairlearn_metrics.demographic_parity_difference),
                              ("eo", fairlearn_metrics.equal_opportunity_difference)]:
        accuracy, gap = threshold_curve(scores, y, s, thresholds, notion)
        for i, t in enumerate(thresholds):
            pred = (scores >= t).astype(np.int64)
            assert accuracy[i] == pytest.approx((pred == y).mean(), abs=1e-12)
            assert gap[i] == pytest.approx(reference(y, pred, sensitive_features=s), abs=1e-12)


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
