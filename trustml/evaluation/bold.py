"""BOLD prompts (Dhamala et al., 2021): Wikipedia sentence openings about people, grouped by
domain (gender, profession, race, ...) and category (American_actors, American_actresses, ...).

Sources: ``hf:AlexaAI/bold`` (the hub dataset: rows of domain, name, category, prompts; needs the
network) or a local JSON / JSON-lines file, either of such rows or in the original repository's
layout ``{category: {name: [prompts]}}`` (``gender_prompt.json``: the domain is the file name's
first word).
"""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path

from trustml.config import ConfigError
from trustml.data.text import HF_PREFIX, parse_hub_spec

Prompt = tuple[str, str, str]  # (domain, category, prompt)


def _rows_from_hub(spec: str) -> list[dict]:
    import datasets

    name, config = parse_hub_spec(spec)
    try:
        ds = datasets.load_dataset(name, config)
    except (OSError, ValueError, ConnectionError) as err:
        raise ConfigError(f"bias.bold {spec!r}: could not load it from the Hugging Face hub "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    split = ds["train"] if "train" in ds else next(iter(ds.values()))
    return list(split)


def _rows_from_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"bias.bold {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = (json.loads(text) if not path.suffix == ".jsonl"
                else [json.loads(line) for line in text.splitlines() if line.strip()])
    except json.JSONDecodeError as err:
        raise ConfigError(f"bias.bold {str(path)!r}: not valid JSON ({err})") from None
    if isinstance(data, dict):  # the original layout: {category: {name: [prompts]}}
        domain = path.stem.split("_")[0]
        return [{"domain": domain, "category": category, "name": name, "prompts": prompts}
                for category, people in data.items() for name, prompts in people.items()]
    return data


def load_bold(source: str, domains: list[str] | tuple[str, ...] = ("gender", "profession"),
              per_domain: int | None = None) -> list[Prompt]:
    """(domain, category, prompt) triples of ``domains``; ``per_domain`` caps each domain,
    taking categories in turn so every category is represented."""
    rows = (_rows_from_hub(source) if source.startswith(HF_PREFIX)
            else _rows_from_file(Path(source)))
    by_category: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        try:
            key, prompts = (row["domain"], row["category"]), row["prompts"]
        except (KeyError, TypeError):
            raise ConfigError(f"bias.bold {source!r}: expected rows with domain, category and "
                              "prompts") from None
        if key[0] in domains:
            by_category.setdefault(key, []).extend(p.strip() for p in prompts if p.strip())
    out: list[Prompt] = []
    for domain in domains:
        lists = [[(d, c, p) for p in ps] for (d, c), ps in by_category.items() if d == domain]
        interleaved = [x for group in zip_longest(*lists) for x in group if x is not None]
        out += interleaved[:per_domain]
    if not out:
        raise ConfigError(f"bias.bold {source!r}: no prompts in domains {list(domains)}")
    return out
