"""Held-out perplexity of a causal LM: exp of the mean next-token loss over all real tokens."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

from trustml.data.sampling import sequential_batches
from trustml.training.objectives import token_losses


@torch.no_grad()
def perplexity(model: nn.Module, dataset: Dataset, batch_size: int = 32,
               device: torch.device | str | None = None) -> float:
    """Token-weighted perplexity (each real next-token prediction counts once; padding skipped)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for batch in sequential_batches(dataset, batch_size):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        losses, keep = token_losses(logits, ids, mask)
        total += (losses * keep).sum().item()
        count += keep.sum().item()
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: the dataset has no next-token position to score")
    return math.exp(total / count)
