"""Exact per-sample gradient rules for ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

A convolution is a linear map applied at every output position: with the (padded) input unfolded
into patches P_i of shape (L, C_in/groups * prod(kernel)) -- one row per output position, "im2col" --
and the output gradient Y_i of shape (L, C_out), sample i's weight gradient is Y_i^T P_i (per group).
So the rule needs only the layer's saved input and its output gradient: no second forward pass
(the ``torch.func`` path re-runs the layer per sample), and, for ``groups == 1``, the gradient is a
:class:`~trustml.privacy.layers.Factored` whose norm the clipper takes from Gram matrices when that
is cheaper than materialising it (small spatial maps, wide channels), exactly as for a linear layer.

Grouped convolutions are materialised per group (one batched matmul): their per-sample gradient has
only |W| = C_out * C_in/groups * prod(kernel) entries, and the Gram route would cost L^2 per group.

Any stride, dilation, padding (ints, ``'valid'``, ``'same'``) and ``padding_mode`` (zeros, reflect,
replicate, circular) is handled exactly: the input is padded the way the layer's own forward pads it,
then unfolded with padding 0. The unfold is generic over 1, 2 and 3 spatial dims (strided windows of
``Tensor.unfold``), so the three layer types share one rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from trustml.privacy.layers import Factored, Use, batched


def _unbatched_error(module: nn.Module, x: Tensor, spatial: int) -> ValueError:
    dims = ("L", "H, W", "D, H, W")[spatial - 1]
    return ValueError(
        f"{type(module).__name__} got an input of shape {tuple(x.shape)}: per-sample clipping needs "
        f"batch-first inputs (N, C, {dims}) whose first dim is the batch; an unbatched (C, {dims}) "
        "input has no per-sample axis. Add the batch dim (x.unsqueeze(0) per sample, or stack samples)."
    )


def patches(module: nn.Module, x: Tensor, spatial: int) -> Tensor:
    """(B, L, C_in * prod(kernel)) rows of the padded input, one per output position, ordered
    (channel, kernel offsets) like ``weight.view(C_out, -1)``."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)  # as the layer's forward
    elif any(module.padding):
        pad = [p for p in reversed(module.padding) for _ in (0, 1)]
        x = F.pad(x, pad)
    for d in range(spatial):
        k, s, dil = module.kernel_size[d], module.stride[d], module.dilation[d]
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)  # windows appended as the last dim
        if dil > 1:
            x = x[..., ::dil]
    b, c = x.shape[:2]
    # (B, C, L_1..L_s, k_1..k_s) -> (B, L_1..L_s, C, k_1..k_s) -> (B, L, C * K)
    order = [0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial)]
    return x.permute(order).reshape(b, math.prod(x.shape[2 : 2 + spatial]), -1)


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
    ) -> Iterator[tuple[nn.Parameter, Use]]:
        g = grads[0]  # (B, C_out, *L)
        weight, bias = module.weight, module.bias
        if weight.requires_grad:
            x = batched(saved, batch).to(g.dtype)
            p = patches(module, x, self.spatial)  # (B, L, C_in * K)
            y = g.flatten(2).transpose(1, 2)  # (B, L, C_out)
            groups = module.groups
            if groups == 1:
                yield weight, Factored(y, p)
            else:  # block-diagonal over groups: materialise each group's Y_g^T P_g
                b, length = y.shape[:2]
                per = (
                    y.reshape(b, length, groups, -1)
                    .permute(0, 2, 3, 1)
                    .matmul(p.reshape(b, length, groups, -1).transpose(1, 2))
                )  # (B, groups, C_out/groups, C_in/groups * K)
                yield weight, per.reshape(b, *weight.shape)
        if bias is not None and bias.requires_grad:
            yield bias, g.flatten(2).sum(2)


RULES: dict[type, ConvRule] = {nn.Conv1d: ConvRule(1), nn.Conv2d: ConvRule(2), nn.Conv3d: ConvRule(3)}
