"""The shared vocabulary of the professions corpus and the bias probe, read from data files.

``professions.tsv`` and ``templates.tsv`` split professions into train / probe and templates into
train / probe / novel by construction, so the corpus generator (which reads only the train split)
and the probe (which reads the held-out ones) can never share a prompt by accident; neither module
imports the other.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Literal

Split = Literal["train", "probe", "novel"]
_STEREOTYPES = ("female", "male", "neutral")


def _rows(name: str, width: int) -> list[list[str]]:
    text = resources.files("trustml.distill").joinpath(name).read_text("utf-8")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != width:
            raise ValueError(f"{name} line {number}: expected {width} tab-separated fields")
        rows.append(fields)
    return rows


@lru_cache(maxsize=1)
def _professions() -> tuple[tuple[str, str, str], ...]:
    rows = _rows("professions.tsv", 3)
    for word, stereotype, split in rows:
        if stereotype not in _STEREOTYPES or split not in ("train", "probe"):
            raise ValueError(f"professions.tsv: {word!r} has stereotype {stereotype!r}, split "
                             f"{split!r}; expected {_STEREOTYPES} and train/probe")
    return tuple((w, s, p) for w, s, p in rows)


def professions(split: Split | None = None) -> tuple[str, ...]:
    """Professions of ``split`` (train or probe; None: all), in file order."""
    return tuple(w for w, _, s in _professions() if split is None or s == split)


def stereotype(profession: str) -> str:
    """female, male or neutral: which pronoun the generated corpus skews it towards."""
    return {w: s for w, s, _ in _professions()}.get(profession, "neutral")


@lru_cache(maxsize=None)
def templates(split: Split) -> tuple[str, ...]:
    """Templates with ``{p}`` of ``split``: train (corpus openings), probe or novel."""
    rows = [t for s, t in _rows("templates.tsv", 2) if s == split]
    if not rows or any("{p}" not in t for t in rows):
        raise ValueError(f"templates.tsv: split {split!r} is empty or lacks {{p}}")
    return tuple(rows)
