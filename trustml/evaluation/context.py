"""What an evaluator gets (EvalContext) and returns (ReportSection), and the one table helper.

A leaf module: evaluators (tabular, bias, attacks) import it without importing the report writer
that calls them, so evaluation has no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustml.config import Config


@dataclass
class EvalContext:
    run_dir: Path
    config: Config
    model: nn.Module
    parts: Any  # trustml.runner.Parts: datasets, tokenizer, objective
    device: torch.device
    out_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportSection:
    title: str
    metrics: dict[str, Any]
    markdown: str
    plots: list[Path] = field(default_factory=list)


Evaluator = Callable[[EvalContext], ReportSection]


def markdown_table(rows: list[dict[str, Any]], columns: list[str], digits: str = ".4f") -> str:
    """A Markdown table of ``rows`` (dicts) in ``columns`` order; floats as ``format(v, digits)``,
    missing values as n/a. Every report of the suite builds its tables here."""

    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        return format(value, digits) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
