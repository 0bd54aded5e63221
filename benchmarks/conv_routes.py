"""Per-sample weight gradients of one convolution, route by route (what ``trustml.privacy.conv``
chooses between), beside the plain batch-summed weight gradient.

Routes: the grouped convolution (batch folded into the channels), im2col + bmm, and the ghost norm
(Gram matrices of im2col rows and output gradients; groups == 1 only). CPU time at one thread,
median of interleaved rounds; the route the rule picks is marked.

    python benchmarks/conv_routes.py            # the benchmark CNN's layers and a few other shapes
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from trustml.privacy import conv as rules

SHAPES = [  # (layer, batch, per-sample input shape)
    (lambda: nn.Conv2d(3, 32, 3, padding=1), 64, (3, 32, 32)),
    (lambda: nn.Conv2d(32, 64, 3, padding=1), 64, (32, 16, 16)),
    (lambda: nn.Conv2d(64, 64, 3, padding=1), 64, (64, 8, 8)),
    (lambda: nn.Conv2d(128, 128, 3, padding=1), 32, (128, 4, 4)),
    (lambda: nn.Conv2d(64, 128, 3, stride=2, padding=1), 32, (64, 16, 16)),
    (lambda: nn.Conv2d(64, 64, 3, padding=1, groups=4), 32, (64, 8, 8)),
    (lambda: nn.Conv1d(64, 64, 5, padding=2), 32, (64, 128)),
    (lambda: nn.Conv3d(16, 16, 3, padding=1), 16, (16, 8, 8, 8)),
]


def ghost_norms(conv: nn.Module, x: torch.Tensor, g: torch.Tensor, spatial: int) -> torch.Tensor:
    p, y = rules.patches(conv, x, spatial), g.flatten(2).transpose(1, 2)
    return (torch.bmm(p, p.transpose(1, 2)) * torch.bmm(y, y.transpose(1, 2))).sum((1, 2))


def time_routes(conv: nn.Module, batch: int, shape: tuple, rounds: int) -> str:
    spatial = len(shape) - 1
    x = torch.randn(batch, *shape)
    g = torch.randn_like(conv(x))
    routes = {
        "plain (summed)": lambda: torch.ops.aten.convolution_backward(
            g, x, conv.weight, None, conv.stride, conv.padding, conv.dilation, False,
            [0] * spatial, conv.groups, [False, True, False]),
        "grouped": lambda: rules.per_sample_weight_grads(conv, x, g, spatial),
        "im2col+bmm": lambda: rules.unfolded_weight_grads(conv, x, g, spatial),
    }
    if conv.groups == 1:
        routes["ghost norm"] = lambda: ghost_norms(conv, x, g, spatial)
    times: dict[str, list[float]] = {k: [] for k in routes}
    for f in routes.values():
        f()
    for _ in range(rounds):
        for k, f in routes.items():
            start = time.process_time()
            f()
            times[k].append(time.process_time() - start)
    length, width = g[0, 0].numel(), conv.weight[0].numel()
    picked = ("ghost norm" if conv.groups == 1
              and length * (conv.out_channels + width) <= conv.out_channels * width
              else "im2col+bmm" if rules.unfolds(conv, length, x.device) else "grouped")
    cells = [f"{k}{'*' if k == picked else ''} {statistics.median(v) * 1e3:.1f}"
             for k, v in times.items()]
    return f"{conv!r:.60} B={batch} L={length} K={width}: " + ", ".join(cells) + " ms"


def main(rounds: int = 7) -> None:
    torch.set_num_threads(1)
    for build, batch, shape in SHAPES:
        torch.manual_seed(0)
        print(time_routes(build(), batch, shape, rounds), flush=True)


if __name__ == "__main__":
    main()
