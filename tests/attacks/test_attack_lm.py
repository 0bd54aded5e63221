"""LM membership attacks: token statistics against a direct computation, and the evaluator on a
small GPT-2 run that memorised its training text."""

import random

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trustml.attacks.evaluate import evaluate_attacks
from trustml.attacks.lm import lm_attack_scores, sequence_logppl, token_stats
from trustml.config import ConfigError, from_dict
from trustml.distill.corpus import word_tokenizer
from trustml.evaluation.report import load_run
from trustml.runner import run_training

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]


def test_token_stats_match_direct_log_probs():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=37,
                                       n_positions=12))
    ids = torch.randint(0, 37, (5, 9))
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0
    chunked = token_stats(model, ids, mask, "cpu", batch_size=2)
    whole = token_stats(model, ids, mask, "cpu", batch_size=64)
    torch.testing.assert_close(chunked.logp, whole.logp)
    model.eval()
    for i in range(5):  # one sequence at a time, no padding, float32 log-softmax
        n = int(mask[i].sum())
        logp = torch.log_softmax(model(ids[i:i + 1, :n]).logits[0, :-1].double(), -1)
        direct = logp.gather(-1, ids[i, 1:n, None]).squeeze(-1)
        torch.testing.assert_close(chunked.logp[i, : n - 1], direct, atol=1e-5, rtol=1e-5)
        probs = logp.exp()
        torch.testing.assert_close(chunked.mu[i, : n - 1], (probs * logp).sum(-1),
                                   atol=1e-5, rtol=1e-5)
    assert chunked.mask[3].sum() == 5 and chunked.mask[0].sum() == 8
    expected = -np.array([chunked.logp[i, : int(mask[i].sum()) - 1].sum() for i in range(5)])
    np.testing.assert_allclose(sequence_logppl(chunked), expected)


def test_reference_attack_needs_a_reference():
    stats = token_stats(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11,
                                                   n_positions=8)),
                        torch.randint(0, 11, (2, 6)), torch.ones(2, 6, dtype=torch.long), "cpu")
    with pytest.raises(ConfigError, match="reference_run"):
        lm_attack_scores(["reference"], stats)
    with pytest.raises(ConfigError, match="unknown"):
        lm_attack_scores(["lira"], stats)


def _random_docs(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n)]


@pytest.mark.slow
def test_evaluator_on_a_memorising_lm(tmp_path):
    docs = _random_docs(80, seed=0)
    (tmp_path / "text.txt").write_text("\n".join(docs) + "\n")
    word_tokenizer(docs).save_pretrained(tmp_path / "tok")
    run_dir = tmp_path / "run"
    cfg = from_dict({
        "run": {"device": "cpu", "checkpoint_every": 1000, "name": "lm"},
        "data": {"dataset": "text", "text_path": str(tmp_path / "text.txt"),
                 "tokenizer": str(tmp_path / "tok"), "seq_len": 12, "val_fraction": 0.5},
        "model": {"kind": "gpt2",
                  "config": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 12}},
        "train": {"epochs": 60, "batch_size": 16, "lr": 3e-3, "log_every": 1000},
        # the target is its own reference: the difference attack scores 0 everywhere
        "attack": {"attacks": ["loss", "zlib", "min_k", "min_k_pp", "reference"],
                   "reference_run": str(run_dir), "fpr": [0.1]},
    })
    run_training(cfg, run_dir, progress=False)
    ctx = load_run(run_dir, "cpu")
    section = evaluate_attacks(ctx, cfg.attack.attacks)
    got = section.metrics
    assert set(got) == {"loss", "zlib", "min_k", "min_k_pp", "reference"}
    assert got["reference"]["auc"] == pytest.approx(0.5)
    assert got["loss"]["auc"] > 0.9  # random word strings: only memorisation separates them
    assert got["min_k"]["auc"] > 0.8
    assert f"{len(ctx.parts.val)} non-members" in section.markdown
    assert all(p.is_file() for p in section.plots) and len(section.plots) == 6
