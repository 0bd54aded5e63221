"""LOSS / LiRA / RMIA / LM scores on synthetic signals whose answer is known, and naive references."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from trustml.attacks import scores
from trustml.attacks.metrics import auc


def test_lira_signal_is_stable_logit_of_true_class():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 2])
    p = logits.softmax(-1)[torch.arange(4), labels].double()
    np.testing.assert_allclose(scores.lira_signal(logits, labels), torch.log(p / (1 - p)), rtol=1e-5)
    extreme = scores.lira_signal(torch.tensor([[800.0, -800.0, 0.0]]), [0])
    assert extreme[0] == pytest.approx(800.0)  # naive log(p / (1 - p)) gives inf here
    # a lone binary logit l is the pair (0, l): phi = l for y = 1 and -l for y = 0
    np.testing.assert_allclose(scores.lira_signal(torch.tensor([2.0, 2.0]), [1, 0]), [2.0, -2.0])


def test_loss_score_is_minus_cross_entropy():
    logits, labels = torch.randn(6, 2), torch.randint(0, 2, (6,))
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    np.testing.assert_allclose(scores.loss_score(logits, labels), -ce.numpy(), rtol=1e-5)


def synthetic_lira(n_ref, seed=0, n=2000, shift=2.0):
    """Example i has OUT signal N(m_i, 1) and IN signal N(m_i + shift, 1), m_i ~ N(0, 5^2):
    the optimal test has AUC Phi(shift / sqrt 2) while the raw signal is swamped by m_i."""
    rng = np.random.default_rng(seed)
    m = rng.normal(0, 5, n)
    ref_in = rng.random((n_ref, n)) < 0.5
    ref = m + shift * ref_in + rng.normal(size=(n_ref, n))
    member = rng.random(n) < 0.5
    target = m + shift * member + rng.normal(size=n)
    return target, ref, ref_in, member, stats.norm.cdf(shift / math.sqrt(2))


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("n_ref", [16, 64])
def test_lira_recovers_optimal_test(online, n_ref):
    target, ref, ref_in, member, best = synthetic_lira(n_ref)
    got = auc(scores.lira(target, ref, ref_in, online=online), member)
    assert best - 0.03 < got < best + 0.02
    assert auc(target, member) < best - 0.2


def test_lira_hand_computed_fixed_variance():
    ref = np.array([[0.0, 1.0], [2.0, 3.0], [1.0, 5.0]])
    ref_in = np.array([[False, True], [True, False], [False, True]])
    got = scores.lira(np.array([1.5, 2.0]), ref, ref_in, fixed_variance=True)
    # example 0: OUT {0, 1} mean .5, IN {2}; example 1: OUT {3}, IN {1, 5} mean 3
    sd_out = math.sqrt((0.25 + 0.25 + 0.0) / (3 - 2))
    sd_in = math.sqrt((0.0 + 4.0 + 4.0) / (3 - 2))
    want = [stats.norm.logpdf(1.5, 2.0, sd_in) - stats.norm.logpdf(1.5, 0.5, sd_out),
            stats.norm.logpdf(2.0, 3.0, sd_in) - stats.norm.logpdf(2.0, 3.0, sd_out)]
    np.testing.assert_allclose(got, want)
    offline = scores.lira(np.array([1.5, 2.0]), ref, ref_in, online=False, fixed_variance=True)
    np.testing.assert_allclose(offline, stats.norm.logcdf([1.5, 2.0], [0.5, 3.0], sd_out))


def test_rmia_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    px, mx, pz, mz = rng.random(30), rng.random(30), rng.random(50), rng.random(50)
    for gamma in (0.5, 1.0, 2.0):
        lr = (px / mx)[:, None] / (pz / mz)[None, :]
        np.testing.assert_allclose(scores.rmia(px, mx, pz, mz, gamma), (lr >= gamma).mean(1))


def test_rmia_marginals_by_hand():
    probs = np.array([[0.2, 0.9], [0.4, 0.5], [0.6, 0.1]])
    ref_in = np.array([[True, False], [False, True], [False, False]])
    np.testing.assert_allclose(scores.rmia_marginal(probs), [0.4, 0.5])
    out_mean = np.array([0.5, 0.5])  # (0.4 + 0.6) / 2 and (0.9 + 0.1) / 2
    np.testing.assert_allclose(scores.rmia_marginal(probs, ref_in, online=False, a=0.2),
                               ((1.2) * out_mean + 0.8) / 2)


def test_rmia_separates_synthetic_members():
    """p_y = sigmoid(signal) of the LiRA simulation: calibrating by the reference models' average
    must beat the raw likelihood (the LOSS attack)."""
    target, ref, ref_in, member, _ = synthetic_lira(16, seed=2)
    p_t, p_r = 1 / (1 + np.exp(-target)), 1 / (1 + np.exp(-ref))
    z = ~member  # population: non-members of the target
    for online, gain in ((True, 0.15), (False, 0.05)):  # offline only approximates Pr(x)
        marg = scores.rmia_marginal(p_r, ref_in, online=online)
        s = scores.rmia(p_t, marg, p_t[z], marg[z])
        assert auc(s, member) > auc(p_t, member) + gain


def test_token_logprobs_and_lm_scores_match_naive_loops():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    tok, mu, sigma = scores.token_logprobs(logits, ids)
    for b in range(2):
        for t in range(4):
            logp = torch.log_softmax(logits[b, t].double(), -1)
            assert tok[b, t] == pytest.approx(logp[ids[b, t + 1]].item())
            p = logp.exp()
            assert mu[b, t] == pytest.approx((p * logp).sum().item())
            assert sigma[b, t] == pytest.approx(((p * (logp - mu[b, t]) ** 2).sum().sqrt()).item())
    loss = scores.lm_loss(tok, mask)
    assert loss[1] == pytest.approx(tok[1, :2].mean().item())
    ref = tok - 1.0
    np.testing.assert_allclose(scores.lm_reference(tok, ref, mask), [1.0, 1.0])
    np.testing.assert_allclose(scores.lm_zlib(tok, ["ab", "ab"], mask),
                               loss / (8 * len(__import__("zlib").compress(b"ab"))))


def test_min_k_by_hand():
    logp = np.array([[-1.0, -5.0, -2.0, -4.0, -3.0]])
    assert scores.min_k(logp, k=0.4)[0] == pytest.approx(-4.5)  # two lowest: -5, -4
    assert scores.min_k(logp, np.array([[1, 1, 1, 0, 0]]), k=0.5)[0] == pytest.approx(-3.5)
    mu, sigma = np.full_like(logp, -3.0), np.full_like(logp, 2.0)
    assert scores.min_k_plus_plus(logp, mu, sigma, k=0.4)[0] == pytest.approx(-0.75)
    with pytest.raises(ValueError, match="k must"):
        scores.min_k(logp, k=0.0)
