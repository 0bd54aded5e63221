"""Differentiable distances between two samples of representations (one per sensitive group).

Both are zero in expectation when the two groups are identically distributed, so adding them to the
task loss pushes the encoder towards group-independent representations.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

Bandwidth = float | Sequence[float] | str


def _check_samples(x: Tensor, y: Tensor, minimum: int, name: str) -> tuple[Tensor, Tensor]:
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if y.dim() == 1:
        y = y.unsqueeze(1)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{name}: expected (n, d) and (m, d) samples, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) < minimum or len(y) < minimum:
        raise ValueError(
            f"{name}: needs at least {minimum} samples per group, got {len(x)} and {len(y)}"
        )
    return x, y


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances via the Gram matrix (no sqrt, so gradients exist at 0).

    Rounding can leave tiny negative values; callers that need >= 0 clamp.
    """
    return (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2.0 * a @ b.T


def median_bandwidth(z: Tensor, max_samples: int = 128) -> Tensor:
    """Median heuristic: the median pairwise distance of the pooled sample (detached, > 0).

    Large batches use ``max_samples`` evenly strided rows (exact below that): the heuristic needs
    a scale, not a precise median, and the full median costs more than the MMD itself.
    """
    with torch.no_grad():
        z = z[:: -(-len(z) // max_samples)]
        d2 = squared_distances(z, z).clamp_min(0.0)
        i, j = torch.triu_indices(len(z), len(z), offset=1, device=z.device)
        sigma = d2[i, j].median().sqrt()
    return sigma.clamp_min(torch.finfo(z.dtype).eps)


def _bandwidths(bandwidth: Bandwidth, pooled: Tensor) -> list[Tensor | float]:
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(
                f"mmd bandwidth: expected 'median', a float or a list of floats, got {bandwidth!r}"
            )
        return [median_bandwidth(pooled)]
    values = (
        [float(bandwidth)] if isinstance(bandwidth, (int, float)) else [float(b) for b in bandwidth]
    )
    if not values or min(values) <= 0:
        raise ValueError(f"mmd bandwidth: expected positive values, got {bandwidth!r}")
    return values


@functools.lru_cache(maxsize=32)
def _mmd_weights(n: int, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """W with sum(W * K) = unbiased MMD^2: 1/(n(n-1)) and 1/(m(m-1)) off the diagonal of the
    within-group blocks, -1/(nm) on the cross blocks (one weighted sum instead of block slices)."""
    w = torch.full((n + m, n + m), -1.0 / (n * m), dtype=dtype, device=device)
    w[:n, :n] = 1.0 / (n * (n - 1))
    w[n:, n:] = 1.0 / (m * (m - 1))
    return w.fill_diagonal_(0.0)


def mmd(x: Tensor, y: Tensor, bandwidth: Bandwidth = "median") -> Tensor:
    """Unbiased estimate of the squared MMD with Gaussian kernel exp(-|a-b|^2 / (2 sigma^2)).

    ``bandwidth`` is sigma, ``"median"`` (median pooled pairwise distance), or a list of sigmas whose
    kernels are summed (robust when the scale of the representation changes during training).
    The unbiased estimator can be slightly negative; it needs >= 2 samples per group.
    """
    x, y = _check_samples(x, y, 2, "mmd")
    pooled = torch.cat([x, y])
    d2 = squared_distances(pooled, pooled)
    kernel = sum(torch.exp(d2 * (-0.5 / sigma**2)) for sigma in _bandwidths(bandwidth, pooled))
    return (kernel * _mmd_weights(len(x), len(y), pooled.dtype, pooled.device)).sum()


@functools.lru_cache(maxsize=16)
def _samples_loss(p: int, blur: float, scaling: float):
    from geomloss import SamplesLoss

    return SamplesLoss(
        "sinkhorn", p=p, blur=blur, scaling=scaling, debias=True, backend="tensorized"
    )


def sinkhorn(x: Tensor, y: Tensor, blur: float = 0.05, p: int = 2, scaling: float = 0.5) -> Tensor:
    """Debiased Sinkhorn divergence S_eps between the uniform empirical measures of x and y.

    geomloss conventions: cost |a-b|^p / p, entropic regularisation eps = blur^p, and eps-scaling
    with ratio ``scaling`` (closer to 1 = more iterations, more accurate). S_eps >= 0 and is 0 iff
    the two measures coincide.
    """
    if blur <= 0:
        raise ValueError(f"sinkhorn blur: expected > 0, got {blur}")
    if not 0 < scaling < 1:
        raise ValueError(f"sinkhorn scaling: expected in (0, 1), got {scaling}")
    x, y = _check_samples(x, y, 1, "sinkhorn")
    return _samples_loss(p, float(blur), float(scaling))(x.contiguous(), y.contiguous())
