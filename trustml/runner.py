"""From a Config to a finished run directory: build the parts, choose the step, call ``fit``.

This is the only place that knows which capability plugs in where; experiments and the CLI call
``run_training`` instead of assembling a loop themselves.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustml import config as cfgmod
from trustml.config import Config, ConfigError
from trustml.data.sampling import ShardedBatches, ShuffledBatches, sequential_batches
from trustml.hub import run_revisions
from trustml.privacy.generic import Refusal
from trustml.training import distributed, rundir
from trustml.training.checkpoint import checkpoint_exists, save_model
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
    meta: dict[str, Any] = field(default_factory=dict)  # data provenance for summary.json


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


def make_scheduler(cfg: cfgmod.TrainConfig, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Linear warmup over ``warmup_steps``, then constant, linear or cosine decay to 0 at
    ``total_steps``; None when neither is asked for."""
    if cfg.lr_schedule == "constant" and cfg.warmup_steps == 0:
        return None
    warmup, kind = cfg.warmup_steps, cfg.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_parts(config: Config) -> Parts:
    """Data, model and objective for ``config`` (on the CPU; the caller moves the model)."""
    if config.model.kind == "mlp":
        from trustml.data.tabular import load_tabular
        from trustml.models.mlp import MLP

        data = load_tabular(config.data, seed=config.run.seed)
        n_classes = int(data.train.y.max()) + 1
        model = MLP(data.n_features, config.model.hidden, max(n_classes, 2),
                    config.model.activation, config.model.dropout, config.model.norm)
        meta = {**data.meta, "revisions": run_revisions(config)}
        return Parts(model, ClassificationObjective(), data.train, data.val, data=data, meta=meta)
    from trustml.data.text import lm_datasets, load_tokenizer
    from trustml.models.lm import build_lm

    tokenizer = load_tokenizer(config.data.tokenizer, config.data.tokenizer_revision)
    documents = None
    if config.data.dataset == "professions" and config.data.text_path is None:
        from trustml.distill.corpus import generate_corpus

        documents = generate_corpus()
    train, val = lm_datasets(config.data, tokenizer, documents)
    if config.distill.enabled:
        from trustml.distill.objective import build_distillation

        model, objective = build_distillation(config, tokenizer)
    else:
        model = build_lm(config.model, len(tokenizer), eos_token_id=tokenizer.eos_token_id)
        objective = LMObjective()
    meta = {**train.meta, "revisions": run_revisions(config, tokenizer)}
    return Parts(model, objective, train, val, tokenizer=tokenizer, meta=meta)


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


def finite_json(value: Any) -> Any:
    """``value`` with NaN and inf floats as None: summary.json stays strict JSON (a literal NaN
    breaks most parsers other than Python's)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


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
                           notion=f.notion, update_every=f.update_every, dual_lr=f.dual_lr,
                           margin=f.margin, select_threshold=f.select_threshold)


def _group_posterior(config: Config, parts: Parts, world: distributed.World):
    """The group head and validation-chosen decision of ``fairness.method: group_posterior``."""
    from trustml.fairness.posterior import GroupPosterior

    if parts.data is None or not hasattr(parts.model, "head"):
        raise ConfigError("fairness.method=group_posterior: needs a tabular dataset and an MLP")
    if len(parts.data.val) == 0:
        raise ConfigError("fairness.method=group_posterior: chooses its decision on the "
                          "validation split; set data.val_fraction > 0")
    if world.distributed:
        raise ConfigError("fairness.method=group_posterior: runs on one process (its group head "
                          "is outside DistributedDataParallel)")
    f = config.fairness
    return GroupPosterior(parts.model.rep_dim, len(parts.data.group_names), parts.data.val,
                          target=f.target, margin=f.margin, weight=f.group_weight)


def run_training(config: Config, run_dir: str | Path | None = None, resume: bool = False,
                 progress: bool = True) -> TrainResult:
    """Train ``config`` into ``run_dir`` (a new ``runs/<name>-<time>`` when None)."""
    if resume and run_dir is None:
        raise ConfigError("--resume needs the run directory to continue")
    t = config.train
    for key, value, plain in (("grad_clip", t.grad_clip, None), ("grad_accum", t.grad_accum, 1),
                              ("checkpoint_steps", t.checkpoint_steps, None)):
        if config.privacy.enabled and value != plain:  # DP clips per sample, splits batches
            raise ConfigError(f"train.{key}: not used with privacy.enabled (DP clips per sample "
                              "with privacy.max_grad_norm, splits batches with "
                              "privacy.physical_batch_size and resumes at epoch boundaries)")
    device = resolve_device(config.run.device)
    world = distributed.setup(device, config.run.dist_timeout_s)
    device = distributed.rank_device(device, world)
    run_dir = Path(distributed.broadcast(
        str(run_dir) if run_dir is not None else str(make_run_dir(config)), world))
    if resume and not checkpoint_exists(run_dir / "checkpoint"):
        raise ConfigError(f"--resume: {str(run_dir)!r} has no checkpoint/ to resume from")
    rundir.claim_on_main(run_dir, world)  # one run per run directory
    seed_everything(config.run.seed)
    parts = build_parts(config)
    model = parts.model.to(device)
    objective, posterior = parts.objective, None
    if config.fairness.method == "group_posterior":
        posterior = _group_posterior(config, parts, world).to(device)
        objective = posterior.objective(parts.objective)
    optimizer = make_optimizer(config.train, [*model.parameters(),
                                              *(posterior.parameters() if posterior else [])])
    penalties = []
    if config.fairness.penalty != "none":
        from trustml.fairness.penalty import build_penalty

        penalties.append(build_penalty(config.fairness))
    state: dict[str, Any] = {"config": cfgmod.ConfigRecord(config), "optimizer": optimizer}
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
                epsilon_budget=p.epsilon_budget, secure_rng=p.secure_rng, seed=config.run.seed,
                amp=config.train.amp,
                world=world, verify=p.verify)
        except ValueError as err:
            raise ConfigError(f"privacy: {err}") from None
        step, batches = privacy.step, privacy.batches
        state["privacy"] = privacy
    else:
        try:
            step = PlainStep(optimizer, penalties, amp=config.train.amp,
                             accumulate=config.train.grad_accum, clip=config.train.grad_clip)
        except ValueError as err:
            raise ConfigError(f"train.grad_accum: {err}") from None
        if posterior is not None:
            state["fairness"] = posterior
        elif config.fairness.target is not None:
            step = _constrained(config, step, parts)
            state["fairness"] = step
        batches = _plain_batches(config, parts, world)
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

    from trustml.evaluation.tabular import predict_scores  # lazy: pulls in matplotlib

    def evaluate() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if len(parts.val) == 0:  # data.val_fraction=0: no val metrics (the summary says why)
            pass
        elif parts.data is not None:
            metrics["val_loss"] = mean_loss(model, parts.objective, parts.val,
                                            config.train.batch_size, device)
            scores = predict_scores(model, parts.data.val.x, device)
            metrics["val_accuracy"] = float(((scores >= 0.5) == parts.data.val.y.numpy()).mean())
        else:
            from trustml.evaluation.perplexity import perplexity

            loss = mean_loss(model, parts.objective, parts.val, config.train.batch_size, device)
            # a distillation run's objective is the KD loss, not the LM loss: name it for what it is
            metrics["val_distill_loss" if config.distill.enabled else "val_loss"] = loss
            metrics["val_perplexity"] = perplexity(model, parts.val, config.train.batch_size,
                                                   device)
        if privacy is not None:
            metrics["epsilon"] = privacy.accountant.epsilon(config.privacy.delta)
        return metrics

    total_steps = config.train.max_steps or config.train.epochs * len(batches)
    scheduler = make_scheduler(config.train, optimizer, total_steps)
    if scheduler is not None:
        state["scheduler"] = scheduler
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        cfgmod.save(config, run_dir / "config.yaml")
    try:
        summary = fit(trained, objective, step, batches, epochs=config.train.epochs,
                      run_dir=run_dir, state=state, evaluate=evaluate,
                      max_steps=config.train.max_steps, log_every=config.train.log_every,
                      checkpoint_every=config.run.checkpoint_every, resume=resume,
                      progress=progress, world=world, scheduler=scheduler,
                      checkpoint_steps=config.train.checkpoint_steps,
                      eval_every_steps=config.train.eval_every_steps)
    except Refusal as err:  # the engine proves exactness at the first step, or refuses the model
        raise ConfigError(f"privacy: {err}") from None
    final = summary["partial_epoch"] or (summary["history"][-1] if summary["history"] else {})
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
                        "sample_rate": privacy.sample_rate, "privacy_note": privacy.note,
                        "privacy_rng": "secure" if privacy.secure_rng else
                        "reproducible (seeded from run.seed)",
                        "accountant_history": privacy.accountant.history,
                        "privacy_verification": privacy.verification and str(privacy.verification)})
    summary.update({"device": str(device), "world_size": world.size, "data": parts.meta})
    if len(parts.val) == 0:
        summary.setdefault("warnings", []).append(
            "data.val_fraction=0: no validation split, so no val_* metrics")
    if world.is_main:
        save_model(model, run_dir / "model.safetensors")
        (run_dir / "summary.json").write_text(json.dumps(finite_json(summary), indent=2,
                                                         allow_nan=False))
        rundir.release(run_dir)
    return TrainResult(run_dir, model, summary)
