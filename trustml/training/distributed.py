"""Data parallelism under ``torchrun``: process-group set-up, data sharding and rank-0 duties.

Plain and fairness training wrap the model in DistributedDataParallel. DP-SGD does not: its
gradients are clipped sums that must be summed across ranks *before* the noise is added once, so
``DPStep`` all-reduces them itself (see ``trustml.privacy.step``). Without ``torchrun`` everything
here is a no-op and the world has one rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current() -> World:
    """The world this process belongs to (one rank when no process group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (1 without it), readable before any set-up."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> World:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo
    on CPU) and pin this rank's GPU. Returns the single-rank world outside ``torchrun``."""
    if launched_world_size() <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return current()


def rank_device(device: torch.device, world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if device.type == "cuda" else device


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the run directory, whose name has a timestamp)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(index: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's share of ``index``: every ``size``-th element starting at ``rank``."""
    return index[world.rank::world.size] if world.distributed else index
