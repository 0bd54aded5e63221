"""Group-stratified mini-batches, so every batch holds each sensitive group in its population share.

Distribution penalties compare groups inside one batch; with plain shuffling a small group (e.g.
women with income > 50K for equal opportunity) can be nearly absent from a batch, making the
penalty noisy or undefined. Stratifying keeps the task loss unbiased (groups are not re-weighted)
while giving every batch about ``batch_size * n_group / n`` samples of each group.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from trustml.data.sampling import collate, epoch_generator


class GroupBalancedBatches:
    """BatchSource stratified by sensitive group ``s`` (and by label ``y`` when ``by_label``).

    Systematic sampling: each stratum is shuffled, its j-th sample gets position (j + u) / n_k
    with a random offset u, and the pooled positions are sorted and cut into
    ``len(dataset) // batch_size`` equal chunks (so no small remainder batch starves a group;
    batches may exceed ``batch_size`` by less than a 1/len(self) share of it). The order is a pure
    function of (seed, epoch).
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int = 0, by_label: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not hasattr(dataset, "s") or (by_label and not hasattr(dataset, "y")):
            raise ValueError(
                "GroupBalancedBatches needs a dataset with tensors .s (and .y for by_label)"
            )
        if len(dataset) == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.dataset, self.batch_size, self.seed, self.by_label = (
            dataset,
            batch_size,
            seed,
            by_label,
        )
        key = torch.as_tensor(dataset.s).long()
        if by_label:
            y = torch.as_tensor(dataset.y).long()
            key = key * (int(y.max()) + 1) + y
        self.strata = [torch.nonzero(key == k).flatten() for k in torch.unique(key)]

    def __len__(self) -> int:
        return max(1, len(self.dataset) // self.batch_size)

    def order(self, epoch: int) -> list[torch.Tensor]:
        """The index tensor of every batch of ``epoch``."""
        gen = epoch_generator(self.seed, epoch)
        index, position = [], []
        for members in self.strata:
            n = len(members)
            index.append(members[torch.randperm(n, generator=gen)])
            offset = torch.rand((), generator=gen, dtype=torch.float64)
            position.append((torch.arange(n, dtype=torch.float64) + offset) / n)
        pooled = torch.cat(index)[torch.argsort(torch.cat(position), stable=True)]
        return list(torch.tensor_split(pooled, len(self)))

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        for index in self.order(epoch):
            yield collate(self.dataset, index)
