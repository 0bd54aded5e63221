"""Per-layer rules: what one call of a layer contributes to its parameters' per-sample gradients.

A rule keeps what it needs from the forward pass (``save``) and, given the gradient of the layer's
output, yields one *use* per trainable parameter (``uses``):

* :class:`Factored` -- the per-sample gradient is G_i = X_i^T Y_i (a linear map: X = output grads,
  Y = activations; an embedding: X = one-hot token ids). It is kept as its two factors so that its
  norm can be taken without materialising G_i ("ghost norm") and the clipped sum is one matmul.
* a dense ``(B, *param.shape)`` tensor -- for small parameters (biases, norm scales) and the generic
  ``torch.func`` path.

Rules never see the batch mixing of autograd: every tensor they get has the batch as its first dim
(broadcast inputs of batch 1 are expanded to ``B`` by :func:`batched`).
"""

from __future__ import annotations

from collections.abc import Iterator
import math
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from trustml.privacy.conv import RULES as CONV_RULES
from trustml.privacy.factored import Factored, Use, batched

try:  # Hugging Face's transposed linear layer (GPT-2); optional so trustml.privacy imports alone
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None


def _rows(t: Tensor, batch: int, width: int | None = None) -> Tensor:
    """(B, T, width) view of a (B, ..., width) tensor; (B, T) for ids when width is None."""
    t = batched(t, batch)
    return t.reshape(batch, -1) if width is None else t.reshape(batch, -1, width)


class Rule(Protocol):
    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any: ...

    def uses(
        self, module: nn.Module, saved: Any, grads: list[Tensor], batch: int
    ) -> Iterator[tuple[nn.Parameter, Use]]: ...


def _positions_summed(g: Tensor) -> Tensor:
    """(B, n) per-sample bias gradients from (B, T, n) rows: a view when T = 1 (2-D inputs, an
    MLP), where summing one position would be a reduction kernel and a copy.

    Rows of 4 KiB or more are summed as a (1, T) by (T, n) product per sample: torch's CPU
    reduction over dim 1 falls off a cliff there (BERT's (16, 128, 1024) FFN bias: 1.4 ms, as a
    product 0.45 ms; 3x at n = 3072, GPT-2 small's FFN), while below it the reduction is the
    faster (n = 256: 0.066 vs 0.077 ms)."""
    b, t, n = g.shape
    if t == 1:
        return g.squeeze(1)
    if n * g.element_size() < 4096:
        return g.sum(1)
    return torch.bmm(g.new_ones(b, 1, t), g).squeeze(1)


def batch_dims(rule: Rule, module: nn.Module, ndim: int) -> range:
    """Dims of a rule's output that may be the batch: any leading dim of a position-wise layer
    (a sequence-first (T, B, d) Linear is fine once the probe has proved which one), else dim 0."""
    if isinstance(rule, (LinearRule, Conv1DRule, EmbeddingRule)):
        return range(ndim - 1)
    if isinstance(rule, LayerNormRule):
        return range(ndim - len(module.normalized_shape))
    return range(min(ndim, 1))


def _trainable(p: nn.Parameter | None) -> bool:
    return p is not None and p.requires_grad


class FirstInput:
    """Rules whose backward needs only the layer's first positional input."""

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return args[0].detach() if args else next(iter(kwargs.values())).detach()


class LinearRule(FirstInput):
    def uses(self, module, saved, grads, batch):
        g = _rows(grads[0], batch, module.out_features)
        if _trainable(module.weight):
            yield module.weight, Factored(g, _rows(saved, batch, module.in_features))
        if _trainable(module.bias):
            yield module.bias, _positions_summed(g)


class Conv1DRule(FirstInput):
    """Hugging Face Conv1D: a linear layer with weight stored as (in, out)."""

    def uses(self, module, saved, grads, batch):
        g = _rows(grads[0], batch, module.nf)
        if _trainable(module.weight):
            yield module.weight, Factored(_rows(saved, batch, module.nx), g)
        if _trainable(module.bias):
            yield module.bias, _positions_summed(g)


class EmbeddingRule(FirstInput):
    def uses(self, module, saved, grads, batch):
        if not _trainable(module.weight):
            return
        ids = _rows(saved, batch)
        g = _rows(grads[0], batch, module.embedding_dim)
        if module.padding_idx is not None:  # the padding row gets no gradient in torch either
            g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
        yield module.weight, Factored(ids, g, module.num_embeddings)


class Normalised(NamedTuple):
    """A LayerNorm call's input and its per-row statistics (mean, rstd), or None for them when
    autograd did not save them (then :class:`LayerNormRule` computes them from the input)."""

    x: Tensor
    mean: Tensor | None
    rstd: Tensor | None

    def movedim(self, source: int, destination: int) -> Normalised:
        """The clipper moves a sequence-first call's batch dim to the front: the statistics'
        leading dims are the input's, so they move with it."""
        return Normalised(*(t if t is None else t.movedim(source, destination) for t in self))


class LayerNormRule:
    """LayerNorm's per-sample scale and shift gradients from autograd's own saved statistics.

    Sample i's gradients are dW_i = sum_t dy[i, t] * xhat[i, t] and db_i = sum_t dy[i, t]. The
    forward's autograd node keeps the per-row mean and rstd for its own backward; reading
    xhat = (x - mean) * rstd off them costs one elementwise pass, where re-normalising the input
    (the old rule) ran a second LayerNorm forward. An output that does not come straight from
    ``native_layer_norm`` (one the clipper expanded from a batch-1 input, a user hook's) gets the
    statistics computed from the input the way the forward does, at backward time.
    """

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Normalised:
        node = getattr(output, "grad_fn", None)
        if type(node).__name__ == "NativeLayerNormBackward0" and tuple(
            node._saved_normalized_shape
        ) == tuple(module.normalized_shape):
            # the input the kernel consumed (after any autocast cast) and the statistics it saved
            return Normalised(node._saved_input.detach(), node._saved_result1.detach(),
                              node._saved_result2.detach())
        return Normalised((args[0] if args else kwargs["input"]).detach(), None, None)

    def uses(self, module, saved, grads, batch):
        weight, bias = _trainable(module.weight), _trainable(module.bias)
        if not (weight or bias):
            return
        size = math.prod(module.normalized_shape)
        g = grads[0]
        shape = (batch, *module.normalized_shape)
        if bias:
            yield module.bias, g.reshape(batch, -1, size).sum(1).reshape(shape)
        if not weight:
            return
        x, mean, rstd = saved
        if mean is None:
            _, mean, rstd = torch.native_layer_norm(x, module.normalized_shape, None, None,
                                                    module.eps)
        dtype = torch.promote_types(g.dtype, mean.dtype)  # bf16 activations, float32 statistics
        x, mean, rstd = (batched(t, batch) for t in (x, mean, rstd))
        xhat = torch.sub(x.to(dtype), mean).mul_(rstd)  # one temporary, reused for the product
        yield module.weight, xhat.mul_(g).reshape(batch, -1, size).sum(1).reshape(shape)


class GroupNormRule:
    """GroupNorm's per-sample scale and shift gradients from autograd's own saved statistics.

    Sample i's gradients are dW_i[c] = sum_s dy[i, c, s] xhat[i, c, s] and db_i[c] = sum_s dy[i, c, s].
    Re-normalising the input to get xhat costs a second GroupNorm forward and a product, two
    input-sized temporaries. Instead the rule keeps the group statistics (mean, rstd) that the
    forward's autograd node saved for its own backward (no extra pass, two (B, groups) tensors) and
    calls torch's GroupNorm backward kernel once with the batch folded into the channels: as one
    sample of B*C channels in B*groups groups, that kernel's "batch-summed" scale and shift gradients
    ARE the (B, C) per-sample ones -- computed exactly as torch computes its own, with no temporary.
    When the output does not come straight from ``native_group_norm`` (an output the clipper
    expanded from a batch-1 input, another torch build) the statistics are computed from the input
    the way the forward does.
    """

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple:
        node = getattr(output, "grad_fn", None)
        if type(node).__name__ == "NativeGroupNormBackward0" and node._saved_group == module.num_groups:
            # the input the kernel consumed (after any autocast cast) and the statistics it saved
            return node._saved_input.detach(), node._saved_result1.detach(), node._saved_result2.detach()
        x = (args[0] if args else kwargs["input"]).detach()
        _, mean, rstd = torch.native_group_norm(
            x, None, None, x.shape[0], x.shape[1], x[0, 0].numel(), module.num_groups, module.eps
        )
        return x, mean, rstd

    def uses(self, module, saved, grads, batch):
        weight, bias = _trainable(module.weight), _trainable(module.bias)
        if not (weight or bias):
            return
        x, mean, rstd = saved
        g = grads[0]
        channels, groups = batch * module.num_channels, batch * module.num_groups
        if x.shape[0] != batch:  # a broadcast batch-1 input: its statistics are every sample's
            x, mean, rstd = batched(x, batch), batched(mean, batch), batched(rstd, batch)
        _, dw, db = torch.ops.aten.native_group_norm_backward(
            g.reshape(1, channels, -1), x.to(g.dtype).reshape(1, channels, -1),
            mean.reshape(1, groups), rstd.reshape(1, groups),
            mean.new_ones(channels),  # only read for the input gradient, which is not asked for
            1, channels, x[0, 0].numel(), groups, [False, True, True],
        )
        if weight:
            yield module.weight, dw.view(batch, module.num_channels)
        if bias:
            yield module.bias, db.view(batch, module.num_channels)


class EmbeddingBagRule:
    """``nn.EmbeddingBag`` (sum / mean): bag i's gradient is sum_l w_il onehot(id_il)^T g_i.

    Bags given by ``offsets`` over a 1-D input are laid out as a padded (B, L_max) id matrix whose
    padding positions carry a zero weight, so they add nothing to the gradient or its norm.
    """

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        names = ("input", "offsets", "per_sample_weights")
        given = dict(zip(names, args)) | kwargs
        return tuple(
            given[n].detach() if isinstance(given.get(n), Tensor) else None for n in names
        )

    def uses(self, module, saved, grads, batch):
        if not _trainable(module.weight):
            return
        ids, offsets, weights = saved
        g = grads[0]
        if ids.dim() == 2:
            if weights is None:
                weights = torch.ones(ids.shape, dtype=g.dtype, device=g.device)
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            ends = offsets[1:] if module.include_last_offset else torch.cat(
                [offsets[1:], offsets.new_tensor([ids.numel()])]
            )
            starts = offsets[: len(ends)]
            width = int((ends - starts).max()) if len(ends) else 0
            pos = starts.unsqueeze(1) + torch.arange(width, device=ids.device)
            mask = pos < ends.unsqueeze(1)
            pos = pos.clamp(max=max(ids.numel() - 1, 0))
            weights = (torch.ones_like(ids, dtype=g.dtype) if weights is None else weights)[pos]
            ids = ids[pos]
        if module.padding_idx is not None:
            mask = mask & (ids != module.padding_idx)
        weights = weights.to(g.dtype) * mask.to(g.dtype)
        if module.mode == "mean":
            weights = weights / mask.sum(1, keepdim=True).clamp(min=1).to(g.dtype)
        yield module.weight, Factored(ids, weights.unsqueeze(-1) * g.unsqueeze(1), module.num_embeddings)


RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Embedding: EmbeddingRule(),
    nn.EmbeddingBag: EmbeddingBagRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    **CONV_RULES,
}
"""Fast rules by EXACT class. A subclass inherits its base's rule only if :func:`plain_subclass`
holds."""
if Conv1D is not None:
    RULES[Conv1D] = Conv1DRule()

# What a subclass may define and still be the base layer's computation: construction, printing,
# initialisation. Anything else that is callable or a descriptor (forward, __call__, __getattr__,
# a ``weight`` property as torch's parametrizations install) could change what forward computes.
_HARMLESS = {
    "__init__", "__module__", "__qualname__", "__doc__", "__annotations__", "__dict__",
    "__weakref__", "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__",
    "extra_repr", "reset_parameters", "_reset_parameters", "_init_weights", "_fill_padding_idx_with_zero",
}
_OWN_PARAMS = {
    nn.Linear: {"weight", "bias"},
    nn.Embedding: {"weight"},
    nn.EmbeddingBag: {"weight"},
    nn.LayerNorm: {"weight", "bias"},
    nn.GroupNorm: {"weight", "bias"},
}


def plain_subclass(module: nn.Module, base: type) -> str | None:
    """None if ``module`` computes exactly what ``base`` computes; else why not. Also for an
    instance of ``base`` itself: legacy ``weight_norm`` replaces a Linear's ``weight`` Parameter
    by ``weight_g`` / ``weight_v`` on the instance, and ``forward`` can be replaced there."""
    for cls in type(module).__mro__:
        if cls is base:
            break
        for name, value in vars(cls).items():
            if name in _HARMLESS:
                continue
            if callable(value) or hasattr(value, "__get__"):
                return f"{cls.__name__} overrides {name}"
    if "forward" in vars(module):
        return "its forward was replaced on the instance"
    extra = set(module._parameters) - _OWN_PARAMS.get(base, {"weight", "bias"})
    if extra:
        return f"it has extra parameters {sorted(extra)}"
    return None


def rule_for(module: nn.Module) -> Rule | None:
    """The fast exact rule for ``module``'s own parameters, or None (generic path or refusal).

    Chosen by exact class; a subclass gets its base's rule only when it provably computes the same
    (:func:`plain_subclass`). Raises ValueError for layer options no rule can make exact.
    """
    base = next((c for c in type(module).__mro__ if c in RULES), None)
    if base is None:
        return None
    if plain_subclass(module, base) is not None:
        return None
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and (
        module.scale_grad_by_freq or module.sparse
    ):
        raise ValueError(
            "scale_grad_by_freq/sparse embeddings are not supported by per-sample clipping "
            "(the gradient scale depends on the whole batch); construct the embedding without them"
        )
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        raise ValueError(
            "max_norm renormalises the embedding rows in place during forward; per-sample "
            "clipping needs a pure function of the weights: construct it with max_norm=None"
        )
    if isinstance(module, nn.EmbeddingBag) and module.mode == "max":
        raise ValueError(
            "EmbeddingBag(mode='max') is not supported: use mode='sum' or 'mean'"
        )
    return RULES[base]
