"""The one training loop. It knows nothing of privacy, fairness or distillation: those arrive as
the objective, the gradient step, the batch source and extra stateful objects (ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def resolved(metrics: dict[str, Any]) -> dict[str, Any]:
    """A step's metrics with lazy values (zero-argument callables, e.g. a DP step's epsilon) computed:
    only the steps that are logged pay for them."""
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


def fit(model: nn.Module, objective, step, batches, *, epochs: int, run_dir: str | Path,
        state: dict[str, Any] | None = None, evaluate: Callable[[], dict[str, float]] | None = None,
        max_steps: int | None = None, log_every: int = 50, checkpoint_every: int = 1,
        resume: bool = False, progress: bool = True, world: World = World()) -> dict[str, Any]:
    """Train for ``epochs`` epochs of ``batches`` and return the run's summary.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict`` (optimizer, privacy
    accountant, ...) that are checkpointed with the model. With ``resume`` the latest checkpoint in
    ``run_dir/checkpoint`` is restored, RNG states included, so the run continues exactly.
    Under ``torchrun`` only rank 0 writes logs and checkpoints and shows progress.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = dict(state or {})
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=world.is_main)
    progress = progress and world.is_main
    device = next(model.parameters()).device
    core = getattr(model, "module", model)  # checkpoints hold the bare model, not a DDP wrapper
    start_epoch, global_step, history = 0, 0, []
    if resume:
        saved = load_state(run_dir / "checkpoint")
        try:
            core.load_state_dict(saved["model"])
            for name, obj in state.items():
                obj.load_state_dict(saved["extra"][name])
            set_rng_state(saved["rng"])
            start_epoch, global_step, history = saved["epoch"], saved["step"], saved["history"]
        except (KeyError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint in {str(run_dir)!r} does not fit this run's "
                                  f"model/optimizer/privacy settings: {first}") from None
        log.write({"event": "resume", "epoch": start_epoch, "step": global_step})

    stopped = None
    began = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        model.train()
        bar = tqdm(batches.batches(epoch), total=len(batches), disable=not progress,
                   desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        last: dict[str, float] = {}
        for batch in bar:
            reason = getattr(step, "exhausted", lambda: None)()
            if reason:
                stopped = reason
                break
            last = step.step(model, objective, to_device(batch, device))
            global_step += 1
            if global_step % log_every == 0:
                last = resolved(last)
                log.write({"step": global_step, "epoch": epoch, **last})
                bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()})
            if max_steps is not None and global_step >= max_steps:
                stopped = f"reached train.max_steps={max_steps}"
                break
        bar.close()
        record = {"epoch": epoch + 1, "step": global_step, **resolved(last),
                  **(evaluate() if evaluate else {})}
        history.append(record)
        log.write(record)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in record.items()))
        checkpoint_now = (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs or stopped
        if checkpoint_now and world.is_main:
            save_state({"model": core.state_dict(), "rng": rng_state(), "epoch": epoch + 1,
                        "step": global_step, "history": history,
                        "extra": {name: obj.state_dict() for name, obj in state.items()}},
                       run_dir / "checkpoint")
        if stopped:
            break
    if stopped:
        log.write({"event": "stopped", "reason": stopped, "step": global_step})
    return {"epochs_completed": len(history), "steps": global_step, "stopped": stopped,
            "history": history, "train_seconds": time.perf_counter() - began}
