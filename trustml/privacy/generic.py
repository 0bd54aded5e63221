"""Generic per-sample gradients for modules without a fast rule, via ``torch.func``.

Given the inputs a module saw and the (per-sample) gradient of its outputs, the per-sample parameter
gradient is a vector-Jacobian product of the module applied to one sample: ``vmap(grad(...))`` over
the batch (a loop over samples where an op has no vmap rule, e.g. the fused RNN kernels). This
re-runs the module's forward once but needs no second backward pass of the model.

Which dimension of each input and output is the batch is a :class:`Layout`: documented by torch for
the layers that have a layout flag (``batch_first`` RNNs and MultiheadAttention, where ``h_0`` and
``c_0`` carry the batch in dim 1), otherwise "dim 0 when its size is the batch, else shared". The
latter is a hypothesis, never trusted: :meth:`GenericRule.check` replays the module per sample and
requires the replay to reproduce the recorded output (a (T, T) mask sliced as if T were the batch
does not), and the clipper proves on its probe that each output row only reaches its own sample's
loss. Two more hypotheses are proved the same way: inputs whose dim 0 is ``B * T`` (rows folded
sample-major, Mixtral's router) are replayed ``T`` rows per sample, and a call whose batch-1 output
the clipper expanded (a broadcast call) may have no batched input: it is replayed once, and that
one output stands for every sample. When the batch size
collides with another size and the replay refutes the default, the inputs of that size are tried as
shared: exactly one choice must fit. The module must be deterministic (dropout in training mode is
refused). An output modified in place after the call (Falcon's residual) is recomputed from the
saved inputs for the comparison.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from trustml.privacy.broadcast import rng_state


class Refusal(ValueError):
    """The engine cannot make this module's per-sample gradients exact (message says why)."""


class AmbiguousBatch(Refusal):
    """The batch dimension of a tensor is not provable for this batch size (a collision of the
    batch size with another dimension); a batch of another size may be fine."""


@dataclass
class Saved:
    flat: list[Any]  # detached positional and keyword inputs, flattened
    spec: Any
    positions: list[int]  # which leaves of the output were recorded (those requiring grad)
    outputs: list[Tensor]  # those recorded outputs, detached (for the replay check)
    versions: list[int]  # their version counters: an output modified in place is recomputed
    broadcast: bool = False  # batch-1 outputs were expanded to the batch (a call shared by all)


@dataclass
class Layout:
    inputs: list[int | None]  # batch dim of each flat input leaf; None: shared by all samples
    outputs: list[int]  # batch dim of each recorded output
    fold: int = 1  # > 1: the batched inputs and outputs are (B * fold, ...), sample-major


def _index_tree(saved: Saved) -> tuple[tuple, dict]:
    """(args, kwargs) with every leaf replaced by its index in ``saved.flat``."""
    return tree_unflatten(list(range(len(saved.flat))), saved.spec)


def _arg(args: tuple, kwargs: dict, pos: int, name: str) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name)


def _rnn_layout(module: nn.RNNBase, saved: Saved) -> Layout:
    if isinstance(_arg(*tree_unflatten(saved.flat, saved.spec), 0, "input"), PackedSequence):
        # (before _index_tree: a PackedSequence cannot be rebuilt from indices)
        raise Refusal("PackedSequence inputs are not supported: pass a padded batch tensor")
    args, kwargs = _index_tree(saved)
    first = _arg(args, kwargs, 0, "input")
    x = saved.flat[first]
    if not isinstance(x, Tensor):
        raise Refusal("PackedSequence inputs are not supported: pass a padded batch tensor")
    if x.dim() != 3:
        raise Refusal("unbatched (2-D) RNN input: pass a (batch, time, features) tensor")
    if module.dropout > 0 and module.training and module.num_layers > 1:
        raise Refusal("dropout between RNN layers is random: set dropout=0 (or use eval mode)")
    b = 0 if module.batch_first else 1
    dims: list[int | None] = [None] * len(saved.flat)
    dims[first] = b
    for i in tree_leaves(_arg(args, kwargs, 1, "hx")):
        if isinstance(i, int):
            dims[i] = 1  # h_0 / c_0: (layers * directions, batch, hidden)
    # outputs: (output, h_n) or (output, (h_n, c_n)); h_n and c_n have the batch in dim 1
    return Layout(dims, [b if k == 0 else 1 for k in saved.positions])


def _mha_layout(module: nn.MultiheadAttention, saved: Saved) -> Layout:
    args, kwargs = _index_tree(saved)
    b = 0 if module.batch_first else 1
    dims: list[int | None] = [None] * len(saved.flat)
    for pos, name in enumerate(("query", "key", "value")):
        i = _arg(args, kwargs, pos, name)
        if saved.flat[i].dim() != 3:
            raise Refusal("unbatched (2-D) attention input: pass 3-D query/key/value")
        dims[i] = b
    mask = _arg(args, kwargs, 3, "key_padding_mask")
    if isinstance(mask, int) and saved.flat[mask] is not None:  # passed as None by keyword: no dim
        dims[mask] = 0
    attn = _arg(args, kwargs, 5, "attn_mask")
    if isinstance(attn, int) and saved.flat[attn] is not None and saved.flat[attn].dim() == 3:
        raise Refusal(
            "a 3-D attn_mask (batch * heads, L, S) interleaves batch and heads: pass a 2-D "
            "attn_mask and a key_padding_mask instead"
        )
    # outputs: (attn_output, attn_weights); the weights are (batch, [heads,] L, S)
    return Layout(dims, [b if k == 0 else 0 for k in saved.positions])


KNOWN_LAYOUTS = {
    nn.RNN: _rnn_layout,
    nn.LSTM: _rnn_layout,
    nn.GRU: _rnn_layout,
    nn.MultiheadAttention: _mha_layout,
}
"""Layers whose batch dimensions torch documents (by exact class: a subclass may move them)."""


def layout(module: nn.Module, saved: Saved, batch: int) -> Layout:
    known = KNOWN_LAYOUTS.get(type(module))
    if known is not None:
        return known(module, saved)
    lead = [x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else 0 for x in saved.flat]
    fold = 1
    if batch > 1 and batch not in lead:  # rows folded into dim 0, (B * T, d): Mixtral's router
        folds = {n // batch for n in lead if n > batch and n % batch == 0}
        fold = folds.pop() if len(folds) == 1 else 1
    dims = [0 if n == batch * fold else None for n in lead]
    return Layout(dims, [0] * len(saved.positions), fold)


def _unfold(x: Tensor, fold: int) -> Tensor:
    """(B * fold, ...) -> (B, fold, ...): one slice per sample."""
    return x if fold == 1 else x.reshape(-1, fold, *x.shape[1:])


def _one(x: Any, d: int | None) -> Any:
    return x.unsqueeze(d) if d is not None else x


RANDOM = ("it draws random numbers in its forward (dropout in training mode?), so its per-sample "
          "gradient cannot be replayed: set its dropout to 0")
MAX_AMBIGUOUS = 4  # inputs whose batch role a colliding pass may search (2**4 replays at most)


def _collides(saved: Saved, batch: int) -> bool:
    """The batch size also occurs in a non-leading dim, so a leading dim of that size may not be
    the batch (a (T,) position index when T == batch size)."""
    shapes = [x.shape for x in saved.flat if isinstance(x, Tensor)] + [o.shape for o in saved.outputs]
    return batch > 1 and any(batch in s[1:] for s in shapes)


def _shapes(saved: Saved, batch: int) -> tuple:
    return (batch, saved.broadcast,
            tuple(tuple(x.shape) if isinstance(x, Tensor) else None for x in saved.flat),
            tuple(tuple(o.shape) for o in saved.outputs))


class GenericRule:
    """Exact per-sample gradients of all trainable parameters of a module's subtree."""

    def __init__(self) -> None:
        self._layouts: dict[tuple, Layout | str] = {}  # proved layout (or why none) per shapes

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Saved:
        flat, spec = tree_flatten((args, kwargs))
        flat = [x.detach() if isinstance(x, Tensor) else x for x in flat]
        positions, outputs = [], []
        for i, o in enumerate(tree_leaves(output)):
            if isinstance(o, Tensor) and o.requires_grad:
                positions.append(i)
                outputs.append(o.detach())
        return Saved(flat, spec, positions, outputs, [o._version for o in outputs])

    @staticmethod
    def _outputs(module, p, flat, saved: Saved, lay: Layout) -> list[Tensor]:
        """The module on one sample (inputs with a batch dim of 1), outputs without it."""
        if lay.fold == 1:  # a folded sample keeps its rows: (fold, ...)
            flat = [_one(x, d) for x, d in zip(flat, lay.inputs)]
        args, kwargs = tree_unflatten(flat, saved.spec)
        outs = tree_leaves(functional_call(module, p, args, kwargs))
        if lay.fold > 1:
            return [outs[k] for k in saved.positions]
        return [outs[k].squeeze(d) for k, d in zip(saved.positions, lay.outputs)]

    def _per_sample(self, fn, params, saved: Saved, lay: Layout, extra=(), extra_dims=(),
                    out_dims: Any = 0):
        """vmap ``fn(params, sample inputs, *extra)`` over the batch; a loop where vmap fails."""
        flat = [_unfold(x, lay.fold) if d is not None else x for x, d in zip(saved.flat, lay.inputs)]
        extra = [[_unfold(t, lay.fold) for t in e] for e in extra]
        try:
            return vmap(fn, in_dims=(None, lay.inputs, *extra_dims), out_dims=out_dims,
                        randomness="error")(params, flat, *extra)
        except RuntimeError as err:
            if "random" in str(err):
                raise Refusal(RANDOM) from err
            return self._loop(fn, params, flat, lay, extra, extra_dims)

    @staticmethod
    def _loop(fn, params, flat: list[Any], lay: Layout, extra, extra_dims):
        """One call per sample where vmap cannot run the module (data-dependent control flow,
        fused kernels). vmap refuses randomness itself; here a random draw shows as a moved
        generator: each replayed sample would get a fresh dropout mask, not the forward's."""
        before = rng_state()
        results = GenericRule._each(fn, params, flat, lay, extra, extra_dims)
        after = rng_state()
        if not torch.equal(before[0], after[0]) or (
            before[1] is not None and not all(map(torch.equal, before[1], after[1]))):
            raise Refusal(RANDOM)
        return results

    @staticmethod
    def _each(fn, params, flat: list[Any], lay: Layout, extra, extra_dims):
        sizes = [x.shape[d] for x, d in zip(flat, lay.inputs) if d is not None]
        sizes += [t.shape[d] for e, ds in zip(extra, extra_dims) for t, d in zip(e, ds)]
        results = []
        for i in range(sizes[0]):
            pick = [x.select(d, i) if d is not None else x for x, d in zip(flat, lay.inputs)]
            more = [[t.select(d, i) for t, d in zip(e, ds)] for e, ds in zip(extra, extra_dims)]
            results.append(fn(params, pick, *more))
        if isinstance(results[0], dict):
            return {k: torch.stack([r[k] for r in results]) for k in results[0]}
        return [torch.stack([r[k] for r in results], d) for k, d in enumerate(lay.outputs)]

    def check(self, module: nn.Module, saved: Saved, batch: int) -> str | None:
        """Replay the module per sample; None if it reproduces the recorded outputs, else why not."""
        try:
            self.resolve(module, saved, batch)
        except Refusal as err:
            return str(err)
        return None

    def resolve(self, module: nn.Module, saved: Saved, batch: int) -> Layout:
        """The layout whose per-sample replay reproduces the recorded outputs (proved once per
        shapes); raise :class:`Refusal` when none does, or when two different ones do.

        The hypothesis is "dim 0 of an input is the batch when its size is the batch size". When
        that size also occurs elsewhere (T == B) and the replay refutes it, the inputs of that size
        are tried as shared, fewest first: exactly one hypothesis must reproduce the outputs (BART's
        (T,) decoder position index at T == B); a tie is ambiguous, and no search runs without a
        collision (a batch input treated as shared would couple samples)."""
        key = _shapes(saved, batch)
        found = self._layouts.get(key)
        if found is None:
            found = self._layouts[key] = self._search(module, saved, batch)
        if isinstance(found, str):
            raise Refusal(found)
        return found

    def layout_of(self, module: nn.Module, saved: Saved, batch: int) -> Layout:
        """The layout for a pass whose structure the probe proved: the proved one for these shapes,
        else (new sequence length or batch size) the default one, which the probe's replay chose
        for this structure -- unless the batch size collides, where only a replay decides."""
        if _shapes(saved, batch) in self._layouts or _collides(saved, batch):
            return self.resolve(module, saved, batch)
        return layout(module, saved, batch)

    def _search(self, module: nn.Module, saved: Saved, batch: int) -> Layout | str:
        base = layout(module, saved, batch)
        why = self._replays(module, saved, batch, base)
        batched_inputs = [i for i, d in enumerate(base.inputs) if d is not None]
        if (why is None or type(module) in KNOWN_LAYOUTS or not _collides(saved, batch)
                or len(batched_inputs) > MAX_AMBIGUOUS):
            return base if why is None else why
        for r in range(1, len(batched_inputs) + 1):
            passing = []
            for shared in combinations(batched_inputs, r):
                dims = [None if i in shared else d for i, d in enumerate(base.inputs)]
                lay = Layout(dims, base.outputs, base.fold)
                if self._replays(module, saved, batch, lay) is None:
                    passing.append(lay)
            if len(passing) > 1:
                return (f"{len(passing)} different choices of which inputs carry the batch of size "
                        f"{batch} each reproduce its output: the batch dim is not provable")
            if passing:
                return passing[0]
        return why

    def _replays(self, module: nn.Module, saved: Saved, batch: int, lay: Layout) -> str | None:
        """None if replaying the module per sample under ``lay`` reproduces its outputs."""
        shared = all(d is None for d in lay.inputs)
        if shared and batch > 1 and not saved.broadcast:
            return "none of its inputs carries the batch (a broadcast call: its output is shared)"
        params = {n: p.detach() for n, p in module.named_parameters()}
        try:
            with torch.no_grad():
                if shared:  # one call shared by every sample: its output once, for each of them
                    args, kwargs = tree_unflatten(saved.flat, saved.spec)
                    leaves = tree_leaves(functional_call(module, params, args, kwargs))
                    outs = [leaves[k] for k in saved.positions]
                else:
                    outs = self._per_sample(
                        lambda p, flat: tuple(self._outputs(module, p, flat, saved, lay)),
                        params, saved, lay, out_dims=tuple(lay.outputs))
                    outs = [o.flatten(0, 1) if lay.fold > 1 else o for o in outs]
        except RuntimeError as err:  # a replay whose shapes do not fit: that layout is wrong
            return f"replaying it one sample at a time fails ({str(err).splitlines()[0][:120]})"
        for got, want in zip(outs, self._recorded(module, params, saved)):
            scale = want.abs().max().item() if want.numel() else 0.0
            if shared and got.dim() == want.dim() and got.shape[0] == 1:
                got = got.expand_as(want)
            if got.shape != want.shape or not torch.allclose(
                got.to(want.dtype), want, rtol=1e-4, atol=1e-6 * max(scale, 1e-30)
            ):
                return (
                    "replaying it one sample at a time does not reproduce its output, so some "
                    "input's batch dimension is not the one assumed (e.g. a (T, T) mask when "
                    f"T == batch size {batch}, or a sequence-first tensor)"
                )
        return None

    @staticmethod
    def _recorded(module: nn.Module, params: dict[str, Tensor], saved: Saved) -> list[Tensor]:
        """The call's outputs; one modified in place since (Falcon's ``mlp_output +=
        attention_output``) is computed again from the saved inputs."""
        if all(o._version == v for o, v in zip(saved.outputs, saved.versions)):
            return saved.outputs
        args, kwargs = tree_unflatten(saved.flat, saved.spec)
        with torch.no_grad():
            again = tree_leaves(functional_call(module, params, args, kwargs))
        return [o if o._version == v else again[k].expand_as(o)
                for o, v, k in zip(saved.outputs, saved.versions, saved.positions)]

    def uses(
        self, module: nn.Module, saved: Saved, grads: list[Tensor], batch: int
    ) -> Iterator[tuple[nn.Parameter, Tensor]]:
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not params:
            return
        lay = self.layout_of(module, saved, batch)
        frozen = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}

        def sample_loss(p: dict[str, Tensor], flat: list[Any], gs: list[Tensor]) -> Tensor:
            outs = self._outputs(module, {**frozen, **p}, flat, saved, lay)
            return sum((o * g).sum() for o, g in zip(outs, gs))

        detached = {n: p.detach() for n, p in params.items()}
        if batch == 1 and all(d is None for d in lay.inputs):

            def whole_loss(p: dict[str, Tensor]) -> Tensor:
                args, kwargs = tree_unflatten(saved.flat, saved.spec)
                outs = tree_leaves(functional_call(module, {**frozen, **p}, args, kwargs))
                return sum((outs[k] * g).sum() for k, g in zip(saved.positions, grads))

            whole = grad(whole_loss)(detached)
            for name, p in params.items():
                yield p, whole[name].unsqueeze(0)
            return
        # a broadcast call (no batched input) is vmapped over its output gradients alone
        try:
            per_sample = self._per_sample(
                grad(sample_loss), detached, saved, lay, (grads,), (lay.outputs,)
            )
        except RuntimeError as err:  # torch.func cannot run it even one sample at a time
            raise Refusal(
                "torch.func cannot take its per-sample gradient "
                f"({str(err).splitlines()[0][:200]}): an autograd.Function without "
                "setup_context, or a buffer updated in its forward?") from err
        for name, p in params.items():
            yield p, per_sample[name]
