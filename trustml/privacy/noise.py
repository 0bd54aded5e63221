"""The Gaussian noise of DP-SGD, added in place to the clipped sums in ``.grad``.

Every coordinate of every noised parameter gets an independent N(0, std^2) draw from ONE generator
stream, walked in parameter order, exactly as one flat draw over the concatenated parameters would.
The draw goes chunk by chunk into one small reused buffer and is added to the ``.grad`` slices it
covers (one ``_foreach_add_`` per chunk): no model-sized temporary. A fresh model-sized tensor each
step is what the allocator hands back from ``mmap`` (glibc maps blocks above 32 MiB) and the kernel
page-faults and zeroes again every step; a chunk that fits the L2 cache is reused hot, and the
``.grad`` slices are read and written once. A model smaller than one chunk gets bit-for-bit the
single flat draw (``normal_`` of all its coordinates at once).
"""

from __future__ import annotations

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


def add_gaussian_(
    grads: list[Tensor],
    std: float,
    generator: torch.Generator | None,
    buffer: Tensor,
    divisor: float = 1.0,
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
        if divisor != 1.0:
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
