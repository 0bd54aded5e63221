"""Batch sources: objects with ``.batches(epoch)`` yielding logical batches (see ARCHITECTURE.md).

The order of every epoch is a pure function of (seed, epoch), so a resumed run sees exactly the
batches an uninterrupted run would have seen, with no sampler state to save. ``seed=None`` makes it
secret instead (DP-SGD's default, where known batches would void amplification by subsampling).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, default_collate

from trustml.training.distributed import World, broadcast, shard


def epoch_generator(seed: int | None, epoch: int, world: World = World()) -> torch.Generator:
    """The generator of one epoch's draws: a pure function of (seed, epoch), or with ``seed=None``
    seeded from 63 fresh bits of the OS CSPRNG (rank 0's, shared with the other ranks so that
    they draw the same global batches), held in memory only: never derived from the config,
    never logged, never checkpointed."""
    if seed is None:
        return torch.Generator().manual_seed(broadcast(secrets.randbits(63), world))
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def collate(dataset: Dataset, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gather rows ``index`` into one batch dict, in one op when the dataset has ``gather``."""
    gather = getattr(dataset, "gather", None)
    if gather is not None:
        return gather(index)
    return default_collate([dataset[i] for i in index.tolist()])


def sequential_batches(dataset: Dataset, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The dataset in order, ``batch_size`` rows at a time (evaluation passes)."""
    for start in range(0, len(dataset), batch_size):
        yield collate(dataset, torch.arange(start, min(start + batch_size, len(dataset))))


class ShuffledBatches:
    """Shuffled mini-batches of fixed size (the last one may be smaller unless ``drop_last``).

    Under data parallelism every rank draws the same permutation and keeps its shard, with
    ``batch_size / world.size`` rows per batch, so the ranks' batches together form one global
    batch and every rank takes the same number of steps.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int | None = 0,
                 drop_last: bool = False, world: World = World()) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        if batch_size % world.size:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the number of "
                             f"processes ({world.size})")
        self.dataset, self.seed, self.drop_last, self.world = dataset, seed, drop_last, world
        self.batch_size = batch_size // world.size

    def __len__(self) -> int:
        n = len(self.dataset) // self.world.size / self.batch_size
        return max(1, math.floor(n) if self.drop_last else math.ceil(n))

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.dataset), generator=epoch_generator(self.seed, epoch,
                                                                              self.world))
        if self.world.distributed:
            order = shard(order[:len(order) - len(order) % self.world.size], self.world)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            if self.drop_last and len(index) < self.batch_size and start > 0:
                return
            yield collate(self.dataset, index)


class ShardedBatches:
    """Any batch source under data parallelism: every rank draws the same global batch and keeps
    rows ``rank::size``, so batches that are stratified globally (group-balanced ones) stay so."""

    def __init__(self, source, world: World) -> None:
        self.source, self.world = source, world

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.source.batches(epoch):
            yield {k: v[self.world.rank::self.world.size] for k, v in batch.items()}
