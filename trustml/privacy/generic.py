"""Generic per-sample gradients for modules without a fast rule, via ``torch.func``.

Given the inputs a module saw and the (per-sample) gradient of its outputs, the per-sample parameter
gradient is a vector-Jacobian product of the module applied to one sample: ``vmap(grad(...))`` over
the batch. This re-runs the module's forward once (vectorised) but needs no second backward pass of
the model. Inputs of batch 1 are treated as broadcast (shared by every sample). The module must be
deterministic (no dropout in training mode): randomness inside ``vmap`` is refused by torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten


@dataclass
class Saved:
    flat: list[Any]  # detached positional and keyword inputs, flattened
    spec: Any
    positions: list[int]  # which leaves of the output were recorded (those requiring grad)


class GenericRule:
    """Exact per-sample gradients of all trainable parameters of a module's subtree."""

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Saved:
        flat, spec = tree_flatten((args, kwargs))
        flat = [x.detach() if isinstance(x, Tensor) else x for x in flat]
        positions = [
            i
            for i, o in enumerate(tree_leaves(output))
            if isinstance(o, Tensor) and o.requires_grad
        ]
        return Saved(flat, spec, positions)

    def uses(
        self, module: nn.Module, saved: Saved, grads: list[Tensor], batch: int
    ) -> Iterator[tuple[nn.Parameter, Tensor]]:
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not params:
            return
        dims = [
            0 if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch else None
            for x in saved.flat
        ]

        def sample_loss(p: dict[str, Tensor], flat: list[Any], gs: list[Tensor]) -> Tensor:
            flat = [x.unsqueeze(0) if d == 0 else x for x, d in zip(flat, dims)]
            args, kwargs = tree_unflatten(flat, saved.spec)
            outs = tree_leaves(functional_call(module, p, args, kwargs))
            return sum((outs[k] * g.unsqueeze(0)).sum() for k, g in zip(saved.positions, gs))

        detached = {n: p.detach() for n, p in params.items()}
        per_sample = vmap(grad(sample_loss), in_dims=(None, dims, 0), randomness="error")(
            detached, saved.flat, grads
        )
        for name, p in params.items():
            yield p, per_sample[name]
