"""Canary insertion (every copy in training, none in validation), secret log-perplexity against a
direct computation, and a tiny end-to-end run of the lm_canaries driver."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trustml.attacks.canaries import count_occurrences, hide_canaries, secret_logppl
from trustml.attacks.experiment import lm_canaries
from trustml.attacks.exposure import CanaryFormat, make_canaries
from trustml.config import ConfigError, from_dict
from trustml.data.text import TextDataset, lm_datasets
from trustml.distill.corpus import generate_corpus, word_tokenizer


def test_count_occurrences_spans_block_boundaries():
    class Tok:
        eos_token_id = pad_token_id = 0

    # stream 5 6 7 5 | 6 0 7 5 | 6 7 0 (eos 0 after each document, blocks of 4)
    data = TextDataset([[5, 6, 7, 5, 6], [7, 5, 6, 7]], Tok(), seq_len=4)
    assert count_occurrences(data, [5, 6, 7]) == 2  # the second one is cut by a block boundary
    assert count_occurrences(data, [7, 0, 7]) == 0 and count_occurrences(data, [6, 0]) == 1
    assert count_occurrences(data, list(range(20))) == 0


@pytest.mark.parametrize("val_fraction", [0.1, 0.3])
def test_hide_canaries_puts_every_copy_in_training(tmp_path, val_fraction):
    fmt = CanaryFormat()
    canaries = make_canaries(fmt, 3, seed=0)
    repeats = dict(zip(canaries, [1, 5, 20]))
    corpus = generate_corpus(200, seed=0)
    lines = hide_canaries(corpus, repeats, val_fraction, seed=0)
    assert sorted(lines) == sorted(corpus + [c for c, r in repeats.items() for _ in range(r)])
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    tok = word_tokenizer(corpus, extra_words=canaries)
    cfg = from_dict({"data": {"dataset": "text", "text_path": str(tmp_path / "text.txt"),
                              "seq_len": 16, "val_fraction": val_fraction}})
    train, val = lm_datasets(cfg.data, tok)
    for canary, r in repeats.items():
        ids = tok(canary)["input_ids"]
        assert count_occurrences(train, ids) == r
        assert count_occurrences(val, ids) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        hide_canaries(corpus[:5], repeats, 0.9, seed=0)


def test_secret_logppl_matches_direct_sum():
    fmt = CanaryFormat()
    texts = make_canaries(fmt, 4, seed=3)
    tok = word_tokenizer(texts)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok),
                                       n_positions=16)).eval()
    got = secret_logppl(model, tok, texts, seq_len=16, device="cpu")
    for value, text in zip(got, texts):
        ids = torch.tensor([[tok.eos_token_id, *tok(text)["input_ids"]]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        assert value == pytest.approx(-logp.gather(-1, ids[0, 1:, None]).sum().item(), rel=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        secret_logppl(model, tok, texts, seq_len=8, device="cpu")


def _tiny(tmp_path, **privacy):
    return from_dict({
        "run": {"device": "cpu", "checkpoint_every": 1000, "name": "canaries", "seed": 1},
        "data": {"dataset": "text", "tokenizer": "words", "seq_len": 32, "val_fraction": 0.2},
        "model": {"kind": "gpt2",
                  "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "log_every": 1000},
        "privacy": {**privacy, "secure_rng": False},  # the checks below need a fixed outcome
        "attack": {"canaries": 4, "canary_repeats": [1, 16], "canary_candidates": 60,
                   "canary_corpus": 150, "fpr": [0.1]},
    })


def test_lm_canaries_needs_a_noise_source(tmp_path):
    with pytest.raises(ConfigError, match="target_epsilon"):
        lm_canaries(_tiny(tmp_path), tmp_path)


def test_lm_canaries_smoke(tmp_path):
    summary = lm_canaries(_tiny(tmp_path, noise_multiplier=1.0), tmp_path)
    # even 3 epochs of a tiny GPT-2 rank the 16x canaries first; DP noise keeps them near chance
    assert summary["checks"] == {"non_private_exposes_most_repeated": True,
                                 "dp_lowers_exposure": True}
    assert summary["train_copies"] == dict(zip(summary["train_copies"], [1, 16, 1, 16]))
    ceiling = math.log2(61)
    for name in ("non_private", "private"):
        result = summary["results"][name]
        assert set(result["attacks"]) == {"loss", "zlib", "min_k", "min_k_pp"}
        for est in ("rank", "skewnorm"):
            assert set(result["exposure"][est]) == {1, 16}
        ranks = np.array([e["rank"] for e in result["canary_exposure"].values()])
        assert ((ranks >= 0) & (ranks <= ceiling + 1e-9)).all()
    assert math.isinf(summary["results"]["non_private"]["epsilon"])
    assert 0 < summary["results"]["private"]["epsilon"] < math.inf
    assert (tmp_path / "exposure.png").is_file() and (tmp_path / "private" / "model.safetensors").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "| 16 | 2 |" in report and "Checks:" in report
    assert json.loads((tmp_path / "summary.json").read_text())["checks"] == summary["checks"]
