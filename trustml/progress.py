"""One verbosity setting for the whole package: progress bars and per-epoch lines, or silence.

The CLI's ``--quiet`` sets it once (``set_quiet``); every bar and progress line goes through ``bar``
and ``note``, so a driver several calls deep (audit -> run_training -> fit, reference models,
distillation students, sweep points) obeys it without a flag threaded through each signature and
without guessing from ``sys.stderr.isatty()`` (a log file wants the lines, a script may not).
Final summaries are printed by the CLI, not here, so they show even when quiet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

_QUIET = False


def set_quiet(flag: bool) -> None:
    global _QUIET
    _QUIET = bool(flag)


def is_quiet() -> bool:
    return _QUIET


@contextmanager
def quiet(flag: bool = True) -> Iterator[None]:
    """Silence (or, with ``flag=False``, allow) progress output inside the block."""
    before = _QUIET
    set_quiet(flag)
    try:
        yield
    finally:
        set_quiet(before)


def bar(iterable: Iterable | None = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled when quiet (or when ``disable``)."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=disable or _QUIET, **kwargs)


def note(text: str) -> None:
    """A progress line (per-epoch metrics, a finished sweep point) that does not break bars."""
    if not _QUIET:
        tqdm.write(text)
