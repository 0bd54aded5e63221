"""Exact per-sample gradient rules for ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

A convolution is a linear map applied at every output position: with the (padded) input unfolded
into patches P_i of shape (L, C_in/groups * prod(kernel)) -- one row per output position, "im2col" --
and the output gradient Y_i of shape (L, C_out), sample i's weight gradient is Y_i^T P_i (per group).
So the rule needs only the layer's saved input and its output gradient: no second forward pass
(the ``torch.func`` path re-runs the layer per sample). Per layer, whichever is cheaper (FLOPs):

* materialise, by whichever of two exact routes is faster for the layer's shape (:meth:`ConvRule.uses`):
  - grouped convolution: fold the batch into the channels, x (1, B*C_in, ...) and the output
    gradient (1, B*C_out, ...); then sample i is a group of its own and torch's grouped-convolution
    weight gradient is exactly the (B, *weight.shape) per-sample gradient, no im2col copy, any
    ``groups``. Best on large output maps (measured 1-2x faster than im2col + bmm at L >= 256);
  - im2col + bmm (:func:`unfolded_weight_grads`): Y_i P_i^T per sample and group. Best when the
    patch is much wider than the map (K >= 8 L: oneDNN's grouped kernel slows as L shrinks;
    measured 1.1-3x faster, e.g. 64->64 channels on 8x8 maps, 128->128 on 4x4;
    `benchmarks/conv_routes.py` times the routes per layer), and on CPU wherever oneDNN has no
    direct kernel for the channels per group (:data:`DIRECT_BLOCK`, e.g. an RGB input layer);
  both in chunks of samples (:data:`CHUNK_ELEMENTS`, :data:`COLUMN_ELEMENTS`) written into one
  preallocated result;
* held (:class:`ConvFactors`): when the layer's input and output gradient are smaller than the
  (B, *weight.shape) per-sample gradients, those two are kept until the clip factors are known
  instead (the norms materialise one chunk of samples at a time; the clipped sum is one
  weight-gradient convolution);
* ghost (``groups == 1``, small output maps, wide channels): a
  :class:`~trustml.privacy.factored.Factored` Y_i^T P_i whose norm the clipper takes from L x L Gram
  matrices, exactly as for a linear layer (P from :func:`columns`).

Any stride, dilation, padding (ints, ``'valid'``, ``'same'``) and ``padding_mode`` (zeros, reflect,
replicate, circular) is handled exactly: the input is padded the way the layer's own forward pads it.
An unbatched (C, ...) input is refused: it has no per-sample axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustml.privacy.factored import Factored, Use, batched, sqnorms


def _unbatched_error(module: nn.Module, x: Tensor, spatial: int) -> ValueError:
    dims = ("L", "H, W", "D, H, W")[spatial - 1]
    return ValueError(
        f"{type(module).__name__} got an input of shape {tuple(x.shape)}: per-sample clipping needs "
        f"batch-first inputs (N, C, {dims}) whose first dim is the batch; an unbatched (C, {dims}) "
        "input has no per-sample axis. Add the batch dim (x.unsqueeze(0) per sample, or stack samples)."
    )


def padded(module: nn.Module, x: Tensor, spatial: int) -> tuple[Tensor, list[int]]:
    """``x`` padded the way the layer's forward pads it, and the zero padding left to apply."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), [0] * spatial
    return x, list(module.padding)


def columns(module: nn.Module, x: Tensor, spatial: int) -> Tensor:
    """(B, C_in * prod(kernel), L) im2col of the padded input: column l holds the patch that output
    position l reads, rows ordered (channel, kernel offsets) like ``weight.view(C_out, -1)``.

    One strided view of the padded input -- (B, C, k_1..k_s, L_1..L_s), the kernel offsets stepping
    by the dilation and the output positions by the stride -- copied once: any dimensionality, and
    measured 2.5-3x faster than ``F.unfold`` on the benchmark CNN's layers.
    """
    x, pad = padded(module, x, spatial)
    if any(pad):
        x = F.pad(x, [p for p in reversed(pad) for _ in (0, 1)])
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    length = [(n - d * (k - 1) - 1) // s + 1
              for n, k, s, d in zip(x.shape[2:], kernel, stride, dilation)]
    step = x.stride()
    view = x.as_strided(
        (*x.shape[:2], *kernel, *length),
        (*step[:2], *(step[2 + i] * dilation[i] for i in range(spatial)),
         *(step[2 + i] * stride[i] for i in range(spatial))),
    )
    return view.reshape(x.shape[0], x.shape[1] * math.prod(kernel), math.prod(length))


def patches(module: nn.Module, x: Tensor, spatial: int) -> Tensor:
    """(B, L, C_in * prod(kernel)) rows of the padded input, one per output position."""
    return columns(module, x, spatial).transpose(1, 2)


CHUNK_ELEMENTS = 2**18
"""Per-sample gradients are computed for this many weight elements' worth of samples at a time
(>= 1 sample): oneDNN's grouped weight gradient builds its result in its own layout and reorders it,
so one call for the whole batch holds two result-sized buffers and leaves the L2 cache; chunks of
about 1 MiB cut that transient to the chunk and measured 1.3-1.7x faster than one call on the
benchmark CNN's 32->64 and 64->64 layers (one call stays best for the 3->32 one, which this keeps)."""


def per_sample_weight_grads(module: nn.Module, x: Tensor, g: Tensor, spatial: int) -> Tensor:
    """(B, *weight.shape): the batch folded into the channels makes sample i a group of its own,
    so torch's grouped-convolution weight gradient IS the per-sample gradient (no im2col copy)."""
    x, pad = padded(module, x, spatial)
    b, shape = x.shape[0], module.weight.shape
    out = g.new_empty(b, *shape)
    step = max(1, CHUNK_ELEMENTS // shape.numel())
    for i in range(0, b, step):
        k = min(step, b - i)
        placeholder = g.new_empty(k * shape[0], *shape[1:])  # only its shape is read (not filled)
        out[i : i + k] = torch.ops.aten.convolution_backward(
            g[i : i + k].reshape(1, -1, *g.shape[2:]), x[i : i + k].reshape(1, -1, *x.shape[2:]),
            placeholder, None, module.stride, pad, module.dilation, False, [0] * spatial,
            k * module.groups, [False, True, False],
        )[1].view(k, *shape)
    return out


COLUMN_ELEMENTS = 2**20
"""im2col columns are built for this many elements' worth of samples at a time (>= 1 sample): a
4 MiB float32 transient; larger chunks measured up to 1.2x faster on the benchmark CNN's 64->64
layer, smaller ones slower (more, smaller bmm calls)."""

UNFOLD_WIDTH = 8
"""Materialise by im2col + bmm when a patch (C_in / groups * prod(kernel)) is at least this many
times the output map's size L; else by the grouped convolution (measured crossover, see above)."""

DIRECT_BLOCK = 8
"""oneDNN's direct convolution kernels take channels in blocks of this many floats (AVX2's width).
When a group's input or output channels are not a multiple of it (the benchmark CNN's 3->32 input
layer), its grouped weight gradient falls back to its gemm-based convolution: im2col and a GEMM,
the algorithm of :func:`unfolded_weight_grads`, but with GEMM kernels of its own that it
JIT-compiles (1.4 MiB of anonymous code pages) beside 2.2 MiB more of library code paged in, both
kept for the life of the process: 4 MiB of the benchmark CNN's 10.6 MiB over the plain step. On
CPU such layers take im2col + bmm instead: 1.1-1.35x the fallback's time on the 3->32 layer (about
2 ms, not measurable in the whole step over 31-41 interleaved rounds), faster on 12->24, 1->16 and
32->10 layers. (With AVX-512 the block may be 16: a multiple of 8 keeps the grouped route.)"""


def unfolds(module: nn.Module, length: int, device: torch.device) -> bool:
    """Whether per-sample weight gradients are materialised by im2col + bmm (else the grouped
    convolution): a patch wide against the output map of ``length`` positions, or on CPU channels
    per group that oneDNN's direct kernels do not take (:data:`DIRECT_BLOCK`)."""
    if module.weight[0].numel() >= UNFOLD_WIDTH * length:
        return True
    channels = (module.in_channels // module.groups, module.out_channels // module.groups)
    return device.type == "cpu" and any(c % DIRECT_BLOCK for c in channels)


def unfolded_weight_grads(module: nn.Module, x: Tensor, g: Tensor, spatial: int) -> Tensor:
    """(B, *weight.shape) as Y_i P_i^T per sample and group: im2col (:func:`columns`) + bmm, in
    chunks of samples whose columns stay within :data:`COLUMN_ELEMENTS`."""
    b, shape, groups = x.shape[0], module.weight.shape, module.groups
    out = g.new_empty(b, groups, shape[0] // groups, shape[1:].numel())
    length = g[0, 0].numel()
    step = max(1, COLUMN_ELEMENTS // (length * shape[1:].numel() * groups))
    for i in range(0, b, step):
        k = min(step, b - i)
        cols = columns(module, x[i : i + k], spatial)  # (k, C_in * K, L)
        cols = cols.view(k * groups, -1, cols.shape[2])
        y = g[i : i + k].reshape(k * groups, shape[0] // groups, -1)
        torch.bmm(y, cols.transpose(1, 2), out=out[i : i + k].view(k * groups, *out.shape[2:]))
    return out.view(b, *shape)


class ConvFactors:
    """A convolution's per-sample weight gradients kept as the layer's input and output gradient
    (the Book-Keeping trick of Bu et al. 2023), for layers whose (B, *weight.shape) gradients are
    larger than those two (small output maps, wide channels: the CNN's 64->64 layer on 8x8 maps
    holds 2 MiB instead of 9 MiB until the clip factors are known). The norms materialise the
    gradients a chunk of samples at a time (each chunk freed at once); the clipped sum is ONE
    weight-gradient convolution whose output gradient has sample i's rows scaled by c_i, the
    layer's own batch-summed backward: a second weight-gradient pass of the layer is the price."""

    def __init__(self, module: nn.Module, x: Tensor, g: Tensor, spatial: int):
        self.module, self.x, self.g, self.spatial = module, x, g, spatial

    def materialise(self, x: Tensor | None = None, g: Tensor | None = None) -> Tensor:
        """(B, *weight.shape) per-sample gradients (of the samples in ``x`` and ``g`` if given)."""
        x, g = (self.x, self.g) if x is None else (x, g)
        if unfolds(self.module, g[0, 0].numel(), g.device):
            return unfolded_weight_grads(self.module, x, g, self.spatial)
        return per_sample_weight_grads(self.module, x, g, self.spatial)

    def norm2(self, dtype: torch.dtype) -> Tensor:
        b = self.x.shape[0]
        out = torch.empty(b, dtype=dtype, device=self.g.device)
        step = max(1, CHUNK_ELEMENTS // self.module.weight.numel())
        for i in range(0, b, step):
            part = self.materialise(self.x[i : i + step], self.g[i : i + step]).flatten(1)
            out[i : i + step] = sqnorms(part, dtype)
        return out

    def weighted_sum(self, c: Tensor) -> Tensor:
        """sum_i c_i G_i, shaped like the weight."""
        module, g = self.module, self.g
        x, pad = padded(module, self.x, self.spatial)
        scaled = g * c.to(g.dtype).view(-1, *[1] * (g.dim() - 1))
        placeholder = g.new_empty(module.weight.shape)  # only its shape is read (not filled)
        return torch.ops.aten.convolution_backward(
            scaled, x, placeholder, None, module.stride, pad, module.dilation, False,
            [0] * self.spatial, module.groups, [False, True, False])[1]


class ConvRule:
    """Per-sample gradients of a ConvNd layer from its saved input and its output gradient."""

    def __init__(self, spatial: int):
        self.spatial = spatial

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output) -> Tensor:
        x = args[0] if args else kwargs["input"]
        if x.dim() != self.spatial + 2:
            raise _unbatched_error(module, x, self.spatial)
        return x.detach()

    def uses(
        self, module: nn.Module, saved: Tensor, grads: list[Tensor], batch: int
    ) -> Iterator[tuple[nn.Parameter, Use | ConvFactors]]:
        g = grads[0]  # (B, C_out, *L)
        weight, bias = module.weight, module.bias
        if weight.requires_grad:
            x = batched(saved, batch).to(g.dtype)
            length, c_out = math.prod(g.shape[2:]), g.shape[1]
            width = weight[0].numel()  # C_in / groups * prod(kernel)
            if module.groups == 1 and length * (c_out + width) <= c_out * width:
                # Gram matrices (L x L per sample) are cheaper than the gradient itself
                yield weight, Factored(g.flatten(2).transpose(1, 2), patches(module, x, self.spatial))
            else:
                factors = ConvFactors(module, x, g, self.spatial)
                # hold whichever is smaller until the clip factors are known
                yield weight, (factors if x.numel() + g.numel() < batch * weight.numel()
                               else factors.materialise())
        if bias is not None and bias.requires_grad:
            yield bias, g.flatten(2).sum(2)


RULES: dict[type, ConvRule] = {nn.Conv1d: ConvRule(1), nn.Conv2d: ConvRule(2), nn.Conv3d: ConvRule(3)}
