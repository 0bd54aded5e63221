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
    """Mean per-sample loss plus weighted penalties, one backward, one optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, penalties: Sequence[Penalty] = (),
                 amp: str = "none") -> None:
        self.optimizer, self.penalties, self.amp = optimizer, list(penalties), amp
        self.scaler: torch.amp.GradScaler | None = None  # made on the model's device at step 1

    def step(self, model: nn.Module, objective, batch: dict[str, torch.Tensor]
             ) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        device = next(model.parameters()).device
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        with autocast(device, self.amp):
            out = objective(model, batch)
            loss = out.losses.float().mean()
            metrics = {"loss": loss.item()}
            total = loss
            for i, penalty in enumerate(self.penalties):
                value = penalty(batch, out.outputs)
                metrics[f"penalty{i}" if len(self.penalties) > 1 else "penalty"] = value.item()
                total = total + value
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return metrics
