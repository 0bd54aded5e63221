"""Counterfactual gender swapping (Gupta et al., 2022): sigma on text (:func:`swap_gender`), on
token ids in context (:func:`counterfactual_ids`, for CDA and the teacher's swapped context), the
vocabulary involution that maps teacher predictions back (:func:`gender_token_map`), and the
teacher perturbation that combines both predictions (:func:`perturb_teacher_logits`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

Perturbation = Literal["none", "logit_mean", "prob_mean", "prob_max"]

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
    # object-pronoun contexts: adverbs, wh-words, subject pronouns and bare verbs that follow
    # "her" as an object ("saw her later", "asked her why", "let her go")
    "later", "soon", "well", "alone", "home", "once", "twice", "before", "after", "around",
    "through", "until", "since", "during", "against", "without", "how", "what", "why", "where",
    "who", "whom", "which", "whether", "i", "you", "he", "she", "we", "they", "never",
    "always", "often", "immediately", "anything", "something", "nothing", "everything", "go",
    "come", "feel", "know", "cry", "laugh", "smile", "leave", "stay", "think", "do", "get",
    "had", "has", "have", "did", "does", "being", "last", "instead", "either", "yet",
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


def _choose(word: str, next_word: str) -> str:
    """The counterpart of ``word`` (lowercase) given the next word ("" at the end or before
    punctuation): for her/his, a content word selects the determiner reading (file order's
    first), anything else the pronoun one."""
    options = _targets()[word.lower()]
    if len(options) == 2 and (not next_word or next_word.lower() in _FUNCTION_WORDS):
        return options[1]
    return options[0]


def swap_gender(text: str) -> str:
    """sigma(text): every listed gendered word replaced by its counterpart, case kept.

    ``her``/``his`` are resolved by the next word: a content word selects the determiner reading
    (her car <-> his car), punctuation, the end or a function word the pronoun one (told her. ->
    told him., it is his. -> it is hers.).
    """

    def replace(match: re.Match[str]) -> str:
        following = re.match(r"\s+([A-Za-z]+)", text[match.end() :])
        word = match.group(0)
        return _match_case(word, _choose(word, following.group(1) if following else ""))

    return _pattern().sub(replace, text)


def _single_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def gender_token_map(tokenizer: PreTrainedTokenizerBase) -> torch.LongTensor:
    """The involution sigma over the vocabulary, used to map teacher PREDICTIONS back (role
    reversal: p_rr(w | x) = p(sigma(w) | sigma(x))): ``map[id]`` is the id of the swapped token.

    A next-token distribution is over single tokens, so this map is a permutation of them: each
    pair is used in five forms (``he``, `` he``, ``He``, `` He``, `` HE``) where both sides are single
    tokens; everything else maps to itself. A word takes part in one pair only (its first one in
    ``gender_pairs.txt``), so ``map[map] == arange`` (" him" and " hers" stay). Swapping the INPUT
    text is :func:`counterfactual_ids`' job, which reads words in context.
    """
    mapping = torch.arange(len(tokenizer), dtype=torch.long)
    used: set[str] = set()
    forms = (str, lambda w: " " + w, str.capitalize, lambda w: " " + w.capitalize(),
             lambda w: " " + w.upper())
    for male, female in gender_pairs():
        if male in used or female in used:
            continue
        used.update((male, female))
        for form in forms:
            a, b = _single_token(tokenizer, form(male)), _single_token(tokenizer, form(female))
            if a is None or b is None or a == b:
                continue
            if mapping[a] != a or mapping[b] != b:  # already paired through another surface form
                continue
            mapping[a], mapping[b] = b, a
    return mapping


def _is_word_char(char: str) -> bool:
    """Python's regex ``\\w`` (what ``\\b`` in :func:`swap_gender` reads), plus U+FFFD: a byte
    piece of a multi-byte character decodes to it and must not open a word boundary."""
    return char.isalnum() or char in "_\ufffd"


@dataclass
class Counterfactual:
    """sigma(x) on token ids: ``ids`` (same shape as the input), ``valid`` (bool, same shape:
    False from the first gendered word that could not be swapped token for token to the end of
    its row, where sigma(x) is not a counterfactual of x), and word counts."""

    ids: torch.Tensor
    valid: torch.Tensor
    swapped: int
    unaligned: int


class TokenSwapper:
    """:func:`swap_gender` on token ids, position for position, for one tokenizer.

    Every vocabulary entry is decoded once. A word is a maximal run of tokens joined without a
    boundary (a token opens a word when it starts with a non-word character such as a space, or
    the previous token ends with one; in a tokenizer that decodes tokens space-separated, such as
    the offline benchmark's word-level one, every token is a word). A listed word is replaced by
    its counterpart (case kept, her/his by the next word, exactly as :func:`swap_gender`) when the
    counterpart, re-encoded with the same leading space, has the same number of tokens and decodes
    to the intended text; otherwise it is left, counted as unaligned and its row is marked invalid
    from there on (see :class:`Counterfactual`), never spliced into a different length.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.pieces: list[str] = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        a = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else 0
        self.spaced = tokenizer.decode([a, a]) == f"{self.pieces[a]} {self.pieces[a]}"
        targets = _targets()
        prefixes = {w[:i] for w in targets for i in range(1, len(w) + 1)}
        self.candidate = torch.tensor(
            [p.strip().lower() in prefixes for p in self.pieces], dtype=torch.bool)
        self._encoded: dict[str, tuple[int, ...] | None] = {}

    def _encode(self, text: str) -> tuple[int, ...] | None:
        """Token ids of ``text`` when they decode back to exactly ``text`` (no unknown word)."""
        if text not in self._encoded:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            expected = text.strip() if self.spaced else text
            self._encoded[text] = ids if self.tokenizer.decode(list(ids)) == expected else None
        return self._encoded[text]

    def _words(self, row: list[int]) -> list[tuple[int, int]]:
        """(start, end) token spans of the row's words (see the class doc)."""
        spans: list[tuple[int, int]] = []
        for i, token in enumerate(row):
            piece = self.pieces[token]
            joins = (
                i > 0 and not self.spaced and piece[:1] != "" and _is_word_char(piece[0])
                and self.pieces[row[i - 1]][-1:] != ""
                and _is_word_char(self.pieces[row[i - 1]][-1])
            )
            if joins:
                spans[-1] = (spans[-1][0], i + 1)
            else:
                spans.append((i, i + 1))
        return spans

    def swap_row(self, row: list[int]) -> tuple[list[int], int, int | None, int]:
        """(swapped row, words swapped, first invalid position or None, words left unaligned)."""
        targets = _targets()
        out = list(row)
        spans = self._words(row)
        texts = ["".join(self.pieces[t] for t in row[s:e]) for s, e in spans]
        swapped, unaligned, first_invalid = 0, 0, None
        for k, ((start, end), text) in enumerate(zip(spans, texts)):
            word = text.lstrip()
            if not word.isalpha() or word.lower() not in targets:
                continue
            following = texts[k + 1] if k + 1 < len(texts) else ""
            next_word = following.strip() if following[:1].isspace() or self.spaced else ""
            replacement = _match_case(word, _choose(word, next_word if next_word.isalpha() else ""))
            ids = self._encode(text[: len(text) - len(word)] + replacement)
            if ids is not None and len(ids) == end - start:
                out[start:end] = ids
                swapped += 1
            else:
                unaligned += 1
                first_invalid = start if first_invalid is None else first_invalid
        return out, swapped, first_invalid, unaligned

    def __call__(self, input_ids: torch.Tensor) -> Counterfactual:
        ids = input_ids.clone()
        valid = torch.ones_like(input_ids, dtype=torch.bool)
        flat, flat_valid = ids.view(-1, ids.shape[-1]), valid.view(-1, ids.shape[-1])
        candidate = self.candidate.to(input_ids.device)
        rows = candidate[input_ids.clamp(0, len(candidate) - 1)].view_as(flat).any(-1)
        swapped = unaligned = 0
        for r in rows.nonzero().flatten().tolist():
            row, n, invalid, bad = self.swap_row(flat[r].tolist())
            flat[r] = torch.tensor(row, dtype=ids.dtype, device=ids.device)
            if invalid is not None:
                flat_valid[r, invalid:] = False
            swapped, unaligned = swapped + n, unaligned + bad
        return Counterfactual(ids, valid, swapped, unaligned)


_SWAPPERS: dict[int, TokenSwapper] = {}


def token_swapper(tokenizer: PreTrainedTokenizerBase) -> TokenSwapper:
    """The :class:`TokenSwapper` of ``tokenizer``, built once per tokenizer object."""
    swapper = _SWAPPERS.get(id(tokenizer))
    if swapper is None or swapper.tokenizer is not tokenizer:
        swapper = _SWAPPERS[id(tokenizer)] = TokenSwapper(tokenizer)
    return swapper


def counterfactual_ids(input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase
                       ) -> torch.LongTensor:
    """sigma(x) of a batch of token ids, same shape, positions aligned: whole gendered words
    swapped in context (see :class:`TokenSwapper`); a word whose counterpart has another token
    count is left as it is (``token_swapper(tokenizer)(input_ids)`` also says where and how many).
    """
    return token_swapper(tokenizer)(input_ids).ids


def perturb_teacher_logits(
    logits: torch.Tensor,
    logits_swapped: torch.Tensor,
    token_map: torch.Tensor,
    mode: Perturbation,
    gendered_only: bool = False,
) -> torch.Tensor:
    """Combine the teacher's logits on x with those on sigma(x) mapped back,
    z_rr[w] = z(sigma(x))[sigma(w)], into target logits (float32).

    - ``logit_mean``: (z + z_rr) / 2;
    - ``prob_mean``: log of (p + p_rr) / 2;
    - ``prob_max``: log of max(p, p_rr), renormalised. A max over raw logits is not used: adding a
      constant to one context's logits leaves its distribution unchanged but changes that max.
      Every mode here depends on each context's distribution only.

    ``gendered_only``: only the tokens that ``token_map`` moves are perturbed; every other token
    keeps the teacher's probability on x exactly, and the gendered tokens share the teacher's
    total gendered mass in the proportions of the combined distribution.
    """
    if mode == "none":
        return logits.float()
    if logits.shape != logits_swapped.shape or logits.shape[-1] != token_map.numel():
        raise ValueError(
            f"perturb_teacher_logits: logits {tuple(logits.shape)} and swapped "
            f"{tuple(logits_swapped.shape)} must match, with {token_map.numel()} = vocabulary size"
        )
    token_map = token_map.to(logits.device)
    log_p = logits.float().log_softmax(-1)
    log_rr = logits_swapped.float().index_select(-1, token_map).log_softmax(-1)
    if mode == "logit_mean":
        combined = ((log_p + log_rr) / 2).log_softmax(-1)
    elif mode == "prob_mean":
        combined = torch.logaddexp(log_p, log_rr) - math.log(2.0)
    elif mode == "prob_max":
        combined = torch.maximum(log_p, log_rr).log_softmax(-1)
    else:
        raise ValueError(f"perturbation mode {mode!r}: expected none, logit_mean, prob_mean or "
                         "prob_max")
    if not gendered_only:
        return combined
    gendered = token_map != torch.arange(token_map.numel(), device=token_map.device)
    inside = torch.full_like(log_p, float("-inf"))
    mass = torch.where(gendered, log_p, inside).logsumexp(-1, keepdim=True)
    share = torch.where(gendered, combined, inside)
    share = share - share.logsumexp(-1, keepdim=True)
    return torch.where(gendered, mass + share, log_p)
