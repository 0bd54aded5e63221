"""The fairness penalty the training loop adds to the task loss: lambda * D(group, rest).

It compares the distribution of the representation ``z`` (or of the score P(y=1)) across sensitive
groups in the mini-batch: over all samples for demographic parity, over positives only for equal
opportunity. Two groups give the single distance D(s=a, s=b); more groups give the sum over groups
of D(group, pooled rest), which is zero exactly when every group matches the others.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from trustml.config import FairnessConfig
from trustml.fairness.losses import mmd, sinkhorn

Distance = Callable[[Tensor, Tensor], Tensor]


def scores_from_logits(logits: Tensor) -> Tensor:
    """P(y=1) as a (B, 1) feature: sigmoid of one logit, softmax column 1 of several."""
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return torch.sigmoid(logits.reshape(-1, 1))
    return torch.softmax(logits, dim=-1)[:, 1:2]


class FairnessPenalty:
    """Callable ``(batch, outputs) -> weight * distance`` for ``PlainStep``."""

    def __init__(
        self,
        distance: Distance,
        weight: float,
        notion: str = "dp",
        acts_on: str = "representation",
        min_group_size: int = 2,
        name: str = "penalty",
    ) -> None:
        if notion not in ("dp", "eo"):
            raise ValueError(f"fairness.notion: expected 'dp' or 'eo', got {notion!r}")
        if acts_on not in ("representation", "scores"):
            raise ValueError(
                f"fairness.acts_on: expected 'representation' or 'scores', got {acts_on!r}"
            )
        self.distance, self.weight, self.notion = distance, float(weight), notion
        self.acts_on = acts_on
        self.min_group_size, self.name = min_group_size, name

    def features(self, outputs: dict[str, Tensor]) -> Tensor:
        key = "z" if self.acts_on == "representation" else "logits"
        if key not in outputs:
            raise ValueError(
                f"fairness.acts_on={self.acts_on!r} needs outputs[{key!r}] from the objective, "
                f"got keys {sorted(outputs)}"
            )
        value = outputs[key].float()  # distances in reduced precision are too coarse
        return value.flatten(1) if self.acts_on == "representation" else scores_from_logits(value)

    def unweighted(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> Tensor:
        feats = self.features(outputs)
        groups = batch["s"].to(feats.device)
        if self.notion == "eo":
            keep = batch["y"].to(groups.device) == 1
            feats, groups = feats[keep], groups[keep]
        present, counts = torch.unique(groups, return_counts=True)
        if len(present) < 2:  # nothing to compare in this batch: a zero that keeps the graph
            return feats.sum() * 0.0
        for g, c in zip(present.tolist(), counts.tolist()):
            if c < self.min_group_size:
                scope = "positive (y == 1) samples" if self.notion == "eo" else "samples"
                raise ValueError(
                    f"fairness penalty {self.name}: sensitive group {g} has {c} {scope} in this batch, "
                    f"needs >= {self.min_group_size}; use fairness.balanced_batches=true or a larger "
                    f"train.batch_size"
                )
        if len(present) == 2:
            return self.distance(feats[groups == present[0]], feats[groups == present[1]])
        return sum(self.distance(feats[groups == g], feats[groups != g]) for g in present)

    def __call__(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> Tensor:
        return self.weight * self.unweighted(batch, outputs)


def build_penalty(cfg: FairnessConfig) -> FairnessPenalty | None:
    """The penalty a ``fairness:`` config section asks for (None for ``penalty: none``)."""
    if cfg.penalty == "none":
        return None
    if cfg.penalty == "mmd":
        distance, minimum = partial(mmd, bandwidth=cfg.bandwidth), 2
    else:
        distance, minimum = partial(sinkhorn, blur=cfg.blur, scaling=cfg.scaling), 1
    return FairnessPenalty(distance, cfg.weight, cfg.notion, cfg.acts_on, minimum, name=cfg.penalty)
