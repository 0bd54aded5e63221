"""The Gaussian noise of DP-SGD, drawn straight into each noised parameter's ``.grad``.

The noise is the first content of a parameter's ``.grad`` in a logical batch: the clipper calls
:meth:`GaussianNoise.start` for a parameter whose ``.grad`` is None right before it accumulates
the clipped sum there (``addmm_`` / ``index_add_`` / ``addmv_`` onto it), and DPStep calls it for
every noised parameter still without one after the last physical batch (one the clipper gave no
gradient). So the noise costs one draw and no pass of its own: no noise buffer added to ``.grad``
(a read-modify-write of every gradient), no zero fill for an embedding's ``index_add_``, no
temporary of any size. DPStep sets every ``.grad`` to None before the first physical batch, and a
later physical batch adds onto the ``.grad`` the first one made: each coordinate gets its noise
exactly once per logical batch, from ONE generator stream (consecutive draws, never overlapping).

The division by the expected batch size B is folded in for free: the noise is drawn with std
``sigma C / B`` (N(0, sigma^2 C^2) / B is N(0, (sigma C / B)^2)) and the clip factors are scaled
by 1 / B (``PerSampleClipper.backward(scale=...)``).

A large tensor is drawn whole (``normal_`` fills uniforms, then transforms 16 at a time in place:
measured as fast as drawing cache-sized chunks, and the generator's ~4.3 ns per number dominates).
A (device, dtype) group of parameters with at most :func:`small_size` coordinates in all (an MLP)
is drawn in ONE ``normal_`` into a flat buffer kept across steps, whose views (made once per
layout) become the ``.grad`` tensors: one call instead of one allocation and one draw per tensor.
Larger groups get a fresh ``.grad`` per parameter, made when its sum is written, as the clipper
would make it anyway: holding model-sized gradients across steps would add them to the peak
memory of the next forward and backward.
"""

from __future__ import annotations

import secrets

import torch
from torch import Tensor, nn

SMALL = {"cpu": 1 << 16}  # coordinates of a group drawn as one flat buffer: 256 KiB of fp32
GPU_SMALL = 1 << 20  # on accelerators fewer, larger launches (4 MiB of fp32)


def small_size(device: torch.device) -> int:
    return SMALL.get(device.type, GPU_SMALL)


def secret_generator(device: torch.device) -> torch.Generator:
    """A generator seeded with 64 fresh bits of the OS CSPRNG (``getrandom``), for one step only."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(64))
    return generator


class _Flat:
    """A small group's persistent buffer and its views, one per parameter (drawn once a step)."""

    __slots__ = ("buffer", "views", "drawn")

    def __init__(self, params: list[nn.Parameter], device: torch.device, dtype: torch.dtype):
        sizes = [p.numel() for p in params]
        self.buffer = torch.empty(sum(sizes), device=device, dtype=dtype)
        self.views = [part.view(p.shape) for part, p in zip(self.buffer.split(sizes), params)]
        self.drawn = False


class GaussianNoise:
    """The noise of one parameter layout (the noised parameters, their shapes, dtypes and
    devices; the caller plans again when it changes): :meth:`begin` a logical batch, then
    :meth:`start` makes each noised parameter's ``.grad`` once."""

    def __init__(self, params: list[nn.Parameter]):
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.groups = list(groups.values())  # by (device, dtype), in order: DPStep all-reduces each
        # id(p) -> (its group's flat buffer, its view's index), or None: drawn on its own
        self._where: dict[int, tuple[_Flat, int] | None] = {}
        self._flats: list[_Flat] = []
        for (device, dtype), members in groups.items():
            flat = None
            if sum(p.numel() for p in members) <= small_size(device):
                flat = _Flat(members, device, dtype)
                self._flats.append(flat)
            for k, p in enumerate(members):
                self._where[id(p)] = None if flat is None else (flat, k)
        self.std = 0.0
        self.generator: torch.Generator | None = None
        # the noised parameters given a .grad this batch -> that tensor (None: std 0, the
        # clipper writes its own); held only until the next begin, as .grad holds it anyway
        self._started: dict[int, Tensor | None] = {}

    def begin(self, std: float, generator: torch.Generator | None) -> None:
        """A new logical batch: N(0, ``std``^2) per coordinate from ``generator`` (std 0: zeros)."""
        self.std, self.generator = float(std), generator
        self._started.clear()
        for flat in self._flats:
            flat.drawn = False

    def start(self, p: nn.Parameter) -> Tensor | None:
        """A new ``.grad`` for ``p`` holding its noise, onto which its clipped sum is to be added;
        None for a parameter that is not noised (then the sum is written as is) or, with std 0,
        one in a group drawn on its own (the clipper's sum needs no zero fill)."""
        where = self._where.get(id(p), False)
        if where is False:
            return None
        grad = self._started[id(p)] = self._made(p, where)
        return grad

    def _made(self, p: nn.Parameter, where: tuple[_Flat, int] | None) -> Tensor | None:
        if where is None and not self.std:
            return None
        if where is None:
            grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            return grad.normal_(0.0, self.std, generator=self.generator)
        flat, k = where
        if not flat.drawn:
            if self.std:
                flat.buffer.normal_(0.0, self.std, generator=self.generator)
            else:
                flat.buffer.zero_()
            flat.drawn = True
        return flat.views[k]

    def zeros_or_noise(self, p: nn.Parameter) -> Tensor:
        """``p``'s ``.grad`` when nothing was written there: its noise alone (or zeros)."""
        grad = self.start(p)
        return torch.zeros_like(p, memory_format=torch.contiguous_format) if grad is None else grad

    def unnoised(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """The noised ``params`` holding a ``.grad`` that :meth:`start` did not make in this
        logical batch: a gradient written around the noise (must be none; DPStep refuses) --
        also one that replaced the noised tensor after it was started (a hook's
        ``p.grad = ...`` in a later physical batch would otherwise discard the noise)."""
        started = self._started
        return [p for p in params
                if p.grad is not None and self._where.get(id(p), False) is not False
                and (id(p) not in started
                     or (made := started[id(p)]) is not None and p.grad is not made)]
