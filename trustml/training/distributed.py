"""Data parallelism under ``torchrun``: process-group set-up, data sharding and rank-0 duties.

Plain and fairness training wrap the model in DistributedDataParallel. DP-SGD does not: its
gradients are clipped sums that must be summed across ranks *before* the noise is added once, so
``DPStep`` all-reduces them itself (see ``trustml.privacy.step``). Without ``torchrun`` everything
here is a no-op and the world has one rank.

A rank that stops answering (frozen, SIGSTOPped, stuck in I/O) would otherwise hang its peers in
their next collective forever: the process group gets a timeout (``run.dist_timeout_s``, env
``TRUSTML_DIST_TIMEOUT_S``), after which a waiting collective raises and the CLI turns that into
one line (``PeerTimeout``) and a nonzero exit on every rank still alive.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trustml.config import ConfigError


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


TIMEOUT_ENV = "TRUSTML_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


def timeout_seconds(configured: float | None = None) -> float:
    """The process-group timeout: env ``TRUSTML_DIST_TIMEOUT_S``, else ``configured``
    (``run.dist_timeout_s``), else 600 s (long enough for a slow checkpoint or evaluation on
    rank 0 while the others wait, short enough that a frozen job is noticed)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S if configured is None else float(configured)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"env {TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


class PeerTimeout(RuntimeError):
    """A collective waited longer than the process-group timeout: a peer rank stopped answering."""


def setup(device: torch.device, timeout_s: float | None = None) -> World:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo
    on CPU) with a timeout (``timeout_seconds``) and pin this rank's GPU. Returns the single-rank
    world outside ``torchrun``."""
    if launched_world_size() <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        seconds = timeout_seconds(timeout_s)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
        _TIMEOUT[0] = seconds
    return current()


_TIMEOUT = [DEFAULT_TIMEOUT_S]  # the timeout the process group was made with, for the message


def peer_timeout(err: BaseException) -> PeerTimeout | None:
    """``err`` as a PeerTimeout when it is a collective's timeout (or a peer's broken connection),
    else None. Backends raise ``DistBackendError`` or a plain RuntimeError naming the timeout."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(err)
    lowered = text.lower()
    if not (isinstance(err, getattr(dist, "DistBackendError", ())) or "timed out" in lowered
            or "timeout" in lowered or "connection closed by peer" in lowered):
        return None
    lines = text.strip().splitlines() or [type(err).__name__]
    first = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])[:160]  # gloo prefixes its source path
    return PeerTimeout(f"rank {dist.get_rank()}/{dist.get_world_size()}: a peer rank stopped "
                       f"answering (no reply within run.dist_timeout_s={_TIMEOUT[0]:g} s); "
                       f"stopping this rank ({first})")


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
