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
