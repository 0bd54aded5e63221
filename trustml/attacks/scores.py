"""Membership scores: one number per example, higher = more likely a training member.

Classifier attacks take logits + labels from the target (and reference models); language-model
attacks take per-token log-probabilities. All functions are pure array code, so the same scores are
used by the evaluator, the audit driver and the tests.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

_TINY = 1e-30


def _tensor(values) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))


def _class_logits(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C) logits and (...) labels; a lone logit l for P(y=1) becomes the pair (0, l)."""
    logits, labels = _tensor(logits).double(), _tensor(labels).long()
    if logits.shape[-1:] == (1,) and logits.dim() == labels.dim() + 1:
        logits = logits.squeeze(-1)
    if logits.shape == labels.shape:
        logits = torch.stack([torch.zeros_like(logits), logits], dim=-1)
    return logits, labels.expand(logits.shape[:-1])


def lira_signal(logits, labels) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)) = logit_y - logsumexp(other logits), exact for any logit scale.

    ``logits`` (..., C) with the class axis last (a lone binary logit is allowed), ``labels``
    (...); leading axes (e.g. reference models) are kept.
    """
    logits, labels = _class_logits(logits, labels)
    true = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    return (true - torch.logsumexp(others, dim=-1)).numpy()


def true_class_prob(logits, labels) -> np.ndarray:
    """p_y under the softmax, the RMIA likelihood Pr(x | theta)."""
    logits, labels = _class_logits(logits, labels)
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).exp().numpy()


def loss_score(logits, labels) -> np.ndarray:
    """LOSS attack (Yeom et al. 2018): minus the cross-entropy loss."""
    return np.log(np.maximum(true_class_prob(logits, labels), _TINY))


def _masked_stats(signals: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example mean and std over the reference models selected by ``mask`` (R, N)."""
    count = mask.sum(0)
    mean = np.where(count > 0, (signals * mask).sum(0) / np.maximum(count, 1), np.nan)
    var = (((signals - np.nan_to_num(mean)) ** 2) * mask).sum(0) / np.maximum(count, 1)
    return mean, np.sqrt(var), count


def _fill(mean: np.ndarray, signals: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Examples with no reference model on one side fall back to that side's global mean."""
    return np.where(np.isnan(mean), (signals * mask).sum() / max(mask.sum(), 1), mean)


def _pooled_std(signals: np.ndarray, mask: np.ndarray, mean: np.ndarray) -> float:
    """One within-example std for all examples: residuals around each example's own mean."""
    resid = (signals - np.nan_to_num(mean)) * mask
    dof = max(mask.sum() - (mask.sum(0) > 0).sum(), 1)
    return float(np.sqrt((resid**2).sum() / dof))


def lira(
    target_signal,
    ref_signals,
    ref_in,
    online: bool = True,
    fixed_variance: bool | None = None,
) -> np.ndarray:
    """LiRA (Carlini et al. 2022) from phi signals: target (N,), references (R, N), IN mask (R, N).

    Online: log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out). Offline: the one-sided test
    log Pr[Z < phi], Z ~ N(mu_out, s_out). ``fixed_variance=None`` uses one global variance below 32
    reference models, where per-example variances are too noisy (the paper's recommendation).
    """
    phi = np.asarray(target_signal, dtype=np.float64)
    signals = np.asarray(ref_signals, dtype=np.float64)
    mask_in = np.asarray(ref_in, dtype=bool)
    if signals.ndim != 2 or signals.shape != mask_in.shape or signals.shape[1] != phi.size:
        raise ValueError(
            f"need target (N,), references and IN mask (R, N); got {phi.shape}, {signals.shape}, "
            f"{mask_in.shape}")
    if fixed_variance is None:
        fixed_variance = signals.shape[0] < 32
    mask_out = ~mask_in

    def fit(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std, _ = _masked_stats(signals, mask)
        if fixed_variance:
            std = np.full_like(phi, _pooled_std(signals, mask, mean))
        else:
            std = np.where(np.isnan(mean), _pooled_std(signals, mask, mean), std)
        return _fill(mean, signals, mask), np.maximum(std, 1e-6)

    mu_out, sd_out = fit(mask_out)
    if not online:
        return stats.norm.logcdf(phi, mu_out, sd_out)
    mu_in, sd_in = fit(mask_in)
    return stats.norm.logpdf(phi, mu_in, sd_in) - stats.norm.logpdf(phi, mu_out, sd_out)


def rmia_marginal(ref_probs, ref_in=None, online: bool = True, a: float = 0.3) -> np.ndarray:
    """Pr(x) from reference models (R, N). Online: average over all of them. Offline (only OUT
    models): Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2, the linear correction of Zarifzadeh et al.
    for the missing IN models."""
    probs = np.asarray(ref_probs, dtype=np.float64)
    if online:
        return probs.mean(0)
    mask = np.ones_like(probs, bool) if ref_in is None else ~np.asarray(ref_in, dtype=bool)
    mean_out, _, _ = _masked_stats(probs, mask)
    mean_out = _fill(mean_out, probs, mask)
    return ((1.0 + a) * mean_out + (1.0 - a)) / 2.0


def rmia(target_prob_x, marginal_x, target_prob_z, marginal_z, gamma: float = 1.0) -> np.ndarray:
    """RMIA (Zarifzadeh et al. 2024): fraction of population samples z that x dominates,
    LR(x, z) = (Pr(x|theta)/Pr(x)) / (Pr(z|theta)/Pr(z)) >= gamma."""
    ratio_x = np.asarray(target_prob_x, np.float64) / np.maximum(marginal_x, _TINY)
    ratio_z = np.sort(np.asarray(target_prob_z, np.float64) / np.maximum(marginal_z, _TINY))
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    return np.searchsorted(ratio_z, ratio_x / gamma, side="right") / ratio_z.size


# ---------------------------------------------------------------- language models


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Next-token statistics of a causal LM: log p(x_t | x_<t), and the mean / std of log p(z)
    under the model's own next-token distribution (for Min-K%++). Shapes (B, T-1)."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = input_ids[:, 1:].unsqueeze(-1)
    token = logp.gather(-1, target).squeeze(-1)
    probs = logp.exp()
    mu = (probs * logp).sum(-1)
    sigma = ((probs * logp.pow(2)).sum(-1) - mu.pow(2)).clamp_min(0).sqrt()
    return token, mu, sigma


def _masked(values, mask) -> np.ma.MaskedArray:
    values = np.asarray(_tensor(values).detach().cpu().double())
    if mask is None:
        return np.ma.masked_array(values, np.zeros_like(values, bool))
    return np.ma.masked_array(values, ~np.asarray(_tensor(mask).detach().cpu()).astype(bool))


def lm_loss(token_logp, mask=None) -> np.ndarray:
    """Mean token log-likelihood (minus the LM loss)."""
    return _masked(token_logp, mask).mean(1).filled(np.nan)


def lm_reference(token_logp, ref_token_logp, mask=None) -> np.ndarray:
    """Target minus reference log-likelihood: removes how "easy" the text is in general."""
    return lm_loss(token_logp, mask) - lm_loss(ref_token_logp, mask)


def lm_zlib(token_logp, texts: list[str], mask=None) -> np.ndarray:
    """Log-likelihood over zlib entropy (Carlini et al. 2021): -loss / zlib bits of the text."""
    import zlib

    bits = np.array([8.0 * len(zlib.compress(t.encode("utf-8"))) for t in texts])
    return lm_loss(token_logp, mask) / bits


def _min_k(values: np.ma.MaskedArray, k: float) -> np.ndarray:
    if not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k}")
    out = []
    for row in values:
        kept = np.sort(row.compressed())
        out.append(kept[: max(1, int(np.ceil(k * kept.size)))].mean() if kept.size else np.nan)
    return np.array(out)


def min_k(token_logp, mask=None, k: float = 0.2) -> np.ndarray:
    """Min-K% (Shi et al. 2024): mean of the k-fraction lowest token log-probs."""
    return _min_k(_masked(token_logp, mask), k)


def min_k_plus_plus(token_logp, mu, sigma, mask=None, k: float = 0.2) -> np.ndarray:
    """Min-K%++ (Zhang et al. 2024): Min-K% over (log p(x_t) - mu_t) / sigma_t, where mu_t and
    sigma_t are the mean and std of log p(z) for z drawn from the model's next-token distribution."""
    z = (_tensor(token_logp).double() - _tensor(mu).double()) / _tensor(sigma).double().clamp_min(1e-12)
    return _min_k(_masked(z, mask), k)
