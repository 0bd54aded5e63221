"""The one training loop. It knows nothing of privacy, fairness or distillation: those arrive as
the objective, the gradient step, the batch source and extra stateful objects (ARCHITECTURE.md).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from trustml.config import ConfigError
from trustml.progress import bar as progress_bar
from trustml.progress import note
from trustml.training.checkpoint import CheckpointError, load_state, save_state
from trustml.training.distributed import World


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()[1].astype(np.int64).tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingDiverged(ConfigError):
    """The loss became NaN or inf: every later step would train on garbage, so the run stops."""


def non_finite(metrics: dict[str, float]) -> str | None:
    """The first loss or penalty of a step that is NaN or inf (an empty Poisson batch, whose
    loss is NaN by definition, does not count)."""
    if metrics.get("batch_size") == 0:
        return None
    return next((f"{k}={v}" for k, v in metrics.items()
                 if k.startswith(("loss", "penalty")) and not math.isfinite(v)), None)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def resolved(metrics: dict[str, Any]) -> dict[str, Any]:
    """A step's metrics with its lazy values (zero-argument callables, e.g. a DP step's epsilon)
    computed: only the steps that are logged pay for them."""
    return {k: v() if callable(v) else v for k, v in metrics.items()}


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged step or finished epoch."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (a line cut short by a crash is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _count(saved: dict[str, Any], key: str) -> int:
    value = saved[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"checkpoint field {key!r}: expected an integer >= 0, got {value!r}")
    return value


def _position(saved: dict[str, Any], records: list[dict[str, Any]],
              per_epoch: int) -> tuple[int, int, int, list[dict[str, Any]]]:
    """(epoch, batches done in it, step, epoch history) of a checkpoint, type-checked and
    cross-checked with the metrics log, where the loop wrote the same position just before."""
    epoch, done, step = _count(saved, "epoch"), _count(saved, "batch"), _count(saved, "step")
    history = saved["history"]
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise ValueError("checkpoint field 'history': expected a list of epoch records")
    if done >= per_epoch:
        raise ValueError(f"checkpoint field 'batch': {done} batches done in an epoch of "
                         f"{per_epoch}")
    if len(history) != epoch or any(r.get("epoch") != i + 1 for i, r in enumerate(history)):
        raise ValueError(f"checkpoint field 'epoch' ({epoch}) disagrees with its {len(history)} "
                         "epoch records")
    if step < (history[-1].get("step", 0) if history else 0):
        raise ValueError(f"checkpoint field 'step' ({step}) is before its last epoch record")
    written = {"epoch": epoch + (1 if done else 0), "step": step,
               "partial_batches": done or None}
    if step and not any("event" not in r and all(r.get(k) == v for k, v in written.items())
                        for r in records):
        raise ValueError(f"checkpoint position (epoch {epoch}, batch {done}, step {step}) is not "
                         "in the metrics log")
    return epoch, done, step, history


def fit(model: nn.Module, objective, step, batches, *, epochs: int, run_dir: str | Path,
        state: dict[str, Any] | None = None, evaluate: Callable[[], dict[str, float]] | None = None,
        max_steps: int | None = None, log_every: int = 50, checkpoint_every: int = 1,
        resume: bool = False, progress: bool = True, world: World = World(),
        scheduler: Any = None, checkpoint_steps: int | None = None,
        eval_every_steps: int | None = None) -> dict[str, Any]:
    """Train for ``epochs`` epochs of ``batches`` and return the run's summary.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict`` (optimizer, privacy
    accountant, ...) that are checkpointed with the model. With ``resume`` the latest checkpoint in
    ``run_dir/checkpoint`` is restored, RNG states included, and the run continues exactly where it
    stopped, mid-epoch included (the consumed batches of the epoch are skipped). A stateful object
    may define ``restored(step, log_records)`` to cross-check what it restored, and ``describe()``
    for the start/resume records of the log. ``scheduler`` (a torch LR scheduler, also in
    ``state``) steps after every optimizer step. ``checkpoint_steps`` / ``eval_every_steps`` add a
    checkpoint / a validation record every N steps (a long run can be less than one epoch).
    Under ``torchrun`` only rank 0 writes logs and checkpoints and shows progress.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = dict(state or {})
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=world.is_main)
    progress = progress and world.is_main
    device = next(model.parameters()).device
    core = getattr(model, "module", model)  # checkpoints hold the bare model, not a DDP wrapper
    per_epoch = len(batches)
    start_epoch, skip, global_step, history = 0, 0, 0, []
    if resume:
        saved = load_state(run_dir / "checkpoint")
        records = read_log(run_dir / "metrics.jsonl")
        try:
            extra = saved["extra"]
            if not isinstance(extra, dict):
                raise ValueError("checkpoint field 'extra': expected a mapping")
            for name, obj in state.items():  # the config record first: it names what changed
                if name in extra:
                    obj.load_state_dict(extra[name])
            if set(extra) != set(state):
                raise ValueError(f"it holds state for {sorted(extra)}, this run for "
                                 f"{sorted(state)}")
            core.load_state_dict(saved["model"])
            set_rng_state(saved["rng"])
            start_epoch, skip, global_step, history = _position(saved, records, per_epoch)
        except ConfigError:
            raise
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint in {str(run_dir)!r} does not fit this run's "
                                  f"model/optimizer/privacy settings: {first}") from None
        for name, obj in state.items():
            if hasattr(obj, "restored"):
                try:
                    obj.restored(global_step, records)
                except ValueError as err:
                    raise CheckpointError(f"resume of {str(run_dir)!r} ({name}): {err}") from None
    described = {name: obj.describe() for name, obj in state.items() if hasattr(obj, "describe")}
    log.write({"event": "resume" if resume else "start", "epoch": start_epoch, "batch": skip,
               "step": global_step, **described})

    def checkpoint(epochs_done: int, batch: int) -> None:
        if world.is_main:
            save_state({"model": core.state_dict(), "rng": rng_state(), "epoch": epochs_done,
                        "batch": batch, "step": global_step, "history": history,
                        "extra": {name: obj.state_dict() for name, obj in state.items()}},
                       run_dir / "checkpoint")

    def show(record: dict[str, Any]) -> None:
        if progress:
            note(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in record.items()))

    stopped, partial = None, None
    began = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        model.train()
        done = skip if epoch == start_epoch else 0
        source = batches.batches(epoch)
        if done:  # resumed mid-epoch: the order is a function of (seed, epoch); skip what was done
            source = itertools.islice(source, done, None)
        bar = progress_bar(source, total=per_epoch, initial=done, disable=not progress,
                           desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        last: dict[str, float] = {}
        for batch in bar:
            reason = getattr(step, "exhausted", lambda: None)()
            if reason:
                stopped = reason
                break
            last = step.step(model, objective, to_device(batch, device))
            if scheduler is not None:
                last["lr"] = scheduler.get_last_lr()[0]
                scheduler.step()
            global_step += 1
            done += 1
            bad = non_finite(last)
            if bad:
                log.write({"event": "diverged", "step": global_step, "epoch": epoch,
                           **resolved(last)})
                raise TrainingDiverged(
                    f"training stopped at step {global_step} (epoch {epoch + 1}): {bad}; lower "
                    "train.lr or check the data (the last checkpoint, if any, is intact)")
            if global_step % log_every == 0:
                last = resolved(last)
                log.write({"step": global_step, "epoch": epoch, **last})
                bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()})
            if max_steps is not None and global_step >= max_steps:
                stopped = f"reached train.max_steps={max_steps}"
                break
            mid_epoch = done < per_epoch  # the epoch's end validates and checkpoints anyway
            if eval_every_steps and evaluate and global_step % eval_every_steps == 0 and mid_epoch:
                record = {"step": global_step, "epoch": epoch, **evaluate()}
                model.train()
                log.write(record)
                show(record)
            if checkpoint_steps and global_step % checkpoint_steps == 0 and mid_epoch:
                # the log holds the same position, which a resume cross-checks
                last = resolved(last)
                log.write({"epoch": epoch + 1, "step": global_step, "partial_batches": done,
                           **last})
                checkpoint(epoch, done)
        bar.close()
        complete = not stopped or done >= per_epoch
        record = {"epoch": epoch + 1, "step": global_step, **resolved(last),
                  **(evaluate() if evaluate else {})}
        if complete:
            history.append(record)
        else:  # the epoch is unfinished: recorded as such, and resumed from batch `done`
            record["partial_batches"] = partial_done = done
            partial = record
        log.write(record)
        show(record)
        if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs or stopped:
            checkpoint(epoch + 1 if complete else epoch, 0 if complete else partial_done)
        if stopped:
            break
    if stopped:
        log.write({"event": "stopped", "reason": stopped, "step": global_step})
    return {"epochs_completed": len(history), "steps": global_step, "stopped": stopped,
            "history": history, "partial_epoch": partial,
            "train_seconds": time.perf_counter() - began}
