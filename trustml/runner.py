"""From a Config to a finished run directory: build the parts, choose the step, call ``fit``.

This is the only place that knows which capability plugs in where; experiments and the CLI call
``run_training`` instead of assembling a loop themselves.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustml import config as cfgmod
from trustml.config import Config, ConfigError
from trustml.data.sampling import ShardedBatches, ShuffledBatches, sequential_batches
from trustml.training import distributed
from trustml.training.checkpoint import save_model
from trustml.training.loop import fit, seed_everything
from trustml.training.objectives import ClassificationObjective, LMObjective
from trustml.training.step import PlainStep


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    summary: dict[str, Any]


@dataclass
class Parts:
    """Everything a run trains on; ``evaluate.py`` rebuilds the same parts from the saved config."""

    model: nn.Module
    objective: Any
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    data: Any = None  # TabularData for tabular runs
    tokenizer: Any = None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' requested but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_optimizer(cfg: cfgmod.TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_parts(config: Config) -> Parts:
    """Data, model and objective for ``config`` (on the CPU; the caller moves the model)."""
    if config.model.kind == "mlp":
        from trustml.data.tabular import load_tabular
        from trustml.models.mlp import MLP

        data = load_tabular(config.data, seed=config.run.seed)
        n_classes = int(data.train.y.max()) + 1
        model = MLP(data.n_features, config.model.hidden, max(n_classes, 2),
                    config.model.activation, config.model.dropout, config.model.norm)
        return Parts(model, ClassificationObjective(), data.train, data.val, data=data)
    from trustml.data.text import lm_datasets, load_tokenizer
    from trustml.models.lm import build_lm

    tokenizer = load_tokenizer(config.data.tokenizer)
    train, val = lm_datasets(config.data, tokenizer)
    if config.distill.enabled:
        from trustml.distill.objective import build_distillation

        model, objective = build_distillation(config, tokenizer)
    else:
        model, objective = build_lm(config.model, len(tokenizer)), LMObjective()
    return Parts(model, objective, train, val, tokenizer=tokenizer)


@torch.no_grad()
def mean_loss(model: nn.Module, objective, dataset, batch_size: int,
              device: torch.device) -> float:
    """Mean per-sample loss of ``objective`` on ``dataset`` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in sequential_batches(dataset, batch_size):
        out = objective(model, {k: v.to(device) for k, v in batch.items()})
        total += out.losses.float().sum().item()
        count += len(out.losses)
    model.train(was_training)
    return total / max(count, 1)


def make_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run.output_dir) / f"{config.run.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(config.run.output_dir) / f"{config.run.name}-{stamp}-{suffix}"
    return run_dir


def _plain_batches(config: Config, parts: Parts, world: distributed.World):
    if config.fairness.penalty != "none" and config.fairness.balanced_batches:
        from trustml.fairness.sampling import GroupBalancedBatches

        balanced = GroupBalancedBatches(parts.train, config.train.batch_size,
                                        seed=config.run.seed,
                                        by_label=config.fairness.notion == "eo")
        return ShardedBatches(balanced, world) if world.distributed else balanced
    return ShuffledBatches(parts.train, config.train.batch_size, seed=config.run.seed,
                           world=world)


def _constrained(config: Config, step: PlainStep, parts: Parts):
    """The plain step with its fairness multiplier steered to ``fairness.target`` on validation."""
    from trustml.fairness.constraint import ConstrainedStep

    if parts.data is None:
        raise ConfigError("fairness.target: needs a tabular dataset with a sensitive attribute")
    f = config.fairness
    return ConstrainedStep(step, step.penalties[0], parts.data.val, target=f.target,
                           notion=f.notion, update_every=f.update_every, dual_lr=f.dual_lr)


def run_training(config: Config, run_dir: str | Path | None = None, resume: bool = False,
                 progress: bool = True) -> TrainResult:
    """Train ``config`` into ``run_dir`` (a new ``runs/<name>-<time>`` when None)."""
    if resume and run_dir is None:
        raise ConfigError("--resume needs the run directory to continue")
    device = resolve_device(config.run.device)
    world = distributed.setup(device)
    device = distributed.rank_device(device, world)
    run_dir = Path(distributed.broadcast(
        str(run_dir) if run_dir is not None else str(make_run_dir(config)), world))
    if resume and not (run_dir / "checkpoint").is_dir():
        raise ConfigError(f"--resume: {str(run_dir)!r} has no checkpoint/ to resume from")
    seed_everything(config.run.seed)
    parts = build_parts(config)
    model = parts.model.to(device)
    optimizer = make_optimizer(config.train, model.parameters())
    penalties = []
    if config.fairness.penalty != "none":
        from trustml.fairness.penalty import build_penalty

        penalties.append(build_penalty(config.fairness))
    state: dict[str, Any] = {"optimizer": optimizer}
    privacy = None
    trained = model
    if config.privacy.enabled:
        from trustml.privacy import ensure_decomposable, make_private

        p = config.privacy
        try:
            ensure_decomposable(penalties)
            privacy = make_private(
                model, optimizer, parts.train, noise_multiplier=p.noise_multiplier,
                target_epsilon=p.target_epsilon, target_delta=p.delta,
                epochs=config.train.epochs, max_grad_norm=p.max_grad_norm,
                accountant=p.accountant, poisson_sampling=p.poisson,
                physical_batch_size=p.physical_batch_size, batch_size=config.train.batch_size,
                epsilon_budget=p.epsilon_budget, seed=config.run.seed, amp=config.train.amp,
                world=world)
        except ValueError as err:
            raise ConfigError(f"privacy: {err}") from None
        step, batches = privacy.step, privacy.batches
        state["privacy"] = privacy
    else:
        step = PlainStep(optimizer, penalties, amp=config.train.amp)
        if config.fairness.target is not None:
            step = _constrained(config, step, parts)
            state["fairness"] = step
        batches = _plain_batches(config, parts, world)
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

    from trustml.evaluation.tabular import predict_scores  # lazy: pulls in matplotlib

    def evaluate() -> dict[str, float]:
        metrics = {"val_loss": mean_loss(model, parts.objective, parts.val,
                                         config.train.batch_size, device)}
        if parts.data is not None:
            scores = predict_scores(model, parts.data.val.x, device)
            metrics["val_accuracy"] = float(((scores >= 0.5) == parts.data.val.y.numpy()).mean())
        else:
            metrics["val_perplexity"] = float(np.exp(min(metrics["val_loss"], 50.0)))
        if privacy is not None:
            metrics["epsilon"] = privacy.accountant.epsilon(config.privacy.delta)
        return metrics

    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        cfgmod.save(config, run_dir / "config.yaml")
    summary = fit(trained, parts.objective, step, batches, epochs=config.train.epochs,
                  run_dir=run_dir, state=state, evaluate=evaluate,
                  max_steps=config.train.max_steps, log_every=config.train.log_every,
                  checkpoint_every=config.run.checkpoint_every, resume=resume, progress=progress,
                  world=world)
    final = summary["history"][-1] if summary["history"] else {}
    summary.update({k: v for k, v in final.items() if k.startswith(("val_", "epsilon"))})
    if "fairness" in state:
        summary.update(state["fairness"].finish(model))
    if parts.data is not None:
        scores = predict_scores(model, parts.data.test.x, device)
        summary["test_accuracy"] = float(((scores >= 0.5) == parts.data.test.y.numpy()).mean())
        if "fairness" in state:
            summary.update(state["fairness"].test_report(scores, parts.data.test))
    if privacy is not None:
        summary.update({"epsilon": privacy.accountant.epsilon(config.privacy.delta),
                        "delta": config.privacy.delta,
                        "noise_multiplier": privacy.noise_multiplier,
                        "sample_rate": privacy.sample_rate, "privacy_note": privacy.note})
    summary.update({"device": str(device), "world_size": world.size})
    if world.is_main:
        save_model(model, run_dir / "model.safetensors")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(run_dir, model, summary)
