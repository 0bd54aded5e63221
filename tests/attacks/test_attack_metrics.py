"""Attack metrics against hand-computed cases and naive / scikit-learn references."""

import numpy as np
import pytest
import torch

from trustml.attacks import metrics


def shifted_ranks():
    """Members arange(100) + 9.5 vs non-members arange(100)."""
    scores = np.r_[np.arange(100) + 9.5, np.arange(100.0)]
    return scores, np.r_[np.ones(100, bool), np.zeros(100, bool)]


def test_shifted_ranks_by_hand():
    scores, member = shifted_ranks()
    # member i + 9.5 beats min(i + 10, 100) non-members: (10 + ... + 100 + 9 * 100) / 100^2
    assert metrics.auc(scores, member) == pytest.approx((sum(range(10, 101)) + 900) / 1e4)
    assert metrics.auc(scores, member) == pytest.approx(0.5905)
    # 1% FPR admits non-member 99; members 99.5 .. 108.5 and 98.5 are above 98 -> 11 of 100
    assert metrics.tpr_at_fpr(scores, member, 0.01) == pytest.approx(0.11)
    # halfway to the first false positive: only the 10 members above every non-member
    assert metrics.tpr_at_fpr(scores, member, 0.005) == pytest.approx(0.10)
    # threshold 9.5: all members, 90 non-members (10..99)
    assert metrics.advantage(scores, member) == pytest.approx(0.10)
    assert metrics.best_balanced_accuracy(scores, member) == pytest.approx(0.55)


def test_perfect_and_reversed_separator():
    member = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    scores = member.astype(float)
    assert metrics.auc(scores, member) == 1.0
    assert metrics.tpr_at_fpr(scores, member, 0.0) == 1.0
    assert metrics.auc(-scores, member) == 0.0
    assert metrics.advantage(-scores, member) == 1.0


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 7, 300).astype(float)
    member = rng.random(300) < 0.4
    s_in, s_out = scores[member][:, None], scores[~member][None, :]
    naive = ((s_in > s_out) + 0.5 * (s_in == s_out)).mean()
    assert metrics.auc(scores, member) == pytest.approx(naive)


def test_roc_matches_sklearn_and_tensors_accepted():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    scores, member = rng.normal(size=500).round(1), rng.random(500) < 0.5
    fpr, tpr, thr = metrics.roc_curve(torch.tensor(scores), torch.tensor(member))
    ref_fpr, ref_tpr, ref_thr = sk.roc_curve(member, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thr[1:], ref_thr[1:])
    assert metrics.auc(torch.tensor(scores), member) == pytest.approx(
        sk.roc_auc_score(member, scores))


def test_tpr_at_fpr_never_splits_ties_by_default():
    # ROC: (0,0) -> (0.5, 0.5) [score 1, one IN one OUT tie] -> (1, 1)
    scores, member = np.array([1.0, 1.0, 0.0, 0.0]), np.array([1, 0, 1, 0], bool)
    assert metrics.tpr_at_fpr(scores, member, 0.25) == 0.0  # no threshold has FPR <= 0.25 but 0
    assert metrics.tpr_at_fpr(scores, member, 0.5) == 0.5
    assert metrics.tpr_at_fpr(scores, member, 0.25, interpolate=True) == pytest.approx(0.25)


def test_tpr_at_fpr_by_hand_with_ties():
    # members 5, 4, 3, 3, 3, 1 ; non-members 3, 3, 2, 0 (4 non-members: one FP = 0.25 FPR)
    scores = np.array([5, 4, 3, 3, 3, 1, 3, 3, 2, 0], float)
    member = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
    # thresholds: 5 -> (0, 1/6), 4 -> (0, 2/6), 3 -> (2/4, 5/6), 2 -> (3/4, 5/6), 1 -> (3/4, 1)
    assert metrics.tpr_at_fpr(scores, member, 0.0) == pytest.approx(2 / 6)
    assert metrics.tpr_at_fpr(scores, member, 0.25) == pytest.approx(2 / 6)  # tie at 3 not split
    assert metrics.tpr_at_fpr(scores, member, 0.5) == pytest.approx(5 / 6)
    assert metrics.tpr_at_fpr(scores, member, 0.75) == 1.0
    # interpolating half way up the tied column reads 2/6 + 0.5 * 3/6
    assert metrics.tpr_at_fpr(scores, member, 0.25, interpolate=True) == pytest.approx(7 / 12)
    # brute force over every threshold agrees with the default
    for f in (0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 1.0):
        best = max((scores[member] >= t).mean()
                   for t in np.r_[np.inf, scores] if (scores[~member] >= t).mean() <= f)
        assert metrics.tpr_at_fpr(scores, member, f) == pytest.approx(best)


def test_bootstrap_interval_brackets_estimate_and_narrows():
    rng = np.random.default_rng(2)

    def sample(n):
        return np.r_[rng.normal(1, 1, n), rng.normal(0, 1, n)], np.r_[np.ones(n), np.zeros(n)]

    small, large = sample(100), sample(3000)
    lo_s, hi_s = metrics.bootstrap_ci(metrics.auc, *small, n_boot=200)
    lo_l, hi_l = metrics.bootstrap_ci(metrics.auc, *large, n_boot=200)
    a, n = metrics.auc(*large), 3000
    assert lo_l <= a <= hi_l
    # Hanley & McNeil (1982) standard error of the AUC
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + (n - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (n * n))
    assert 0.75 < (hi_l - lo_l) / (2 * 1.96 * se) < 1.25
    assert hi_l - lo_l < (hi_s - lo_s) / 2


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="both members"):
        metrics.auc([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="entries"):
        metrics.auc([1.0, 2.0, 3.0], [1, 0])
    with pytest.raises(ValueError, match="fpr"):
        metrics.tpr_at_fpr([1.0, 2.0], [1, 0], 1.5)
