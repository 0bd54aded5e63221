"""Evaluation of a finished run: evaluators produce sections, this module writes them out.

An evaluator is ``fn(ctx) -> ReportSection``; ``evaluate_run`` picks those that apply to the run
(tabular metrics, language-model bias, membership-inference attacks) and writes
``eval/metrics.json`` and ``eval/report.md`` with the plots beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trustml import config as cfgmod
from trustml.config import ConfigError
from trustml.evaluation.context import EvalContext, ReportSection
from trustml.training import distributed, rundir
from trustml.training.checkpoint import CheckpointError, load_model


def find_runs(path: str | Path) -> list[Path]:
    """The trained runs at ``path``: itself when it holds a model, else every run below it (an
    experiment's directory: audit targets, sweep points, distillation students), in name order."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--run: {str(path)!r} " + ("is a file, not a run directory"
                                                       if path.exists() else "does not exist"))
    if (path / "model.safetensors").is_file():
        return [path]
    runs = sorted(p.parent for p in path.rglob("model.safetensors")
                  if (p.parent / "config.yaml").is_file())
    if runs:
        return runs
    if (path / "config.yaml").is_file():
        raise ConfigError(f"--run: {str(path)!r} has a config.yaml but no model.safetensors and no "
                          "trained run inside it (an unfinished run? continue it with --resume)")
    raise ConfigError(f"--run: {str(path)!r} is not a run directory (no config.yaml, no "
                      "model.safetensors) and holds no run")


HEADLINE_KEYS = ("accuracy", "auc", "demographic_parity_difference", "mean_abs_gap",
                 "mean_polarity", "perplexity")


def headline(metrics_path: str | Path) -> str:
    """One line of the headline numbers of an ``eval/metrics.json`` (quality, fairness, bias and
    each attack's AUC), for the CLI's final message."""
    metrics = json.loads(Path(metrics_path).read_text())
    parts = []
    for section in metrics.values():
        if not isinstance(section, dict):
            continue
        parts += [f"{k} {section[k]:.4g}" for k in HEADLINE_KEYS
                  if isinstance(section.get(k), (int, float))]
        parts += [f"{name} AUC {m['auc']:.4g}" for name, m in section.items()
                  if isinstance(m, dict) and "auc" in m]
    return ", ".join(parts) or "no metrics"


def load_run(run_dir: str | Path, device: str = "auto",
             overrides: list[str] | None = None) -> EvalContext:
    """Rebuild the model and data of a run directory from its saved config and weights;
    ``overrides`` (``bias.*=...`` only: they choose evaluations, not the model) apply on top."""
    from trustml.runner import build_parts, resolve_device

    bad = [o for o in overrides or [] if not o.startswith("bias.")]
    if bad:  # settings first: a wrong override is reported before the directory is read
        raise ConfigError(f"evaluate --set {bad[0]!r}: only bias.* keys can be set at evaluation")
    run_dir = Path(run_dir)
    runs = find_runs(run_dir)
    if runs != [run_dir]:
        raise ConfigError(f"{str(run_dir)!r} is an experiment's directory holding {len(runs)} "
                          f"runs ({', '.join(str(r.relative_to(run_dir)) for r in runs)}); "
                          "evaluate one of them")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run: {str(run_dir)!r} is not a run directory (no config.yaml)")
    config = cfgmod.load(run_dir / "config.yaml", overrides)
    parts = build_parts(config)
    dev = resolve_device(device)
    try:
        model = load_model(parts.model, run_dir / "model.safetensors").to(dev).eval()
    except RuntimeError as err:  # e.g. a size mismatch: weights of another model.hidden
        first = str(err).strip().splitlines()
        raise CheckpointError(f"model weights {str(run_dir / 'model.safetensors')!r} do not fit "
                              f"the model of config.yaml: {(first[-1] if first else err)!s:.200}"
                              ) from None
    summary = _read_summary(run_dir / "summary.json")
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    return EvalContext(run_dir, config, model, parts, dev, out_dir, summary)


def _read_summary(path: Path) -> dict[str, Any]:
    """The run's summary.json ({} when absent); a corrupt one is a clear error, not a traceback."""
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({err}); rerun training or delete "
                          "it") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{str(path)!r}: expected a JSON object, got {type(summary).__name__}")
    return summary


def write_report(ctx: EvalContext, sections: list[ReportSection]) -> Path:
    """Write ``metrics.json`` and ``report.md`` (rank 0 alone under torchrun)."""
    path = ctx.out_dir / "report.md"
    if not distributed.current().is_main:
        return path
    metrics = {"run": ctx.config.run.name, **{s.title: s.metrics for s in sections}}
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = [f"# Evaluation of `{ctx.run_dir.name}`", ""]
    if ctx.summary:
        keys = ("steps", "test_accuracy", "epsilon", "delta", "noise_multiplier", "privacy_rng",
                "privacy_verification",
                "stopped")
        facts = [f"{k} = {ctx.summary[k]:.4g}" if isinstance(ctx.summary[k], float)
                 else f"{k} = {ctx.summary[k]}" for k in keys if ctx.summary.get(k) is not None]
        lines += ["Training: " + ", ".join(facts), ""]
        lines += [f"**Warning:** {w}" for w in ctx.summary.get("warnings", [])]
        lines += [""] if ctx.summary.get("warnings") else []
    for section in sections:
        lines += [f"## {section.title}", "", section.markdown.strip(), ""]
        lines += [f"![{p.stem}]({p.relative_to(ctx.out_dir)})" for p in section.plots]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def evaluate_run(run_dir: str | Path, attacks: list[str] | None = None,
                 device: str = "auto", overrides: list[str] | None = None) -> Path:
    """Evaluate ``run_dir``; ``attacks`` overrides ``attack.attacks`` of the run's config. Under
    torchrun the ranks share the attacks' reference models; rank 0 alone evaluates and writes."""
    ctx = load_run(run_dir, device, overrides)
    world = distributed.setup(ctx.device, ctx.config.run.dist_timeout_s)
    rundir.claim_on_main(ctx.run_dir, world)  # never evaluate a run that is still training
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
    path = write_report(ctx, sections)
    if world.is_main:
        rundir.release(ctx.run_dir)
    return path
