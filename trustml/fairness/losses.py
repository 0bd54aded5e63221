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
        sigma = torch.pdist(z[:: -(-len(z) // max_samples)]).median()
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


def _fourier_features(z: Tensor, sigmas: list[Tensor | float], frequencies: int) -> Tensor:
    """Random Fourier features (Rahimi & Recht 2007): phi(a).phi(b) is an unbiased estimate of
    the summed Gaussian kernels, and phi(a).phi(a) = len(sigmas) exactly. Fresh frequencies on
    every call, so the estimate's noise averages out over training steps like minibatch noise."""
    omega = torch.randn(z.shape[1], frequencies, dtype=z.dtype, device=z.device)
    phase = z @ torch.cat([omega / sigma for sigma in sigmas], 1)
    return torch.cat([phase.cos(), phase.sin()], 1) * frequencies**-0.5


def mmd_between(
    z: Tensor, first: Tensor, second: Tensor, bandwidth: Bandwidth = "median",
    frequencies: int | None = None,
) -> Tensor:
    """Unbiased squared MMD between the rows of ``z`` picked by each pair of 0/1 masks.

    ``first`` and ``second`` are (P, B) masks over the B rows of ``z``; returns the P estimates.
    Every pair is read off one pooled kernel matrix (or one feature matrix), so a training batch
    is never split into per-group copies; the median bandwidth is taken over all rows of ``z``.
    ``frequencies=None`` is the exact O(B^2 d) estimator; an int uses that many random Fourier
    frequencies, O(B d F), unbiased in expectation over the frequencies too: the cheaper choice
    once B^2 outgrows the model's own step.
    """
    sigmas = _bandwidths(bandwidth, z)
    masks = torch.cat([first, second]).to(z.dtype)  # (2P, B)
    count = masks.sum(1)
    means = masks / count[:, None]  # row r averages over mask r
    pairs = len(first)
    # v K v with v = mean(first) - mean(second) is the biased (V-) statistic; forming v first lets
    # the large within- and cross-group sums cancel term by term instead of after summation (2e-3
    # relative error in float32 otherwise). The unbiased estimator drops the i == j terms:
    # U = V + (M_first - k_ii) / (n - 1) + (M_second - k_ii) / (m - 1), M the within-group mean.
    rows = torch.cat([means[:pairs] - means[pairs:], means])  # (3P, B)
    if frequencies is None:
        d2 = squared_distances(z, z)
        kernel = sum(torch.exp(d2 * (-0.5 / s**2)) for s in sigmas)
        quad = ((rows @ kernel) * rows).sum(1)
        self_sim = means @ kernel.diagonal()
    else:
        embedded = rows @ _fourier_features(z, sigmas, frequencies)
        quad = (embedded * embedded).sum(1)
        self_sim = float(len(sigmas))
    correction = (quad[pairs:] - self_sim) / (count - 1)
    return quad[:pairs] + correction[:pairs] + correction[pairs:]


def mmd(
    x: Tensor, y: Tensor, bandwidth: Bandwidth = "median", frequencies: int | None = None
) -> Tensor:
    """Unbiased estimate of the squared MMD with Gaussian kernel exp(-|a-b|^2 / (2 sigma^2)).

    ``bandwidth`` is sigma, ``"median"`` (median pooled pairwise distance), or a list of sigmas whose
    kernels are summed (robust when the scale of the representation changes during training).
    ``frequencies`` switches to random Fourier features (see ``mmd_between``).
    The unbiased estimator can be slightly negative; it needs >= 2 samples per group.
    """
    x, y = _check_samples(x, y, 2, "mmd")
    in_x = torch.arange(len(x) + len(y), device=x.device) < len(x)
    return mmd_between(torch.cat([x, y]), in_x[None], ~in_x[None], bandwidth, frequencies)[0]


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


def mean_gap_between(z: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """|mean of ``z[first[p]]`` - mean of ``z[second[p]]``| per row p of the (P, B) 0/1 masks.

    On scores P(y=1) this is the soft selection-rate gap: the demographic parity difference of the
    expected decisions, the gap DPD measures, with no kernel or transport plan in between (a
    distance between whole distributions asks for more than parity and costs accuracy for it).
    """
    value = z.reshape(len(z), -1)[:, 0]
    first, second = first.to(value.dtype), second.to(value.dtype)
    return ((first @ value) / first.sum(1) - (second @ value) / second.sum(1)).abs()
