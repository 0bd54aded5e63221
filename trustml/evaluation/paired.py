"""Paired-sentence bias scores of a causal LM: CrowS-Pairs, StereoSet / WinoBias-style pairs.

Each pair is a more-stereotypical and a less-stereotypical sentence that differ in the group they
mention. The LM scores each by its total log-likelihood (eos first, every token counted); the
result is the share of pairs in which it prefers the stereotypical one (50% = no preference),
with a 95% bootstrap interval over pairs. For a causal LM the whole-sentence likelihood replaces
the masked-LM pseudo-likelihood of the CrowS-Pairs paper.

Files: CrowS-Pairs' CSV (``sent_more``, ``sent_less``, ``stereo_antistereo``, ``bias_type``), or
a JSON list / JSON-lines file of ``{"stereotype": ..., "anti_stereotype": ..., "category": ...}``
(StereoSet intrasentence pairs, WinoBias pro/anti sentences).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trustml.config import ConfigError

Pair = tuple[str, str, str]  # (stereotypical, less stereotypical, category)


def load_crows_pairs(path: str | Path) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bias.crows_pairs {str(path)!r} does not exist")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"sent_more", "sent_less"} <= set(rows[0]):
        raise ConfigError(f"bias.crows_pairs {str(path)!r}: expected CSV columns sent_more, "
                          "sent_less (CrowS-Pairs)")
    return [(r["sent_more"], r["sent_less"],
             f"{r.get('bias_type', '')}/{r.get('stereo_antistereo', '')}".strip("/"))
            for r in rows]


def load_pairs(path: str | Path) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bias.paired {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        rows = ([json.loads(line) for line in text.splitlines() if line.strip()]
                if path.suffix == ".jsonl" else json.loads(text))
        return [(r["stereotype"], r["anti_stereotype"], r.get("category", "")) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"bias.paired {str(path)!r}: expected a JSON list of objects with "
                          "stereotype and anti_stereotype") from None


@torch.no_grad()
def sentence_log_likelihood(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                            sentences: list[str]) -> np.ndarray:
    """Total log P(sentence | eos) of each sentence, one at a time (no padding effects)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for sentence in sentences:
        ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer.encode(sentence)]], device=device)
        log_p = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        out.append(log_p.gather(-1, ids[0, 1:, None]).sum().item())
    return np.array(out)


def paired_preference(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[Pair],
                      n_bootstrap: int = 2000, seed: int = 0) -> dict[str, object]:
    """``{"stereotype_share", "ci", "n", "by_category": {category: share}}``."""
    if not pairs:
        raise ValueError("paired_preference needs at least one pair")
    more = sentence_log_likelihood(model, tokenizer, [p[0] for p in pairs])
    less = sentence_log_likelihood(model, tokenizer, [p[1] for p in pairs])
    prefers = (more > less).astype(float)
    rng = np.random.default_rng(seed)
    draws = prefers[rng.integers(0, len(prefers), (n_bootstrap, len(prefers)))].mean(1)
    categories: dict[str, list[float]] = {}
    for (_, _, category), value in zip(pairs, prefers):
        categories.setdefault(category, []).append(value)
    return {"stereotype_share": float(prefers.mean()),
            "ci": [float(v) for v in np.percentile(draws, [2.5, 97.5])], "n": len(pairs),
            "by_category": {c: float(np.mean(v)) for c, v in sorted(categories.items())}}
