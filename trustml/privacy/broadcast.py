"""Prove that expanding batch-1 layer outputs to the batch left the model's forward unchanged.

A call computed once for the whole batch (GPT-2's default position ids, BART's decoder positions)
has one output shared by every sample, so autograd sums its samples' output gradients. The clipper
expands such an output from batch 1 to B, which gives each sample its own rows and output gradient:
for a consumer that broadcasts it against per-sample tensors (``hidden + positions``) the values are
identical. For a consumer that reads dim 0 as something else (a sequence-first layer on one token,
a (1,) scale broadcast against trailing dims) the forward changes. So on the first pass of each
structure, the model is run again on the same inputs with the same random state (dropout draws the
same masks), without the expansion, and the outputs must agree; the clipper's probe then proves that
each expanded row reaches only its own sample's loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

_CPU = torch.default_generator


@dataclass
class Call:
    """One call of the model in which some layer's batch-1 output was expanded."""

    args: tuple
    kwargs: dict
    rng: tuple[Tensor, list[Tensor] | None]
    autocast: tuple[str, bool, torch.dtype] | None
    expanded: list[str]  # the layers whose output was expanded, described
    output: Any = None


def rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """The CPU and (if initialised) CUDA generator states: a few KiB on the host (the CPU's
    copied straight from the default generator: ~1 us)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return _CPU.get_state(), cuda


def autocast_state(device: torch.device | None) -> tuple[str, bool, torch.dtype] | None:
    kind = None if device is None else device.type
    if kind != "cpu" and kind != "cuda":
        return None
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _differs(got: Any, want: Any) -> str | None:
    a, b = tree_leaves(got), tree_leaves(want)
    if len(a) != len(b):
        return "a different number of outputs"
    for x, y in zip(a, b):
        if not isinstance(y, Tensor):
            continue
        if not isinstance(x, Tensor) or x.shape != y.shape:
            return f"an output of shape {tuple(y.shape)} instead of {tuple(getattr(x, 'shape', ()))}"
        y = y.detach()
        if y.is_floating_point() or y.is_complex():
            scale = y.abs().max().item() if y.numel() else 0.0
            same = torch.allclose(x.to(y.dtype), y, rtol=1e-4, atol=1e-6 * max(scale, 1e-30),
                                  equal_nan=True)
        else:
            same = torch.equal(x, y)
        if not same:
            return "different output values"
    return None


def unchanged(model: nn.Module, call: Call) -> str | None:
    """Run ``model`` again on the call's inputs (no hooks must expand anything now); None if its
    outputs equal the recorded ones, else how they differ. Buffers the forward updates (running
    statistics, power-iteration vectors) are restored afterwards: the check leaves no trace."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu, cuda = call.rng
    devices = list(range(len(cuda))) if cuda is not None else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            if call.autocast is not None:
                kind, enabled, dtype = call.autocast
                with torch.autocast(kind, dtype=dtype, enabled=enabled):
                    again = model(*call.args, **call.kwargs)
            else:
                again = model(*call.args, **call.kwargs)
    finally:
        with torch.no_grad():  # only those changed: a copy bumps the version autograd checks
            for b, saved in buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)
    want = call.output
    if isinstance(want, Mapping) and isinstance(again, Mapping) and set(want) <= set(again):
        # only what the call returned can reach the loss: an output the replay adds is not
        # compared (Hugging Face returns a KV cache under no_grad when gradient checkpointing
        # turned it off for the recorded, grad-enabled call)
        again, want = [again[k] for k in want], [want[k] for k in want]
    return _differs(again, want)
