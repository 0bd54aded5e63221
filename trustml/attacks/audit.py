"""Empirical (epsilon, delta) lower bounds from membership-inference outcomes.

An (eps, delta)-DP mechanism forces every membership test to satisfy TPR <= e^eps FPR + delta and
TNR <= e^eps FNR + delta. An attack that beats those inequalities with statistical confidence proves
a lower bound on the true epsilon; an accountant claiming less than that bound is wrong.

Threshold choice. The bound must hold for the threshold that was *selected*, so selection either
uses a disjoint split (``selection="split"``: pick the best threshold on a random half, certify it on
the other half) or certifies every candidate at once (``selection="bonferroni"``, the default: the
confidence level alpha is divided by the number of candidate thresholds, which are the distinct
scores, thinned to at most ``max_thresholds`` quantiles). Within one threshold the two one-sided
Clopper-Pearson bounds (TPR lower, FPR upper) each get half of the level, so the whole statement
holds with probability >= 1 - alpha.

Independence. Clopper-Pearson treats every example as an independent trial of the mechanism, which
holds when each example's membership was decided by its own coin flip (the one-run design of the
``audit`` driver); for a fixed member/non-member split of one model it is the usual heuristic. The
one-run bound of Steinke, Nasr and Jagielski (2023) needs only the coin flips and holds for any
mechanism: it is the bound the audit driver uses for its violation check.

Not a bound: :func:`gdp_epsilon_estimate` fits a Gaussian trade-off curve (mu-GDP) through the
attack's ROC. It is an *estimate* under that assumption and can exceed the true epsilon of a
mechanism whose trade-off curve is not Gaussian (randomised response with epsilon 1 reads about 5),
so it is labelled as such everywhere and never used in a violation check.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy import optimize, stats

from trustml.attacks.metrics import _checked


def clopper_pearson(k: np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided exact binomial bounds: P(p < lower) <= alpha and P(p > upper) <= alpha each."""
    k = np.asarray(k, dtype=np.float64)
    lower = np.where(k > 0, stats.beta.ppf(alpha, k, n - k + 1), 0.0)
    upper = np.where(k < n, stats.beta.ppf(1.0 - alpha, k + 1, n - k), 1.0)
    return np.nan_to_num(lower, nan=0.0), np.nan_to_num(upper, nan=1.0)


def _candidates(scores: np.ndarray, max_thresholds: int) -> np.ndarray:
    distinct = np.unique(scores)
    if distinct.size > max_thresholds:
        distinct = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, max_thresholds)))
    return distinct


def _rates(scores, member, thresholds) -> tuple[np.ndarray, np.ndarray, int, int]:
    """True/false-positive counts of "member iff score >= t" for every t."""
    s_in, s_out = np.sort(scores[member]), np.sort(scores[~member])
    tp = s_in.size - np.searchsorted(s_in, thresholds, side="left")
    fp = s_out.size - np.searchsorted(s_out, thresholds, side="left")
    return tp, fp, s_in.size, s_out.size


def _eps_from_bounds(tpr_lb, fpr_ub, delta: float) -> np.ndarray:
    """max over both tests (guess member / guess non-member) of the DP inequality's epsilon."""
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = np.log((tpr_lb - delta) / fpr_ub)
        reverse = np.log(((1.0 - fpr_ub) - delta) / (1.0 - tpr_lb))
    eps = np.fmax(np.nan_to_num(direct, nan=0.0, posinf=0.0),
                  np.nan_to_num(reverse, nan=0.0, posinf=0.0))
    return np.maximum(eps, 0.0)


def gdp_delta(eps: float, mu: float) -> float:
    """delta(eps) of mu-GDP (Dong, Roth, Su 2019, Cor. 2.13), with the e^eps term in log space so
    that large mu (a near-perfect attack) does not overflow."""
    return float(stats.norm.cdf(-eps / mu + mu / 2)
                 - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest eps with delta(eps) <= delta for mu-GDP, solved numerically (delta is decreasing).
    mu-GDP with mu > 0 is (eps, delta)-DP only for delta > 0: at delta = 0 it returns infinity."""
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    if delta <= 0.0:
        return math.inf
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2.0
    return float(optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-12))


def _confident_rates(scores, member, thresholds, alpha) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: Clopper-Pearson TPR lower and FPR upper bound, alpha / 2 each."""
    tp, fp, n_in, n_out = _rates(scores, member, thresholds)
    tpr_lb, _ = clopper_pearson(tp, n_in, alpha / 2)
    _, fpr_ub = clopper_pearson(fp, n_out, alpha / 2)
    return tpr_lb, fpr_ub


def _check(delta: float, alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")


def epsilon_lower_bound(
    scores,
    is_member,
    delta: float,
    method: Literal["clopper_pearson"] = "clopper_pearson",
    alpha: float = 0.05,
    selection: Literal["bonferroni", "split"] = "bonferroni",
    max_thresholds: int = 1000,
    seed: int = 0,
) -> float:
    """Epsilon that the attack proves with confidence 1 - alpha (0.0 when it proves nothing).

    Clopper-Pearson on (TPR, FPR) at a threshold: valid for any mechanism. The Gaussian-trade-off
    figure is not a bound and lives in :func:`gdp_epsilon_estimate`."""
    if method == "gdp":
        raise ValueError("method 'gdp' is not a lower bound (it assumes a Gaussian trade-off "
                         "curve); use gdp_epsilon_estimate for that estimate")
    if method != "clopper_pearson":
        raise ValueError(f"method must be 'clopper_pearson', got {method!r}")
    _check(delta, alpha)
    scores, member = _checked(scores, is_member)
    if selection == "bonferroni":
        thresholds = _candidates(scores, max_thresholds)
        tpr_lb, fpr_ub = _confident_rates(scores, member, thresholds, alpha / thresholds.size)
        return float(_eps_from_bounds(tpr_lb, fpr_ub, delta).max())
    if selection != "split":
        raise ValueError(f"selection must be 'bonferroni' or 'split', got {selection!r}")
    # a stream of its own (not default_rng(seed)): the split must not echo a membership draw
    pick = np.random.default_rng((seed, 0x5EED)).random(scores.size) < 0.5
    (s_a, m_a), (s_b, m_b) = (scores[pick], member[pick]), (scores[~pick], member[~pick])
    if m_a.all() or not m_a.any() or m_b.all() or not m_b.any():
        raise ValueError("too few members/non-members to split for threshold selection")
    best = _best_threshold(s_a, m_a, _candidates(s_a, max_thresholds), delta)
    tpr_lb, fpr_ub = _confident_rates(s_b, m_b, np.array([best]), alpha)
    return float(_eps_from_bounds(tpr_lb, fpr_ub, delta).max())


def gdp_epsilon_estimate(
    scores,
    is_member,
    delta: float,
    alpha: float = 0.05,
    max_thresholds: int = 1000,
) -> float:
    """ESTIMATE (not a bound): epsilon at ``delta`` of the mu-GDP curve through the attack's most
    confident ROC corner, assuming the mechanism's trade-off curve is Gaussian.

    The tradeoff curve of mu-GDP passes through (FPR, FNR) iff mu = Phi^-1(1 - FPR) - Phi^-1(FNR);
    the confident corner (FPR upper, FNR upper bound, Bonferroni over thresholds) gives mu. A
    mechanism with a non-Gaussian trade-off curve (randomised response) can read far above its
    true epsilon, so this figure never enters a violation check."""
    _check(delta, alpha)
    scores, member = _checked(scores, is_member)
    thresholds = _candidates(scores, max_thresholds)
    tpr_lb, fpr_ub = _confident_rates(scores, member, thresholds, alpha / thresholds.size)
    mu = stats.norm.ppf(1.0 - fpr_ub) - stats.norm.ppf(1.0 - tpr_lb)
    best = float(np.max(np.nan_to_num(mu, nan=0.0, posinf=0.0, neginf=0.0), initial=0.0))
    return gdp_epsilon(best, delta) if best > 0 else 0.0


def _best_threshold(scores, member, thresholds, delta) -> float:
    """Threshold with the largest point-estimate epsilon on the selection split."""
    tp, fp, n_in, n_out = _rates(scores, member, thresholds)
    tpr, fpr = tp / n_in, fp / n_out
    # a half-count floor keeps "0 false positives" from reading as infinite epsilon
    value = _eps_from_bounds(tpr, np.maximum(fpr, 0.5 / n_out), delta)
    value = value + 1e-9 * tpr  # prefer the threshold with more evidence among ties
    return float(thresholds[int(np.argmax(value))])


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of "v of r guesses correct" under (eps, delta)-DP with m canaries
    (Steinke, Nasr, Jagielski 2023, Thm. 5.2 / their reference implementation)."""
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    if v == 0 or delta == 0.0:
        return float(min(beta, 1.0))
    i = np.arange(1, v + 1)
    tail = np.cumsum(stats.binom.pmf(v - i, r, q))  # P[v - i <= Binom(r, q) <= v - 1]
    return float(min(beta + np.max(tail / i) * delta * 2 * m, 1.0))


def one_run_epsilon(
    scores,
    is_member,
    delta: float,
    k_pos: int,
    k_neg: int,
    alpha: float = 0.05,
) -> float:
    """One-run audit: the m canaries' inclusion was decided by fair coins; guess "IN" for the k_pos
    highest and "OUT" for the k_neg lowest scores, abstain on the rest, and return the largest eps
    whose p-value for the observed number of correct guesses is below alpha (0.0 if none)."""
    scores, member = _checked(scores, is_member)
    m = scores.size
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m or k_pos + k_neg == 0:
        raise ValueError(f"need 0 < k_pos + k_neg <= {m} canaries, got k_pos={k_pos}, k_neg={k_neg}")
    order = np.argsort(-scores, kind="mergesort")
    correct = int(member[order[:k_pos]].sum() + (~member[order[m - k_neg:]]).sum())
    r = k_pos + k_neg
    if one_run_p_value(m, r, correct, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, correct, hi, delta) < alpha:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if one_run_p_value(m, r, correct, mid, delta) < alpha else (lo, mid)
    return lo


def one_run_audit(scores, is_member, delta: float, alpha: float = 0.05,
                  independent_trials: bool = False,
                  guess_fractions: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
                  max_thresholds: int = 100) -> dict[str, float]:
    """Sound bounds on one set of coin-flip canaries, jointly at confidence 1 - alpha.

    ``eps_lb_one_run`` (Steinke et al., Bonferroni over guessing k of the m canaries IN and k OUT,
    k = fraction * m) needs only the coins. ``eps_lb_clopper_pearson`` (Bonferroni over
    thresholds) also needs the canaries' outcomes to be independent trials, which holds for
    gradient canaries in separate coordinates (independent noise and sampling) but not for input
    canaries read off one shared model. ``eps_lb`` is the one-run bound, or with
    ``independent_trials`` the larger of both, each then at alpha / 2. ``eps_estimate_gdp`` is the
    labelled Gaussian-trade-off estimate (not a bound)."""
    scores, member = _checked(scores, is_member)
    m = scores.size
    ks = sorted({max(1, int(f * m)) for f in guess_fractions if 2 * max(1, int(f * m)) <= m})
    if not ks:
        raise ValueError(f"{m} canaries are too few for a one-run audit")
    level = alpha / 2 if independent_trials else alpha
    cp = epsilon_lower_bound(scores, member, delta, alpha=level, max_thresholds=max_thresholds)
    one_run = max(one_run_epsilon(scores, member, delta, k, k, alpha=level / len(ks))
                  for k in ks)
    return {"eps_lb_clopper_pearson": cp, "eps_lb_one_run": one_run,
            "eps_lb": max(cp, one_run) if independent_trials else one_run,
            "eps_estimate_gdp": gdp_epsilon_estimate(scores, member, delta, alpha=alpha,
                                                     max_thresholds=max_thresholds)}
