"""Which revision of a Hugging Face hub repository a run used, for its summary.

A hub name without a pinned revision follows its default branch, so a rerun months later may load
other weights or data. Runs therefore accept a revision per hub load (``model.revision``,
``data.revision``, ``data.tokenizer_revision``, ``distill.teacher_revision``) and record what it
resolved to. The resolution reads the hub cache's ``refs/`` files, which every download writes,
instead of asking the hub again: it works offline and never costs a request.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from trustml.config import Config

_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolved_revision(name_or_path: str, requested: str | None,
                      repo_type: str = "model") -> str:
    """``"local"`` for a folder on disk (or ``""``: files shipped with a package), the commit a
    hub ``requested`` revision (default branch when None) points to in the cache, else the
    requested revision itself or ``"unpinned"``."""
    if not name_or_path or os.path.isdir(name_or_path):
        return "local"
    if requested is not None and _COMMIT.fullmatch(requested):
        return requested
    from huggingface_hub import constants

    repo = f"{repo_type}s--{name_or_path.replace('/', '--')}"
    ref = Path(constants.HF_HUB_CACHE) / repo / "refs" / (requested or "main")
    if ref.is_file():
        commit = ref.read_text().strip()
        if _COMMIT.fullmatch(commit):
            return commit
    return requested or "unpinned"


def run_revisions(config: Config, tokenizer: Any = None) -> dict[str, str]:
    """What every hub load of ``config`` resolved to, by config key (for summary.json). Called
    after the loads, so that a download has written the cache refs it reads."""
    data = config.data
    revisions = {}
    if tokenizer is not None:  # the offline GPT-2 BPE has no name: package files
        revisions["data.tokenizer"] = resolved_revision(
            data.tokenizer if tokenizer.name_or_path else "", data.tokenizer_revision)
    if data.path is not None and data.path.startswith("hf:"):
        from trustml.data.text import parse_hub_spec

        name = data.path[3:] if data.dataset == "adult" else parse_hub_spec(data.path)[0]
        revisions["data.path"] = resolved_revision(name, data.revision, "dataset")
    if config.model.kind == "gpt2" and config.model.name is not None:
        revisions["model.name"] = resolved_revision(config.model.name, config.model.revision)
    if config.distill.enabled and config.distill.teacher is not None:
        revisions["distill.teacher"] = resolved_revision(config.distill.teacher,
                                                         config.distill.teacher_revision)
    return revisions
