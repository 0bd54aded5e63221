"""Factored per-sample gradients G_i = X_i^T Y_i: their norms, inner products and clipped sums.

A linear map's per-sample gradient (a linear layer, an embedding, a convolution's im2col form) is
kept as its two factors. Its squared norm is either taken from Gram matrices, <X_i X_i^T, Y_i Y_i^T>
("ghost norm", T^2 (m + n) FLOPs per sample, no (m, n) tensor), or by materialising G_i
(T m n FLOPs, a (B, m, n) tensor). Materialising costs no more FLOPs than the clipped sum's matmul
it replaces (sum_i c_i G_i is then a (B,) x (B, m n) product), so the choice is about memory:
:meth:`Factored.ghost_cheaper` materialises whenever G_i is no larger than its factors.

Grams are shared through a :class:`Grams` cache: BERT's query / key / value layers read one input,
and the three embeddings summed into one hidden state receive one output gradient.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Factored:
    """Per-sample gradient G_i = X_i^T Y_i of a 2-D parameter of shape (m, n).

    ``x`` is (B, T, m) dense, or (B, T) token ids one-hot over ``vocab`` rows (then m = vocab);
    ``y`` is (B, T, n). Several calls of the same layer are concatenated along T.
    """

    x: Tensor
    y: Tensor
    vocab: int | None = None

    def __post_init__(self) -> None:
        # Under autocast the two factors can differ (bf16 activations, fp32 output grads): compute
        # in the wider type so the products below are defined and no precision is thrown away.
        if not self.indexed and self.x.dtype != self.y.dtype:
            common = torch.promote_types(self.x.dtype, self.y.dtype)
            self.x, self.y = self.x.to(common), self.y.to(common)

    @property
    def indexed(self) -> bool:
        return self.vocab is not None

    def ghost_cheaper(self) -> bool:
        """Ghost norm unless G_i (m n numbers per sample) is no larger than its factors
        (T (m + n)): then materialising needs no extra memory and saves the T^2 (m + n) Grams.

        In time materialising always wins once T is more than a few tokens (the clipped sum's
        matmul is paid either way), so this is the fastest choice that adds no memory. Going
        further costs memory for every sample: on BERT 4x256 (B=16, T=128) materialising the
        256x1024 FFN layers too cut the clipper's user time by ~4% but raised the step's peak by
        38-48 MiB (from ~140), as every per-sample gradient is held until the clip factors are
        known."""
        if self.indexed:
            return True  # materialising is B x vocab x n: never worth it
        t, m, n = self.x.shape[1], self.x.shape[2], self.y.shape[2]
        return t * (m + n) < m * n

    def materialise(self) -> Tensor:
        """(B, m, n) per-sample gradients."""
        b, t, n = self.y.shape
        if self.indexed:
            out = self.y.new_zeros(b, self.vocab, n)
            return out.scatter_add_(1, self.x.unsqueeze(-1).expand(b, t, n), self.y)
        return torch.bmm(self.x.transpose(1, 2), self.y)

    def weighted_sum(self, c: Tensor, into: Tensor | None = None) -> Tensor:
        """sum_i c_i G_i as one matmul (one index_add for token ids), added to ``into`` if given."""
        b, t, n = self.y.shape
        c = c.to(self.y.dtype).view(b, 1, 1)
        if self.indexed:
            out = self.y.new_zeros(self.vocab, n) if into is None else into
            return out.index_add_(0, self.x.reshape(-1), (self.y * c).reshape(-1, n).to(out.dtype))
        x, y = self.x, self.y
        if x.shape[2] <= n:  # scale the smaller factor
            x = x * c
        else:
            y = y * c
        x, y = x.reshape(b * t, -1).T, y.reshape(b * t, n)
        return x @ y if into is None else into.addmm_(x.to(into.dtype), y.to(into.dtype))


Use = Factored | Tensor
"""What a rule yields per parameter: a :class:`Factored` gradient or dense (B, *param.shape)."""


def _key(t: Tensor) -> tuple:
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device


class Grams:
    """Per-sample Gram matrices (B, T_a, T_b) = A B^T of one backward pass, shared while recent.

    Keyed by the factors' memory (address, shape, strides, dtype): two views of the same rows share
    a Gram. The cache holds the factors, so no address is reused while it lives. Layers that share
    a factor are recorded one after another (BERT's query / key / value, the embeddings summed
    into one hidden state), so only the ``keep`` most recently used Grams are kept: holding every
    Gram of the pass until its end would add B T^2 numbers per layer to the step's peak memory.
    """

    def __init__(self, keep: int = 4) -> None:
        self._cache: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self._keep = keep

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        key = (_key(a), _key(b))
        if key not in self._cache and (key[1], key[0]) in self._cache:
            self._cache.move_to_end((key[1], key[0]))
            return self._cache[key[1], key[0]][2].transpose(1, 2)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = (a, b, torch.bmm(a, b.transpose(1, 2)))
            if len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return self._cache[key][2]


def gram(u: Factored, v: Factored, grams: Grams | None = None) -> Tensor:
    """(B, T_u, T_v) matrix X_u X_v^T, using token equality / gathers for one-hot factors."""
    if u.indexed and v.indexed:
        return (u.x.unsqueeze(2) == v.x.unsqueeze(1)).to(u.y.dtype)
    if u.indexed:  # (X_u X_v^T)[t, s] = X_v[s, id_t]
        return v.x.gather(2, u.x.unsqueeze(1).expand(-1, v.x.shape[1], -1)).transpose(1, 2)
    if v.indexed:
        return gram(v, u).transpose(1, 2)
    return torch.bmm(u.x, v.x.transpose(1, 2)) if grams is None else grams(u.x, v.x)


def inner(u: Factored, v: Factored, dtype: torch.dtype, grams: Grams | None = None) -> Tensor:
    """(B,) per-sample Frobenius inner products <G_u,i, G_v,i>, accumulated in ``dtype``."""
    if not (u.indexed or v.indexed) and u.x.shape[1] == 1 and v.x.shape[1] == 1:
        # rank one per sample (2-D inputs): <x_u, x_v> <y_u, y_v>, without B tiny matmuls
        return (_rowdot(u.x, v.x, dtype) * _rowdot(u.y, v.y, dtype)).view(-1)
    gx = gram(u, v, grams).to(dtype)
    gy = (torch.bmm(u.y, v.y.transpose(1, 2)) if grams is None else grams(u.y, v.y)).to(dtype)
    return torch.linalg.vecdot(gx.flatten(1), gy.flatten(1))


def _rowdot(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1) dot products of (B, 1, k) rows in ``dtype``, casting only what is not in it yet
    (a norm's two operands are one tensor: cast once)."""
    same = a is b
    a = a if a.dtype == dtype else a.to(dtype)
    b = a if same else b if b.dtype == dtype else b.to(dtype)
    return torch.linalg.vecdot(a, b)


def merge(uses: list[Factored]) -> list[Factored]:
    """Concatenate uses of the same kind along T: sum_k X_k^T Y_k = [X_1; X_2]^T [Y_1; Y_2]."""
    groups: dict[Any, list[Factored]] = {}
    for use in uses:
        key = ("ids", use.vocab) if use.indexed else ("dense", use.x.shape[2])
        groups.setdefault(key, []).append(use)
    return [
        g[0]
        if len(g) == 1
        else Factored(torch.cat([u.x for u in g], 1), torch.cat([u.y for u in g], 1), g[0].vocab)
        for g in groups.values()
    ]


def batched(t: Tensor, batch: int) -> Tensor:
    """Expand a broadcast input of batch 1 (e.g. GPT-2's default position ids) to ``batch``."""
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 and batch > 1 else t
