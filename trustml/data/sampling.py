"""Batch sources: objects with ``.batches(epoch)`` yielding logical batches (see ARCHITECTURE.md).

The order of every epoch is a pure function of (seed, epoch), so a run resumed at an epoch boundary
sees exactly the batches an uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, default_collate


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def collate(dataset: Dataset, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gather rows ``index`` into one batch dict, in one op when the dataset has ``gather``."""
    gather = getattr(dataset, "gather", None)
    if gather is not None:
        return gather(index)
    return default_collate([dataset[i] for i in index.tolist()])


class ShuffledBatches:
    """Shuffled mini-batches of fixed size (the last one may be smaller unless ``drop_last``)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0,
                 drop_last: bool = False) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.dataset, self.batch_size, self.seed, self.drop_last = (
            dataset, batch_size, seed, drop_last)

    def __len__(self) -> int:
        n = len(self.dataset) / self.batch_size
        return max(1, math.floor(n) if self.drop_last else math.ceil(n))

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.dataset), generator=epoch_generator(self.seed, epoch))
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            if self.drop_last and len(index) < self.batch_size and start > 0:
                return
            yield collate(self.dataset, index)
