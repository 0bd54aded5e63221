"""Poisson sampling: each example joins each logical batch independently with probability q.

This is the sampling the privacy accountants assume (amplification by subsampling). Batch sizes
vary around ``q * N``; an empty batch is a valid draw and is still a step for the accountant. The
draws of an epoch are a pure function of (seed, epoch) in the reproducible mode; with ``seed=None``
(the secure default of ``make_private``) each epoch's masks come from a fresh secret seed
(``trustml.data.sampling.epoch_generator``), so nobody can replay which examples were in a batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from trustml.data.sampling import collate, epoch_generator
from trustml.training.distributed import World


class PoissonBatches:
    """BatchSource of ``steps`` Poisson-sampled logical batches per epoch (default ``round(1/q)``)."""

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float,
        seed: int | None = 0,
        steps: int | None = None,
        world: World = World(),
    ):
        if len(dataset) == 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.dataset, self.sample_rate, self.seed, self.world = dataset, sample_rate, seed, world
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self._empty = {k: v[:0] for k, v in collate(dataset, torch.tensor([0])).items()}

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        generator = epoch_generator(self.seed, epoch, self.world)
        for _ in range(self.steps):
            index = (
                (torch.rand(len(self.dataset), generator=generator) < self.sample_rate)
                .nonzero()
                .flatten()
            )
            if self.world.distributed:
                # Every rank draws the same mask (same seed, or rank 0's secret one broadcast) and
                # keeps its shard (index % size == rank): each shard is Poisson-sampled at rate q,
                # so the union is a Poisson sample of the set.
                index = index[index % self.world.size == self.world.rank]
            yield collate(self.dataset, index) if len(index) else dict(self._empty)
