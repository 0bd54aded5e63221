"""Evaluation of a finished run: evaluators produce sections, this module writes them out.

An evaluator is ``fn(ctx) -> ReportSection``; ``evaluate_run`` picks those that apply to the run
(tabular metrics, language-model bias, membership-inference attacks) and writes
``eval/metrics.json`` and ``eval/report.md`` with the plots beside them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustml import config as cfgmod
from trustml.config import Config, ConfigError
from trustml.training import distributed
from trustml.training.checkpoint import load_model


@dataclass
class EvalContext:
    run_dir: Path
    config: Config
    model: nn.Module
    parts: Any  # trustml.training.run.Parts: datasets, tokenizer, objective
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


def load_run(run_dir: str | Path, device: str = "auto") -> EvalContext:
    """Rebuild the model and data of a run directory from its saved config and weights."""
    from trustml.training.run import build_parts, resolve_device

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run: {str(run_dir)!r} is not a run directory (no config.yaml)")
    config = cfgmod.load(run_dir / "config.yaml")
    parts = build_parts(config)
    dev = resolve_device(device)
    model = load_model(parts.model, run_dir / "model.safetensors").to(dev).eval()
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    return EvalContext(run_dir, config, model, parts, dev, out_dir, summary)


def write_report(ctx: EvalContext, sections: list[ReportSection]) -> Path:
    """Write ``metrics.json`` and ``report.md`` (rank 0 alone under torchrun)."""
    path = ctx.out_dir / "report.md"
    if not distributed.current().is_main:
        return path
    metrics = {"run": ctx.config.run.name, **{s.title: s.metrics for s in sections}}
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = [f"# Evaluation of `{ctx.run_dir.name}`", ""]
    if ctx.summary:
        keys = ("steps", "test_accuracy", "epsilon", "delta", "noise_multiplier", "privacy_verification",
                "stopped")
        facts = [f"{k} = {ctx.summary[k]:.4g}" if isinstance(ctx.summary[k], float)
                 else f"{k} = {ctx.summary[k]}" for k in keys if ctx.summary.get(k) is not None]
        lines += ["Training: " + ", ".join(facts), ""]
    for section in sections:
        lines += [f"## {section.title}", "", section.markdown.strip(), ""]
        lines += [f"![{p.stem}]({p.relative_to(ctx.out_dir)})" for p in section.plots]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def evaluate_run(run_dir: str | Path, attacks: list[str] | None = None,
                 device: str = "auto") -> Path:
    """Evaluate ``run_dir``; ``attacks`` overrides ``attack.attacks`` of the run's config. Under
    torchrun the ranks share the attacks' reference models; rank 0 alone evaluates and writes."""
    ctx = load_run(run_dir, device)
    world = distributed.setup(ctx.device)
    ctx.device = distributed.rank_device(ctx.device, world)
    ctx.model.to(ctx.device)
    sections: list[ReportSection] = []
    if world.is_main:  # the other ranks only help train the attacks' reference models
        if ctx.parts.data is not None:
            from trustml.evaluation.tabular import evaluate_tabular

            sections.append(evaluate_tabular(ctx))
        else:
            from trustml.evaluation.bias import evaluate_lm

            sections.append(evaluate_lm(ctx))
    attacks = ctx.config.attack.attacks if attacks is None else attacks
    if attacks:
        from trustml.attacks.evaluate import evaluate_attacks

        section = evaluate_attacks(ctx, attacks)
        if section is not None:
            sections.append(section)
    return write_report(ctx, sections)
