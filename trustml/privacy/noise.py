"""The Gaussian noise of DP-SGD, added in place to the clipped sums in ``.grad``.

Every coordinate of every noised parameter gets an independent N(0, std^2) draw from ONE generator
stream, walked in parameter order, exactly as one flat draw over the concatenated parameters would.
The draw goes chunk by chunk into one small reused buffer and is added to the ``.grad`` slices it
covers (one ``_foreach_add_`` per chunk): no model-sized temporary. A fresh model-sized tensor each
step is what the allocator hands back from ``mmap`` (glibc maps blocks above 32 MiB) and the kernel
page-faults and zeroes again every step; a chunk that fits the L2 cache is reused hot, and the
``.grad`` slices are read and written once. A model smaller than one chunk gets bit-for-bit the
single flat draw (``normal_`` of all its coordinates at once).

:class:`GaussianNoise` is that draw for one (device, dtype) group of parameters, planned once per
parameter layout (shapes, dtypes, devices; the caller re-plans when they change): the chunk buffer
and, when the group fits one chunk, the buffer's slices shaped like the gradients, so a small
model's step is one ``normal_``, one ``_foreach_add_`` and one ``_foreach_div_`` with no Python
slicing. The divisor is a 0-dim tensor: ``_foreach_div_`` by a Python float dispatches per tensor
on the CPU (3-4x slower on the Adult MLP's six gradients), by a tensor it does not.
"""

from __future__ import annotations

import math
import secrets

import torch
from torch import Tensor

CHUNK = {"cpu": 1 << 16}  # elements per draw: 256 KiB of fp32, well inside a core's L2 cache
GPU_CHUNK = 1 << 20  # on accelerators fewer, larger launches (4 MiB of fp32)


def chunk_size(device: torch.device) -> int:
    return CHUNK.get(device.type, GPU_CHUNK)


def secret_generator(device: torch.device) -> torch.Generator:
    """A generator seeded with 64 fresh bits of the OS CSPRNG (``getrandom``), for one step only."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(64))
    return generator


class GaussianNoise:
    """The noise of one (device, dtype) group of parameters of the given shapes: one buffer,
    reused every step; a group that fits one chunk is one draw added through cached views."""

    def __init__(self, shapes: list[torch.Size], device: torch.device, dtype: torch.dtype,
                 divisor: float = 1.0):
        sizes = [math.prod(shape) for shape in shapes]
        total = sum(sizes)
        chunk = chunk_size(device)
        self.buffer = torch.empty(min(total, chunk), device=device, dtype=dtype)
        # the divisor in at least fp32 (a bf16 one would round the batch size)
        self.divisor = torch.tensor(divisor, device=device,
                                    dtype=torch.promote_types(dtype, torch.float32))
        self.sources: list[Tensor] | None = None  # one chunk: the buffer's slice of each grad
        if total <= chunk:
            self.sources = [part.view(shape) for part, shape in
                            zip(self.buffer.split(sizes), shapes, strict=True)]

    def add_(self, grads: list[Tensor], std: float, generator: torch.Generator | None) -> None:
        """``grads = (grads + N(0, std^2)) / divisor`` in place (contiguous ``grads`` when the
        group spans several chunks; any strides when it fits one)."""
        if self.sources is None:
            add_gaussian_(grads, std, generator, self.buffer, self.divisor)
            return
        self.buffer.normal_(0.0, std, generator=generator)
        torch._foreach_add_(grads, self.sources)
        torch._foreach_div_(grads, self.divisor)


def add_gaussian_(
    grads: list[Tensor],
    std: float,
    generator: torch.Generator | None,
    buffer: Tensor,
    divisor: float | Tensor = 1.0,
) -> None:
    """Add N(0, std^2) to every element of ``grads`` (contiguous, of ``buffer``'s device and
    dtype) in place, drawing ``len(buffer)`` values at a time from ``generator``; then divide by
    ``divisor`` while the chunk's slices are still in cache (DP-SGD's division by the batch size)."""
    targets: list[Tensor] = []
    sources: list[Tensor] = []
    used = 0

    def flush() -> None:
        buffer[:used].normal_(0.0, std, generator=generator)
        torch._foreach_add_(targets, sources)
        if isinstance(divisor, Tensor) or divisor != 1.0:
            torch._foreach_div_(targets, divisor)
        targets.clear()
        sources.clear()

    for grad in grads:
        flat, at = grad.view(-1), 0
        while at < flat.numel():
            take = min(flat.numel() - at, len(buffer) - used)
            targets.append(flat[at : at + take])
            sources.append(buffer[used : used + take])
            at, used = at + take, used + take
            if used == len(buffer):
                flush()
                used = 0
    if used:
        flush()
