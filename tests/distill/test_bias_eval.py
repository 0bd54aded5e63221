"""Bias probe, generation polarity and perplexity against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from trustml.data.text import TextDataset
from trustml.distill.corpus import generate_corpus, word_tokenizer
from trustml.evaluation.bias import (
    PROFESSIONS,
    TEMPLATES,
    count_gendered,
    generation_polarity,
    template_gap,
)
from trustml.evaluation.perplexity import perplexity


@pytest.fixture(scope="module")
def setup():
    corpus = generate_corpus(300, seed=0)
    tok = word_tokenizer(corpus)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2,
                                       n_positions=32)).eval()
    return corpus, tok, model


def test_template_gap_matches_one_prompt_at_a_time(setup):
    _, tok, model = setup
    professions = ("nurse", "engineer", "doctor")
    result = template_gap(model, tok, professions)
    he, she = tok.convert_tokens_to_ids(["he", "she"])
    direct = []
    for p in professions:
        gaps = []
        for t in TEMPLATES:
            ids = torch.tensor([[tok.eos_token_id, *tok.encode(t.format(p=p))]])
            with torch.no_grad():
                lp = model(ids).logits[0, -1].log_softmax(-1)
            gaps.append((lp[he] - lp[she]).item())
        assert result["gap"][p] == pytest.approx(sum(gaps) / len(gaps), abs=1e-5)
        direct += [[p, t, g] for t, g in zip(TEMPLATES, gaps)]
    assert [r[:2] for r in result["prompts"]] == [r[:2] for r in direct]
    assert [r[2] for r in result["prompts"]] == pytest.approx([r[2] for r in direct], abs=1e-5)
    values = [r[2] for r in direct]
    assert result["mean_abs_gap"] == pytest.approx(sum(map(abs, values)) / len(values), abs=1e-5)
    assert result["mean_gap"] == pytest.approx(sum(values) / len(values), abs=1e-5)
    assert len(PROFESSIONS) == 60 and len(set(PROFESSIONS)) == 60


class _Leaning(nn.Module):
    """A model whose next-token gap is +1 after one template and -1 after the other."""

    def __init__(self, tok, lean_he: str):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.tok, self.lean = tok, tok.convert_tokens_to_ids(lean_he)
        self.he, self.she = tok.convert_tokens_to_ids(["he", "she"])

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        sign = (input_ids[:, -1] == self.lean).float() * 2 - 1
        logits[:, -1, self.he], logits[:, -1, self.she] = sign / 2, -sign / 2
        return type("Out", (), {"logits": logits})


def test_opposite_leanings_do_not_cancel(setup):
    """Per prompt |gap| is 1 everywhere; the old abs-of-mean-over-templates read 0."""
    _, tok, _ = setup
    templates = ("The {p} said that", "The {p} went home because")
    result = template_gap(_Leaning(tok, "that"), tok, ("nurse", "pilot"), templates)
    assert result["mean_abs_gap"] == pytest.approx(1.0)
    assert result["mean_gap"] == pytest.approx(0.0)
    assert result["gap"] == pytest.approx({"nurse": 0.0, "pilot": 0.0})


def test_count_gendered():
    assert count_gendered("He said his Man, she; HERSELF. the hero") == (3, 2)
    assert count_gendered("theme shelter") == (0, 0)


class _Scripted(nn.Module):
    """generate() appends a fixed continuation per profession: nurses get 'she she', the
    engineer 'he', everyone else nothing gendered."""

    def __init__(self, tok):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.tok = tok

    def generate(self, input_ids, num_return_sequences, **_):
        rows = []
        for ids in input_ids.repeat_interleave(num_return_sequences, 0):
            prof = self.tok.decode(ids[2:3].tolist())
            words = {"nurse": "she she", "engineer": "he"}.get(prof, "the")
            rows.append(torch.tensor(self.tok.encode(words + " . the the")[:3]))
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, 0),
                          torch.stack(rows)], 1)


def test_polarity_counts_and_smoothing(setup):
    _, tok, _ = setup
    res = generation_polarity(_Scripted(tok), tok, k=2, professions=("nurse", "engineer", "cook"))
    # nurse: F = 2 words x 2 samples x 8 templates = 32, M = 0 -> (0+1)/(32+1)
    assert len(TEMPLATES) == 8
    assert res["counts"]["nurse"] == [0, 32] and res["counts"]["engineer"] == [16, 0]
    assert res["polarity"]["nurse"] == pytest.approx(1 / 33)
    assert res["polarity"]["engineer"] == pytest.approx(1 / 17)
    assert res["polarity"]["cook"] == 1.0
    assert res["min_polarity"] == pytest.approx(1 / 33)
    assert res["mean_polarity"] == pytest.approx((1 / 33 + 1 / 17 + 1) / 3)


def test_generation_is_seeded(setup):
    _, tok, model = setup
    kw = {"k": 2, "max_new_tokens": 6, "professions": ("nurse", "pilot"), "templates": TEMPLATES[:2]}
    assert generation_polarity(model, tok, seed=3, **kw) == generation_polarity(model, tok,
                                                                                seed=3, **kw)


def test_perplexity_matches_token_weighted_cross_entropy(setup):
    corpus, tok, model = setup
    ds = TextDataset(corpus[:20], tok, seq_len=16, pack=False)
    total, count = 0.0, 0
    for i in range(len(ds)):
        n = int(ds[i]["attention_mask"].sum())
        ids = ds[i]["input_ids"][:n]
        with torch.no_grad():
            logits = model(ids[None]).logits[0]
        total += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
        count += n - 1
    assert perplexity(model, ds, batch_size=7) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_short_context_models_skip_prompts_they_cannot_hold():
    """A model whose context is shorter than a prompt (tiny canary models) must not crash."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from trustml.data.text import load_tokenizer
    from trustml.evaluation.bias import generation_polarity, template_gap

    tok = load_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=5, n_embd=16, n_layer=1,
                                       n_head=2))
    gap = template_gap(model, tok, professions=("nurse", "engineer"),
                       templates=("The {p} said", "The {p} went home because of"))
    assert set(gap["gap"]) == {"nurse", "engineer"}  # only the short template fits
    pol = generation_polarity(model, tok, k=1, max_new_tokens=3, professions=("nurse",),
                              templates=("The {p} said", "The {p} went home because of"))
    assert 0 < pol["mean_polarity"] <= 1
