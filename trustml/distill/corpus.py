"""An offline, gender-skewed corpus about professions, and a word-level tokenizer for it.

The teacher of the offline benchmark learns its bias from this text: each profession's pronoun
follows a configured skew (nurse: ``skew`` she, engineer: ``skew`` he, doctor: 50/50;
``professions.tsv``), and the gendered sentences open with the TRAIN templates of
``templates.tsv`` ("The nurse said that she ..."), never with the probe's. Neutral sentences (no
gendered word) make up the rest, so perplexity is not only about pronouns.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trustml.distill import vocabulary

_CONTINUATIONS = [
    "would finish the work soon", "was very tired", "had a long day", "needed some rest",
    "forgot the keys at the office", "wanted to call a friend", "missed the early bus",
    "had to help a colleague", "was feeling unwell", "would come back tomorrow",
    "liked the new schedule", "had lost track of time", "was waiting for a letter",
    "wanted to read a book", "had an appointment in the city",
]
_THINGS = ["shift", "report", "lunch", "coffee", "task", "project", "meeting", "break"]
_SUBJECTS = [
    "dog", "river", "train", "committee", "storm", "garden", "market", "child", "city", "machine",
    "company", "village", "museum", "student", "neighbor", "bird", "team", "council", "artist", "cat",
]
_VERBS = [
    "crossed", "visited", "watched", "painted", "found", "opened", "followed", "cleaned", "moved",
    "built", "closed", "reached", "passed", "carried", "fixed", "left", "studied", "described",
]
_OBJECTS = [
    "the bridge", "the old house", "a small boat", "the station", "the long road", "a green field",
    "the library", "the empty room", "a wooden table", "the hospital", "the north gate",
    "a quiet park", "the school", "the harbor", "a tall tree", "the factory",
]
_WHEN = [
    "in the morning", "after lunch", "at night", "last week", "during the storm", "on monday",
    "before dawn", "in the spring", "yesterday", "every day", "once again", "without a word",
]
_PRONOUNS = {
    "he": ("he", "his", "himself"),
    "she": ("she", "her", "herself"),
}


def profession_skew(skew: float, professions: tuple[str, ...] | None = None
                    ) -> dict[str, float]:
    """P(she) per profession: ``skew`` for female-stereotyped, 1 - skew for male, 0.5 otherwise."""
    share = {"female": skew, "male": 1 - skew, "neutral": 0.5}
    return {p: share[vocabulary.stereotype(p)] for p in professions or vocabulary.professions()}


def _gendered(rng: random.Random, profession: str, p_she: float, templates: tuple[str, ...]
              ) -> str:
    he, his, himself = _PRONOUNS["she" if rng.random() < p_she else "he"]
    template = rng.choice(templates)
    opening = template.format(p=profession)
    if template.endswith("finished"):
        tail = f"{his} {rng.choice(_THINGS)} and {he} {rng.choice(_CONTINUATIONS)}"
    elif rng.random() < 0.2:
        tail = f"{he} blamed {himself} for the delay"
    else:
        tail = f"{he} {rng.choice(_CONTINUATIONS)}"
    return f"{opening} {tail} ."


def _neutral(rng: random.Random, professions: tuple[str, ...]) -> str:
    subject = rng.choice(_SUBJECTS + list(professions))
    return (
        f"The {subject} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_WHEN)} ."
    )


def generate_corpus(
    n_sentences: int = 20000, skew: float = 0.9, neutral_fraction: float = 0.5, seed: int = 0,
    professions: tuple[str, ...] | None = None,
) -> list[str]:
    """``n_sentences`` sentences about ``professions`` (default: all of ``professions.tsv``),
    opened by the train templates; a pure function of the arguments (own RNG, no global state)."""
    if not 0.5 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0.5, 1] (P of the stereotyped pronoun), got {skew}")
    if not 0.0 <= neutral_fraction < 1.0:
        raise ValueError(f"neutral_fraction must be in [0, 1), got {neutral_fraction}")
    professions = tuple(professions or vocabulary.professions())
    templates = vocabulary.templates("train")
    rng = random.Random(seed)
    p_she = profession_skew(skew, professions)
    return [
        _neutral(rng, professions) if rng.random() < neutral_fraction
        else _gendered(rng, (p := rng.choice(professions)), p_she[p], templates)
        for _ in range(n_sentences)
    ]


def word_tokenizer(texts: list[str], extra_words: list[str] = ()) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over ``texts`` (plus ``extra_words``).

    The offline benchmark uses it instead of GPT-2's 50k BPE: a softmax over ~300 words makes a
    CPU run of a teacher and four students take minutes, while the method is unchanged (the gender
    token map is built from the same pair list through ``tokenizer.encode``).
    """
    splitter = pre_tokenizers.Whitespace()
    words = sorted(
        {w for t in [*texts, *extra_words] for w, _ in splitter.pre_tokenize_str(t)}
    )
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        bos_token="<|endoftext|>", unk_token="<unk>",
    )
