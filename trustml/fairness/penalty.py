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
import torch.nn.functional as F
from torch import Tensor

from trustml.config import Config, FairnessConfig
from trustml.fairness.losses import mean_gap_between, mmd_between, sinkhorn

MaskedDistance = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(z, first, second) -> (P,)``: distance between ``z[first[p]]`` and ``z[second[p]]`` per row p."""


def split_pairs(distance: Callable[[Tensor, Tensor], Tensor]) -> MaskedDistance:
    """A two-sample distance, applied to each masked pair (for distances with no pooled form)."""

    def masked(z: Tensor, first: Tensor, second: Tensor) -> Tensor:
        return torch.stack([distance(z[a], z[b]) for a, b in zip(first, second)])

    return masked


def scores_from_logits(logits: Tensor) -> Tensor:
    """P(y=1) as a (B, 1) feature: sigmoid of one logit, softmax column 1 of several."""
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return torch.sigmoid(logits.reshape(-1, 1))
    return torch.softmax(logits, dim=-1)[:, 1:2]


class FairnessPenalty:
    """Callable ``(batch, outputs) -> weight * distance`` for ``PlainStep``."""

    def __init__(
        self,
        distance: MaskedDistance,
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
        members = F.one_hot(batch["s"].to(feats.device)).T.bool()  # (groups, B)
        if self.notion == "eo":  # drop the negatives (they would also skew the median bandwidth)
            keep = batch["y"].to(feats.device) == 1
            feats, members = feats[keep], members[:, keep]
        counts = members.sum(1).tolist()
        present = [g for g, c in enumerate(counts) if c > 0]
        if len(present) < 2:  # nothing to compare in this batch: a zero that keeps the graph
            return feats.sum() * 0.0
        for g in present:
            if counts[g] < self.min_group_size:
                scope = "positive (y == 1) samples" if self.notion == "eo" else "samples"
                raise ValueError(
                    f"fairness penalty {self.name}: sensitive group {g} has {counts[g]} {scope} in "
                    f"this batch, needs >= {self.min_group_size}; use fairness.balanced_batches=true "
                    f"or a larger train.batch_size"
                )
        members = members[present]
        if len(present) == 2:
            return self.distance(feats, members[:1], members[1:]).sum()
        return self.distance(feats, members, ~members).sum()

    def __call__(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> Tensor:
        return self.weight * self.unweighted(batch, outputs)


def build_penalty(cfg: FairnessConfig) -> FairnessPenalty | None:
    """The penalty a ``fairness:`` config section asks for (None for ``penalty: none``)."""
    if cfg.penalty == "none":
        return None
    if cfg.penalty == "mmd":
        distance = partial(mmd_between, bandwidth=cfg.bandwidth, frequencies=cfg.frequencies)
        minimum = 2
    elif cfg.penalty == "rate":
        distance, minimum = mean_gap_between, 1
    else:
        distance, minimum = split_pairs(partial(sinkhorn, blur=cfg.blur, scaling=cfg.scaling)), 1
    return FairnessPenalty(distance, cfg.weight, cfg.notion, cfg.acts_on, minimum, name=cfg.penalty)


def with_penalty(config: Config, penalty: str, weight: float) -> Config:
    """A copy of ``config`` with another penalty and weight (MMD-only settings dropped for others).

    ``group_posterior`` is not a penalty but the method of :mod:`trustml.fairness.posterior`
    (``penalty: none``), so that a frontier can set it beside the penalties. The section is
    validated once, as a whole (field by field, an intermediate state would be refused)."""
    cfg = config.model_copy(deep=True)
    f = cfg.fairness.model_dump()
    f["method"] = "group_posterior" if penalty == "group_posterior" else "penalty"
    f["penalty"], f["weight"] = ("none" if penalty == "group_posterior" else penalty), weight
    if penalty != "mmd":
        f["frequencies"] = None
    if penalty == "none":  # nothing left to steer: the unconstrained model
        f["target"] = None
    if penalty == "rate":  # a gap between mean scores: it acts on P(y=1) only
        f["acts_on"] = "scores"
    cfg.fairness = FairnessConfig.model_validate(f)
    return cfg
