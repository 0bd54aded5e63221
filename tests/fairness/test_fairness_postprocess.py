"""Wasserstein-barycenter post-processing, KS distance, linear FERM and the torch linear models."""

import numpy as np
import pytest

from trustml.fairness.ferm import LinearFERM
from trustml.fairness.linear import fit_linear
from trustml.fairness.metrics import equal_opportunity_difference
from trustml.fairness.postprocess import WassersteinBarycenterFair, ks_distance


def test_ks_distance_matches_scipy_and_takes_the_worst_pair():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(0, 1, 300), rng.normal(0.3, 1, 200), rng.normal(1.0, 1, 250)
    values = np.concatenate([a, b, c])
    s = np.repeat([0, 1, 2], [300, 200, 250])
    assert ks_distance(values[s < 2], s[s < 2]) == pytest.approx(stats.ks_2samp(a, b).statistic)
    worst = max(stats.ks_2samp(p, q).statistic for p, q in [(a, b), (a, c), (b, c)])
    assert ks_distance(values, s) == pytest.approx(worst)


def test_barycenter_hand_computed_case():
    post = WassersteinBarycenterFair(jitter=0.0).fit(
        [0, 1, 2, 3, 10, 11, 12, 13], [0] * 4 + [1] * 4
    )
    # group 0 value 1: F_0 = 2/4, Q_0(1/2) = 1, Q_1(1/2) = 11 -> 0.5 * 1 + 0.5 * 11
    assert post.transform([1.0, 12.0], [0, 1]) == pytest.approx([6.0, 7.0])
    np.testing.assert_allclose(
        post.quantile(np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.34, 1.0])), [1.0, 2.0, 3.0]
    )


def test_barycenter_removes_group_shift_on_held_out_data_and_keeps_order():
    rng = np.random.default_rng(1)

    def draw(n):
        s = (rng.random(n) < 0.3).astype(int)
        return rng.gamma(2.0, 1.0, n) + 2.0 * s + 0.5 * s * rng.normal(size=n), s

    calib, s_calib = draw(4000)
    test, s_test = draw(4000)
    post = WassersteinBarycenterFair(seed=0).fit(calib, s_calib)
    fair = post.transform(test, s_test)
    assert ks_distance(test, s_test) > 0.5
    assert ks_distance(fair, s_test) < 0.05
    for g in (0, 1):  # monotone within each group
        order = np.argsort(test[s_test == g])
        assert np.all(np.diff(fair[s_test == g][order]) >= -1e-9)
    # the barycenter's mean is the weighted mean of the group means
    pi = np.bincount(s_calib) / len(s_calib)
    assert fair.mean() == pytest.approx(
        sum(pi[g] * calib[s_calib == g].mean() for g in (0, 1)), abs=0.1
    )


def test_barycenter_jitter_handles_ties_and_unseen_groups_error():
    scores = np.repeat([0.1, 0.5, 0.9], 500)
    s = np.tile([0, 1], 750)
    post = WassersteinBarycenterFair(jitter=1e-3).fit(scores, s)
    assert ks_distance(post.transform(scores, s), s) < 0.05
    with pytest.raises(ValueError, match="not in the calibration"):
        post.transform([0.5], [7])


def _biased_linear_data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    s = (rng.random(n) < 0.4).astype(int)
    x = rng.normal(size=(n, 4))
    x[:, 0] += 1.5 * s  # a proxy of the sensitive attribute
    y = (x[:, 1] + 0.8 * x[:, 0] + 0.5 * rng.normal(size=n) > 0.8).astype(int)
    return x, y, s


def test_linear_ferm_projects_out_positive_mean_difference():
    x, y, s = _biased_linear_data()
    ferm = LinearFERM().fit(x, y, s)
    xp = ferm.transform(x)
    u = x[(y == 1) & (s == 1)].mean(0) - x[(y == 1) & (s == 0)].mean(0)
    np.testing.assert_allclose(xp @ u, 0.0, atol=1e-9)
    # projected positives have equal group means, so any linear score has equal group means
    np.testing.assert_allclose(
        xp[(y == 1) & (s == 1)].mean(0), xp[(y == 1) & (s == 0)].mean(0), atol=1e-9
    )
    base = fit_linear(x, y, "squared_hinge")
    fair = fit_linear(xp, y, "squared_hinge")
    assert equal_opportunity_difference(
        y, fair.predict(xp), s
    ) < 0.5 * equal_opportunity_difference(y, base.predict(x), s)


def test_linear_models_match_sklearn():
    lm = pytest.importorskip("sklearn.linear_model")
    svm = pytest.importorskip("sklearn.svm")
    x, y, _ = _biased_linear_data(800, seed=2)
    ours = fit_linear(x, y, "logistic", c=0.5)
    ref = lm.LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(x, y)
    np.testing.assert_allclose(ours.weight, ref.coef_[0], rtol=1e-4, atol=1e-5)
    ours = fit_linear(x, y, "squared_hinge", c=0.5)
    ref = svm.LinearSVC(
        C=0.5, loss="squared_hinge", tol=1e-10, max_iter=100000, intercept_scaling=1e4
    ).fit(x, y)
    np.testing.assert_allclose(ours.weight, ref.coef_[0], rtol=1e-3, atol=1e-4)
