"""Counterfactual gender swapping: sigma on text, and the token-level involution used for aligned
swapped contexts and for mapping teacher predictions back ("role reversal", Gupta et al., 2022)."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

Perturbation = Literal["none", "logit_mean", "logit_max", "prob_mean"]

# After an ambiguous word (her, his) these mean the pronoun reading, not the determiner one:
# "gave her the book" -> "gave him the book", but "her book" -> "his book".
_FUNCTION_WORDS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "to", "and", "or", "but", "nor", "so",
    "as", "at", "in", "on", "of", "for", "with", "from", "by", "up", "down", "out", "off",
    "about", "into", "onto", "over", "under", "again", "back", "then", "when", "while", "if",
    "because", "than", "too", "very", "now", "there", "here", "yesterday", "today", "tomorrow",
    "away", "is", "was", "are", "were", "be", "been", "will", "would", "can", "could", "should",
    "must", "may", "might", "not", "also", "just", "all", "both", "each", "every", "some",
    "any", "no", "my", "your", "his", "her", "its", "our", "their", "me", "him", "us", "them",
    "it",
})


@lru_cache(maxsize=1)
def gender_pairs() -> tuple[tuple[str, str], ...]:
    """The curated (male, female) pairs of ``gender_pairs.txt``, in file order."""
    text = resources.files("trustml.distill").joinpath("gender_pairs.txt").read_text("utf-8")
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        words = line.split()
        if len(words) != 2 or not all(w.isalpha() and w.islower() for w in words):
            raise ValueError(f"gender_pairs.txt line {number}: expected 'male female' in lowercase")
        pairs.append((words[0], words[1]))
    return tuple(pairs)


@lru_cache(maxsize=1)
def _targets() -> dict[str, tuple[str, ...]]:
    """word -> its counterparts in file order (two for ambiguous words: determiner, pronoun)."""
    out: dict[str, list[str]] = {}
    for male, female in gender_pairs():
        for src, dst in ((male, female), (female, male)):
            if dst not in out.setdefault(src, []):
                out[src].append(dst)
    if any(len(t) > 2 for t in out.values()):
        raise ValueError("gender_pairs.txt: a word may have at most two counterparts")
    return {k: tuple(v) for k, v in out.items()}


@lru_cache(maxsize=1)
def _pattern() -> re.Pattern[str]:
    words = sorted(_targets(), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE)


def _match_case(source: str, word: str) -> str:
    if len(source) > 1 and source.isupper():
        return word.upper()
    if source[0].isupper():
        return word[0].upper() + word[1:]
    return word


def swap_gender(text: str) -> str:
    """sigma(text): every listed gendered word replaced by its counterpart, case kept.

    ``her``/``his`` are resolved by the next word: a content word selects the determiner reading
    (her car <-> his car), punctuation, the end or a function word the pronoun one (told her. ->
    told him., it is his. -> it is hers.).
    """
    targets = _targets()

    def replace(match: re.Match[str]) -> str:
        word = match.group(0)
        options = targets[word.lower()]
        choice = options[0]
        if len(options) == 2:
            following = re.match(r"\s+([A-Za-z]+)", text[match.end() :])
            if following is None or following.group(1).lower() in _FUNCTION_WORDS:
                choice = options[1]
        return _match_case(word, choice)

    return _pattern().sub(replace, text)


def _single_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def gender_token_map(tokenizer: PreTrainedTokenizerBase) -> torch.LongTensor:
    """The involution sigma over the vocabulary: ``map[id]`` is the id of the swapped token.

    Each pair is used in four forms (``he``, `` he``, ``He``, `` He``) where both sides are single
    tokens; everything else maps to itself. A word takes part in one pair only (its first one in
    ``gender_pairs.txt``), so the map is one-to-one: ``map[map] == arange``.
    """
    mapping = torch.arange(len(tokenizer), dtype=torch.long)
    used: set[str] = set()
    for male, female in gender_pairs():
        if male in used or female in used:
            continue
        used.update((male, female))
        for form in (str, lambda w: " " + w, str.capitalize, lambda w: " " + w.capitalize()):
            a, b = _single_token(tokenizer, form(male)), _single_token(tokenizer, form(female))
            if a is None or b is None or a == b:
                continue
            if mapping[a] != a or mapping[b] != b:  # already paired through another surface form
                continue
            mapping[a], mapping[b] = b, a
    return mapping


def perturb_teacher_logits(
    logits: torch.Tensor,
    logits_swapped: torch.Tensor,
    token_map: torch.Tensor,
    mode: Perturbation,
) -> torch.Tensor:
    """Combine teacher logits on x with those on sigma(x) mapped back: z'_rr[w] = z'[sigma(w)].

    ``logit_mean`` averages logits, ``logit_max`` takes the larger, ``prob_mean`` returns the log of
    the mean of the two distributions (usable as logits). With ``logit_mean``/``prob_mean`` the target
    is symmetric: p(sigma(w) | sigma(x)) = p(w | x).
    """
    if mode == "none":
        return logits
    if logits.shape != logits_swapped.shape or logits.shape[-1] != token_map.numel():
        raise ValueError(
            f"perturb_teacher_logits: logits {tuple(logits.shape)} and swapped "
            f"{tuple(logits_swapped.shape)} must match, with {token_map.numel()} = vocabulary size"
        )
    reversed_ = logits_swapped.index_select(-1, token_map.to(logits.device))
    if mode == "logit_mean":
        return (logits + reversed_) / 2
    if mode == "logit_max":
        return torch.maximum(logits, reversed_)
    if mode == "prob_mean":
        log_p = torch.logaddexp(logits.log_softmax(-1), reversed_.log_softmax(-1))
        return log_p - torch.log(torch.tensor(2.0, dtype=log_p.dtype, device=log_p.device))
    raise ValueError(f"perturbation mode {mode!r}: expected none, logit_mean, logit_max or prob_mean")
