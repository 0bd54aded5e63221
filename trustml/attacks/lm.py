"""Membership attacks on a causal language model: per-token statistics of the target (and an
optional reference model) over token blocks -> one score per block (higher = member)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trustml.attacks import scores as sc
from trustml.attacks.tabular import check_attacks
from trustml.config import ConfigError

LM_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "reference")

# log-softmax over the vocabulary is held in float64: cap the elements of one chunk (~256 MiB)
_CHUNK_ELEMENTS = 2**25


@dataclass
class TokenStats:
    """Per next-token position (N, T-1): log p(x_t | x_<t), the mean and std of log p(z) under the
    model's own next-token distribution (Min-K%++), and which positions are real tokens."""

    logp: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    mask: torch.Tensor


@torch.no_grad()
def token_stats(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                device, batch_size: int = 64) -> TokenStats:
    """``TokenStats`` of ``model`` on (N, T) blocks, in eval mode, chunked to bound memory."""
    was_training = model.training
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, min(batch_size, _CHUNK_ELEMENTS // (input_ids.shape[1] * vocab)))
    parts = []
    for ids, mask in zip(input_ids.split(rows), attention_mask.split(rows)):
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        parts.append([t.cpu() for t in sc.token_logprobs(logits, ids)] + [mask[:, 1:].cpu()])
    model.train(was_training)
    return TokenStats(*(torch.cat(column) for column in zip(*parts)))


def sequence_logppl(stats: TokenStats) -> np.ndarray:
    """Log-perplexity of each block as the Secret Sharer ranks it: minus the summed token log-probs."""
    return -(stats.logp * stats.mask).sum(1).numpy()


def block_texts(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """The text of each block (padding dropped), for the zlib attack."""
    return [tokenizer.decode(ids[mask.bool()].tolist())
            for ids, mask in zip(input_ids, attention_mask)]


def lm_attack_scores(attacks: list[str], target: TokenStats, texts: list[str] | None = None,
                     reference: TokenStats | None = None, k: float = 0.2
                     ) -> dict[str, np.ndarray]:
    """Score every block with each attack (higher = member)."""
    check_attacks(attacks, LM_ATTACKS)
    out: dict[str, np.ndarray] = {}
    if "loss" in attacks:
        out["loss"] = sc.lm_loss(target.logp, target.mask)
    if "zlib" in attacks:
        if texts is None:
            raise ValueError("the zlib attack needs the blocks' texts")
        out["zlib"] = sc.lm_zlib(target.logp, texts, target.mask)
    if "min_k" in attacks:
        out["min_k"] = sc.min_k(target.logp, target.mask, k=k)
    if "min_k_pp" in attacks:
        out["min_k_pp"] = sc.min_k_plus_plus(target.logp, target.mu, target.sigma, target.mask, k=k)
    if "reference" in attacks:
        if reference is None:
            raise ConfigError("attack 'reference' needs attack.reference_run (a run directory "
                              "whose model is the reference language model)")
        out["reference"] = sc.lm_reference(target.logp, reference.logp, target.mask)
    return out


def load_reference_lm(run_dir: str | Path, tokenizer) -> nn.Module:
    """The language model of another run directory, checked to share the target's tokenizer."""
    from trustml import config as cfgmod
    from trustml.data.text import load_tokenizer
    from trustml.models.lm import build_lm
    from trustml.training.checkpoint import load_model

    run_dir = Path(run_dir)
    weights = run_dir / "model.safetensors"
    if not (run_dir / "config.yaml").is_file() or not weights.is_file():
        raise ConfigError(f"attack.reference_run: {str(run_dir)!r} is not a finished run directory "
                          "(config.yaml and model.safetensors expected)")
    ref_cfg = cfgmod.load(run_dir / "config.yaml")
    if ref_cfg.model.kind != "gpt2":
        raise ConfigError(f"attack.reference_run: {str(run_dir)!r} is not a language-model run")
    if load_tokenizer(ref_cfg.data.tokenizer).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"attack.reference_run: {str(run_dir)!r} uses a different tokenizer "
                          "than the target; the token log-probs would not be comparable")
    return load_model(build_lm(ref_cfg.model, len(tokenizer), tokenizer.eos_token_id),
                      weights).eval()
