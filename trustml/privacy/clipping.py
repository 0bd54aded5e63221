"""PerSampleClipper: exact per-sample gradient clipping from one forward and one backward pass.

Forward hooks record, for every layer that owns trainable parameters, what its rule needs (the
activations) and a handle on its output. :meth:`PerSampleClipper.backward` then runs ONE backward
pass that asks autograd only for the gradients of those outputs -- so autograd never computes the
(batch-summed) parameter gradients at all -- and builds from activations and output gradients:

1. every sample's gradient norm, per parameter either by Gram matrices ("ghost norm",
   <X X^T, Y Y^T>) or by materialising per-sample gradients, whichever is cheaper;
2. the clip factors c_i = min(1, C / ||grad_i||);
3. the clipped sum sum_i c_i grad_i as one matmul per parameter (no second backward pass).

A parameter used by several layers (GPT-2's tied ``wte``/``lm_head``) gets the norm of the *sum* of
its uses, cross terms included; a layer called several times per forward accumulates its calls; a
layer whose input has batch 1 while the model's input has batch B (GPT-2's default position ids)
has its output expanded to B so that its output gradient stays per-sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from trustml.privacy.generic import GenericRule
from trustml.privacy.layers import Factored, Rule, Use, batched, inner, merge, rule_for

Strategy = Literal["auto", "ghost", "materialise"]


@dataclass
class _Record:
    module: nn.Module
    rule: Rule
    saved: Any
    edges: list[GradientEdge]
    outputs: list[tuple[torch.Size, torch.dtype, torch.device]]


class _ParamPlan:
    """All uses of one parameter in a pass: its per-sample norm and its clipped sum."""

    def __init__(self, uses: list[Use], strategy: Strategy):
        dense = [u for u in uses if not isinstance(u, Factored)]
        factored = merge([u for u in uses if isinstance(u, Factored)])
        materialise = (
            bool(dense)
            or strategy == "materialise"
            or (strategy == "auto" and len(factored) == 1 and not factored[0].ghost_cheaper())
        )
        self.factored: list[Factored] = [] if materialise else factored
        self.dense: Tensor | None = None
        if materialise:
            parts = dense + [f.materialise() for f in factored]
            self.dense = parts[0]
            for part in parts[1:]:
                self.dense = self.dense + part

    def norm2(self, dtype: torch.dtype) -> Tensor:
        if self.dense is not None:
            flat = self.dense.flatten(1).to(dtype)
            return torch.linalg.vecdot(flat, flat)
        total = 0
        for i, u in enumerate(self.factored):
            total = total + inner(u, u, dtype)
            for v in self.factored[i + 1 :]:
                total = total + 2 * inner(u, v, dtype)
        return total

    def weighted_sum(self, c: Tensor) -> Tensor:
        if self.dense is not None:
            # c (B,) times (B, *shape) as one matmul (tensordot's Python wrapper costs more here)
            return (c.to(self.dense.dtype) @ self.dense.flatten(1)).view(self.dense.shape[1:])
        total = None
        for f in sorted(self.factored, key=lambda f: f.indexed):  # the matmul first: no zero-fill
            total = f.weighted_sum(c, into=total)
        return total


def _first_tensor(tree: Any) -> Tensor | None:
    args = tree[0] if isinstance(tree, tuple) and len(tree) == 2 else ()
    if args and isinstance(args[0], Tensor) and args[0].dim() > 0:  # the common case, no pytree walk
        return args[0]
    return next((t for t in tree_leaves(tree) if isinstance(t, Tensor) and t.dim() > 0), None)


def _batchnorm_error(name: str) -> ValueError:
    return ValueError(
        f"module {name or '<model>'} is a BatchNorm layer: it mixes samples of a batch, so per-sample "
        "gradients (and DP-SGD) are undefined. Replace it with GroupNorm (or LayerNorm), e.g. "
        "opacus.validators.ModuleValidator.fix(model)."
    )


class PerSampleClipper:
    """Clip per-sample gradients of ``model`` to ``max_grad_norm`` and sum them.

    ``strategy`` picks the norm computation: ``auto`` (cheaper of ghost norm and materialising, per
    layer, by FLOP estimate), or force ``ghost`` / ``materialise`` (for tests and benchmarks).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, *, strategy: Strategy = "auto"):
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
        if strategy not in ("auto", "ghost", "materialise"):
            raise ValueError(f"strategy must be 'auto', 'ghost' or 'materialise', got {strategy!r}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.strategy: Strategy = strategy
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._params_of: dict[nn.Module, list[nn.Parameter]] = {}
        self._records: list[_Record] = []
        self._batch = 0
        self._recording = True
        self._handles = [model.register_forward_pre_hook(self._note_batch, with_kwargs=True)]
        self._attach(model, "")

    def _attach(self, module: nn.Module, name: str) -> None:
        if isinstance(module, _BatchNorm):
            raise _batchnorm_error(name)
        rule = rule_for(module)
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and rule is None:  # no fast rule: torch.func over the whole subtree
            for sub_name, sub in module.named_modules(prefix=name):
                if isinstance(sub, _BatchNorm):
                    raise _batchnorm_error(sub_name)
            self._hook(module, GenericRule(), [p for p in module.parameters() if p.requires_grad])
            return
        if own:
            self._hook(module, rule, own)
        for child_name, child in module.named_children():
            self._attach(child, f"{name}.{child_name}" if name else child_name)

    def _hook(self, module: nn.Module, rule: Rule, params: list[nn.Parameter]) -> None:
        self._params_of[module] = params

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return self._record(mod, rule, args, kwargs, output)

        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _note_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = _first_tensor((args, kwargs))
        if first is not None and self._recording:
            self._batch = first.shape[0]

    def _record(self, module: nn.Module, rule: Rule, args: tuple, kwargs: dict, output: Any) -> Any:
        if not (self._recording and torch.is_grad_enabled()):
            return None
        first = _first_tensor((args, kwargs))
        if first is not None:
            self._batch = max(self._batch, first.shape[0])
        # a plain tensor output (the common case) skips the pytree walk
        leaves, spec = ([output], None) if isinstance(output, Tensor) else tree_flatten(output)
        expand = self._batch > 1 and any(
            isinstance(o, Tensor) and o.dim() > 0 and o.shape[0] == 1 for o in leaves
        )
        if expand:  # broadcast layer: give every sample its own output (and output gradient)
            leaves = [
                batched(o, self._batch) if isinstance(o, Tensor) and o.dim() > 0 else o
                for o in leaves
            ]
            output = leaves[0] if spec is None else tree_unflatten(leaves, spec)
        outs = [o for o in leaves if isinstance(o, Tensor) and o.requires_grad]
        if outs:
            saved = rule.save(module, args, kwargs, output)
            edges = [get_gradient_edge(o) for o in outs]
            self._records.append(
                _Record(module, rule, saved, edges, [(o.shape, o.dtype, o.device) for o in outs])
            )
        return output if expand else None

    def _name(self, module: nn.Module) -> str:
        return (
            next((n for n, m in self.model.named_modules() if m is module), type(module).__name__)
            or "<model>"
        )

    def backward(self, per_sample_losses: Tensor, *, loss_scale: float = 1.0) -> Tensor:
        """Add sum_i c_i grad_i to each trainable parameter's ``.grad``; return the (B,) norms.

        Like ``loss.backward()`` this accumulates into ``.grad`` (zero it before a logical batch;
        several physical batches then add up). ``loss_scale`` (fp16) multiplies the backward pass's
        gradients; norms and the clipped sum are returned unscaled.
        """
        losses = per_sample_losses
        if losses.dim() != 1:
            raise ValueError(f"per_sample_losses must have shape (B,), got {tuple(losses.shape)}")
        records, self._records, self._batch = self._records, [], 0
        batch = losses.shape[0]
        if batch == 0:
            return losses.detach().float()
        if not losses.requires_grad:
            raise ValueError(
                "per_sample_losses does not require grad "
                "(computed under no_grad, or no trainable parameters?)"
            )
        used = {id(p) for r in records for p in self._params_of[r.module]}
        unused = list(
            {id(p): p for ps in self._params_of.values() for p in ps if id(p) not in used}.values()
        )
        edges = [e for r in records for e in r.edges]
        if not edges and not unused:
            raise ValueError(
                "no layer with trainable parameters ran in the forward pass since the last backward"
            )
        grads = torch.autograd.grad(
            losses,
            edges + unused,
            grad_outputs=torch.full_like(losses, loss_scale),
            allow_unused=True,
        )
        for p, g in zip(unused, grads[len(edges) :]):
            if g is not None:
                raise RuntimeError(
                    f"parameter {self._names.get(id(p), '?')} got a gradient without its module being called "
                    "(used functionally?); per-sample clipping cannot see that use"
                )
        plans = self._plans(records, grads, batch)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p, _ in plans) else torch.float32
        # one stacked sum over parameters rather than one add per parameter
        norm2 = (
            torch.stack([plan.norm2(dtype) for _, plan in plans]).sum(0)
            if plans
            else torch.zeros(batch, dtype=dtype, device=losses.device)
        )
        norms = norm2.sqrt() / loss_scale
        factors = self.max_grad_norm / norms.clamp(min=self.max_grad_norm)
        for p, plan in plans:
            # a Factored use sums to a 2-D (m, n) matrix; conv weights are (C_out, C_in, *kernel)
            g = plan.weighted_sum(factors / loss_scale).to(p.dtype).reshape(p.shape)
            if p.grad is None:
                p.grad = g
            else:
                p.grad += g
        return norms

    def _plans(
        self, records: list[_Record], grads: tuple, batch: int
    ) -> list[tuple[nn.Parameter, _ParamPlan]]:
        uses: dict[int, tuple[nn.Parameter, list[Use]]] = {}
        at = 0
        self._recording = False  # the generic path re-runs modules: do not record those calls
        try:
            for r in records:
                gs = list(grads[at : at + len(r.edges)])
                at += len(r.edges)
                if all(g is None for g in gs):
                    continue  # this call did not reach the loss
                gs = [
                    torch.zeros(s, dtype=d, device=dev) if g is None else g
                    for g, (s, d, dev) in zip(gs, r.outputs)
                ]
                if any(g.dim() == 0 or g.shape[0] != batch for g in gs):
                    raise ValueError(
                        f"layer {self._name(r.module)} produced an output of leading dim "
                        f"{gs[0].shape[0] if gs[0].dim() else 0} for a loss of batch {batch}: per-sample "
                        "clipping needs batch-first layer inputs (batch-1 inputs broadcast over the batch "
                        "are fine when the model's first input carries the batch)"
                    )
                for p, use in r.rule.uses(r.module, r.saved, gs, batch):
                    uses.setdefault(id(p), (p, []))[1].append(use)
        finally:
            self._recording = True
        return [(p, _ParamPlan(u, self.strategy)) for p, u in uses.values()]

    def remove(self) -> None:
        """Detach the hooks (the model behaves as before)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._records.clear()
