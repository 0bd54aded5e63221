"""Gender swapping on text and tokens, and the role-reversal teacher perturbation."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trustml.distill.corpus import generate_corpus, word_tokenizer
from trustml.distill.counterfactual import (
    gender_pairs,
    gender_token_map,
    perturb_teacher_logits,
    swap_gender,
)


def test_pair_list_is_curated():
    pairs = gender_pairs()
    assert len(pairs) >= 80 and len(set(pairs)) == len(pairs)
    males, females = {m for m, _ in pairs}, {f for _, f in pairs}
    assert not males & females  # a word is never on both sides


@pytest.mark.parametrize(
    "text, swapped",
    [
        ("He said that she is here.", "She said that he is here."),
        ("HE and SHE", "SHE and HE"),
        ("The king met the Queen and Mr Smith.", "The queen met the King and Mrs Smith."),
        ("his car", "her car"),
        ("She gave him her keys.", "He gave her his keys."),
        ("I told her the news.", "I told him the news."),
        ("The book is his.", "The book is hers."),
        ("My grandfather and his stepson", "My grandmother and her stepdaughter"),
        ("theme, shelter, hero's", "theme, shelter, heroine's"),  # whole words only
    ],
)
def test_swap_gender_examples(text, swapped):
    assert swap_gender(text) == swapped
    assert swap_gender(swapped) == text


def test_swap_is_an_involution_on_unambiguous_text():
    for male, female in gender_pairs():
        for word in (male, female):
            if word in ("her", "his", "him", "hers"):  # her/his: two readings (tested above)
                continue
            for form in (word, word.capitalize(), word.upper()):
                text = f"Then {form} left ."
                assert swap_gender(swap_gender(text)) == text
    for sentence in generate_corpus(300, seed=3):
        assert swap_gender(swap_gender(sentence)) == sentence


def _check_involution(mapping: torch.Tensor) -> None:
    assert torch.equal(mapping[mapping], torch.arange(len(mapping)))


def test_gpt2_token_map(gpt2):
    mapping = gender_token_map(gpt2)
    assert mapping.dtype == torch.long and len(mapping) == len(gpt2)
    _check_involution(mapping)
    def tid(s):
        return gpt2.encode(s)[0]

    for a, b in [(" he", " she"), ("He", "She"), (" He", " She"), ("he", "she"), (" HE", " SHE"),
                 (" his", " her"), (" himself", " herself"), (" man", " woman"),
                 (" Mr", " Mrs"), (" king", " queen")]:
        assert mapping[tid(a)] == tid(b) and mapping[tid(b)] == tid(a), (a, b)
    for same in (" the", " nurse", " him", " hers", ","):  # identity outside the first pairs
        assert mapping[tid(same)] == tid(same)
    moved = (mapping != torch.arange(len(mapping))).nonzero().flatten()
    for i in moved.tolist():  # every moved token is a gendered word, swapped by the text swapper
        word = gpt2.decode([i])
        if word.strip().lower() in ("her", "his"):  # alone, they read as pronouns (him, hers)
            continue
        assert swap_gender(word) == gpt2.decode([mapping[i].item()]), word


def test_token_map_aligns_with_text_swap_on_corpus():
    corpus = generate_corpus(200, seed=1)
    tok = word_tokenizer(corpus)
    mapping = gender_token_map(tok)
    _check_involution(mapping)
    for sentence in corpus:
        ids = torch.tensor(tok.encode(sentence))
        assert tok.decode(mapping[ids].tolist()) == tok.decode(tok.encode(swap_gender(sentence)))


def test_perturbation_modes_against_direct_formulas():
    torch.manual_seed(0)
    mapping = torch.tensor([1, 0, 2, 4, 3])
    z, zs = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    zr = zs[..., [1, 0, 2, 4, 3]]
    p, pr = z.softmax(-1), zr.softmax(-1)
    assert torch.equal(perturb_teacher_logits(z, zs, mapping, "none"), z)
    lm = perturb_teacher_logits(z, zs, mapping, "logit_mean")
    assert torch.allclose(lm.softmax(-1), ((z + zr) / 2).softmax(-1), atol=1e-6)
    pm = perturb_teacher_logits(z, zs, mapping, "prob_mean")
    assert torch.allclose(pm.exp(), (p + pr) / 2, atol=1e-6)
    px = perturb_teacher_logits(z, zs, mapping, "prob_max")
    top = torch.maximum(p, pr)
    assert torch.allclose(px.exp(), top / top.sum(-1, keepdim=True), atol=1e-6)
    for target in (lm, pm, px):
        assert target.dtype == torch.float32
        assert torch.allclose(target.exp().sum(-1), torch.ones(2, 3), atol=1e-6)
    with pytest.raises(ValueError, match="perturbation mode"):
        perturb_teacher_logits(z, zs, mapping, "logit_max")
    with pytest.raises(ValueError, match="vocabulary size"):
        perturb_teacher_logits(z, zs, torch.arange(4), "logit_mean")


@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean", "prob_max"])
@pytest.mark.parametrize("gendered_only", [False, True])
def test_targets_ignore_per_context_logit_shifts(mode, gendered_only):
    """Adding a constant to one context's logits leaves its distribution, hence the target,
    unchanged (a max over raw logits would not be)."""
    torch.manual_seed(1)
    mapping = torch.tensor([1, 0, 2, 4, 3, 5])
    z, zs = torch.randn(4, 6), torch.randn(4, 6)
    shift, shift_s = torch.randn(4, 1) * 5, torch.randn(4, 1) * 5
    a = perturb_teacher_logits(z, zs, mapping, mode, gendered_only).softmax(-1)
    b = perturb_teacher_logits(z + shift, zs + shift_s, mapping, mode, gendered_only).softmax(-1)
    assert torch.allclose(a, b, atol=1e-6)
    raw_max = torch.maximum(z, zs[..., mapping]).softmax(-1)
    shifted = torch.maximum(z + shift, (zs + shift_s)[..., mapping]).softmax(-1)
    assert not torch.allclose(raw_max, shifted, atol=1e-3)


@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean", "prob_max"])
def test_gendered_only_keeps_every_other_probability(mode):
    torch.manual_seed(2)
    mapping = torch.tensor([1, 0, 2, 4, 3, 5, 6])
    gendered = torch.tensor([True, True, False, True, True, False, False])
    z, zs = torch.randn(3, 7), torch.randn(3, 7)
    p = z.softmax(-1)
    target = perturb_teacher_logits(z, zs, mapping, mode, gendered_only=True).exp()
    assert torch.allclose(target[:, ~gendered], p[:, ~gendered], atol=1e-6)
    assert torch.allclose(target[:, gendered].sum(-1), p[:, gendered].sum(-1), atol=1e-6)
    full = perturb_teacher_logits(z, zs, mapping, mode).exp()[:, gendered]
    assert torch.allclose(target[:, gendered] / target[:, gendered].sum(-1, keepdim=True),
                          full / full.sum(-1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean", "prob_max"])
def test_perturbed_target_is_gender_symmetric(mode):
    """p(sigma(w) | sigma(x)) == p(w | x) for the combined target of a real (random) teacher."""
    corpus = generate_corpus(200, seed=2)
    tok = word_tokenizer(corpus)
    mapping = gender_token_map(tok)
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2,
                                         n_positions=32)).eval()
    x = torch.tensor([tok.encode(s)[:8] for s in corpus if len(tok.encode(s)) >= 8][:6])
    sx = mapping[x]
    assert not torch.equal(sx, x)
    with torch.no_grad():
        z = teacher(torch.cat([x, sx])).logits
    z_x, z_sx = z[: len(x)], z[len(x):]
    target_x = perturb_teacher_logits(z_x, z_sx, mapping, mode)
    target_sx = perturb_teacher_logits(z_sx, z_x, mapping, mode)
    p_x, p_sx = target_x.softmax(-1), target_sx.softmax(-1)
    assert torch.allclose(p_sx[..., mapping], p_x, atol=1e-6)
    # ... which the unperturbed teacher does not satisfy
    assert not torch.allclose(z_sx.softmax(-1)[..., mapping], z_x.softmax(-1), atol=1e-3)
