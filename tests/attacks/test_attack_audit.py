"""Empirical epsilon lower bounds: closed forms, mechanisms with known epsilon, and null cases."""

import math

import numpy as np
import pytest
from scipy import stats

from trustml.attacks import audit


def perfect(n):
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    return member.astype(float), member


@pytest.mark.parametrize("selection", ["bonferroni", "split"])
def test_perfect_separator_bound_grows_with_samples(selection):
    bounds = [audit.epsilon_lower_bound(*perfect(n), delta=1e-5, selection=selection)
              for n in (50, 500, 5000)]
    assert 0 < bounds[0] < bounds[1] < bounds[2]


def test_perfect_separator_closed_form():
    n, alpha, delta = 1000, 0.05, 1e-5
    # two distinct scores -> two candidate thresholds; two one-sided bounds per threshold
    a = alpha / 2 / 2
    tpr_lb = a ** (1 / n)  # Clopper-Pearson lower bound for n successes of n
    fpr_ub = 1 - a ** (1 / n)
    expected = math.log((tpr_lb - delta) / fpr_ub)
    assert audit.epsilon_lower_bound(*perfect(n), delta=delta, alpha=alpha) == pytest.approx(
        expected)


@pytest.mark.parametrize("method", ["clopper_pearson", "gdp"])
def test_identical_distributions_give_zero(method):
    rng = np.random.default_rng(0)
    scores, member = rng.normal(size=4000), rng.random(4000) < 0.5
    assert audit.epsilon_lower_bound(scores, member, 1e-5, method=method) == pytest.approx(
        0, abs=0.05)


def test_randomized_response_bound_is_sound_and_tight():
    """Randomised response with eps = 1 says "member" w.p. e/(1+e) for members, 1/(1+e) else."""
    eps, rng = 1.0, np.random.default_rng(3)
    member = rng.random(40000) < 0.5
    keep = rng.random(member.size) < math.exp(eps) / (1 + math.exp(eps))
    guess = np.where(keep, member, ~member).astype(float)
    bound = audit.epsilon_lower_bound(guess, member, delta=0.0)
    assert 0.85 * eps < bound <= eps


def test_gaussian_scores_gdp_bound_close_to_truth():
    mu, n, rng = 1.0, 20000, np.random.default_rng(4)
    scores = np.r_[rng.normal(mu, 1, n), rng.normal(0, 1, n)]
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    truth = audit.gdp_epsilon(mu, 1e-5)
    bound = audit.epsilon_lower_bound(scores, member, 1e-5, method="gdp")
    assert 0.8 * truth < bound <= truth
    assert audit.epsilon_lower_bound(scores, member, 1e-5) <= truth


def test_gdp_conversion_matches_opacus():
    from opacus.accountants.analysis.gdp import eps_from_mu

    for mu in (0.5, 1.0, 2.0):
        assert audit.gdp_epsilon(mu, 1e-5) == pytest.approx(eps_from_mu(mu=mu, delta=1e-5))


def test_one_run_p_value_and_epsilon_by_hand():
    # delta = 0: p-value is the binomial tail P[Binom(r, e^eps / (1 + e^eps)) >= v]
    q = 1 / (1 + math.exp(-0.7))
    assert audit.one_run_p_value(1000, 50, 40, 0.7, 0.0) == pytest.approx(
        stats.binom.sf(39, 50, q))
    # all 100 guesses right: q^100 = 0.05 -> eps = logit(0.05^(1/100))
    rng = np.random.default_rng(5)
    member = rng.random(1000) < 0.5
    q = 0.05 ** (1 / 100)
    eps = audit.one_run_epsilon(member.astype(float), member, 0.0, k_pos=50, k_neg=50)
    assert eps == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    assert audit.one_run_epsilon(rng.normal(size=1000), member, 1e-5, 50, 50) == 0.0
    assert audit.one_run_epsilon(member.astype(float), member, 1e-5, 50, 50) < eps


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        audit.epsilon_lower_bound(*perfect(10), delta=1e-5, method="bogus")
    with pytest.raises(ValueError, match="k_pos"):
        audit.one_run_epsilon(*perfect(10), delta=0.0, k_pos=20, k_neg=5)
