"""Hiding canaries in a training text and measuring their exposure (the Secret Sharer experiment).

The canaries go into a text file read by ``trustml.data.text.lm_datasets``, so the models are
trained by the suite's ordinary loop; every copy must land in the training split and none in the
validation split, which ``count_occurrences`` verifies on the datasets actually built.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from trustml.attacks import exposure as ex
from trustml.attacks.lm import sequence_logppl, token_stats
from trustml.data.text import TextDataset, split_documents


def hide_canaries(corpus: list[str], repeats: dict[str, int], val_fraction: float,
                  seed: int) -> list[str]:
    """Lines (one document each) of a text file holding ``corpus`` and ``repeats[c]`` copies of
    every canary ``c``, placed so that the document split of ``lm_datasets`` sends only corpus
    sentences to validation and every canary copy to training."""
    copies = [canary for canary, count in repeats.items() for _ in range(count)]
    n = len(corpus) + len(copies)
    train_pos, val_pos = split_documents(list(range(n)), val_fraction)
    if len(val_pos) > len(corpus):
        raise ValueError(f"data.val_fraction={val_fraction} needs more validation sentences "
                         f"({len(val_pos)}) than the corpus has ({len(corpus)})")
    rng = random.Random(seed)
    docs = list(corpus)
    rng.shuffle(docs)
    val_docs, train_docs = docs[: len(val_pos)], docs[len(val_pos):] + copies
    rng.shuffle(train_docs)
    lines = [""] * n
    for positions, chosen in ((val_pos, val_docs), (train_pos, train_docs)):
        for pos, doc in zip(positions, chosen):
            lines[pos] = doc
    return lines


def count_occurrences(dataset: TextDataset, tokens: list[int]) -> int:
    """How often ``tokens`` occurs in the token stream of a packed dataset (its blocks joined)."""
    stream = dataset.input_ids[dataset.attention_mask.bool()]
    if len(tokens) > len(stream):
        return 0
    windows = stream.unfold(0, len(tokens), 1)
    return int((windows == torch.as_tensor(tokens)).all(1).sum())


def secret_logppl(model, tokenizer, texts: list[str], seq_len: int, device) -> np.ndarray:
    """Log-perplexity of each canary / candidate text, read as its own document after an eos (the
    context it has in the packed training stream)."""
    longest = max(len(ids) for ids in tokenizer(texts)["input_ids"]) + 1
    if longest > seq_len:
        raise ValueError(f"data.seq_len={seq_len} cuts the canaries ({longest} tokens with eos)")
    data = TextDataset(texts, tokenizer, seq_len, pack=False)
    return sequence_logppl(token_stats(model, data.input_ids, data.attention_mask, device))


def exposures(canary_logppl: np.ndarray, candidate_logppl: np.ndarray) -> dict[str, np.ndarray]:
    """Exposure of every canary by rank among the candidates and by skew-normal extrapolation."""
    return {"rank": ex.exposure_by_rank(canary_logppl, candidate_logppl),
            "skewnorm": ex.exposure_skewnorm(canary_logppl, candidate_logppl)}
