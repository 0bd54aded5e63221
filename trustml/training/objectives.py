"""Objectives: batch -> per-sample losses (B,), the common currency of every training mode.

Plain training averages the losses; DP training hands them to the per-sample clipper, which is why
an objective must never reduce over the batch itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ObjectiveOutput:
    losses: torch.Tensor  # (B,)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


class ClassificationObjective:
    """Cross-entropy of an encoder/head model; exposes the representation ``z`` and ``logits``."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        logits, z = model(batch["x"], with_representation=True)
        losses = F.cross_entropy(logits, batch["y"], reduction="none")
        return ObjectiveOutput(losses, {"z": z, "logits": logits})


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses (B, T-1) and the mask of positions that count (padding excluded)."""
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                             reduction="none").view_as(targets)
    mask = (torch.ones_like(targets) if attention_mask is None else attention_mask[:, 1:]).float()
    return losses, mask


class LMObjective:
    """Per-sample mean next-token cross-entropy of a causal LM over non-padded positions."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        mask = batch.get("attention_mask")
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        losses, keep = token_losses(logits, batch["input_ids"], mask)
        per_sample = (losses * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return ObjectiveOutput(per_sample, {"logits": logits})
