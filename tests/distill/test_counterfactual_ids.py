"""counterfactual_ids on real text with the real GPT-2 BPE: whole words in context, every casing,
unalignable pairs left and counted, agreement with swap_gender, and a measured error rate on
hand-curated sentences that trustml does not generate (tests/distill/data/)."""

import re
from pathlib import Path

import pytest
import torch

from trustml.distill.corpus import generate_corpus, word_tokenizer
from trustml.distill.counterfactual import counterfactual_ids, swap_gender, token_swapper

DATA = Path(__file__).parent / "data"


def _pairs():
    rows = []
    for line in (DATA / "counterfactual_sentences.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            rows.append(tuple(line.split("\t")))
    return rows


def _swap(gpt2, text):
    ids = torch.tensor([gpt2.encode(text)])
    result = token_swapper(gpt2)(ids)
    assert result.ids.shape == ids.shape and result.ids.dtype == torch.long
    return gpt2.decode(result.ids[0]), result


def _words(text):
    return re.findall(r"\w+|[^\w\s]", text)


def test_corpus_file_is_a_few_hundred_real_sentences():
    rows = _pairs()
    assert len(rows) >= 240 and all(len(r) == 2 for r in rows)
    generated = set(generate_corpus(5000, seed=0))
    assert not generated & {s for s, _ in rows}


def test_frequency_weighted_error_rate_on_real_sentences(gpt2):
    """Every gendered word occurrence counts once (frequent words weigh more). An error is a word
    that ends up different from the expected counterfactual, other than a deliberate,
    counted non-swap of an unalignable word (which also marks its row invalid from there on)."""
    occurrences = errors = unaligned = untouched_changed = 0
    for sentence, expected in _pairs():
        got, result = _swap(gpt2, sentence)
        source, want, have = _words(sentence), _words(expected), _words(got)
        assert len(source) == len(want) == len(have), sentence
        for s, w, h in zip(source, want, have):
            if s == w:
                untouched_changed += h != s
                continue
            occurrences += 1
            if h == s:
                unaligned += 1
            elif h != w:
                errors += 1
        assert result.unaligned == sum(s != w and h == s for s, w, h in zip(source, want, have))
        if result.unaligned:
            assert not result.valid[0, -1]
    rate, left = errors / occurrences, unaligned / occurrences
    print(f"\n{occurrences} gendered words: error rate {rate:.4f} ({errors}), "
          f"left unaligned {left:.4f} ({unaligned})")
    assert occurrences >= 300
    assert untouched_changed == 0  # no other word ever moves
    # measured: 3 errors of 320 (her + bare verb: "heard her sing" -> "his sing"), and 35 words
    # left (role nouns such as chairman/chairwoman, sir/madam, HE/SHE at the start: the two
    # sides have different GPT-2 token counts); the file over-represents rare role nouns
    assert rate <= 0.015
    assert left <= 0.12


def test_agrees_with_swap_gender_wherever_every_word_aligns(gpt2):
    whole = 0
    for sentence, _ in _pairs():
        got, result = _swap(gpt2, sentence)
        text = swap_gender(sentence)
        if result.unaligned == 0:
            assert got == text, sentence
            whole += 1
        else:  # word by word: swap_gender's word, or the original where it was left
            left = [(s, t) for s, t, h in zip(_words(sentence), _words(text), _words(got))
                    if h != t]
            assert all(s != t for s, t in left) and len(left) == result.unaligned, sentence
            assert got == gpt2.decode(gpt2.encode(got))
    assert whole >= 200


def test_words_that_must_never_change(gpt2):
    words = [w.strip() for w in (DATA / "never_swap.txt").read_text().splitlines()
             if w.strip() and not w.startswith("#")]
    assert len(words) >= 50
    for word in words:
        for form in {word, word.lower(), word.capitalize(), word.upper()}:
            for text in (form, f"The {form} said that", f"{form}, he said."):
                ids = torch.tensor([gpt2.encode(text)])
                expected = swap_gender(text)
                assert gpt2.decode(counterfactual_ids(ids, gpt2)[0]) == expected, text
                assert form in expected


@pytest.mark.parametrize("text, swapped", [
    (" he left", " she left"), (" He left", " She left"), ("He left", "She left"),
    (" HE left", " SHE left"), ("I told her the news.", "I told him the news."),
    ("She gave him her keys.", "He gave her his keys."), ("It is hers.", "It is his."),
    ("The book is his.", "The book is hers."), ("The men and women", "The women and men"),
    ("My uncle and his sons", "My aunt and her daughters"),
    (" Managed by Herbert, the hermit", " Managed by Herbert, the hermit"),
])
def test_casings_context_and_pieces(gpt2, text, swapped):
    got, result = _swap(gpt2, text)
    assert got == swapped and result.unaligned == 0 and result.valid.all()


def test_unaligned_word_is_left_counted_and_masks_the_rest_of_its_row(gpt2):
    text = "The Gentlemen said that he left."  # " Gentlemen" is 2 tokens, " Ladies" 1
    first, second = gpt2.encode(text), gpt2.encode("I told her the news.")
    second += [gpt2.eos_token_id] * (len(first) - len(second))
    ids = torch.tensor([first, second])
    result = token_swapper(gpt2)(ids)
    assert result.unaligned == 1 and result.swapped == 2
    assert gpt2.decode(result.ids[0]) == "The Gentlemen said that she left."
    assert result.valid[0].tolist() == [True] + [False] * (ids.shape[1] - 1)
    assert result.valid[1].all() and gpt2.decode(result.ids[1]).startswith("I told him the")


def test_padding_and_shape(gpt2):
    ids = torch.full((2, 3, 6), gpt2.eos_token_id)
    ids[1, 2, :3] = torch.tensor(gpt2.encode("she said he"))
    out = counterfactual_ids(ids, gpt2)
    assert out.shape == ids.shape
    assert gpt2.decode(out[1, 2, :3]) == "he said she"
    assert torch.equal(out[0], ids[0])


def test_word_level_tokenizer_agrees_with_swap_gender_on_the_corpus():
    corpus = generate_corpus(300, seed=1)
    tok = word_tokenizer(corpus)
    for sentence in corpus:
        ids = torch.tensor([tok.encode(sentence)])
        expected = tok.decode(tok.encode(swap_gender(sentence)))
        assert tok.decode(counterfactual_ids(ids, tok)[0]) == expected
