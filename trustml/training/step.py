"""Gradient steps: how one logical batch becomes one optimizer update.

The loop is the same for every mode; only the step differs. ``PlainStep`` is ordinary training
(mean loss plus any penalties); ``trustml.privacy.DPStep`` clips per sample and adds noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Protocol

import torch
from torch import nn

Penalty = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


class GradientStep(Protocol):
    def step(self, model: nn.Module, objective, batch: dict[str, torch.Tensor]
             ) -> dict[str, float]: ...


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast on ``device`` (CUDA is where it pays; the CPU runs it too, which is how
    CI tests the mixed-precision paths); a no-op when ``amp == 'none'``."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class PlainStep:
    """Mean per-sample loss plus weighted penalties, one optimizer step per logical batch.

    ``accumulate`` splits the batch into that many micro-batches, each backpropagated with its
    share of the mean loss (the same update as one pass, at a micro-batch's memory). Penalties
    couple the samples of a batch, so they are refused with accumulation. ``clip``: the global
    gradient norm is clipped to it before the step (unscaled first under fp16); the norm before
    clipping is logged as ``grad_norm``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, penalties: Sequence[Penalty] = (),
                 amp: str = "none", accumulate: int = 1, clip: float | None = None) -> None:
        if accumulate > 1 and penalties:
            raise ValueError("gradient accumulation splits the batch; a fairness penalty needs "
                             "the whole batch (set train.grad_accum=1)")
        self.optimizer, self.penalties, self.amp = optimizer, list(penalties), amp
        self.accumulate, self.clip = accumulate, clip
        self.scaler: torch.amp.GradScaler | None = None  # made on the model's device at step 1

    def _micro_batches(self, batch: dict[str, torch.Tensor]):
        n = len(next(iter(batch.values())))
        for index in torch.arange(n).tensor_split(min(self.accumulate, n)):
            yield {k: v[index.to(v.device)] for k, v in batch.items()}, len(index) / n

    def step(self, model: nn.Module, objective, batch: dict[str, torch.Tensor]
             ) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        device = next(model.parameters()).device
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        metrics = {"loss": 0.0}
        for part, weight in self._micro_batches(batch):
            with autocast(device, self.amp):
                out = objective(model, part)
                loss = out.losses.float().mean()
                metrics["loss"] += weight * loss.item()
                total = loss * weight
                for i, penalty in enumerate(self.penalties):
                    value = penalty(part, out.outputs)
                    metrics[f"penalty{i}" if len(self.penalties) > 1 else "penalty"] = value.item()
                    total = total + value
            self.scaler.scale(total).backward()
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return metrics
