"""MLP classifier split into an encoder (the representation z) and a linear head.

The split is what fairness penalties act on (``represent``) and what transfer experiments freeze.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], n_classes: int = 2,
                 activation: str = "relu", dropout: float = 0.0, norm: str = "none") -> None:
        super().__init__()
        if not hidden:
            raise ValueError("model.hidden: expected at least one hidden width")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if norm == "layer":
                layers.append(nn.LayerNorm(h))
            elif norm == "group":
                layers.append(nn.GroupNorm(min(8, h), h))
            layers.append(ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    @property
    def rep_dim(self) -> int:
        return self.head.in_features

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor, with_representation: bool = False):
        """Logits, or ``(logits, z)``: one call, so DistributedDataParallel sees the whole use."""
        z = self.encoder(x)
        logits = self.head(z)
        return (logits, z) if with_representation else logits
