"""Fairness metrics agree with Fairlearn / scikit-learn on random inputs, including 3 groups."""

import numpy as np
import pytest
import torch

from trustml.fairness import metrics

fairlearn_metrics = pytest.importorskip("fairlearn.metrics")
sk_metrics = pytest.importorskip("sklearn.metrics")


def _random(seed: int, n: int, groups: int):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, groups, n)
    y = (rng.random(n) < 0.3 + 0.1 * s).astype(int)
    scores = np.clip(0.4 * y + 0.1 * s + rng.normal(0, 0.3, n), 0, 1)
    return y, scores, s


@pytest.mark.parametrize("seed,groups", [(0, 2), (1, 2), (2, 3), (3, 3), (4, 4)])
def test_gaps_match_fairlearn(seed, groups):
    y, scores, s = _random(seed, 500, groups)
    pred = (scores >= 0.5).astype(int)
    for ours, theirs in [
        (metrics.demographic_parity_difference, fairlearn_metrics.demographic_parity_difference),
        (metrics.demographic_parity_ratio, fairlearn_metrics.demographic_parity_ratio),
        (metrics.equalized_odds_difference, fairlearn_metrics.equalized_odds_difference),
    ]:
        assert ours(y, pred, s) == pytest.approx(theirs(y, pred, sensitive_features=s), abs=1e-12)
    frame = fairlearn_metrics.MetricFrame(
        metrics={
            "tpr": fairlearn_metrics.true_positive_rate,
            "fpr": fairlearn_metrics.false_positive_rate,
            "sel": fairlearn_metrics.selection_rate,
            "acc": sk_metrics.accuracy_score,
        },
        y_true=y,
        y_pred=pred,
        sensitive_features=s,
    )
    assert metrics.equal_opportunity_difference(y, pred, s) == pytest.approx(
        frame.difference()["tpr"], abs=1e-12
    )
    ours = metrics.group_metrics(y, pred, s)
    assert sorted(ours) == list(range(groups))
    for g in range(groups):
        row = frame.by_group.loc[g]
        assert ours[g]["tpr"] == pytest.approx(row["tpr"])
        assert ours[g]["fpr"] == pytest.approx(row["fpr"])
        assert ours[g]["selection_rate"] == pytest.approx(row["sel"])
        assert ours[g]["accuracy"] == pytest.approx(row["acc"])
        assert ours[g]["count"] == int((s == g).sum())


def test_hand_computed_case_and_tensors():
    y = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0])
    pred = torch.tensor([1, 0, 1, 0, 1, 1, 1, 0])
    s = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # group 0: sel 2/4, tpr 1/2, fpr 1/2; group 1: sel 3/4, tpr 1, fpr 2/3
    assert metrics.demographic_parity_difference(y, pred, s) == pytest.approx(0.25)
    assert metrics.demographic_parity_ratio(y, pred, s) == pytest.approx(2 / 3)
    assert metrics.equal_opportunity_difference(y, pred, s) == pytest.approx(0.5)
    assert metrics.equalized_odds_difference(y, pred, s) == pytest.approx(0.5)
    assert metrics.selection_rate(y, pred) == pytest.approx(5 / 8)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * y, 1)  # many ties
    assert metrics.roc_auc(y, scores) == pytest.approx(sk_metrics.roc_auc_score(y, scores))
    assert np.isnan(metrics.roc_auc(np.ones(5, int), rng.random(5)))


def test_classification_report_matches_sklearn_and_is_json_safe():
    import json

    y, scores, s = _random(7, 400, 3)
    s[:3] = 3
    y[:3] = 0  # group 3 has no positives: TPR and AUC undefined
    report = metrics.classification_report(
        y, scores, s, threshold=0.5, group_names=["a", "b", "c", "d"]
    )
    pred = (scores >= 0.5).astype(int)
    assert report["accuracy"] == pytest.approx(sk_metrics.accuracy_score(y, pred))
    assert report["balanced_accuracy"] == pytest.approx(sk_metrics.balanced_accuracy_score(y, pred))
    assert report["auc"] == pytest.approx(sk_metrics.roc_auc_score(y, scores))
    assert report["demographic_parity_difference"] == pytest.approx(
        fairlearn_metrics.demographic_parity_difference(y, pred, sensitive_features=s)
    )
    assert set(report["groups"]) == {"a", "b", "c", "d"}
    m = s == 1
    assert report["groups"]["b"]["auc"] == pytest.approx(sk_metrics.roc_auc_score(y[m], scores[m]))
    assert report["groups"]["d"]["tpr"] is None and report["groups"]["d"]["auc"] is None
    json.dumps(report, allow_nan=False)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="same length"):
        metrics.demographic_parity_difference([0, 1], [0, 1, 1], [0, 0])
    with pytest.raises(ValueError, match="y_pred: expected binary"):
        metrics.demographic_parity_difference([0, 1], [0.2, 0.7], [0, 1])
