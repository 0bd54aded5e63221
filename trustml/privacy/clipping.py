"""PerSampleClipper: exact per-sample gradient clipping from one forward and one backward pass.

Forward hooks record, for every layer that owns trainable parameters, what its rule needs (the
activations) and a handle on its output. :meth:`PerSampleClipper.backward` then runs ONE backward
pass whose only targets are those outputs -- so autograd never computes the (batch-summed)
parameter gradients at all -- and takes each layer's output gradient the moment autograd has it
(a pre-hook on the node that consumes it), so that no more than what the clipped sums need is ever
held at once:

1. every sample's gradient norm, per parameter either by Gram matrices ("ghost norm",
   <X X^T, Y Y^T>, each Gram computed once per pass even when layers share an input or an output
   gradient) or by materialising per-sample gradients when they are smaller than their factors
   (:meth:`~trustml.privacy.factored.Factored.ghost_cheaper`; a convolution keeps whichever of
   the two is smaller, :class:`~trustml.privacy.conv.ConvFactors`), built as soon as the last
   call using the parameter has its output gradient, while autograd is still running: a
   materialised layer drops its saved input and output gradient there, a ghost layer its Grams;
2. the clip factors c_i = min(1, C / ||grad_i||);
3. the clipped sum sum_i c_i grad_i as one matmul per parameter (no second backward pass), each
   parameter's factors freed as soon as its sum is taken.

A parameter used by several layers (GPT-2's tied ``wte``/``lm_head``) gets the norm of the *sum* of
its uses, cross terms included; a layer called several times per forward accumulates its calls; a
module registered under two parents is hooked once; a layer whose input has batch 1 while the
model's input has batch B (GPT-2's default position ids), or a generic-path call given a batch input
whose output has batch 1 (BART's decoder positions), has its output expanded to B so that its output
gradient stays per-sample (:mod:`trustml.privacy.broadcast` proves the forward unchanged);
position-wise layers on rows folded sample-major into dim 0, (B*T, d), read them as (B, T, d).

Nothing is assumed silently. Each new *signature* of a pass (which layers ran, the trainable set,
the batch size and where it occurs in their shapes) is proved once, before its gradients are used,
by a probe (:meth:`PerSampleClipper._probe`): each recorded output's rows reach only their own
sample's loss (about log2 B backward passes, each over a part of the batch, such that any two
samples are told apart: :func:`_probe_groups`); every generic-path call
replays exactly per sample. A failure is a :class:`Refusal` naming the module, its class and why
(an :class:`AmbiguousBatch` when the batch size collides with another dimension: another batch
size may pass, and DPStep retries with one). Every pass, proved before or not, walks its autograd
graph (:mod:`trustml.privacy.graph`): a parameter used outside the recorded calls is refused, and
a graph whose structure differs from the proved one's is proved anew.

The probe follows gradients: samples whose values mix with no gradient path between them (a batch
statistic under ``detach()`` or ``no_grad``, routing with a capacity shared by the batch) are not
seen here. DPStep's self-check (:mod:`trustml.privacy.verify`: the first batch against the naive
per-sample loop) refuses those.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from torch.nn.utils import parametrize

from trustml.privacy.broadcast import Call, autocast_state, rng_state, unchanged
from trustml.privacy.conv import ConvFactors
from trustml.privacy.factored import Factored, Grams, Use, batched, inner, merge, sqnorms
from trustml.privacy.generic import KNOWN_LAYOUTS, AmbiguousBatch, GenericRule, Layout, Refusal
from trustml.privacy.graph import Box, ReentrantCheckpoint, gradient_hooked, stray_uses
from trustml.privacy.layers import (
    Conv1DRule,
    EmbeddingRule,
    LayerNormRule,
    LinearRule,
    Rule,
    batch_dims,
    rule_for,
)

Strategy = Literal["auto", "ghost", "materialise"]
FOLDABLE = (LinearRule, Conv1DRule, EmbeddingRule, LayerNormRule)  # position-wise fast rules
# Proofs remembered, the least recently used forgotten first. A proof holds for one batch size
# (see _signature), and Poisson-sampled batches take a few hundred sizes in a long run (their
# spread is about 4 sqrt(B) either side of the expected B; physical batches add their remainders).
PROOFS_KEPT = 512
# Output gradients that may arrive before the calls holding them are taken (see _plans): taking a
# call inside autograd's callback costs tens of microseconds more than after the backward, which
# is 5-8% of the Adult MLP's clipper (~100 KB of output gradients in all); a transformer's or a
# CNN's output gradients are MiB-sized, so there every call is still taken as it arrives.
STREAM_BYTES = 1 << 20


@dataclass(slots=True)
class _Record:
    module: nn.Module
    rule: Rule
    saved: Any
    edges: list[GradientEdge]
    outputs: list[tuple[torch.Size, torch.dtype, torch.device]]
    inputs: tuple  # the call's (args, kwargs), for the graph walk of the probe
    versions: tuple[int, ...]  # their tensors' version counters after the call (_modified)


@dataclass
class _Proof:
    """What a proven pass structure fixes (cached per signature, so a steady step re-derives
    nothing): each recorded output's batch dim, how many recorded calls cover each parameter
    (its plan is built when the last of them has its output gradients), and which calls are
    2-D ``nn.Linear`` calls by their structure (:meth:`PerSampleClipper._linear`; found at the
    first pass that needs it)."""

    dims: list[list[int]]
    calls: dict[int, int]
    linear: list[bool] | None = None


class _ParamPlan:
    """All uses of one parameter in a pass: its per-sample squared norm and its clipped sum.

    Built as soon as the last of its uses is known, so that a materialised gradient drops its
    factors (the saved input and the output gradient) while the rest of the pass is processed.
    """

    def __init__(self, uses: list[Use | ConvFactors], strategy: Strategy, dtype: torch.dtype,
                 grams: Grams):
        self.factors: ConvFactors | None = None
        self.factored: list[Factored] = []
        self.dense: Tensor | None = None
        if len(uses) == 1 and isinstance(uses[0], ConvFactors) and strategy != "materialise":
            self.factors = uses[0]  # a single call's input and output gradient: held as they are
            self.norm2 = self.factors.norm2(dtype)
            return
        dense = [u for u in uses if isinstance(u, Tensor)]
        held = [u for u in uses if isinstance(u, ConvFactors)]
        factored = [u for u in uses if isinstance(u, Factored)]
        if len(factored) > 1:
            factored = merge(factored)
        materialise = (
            bool(dense or held)
            or strategy == "materialise"
            or (strategy == "auto" and len(factored) == 1 and not factored[0].ghost_cheaper())
        )
        if materialise:
            parts = dense + [f.materialise() for f in factored + held]
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            # reshape, not flatten(1): a 0-dim parameter gives (B, 1)
            self.dense = total.reshape(total.shape[0], -1)
            self.norm2 = sqnorms(self.dense, dtype)
            return
        self.factored = factored
        total = inner(factored[0], factored[0], dtype, grams)
        for i, u in enumerate(factored):
            if i:
                total = total + inner(u, u, dtype, grams)
            for v in factored[i + 1 :]:
                total = total + 2 * inner(u, v, dtype, grams)
        self.norm2 = total

    def weighted_sum(self, c: Tensor) -> Tensor:
        if self.factors is not None:
            return self.factors.weighted_sum(c)
        if self.dense is not None:
            return (c if c.dtype == self.dense.dtype else c.to(self.dense.dtype)) @ self.dense
        if len(self.factored) == 1:
            return self.factored[0].weighted_sum(c)
        total = None
        for f in sorted(self.factored, key=lambda f: f.indexed):  # the matmul first: no zero-fill
            total = f.weighted_sum(c, into=total)
        return total

    def add_to(self, c: Tensor, grad: Tensor) -> None:
        """``grad += weighted_sum(c)`` in place (a later physical batch): no temporary of its size
        (but for a convolution's held factors, whose sum is one convolution)."""
        if not grad.is_contiguous() or self.factors is not None:
            grad += self.weighted_sum(c).to(grad.dtype).reshape(grad.shape)
        elif self.dense is not None:
            grad.view(-1).addmv_(self.dense.T.to(grad.dtype), c.to(grad.dtype))
        else:
            f = self.factored[0]
            target = grad.view(f.vocab if f.indexed else f.x.shape[2], f.y.shape[2])
            for f in self.factored:
                f.weighted_sum(c, into=target)


class _LinearPlan:
    """Both parameters of an ``nn.Linear`` called once per pass on 2-D input (an MLP's layers):
    rank one per sample, G_i = g_i x_i^T for the weight and g_i for the bias, so one output row
    norm ||g_i||^2 serves both, ||G_i||^2 = ||x_i||^2 ||g_i||^2, and the clipped sums are one
    matmul and one matrix-vector product. The same values as :class:`_ParamPlan` over
    :class:`Factored` (whose rank-one inner product this is), without its per-parameter objects:
    on the Adult MLP those cost more than the arithmetic."""

    __slots__ = ("weight", "bias", "x", "g", "norm2")

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, x: Tensor,
                 g: Tensor, dtype: torch.dtype):
        self.weight, self.bias, self.x, self.g = weight, bias, x, g
        gw = g if g.dtype == dtype else g.to(dtype)
        gg = torch.linalg.vecdot(gw, gw)
        if weight is None:
            self.norm2 = gg
            return
        xw = x if x.dtype == dtype else x.to(dtype)
        xx = torch.linalg.vecdot(xw, xw)
        self.norm2 = xx.mul_(gg) if bias is None else torch.addcmul(gg, xx, gg)

    def write(self, c: Tensor) -> None:
        """Add each parameter's clipped sum to its ``.grad`` (set it when None)."""
        g, x = self.g, self.x
        c = c if c.dtype == g.dtype else c.to(g.dtype)
        if self.weight is not None:
            w = self.weight
            if g.shape[1] <= x.shape[1]:  # scale the smaller factor
                g, x = g * c.unsqueeze(1), x
            else:
                g, x = g, x * c.unsqueeze(1)
            if w.grad is None:
                s = g.T @ x
                w.grad = s if s.dtype == w.dtype else s.to(w.dtype)
            elif w.grad.dtype == g.dtype and w.grad.is_contiguous():
                w.grad.addmm_(g.T, x)
            else:
                w.grad += (g.T @ x).to(w.grad.dtype)
        b = self.bias
        if b is not None:
            if b.grad is None:
                s = c @ self.g
                b.grad = s if s.dtype == b.dtype else s.to(b.dtype)
            elif b.grad.dtype == self.g.dtype:
                b.grad.addmv_(self.g.T, c)
            else:
                b.grad += (c @ self.g).to(b.grad.dtype)


def _linear_plan(r: _Record, g: Tensor | None,
                 dtype: torch.dtype) -> list[tuple[nn.Parameter, _LinearPlan]]:
    """A :class:`_LinearPlan` call's plan, keyed by its weight (its bias when the weight is
    frozen); none when both are frozen or the call did not reach the loss (``g`` None). The
    record drops its saved input."""
    x, r.saved, r.inputs = r.saved, None, None
    params = r.module._parameters  # what ``module.weight`` reads, without Module.__getattr__
    weight, bias = params.get("weight"), params.get("bias")
    weight = weight if weight is not None and weight.requires_grad else None
    bias = bias if bias is not None and bias.requires_grad else None
    if g is None or (weight is None and bias is None):
        return []
    return [(bias if weight is None else weight, _LinearPlan(weight, bias, x, g, dtype))]


def _edge(t: Tensor) -> GradientEdge:
    """``get_gradient_edge(t)`` without its checks where ``t`` comes out of a C++ autograd node
    (all but custom Functions, whose edge needs an ownership token; and leaves)."""
    node = t.grad_fn
    if node is None or isinstance(node, torch._C._FunctionBase):
        return get_gradient_edge(t)
    return GradientEdge(node, t.output_nr)


def _probe_groups(batch: int, losses: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """The probes proving that each recorded output row reaches only its own sample's loss: the
    samples' loss weights, and per probe (the indices of the samples NOT kept, the weights of the
    losses it differentiates: the kept samples' weights, 0 elsewhere).

    Every sample gets its own set of n // 2 of the n probes (a distinct code word of weight
    n // 2, so none contains another's): for samples i != j some probe keeps i and not j, and
    i's loss reaching j's rows shows there as a nonzero gradient on a row not kept. n is the
    least with C(n, n // 2) >= B: 13 backward passes for B = 1024, once per pass signature. An
    even/odd split alone (two probes) missed a sample mixed with a partner of the same parity:
    i and i + B/2 of a two-view batch, ``h + h.roll(2, 0)``. The kept losses are weighted in
    [1, 2) (a fixed seed: the weights touch no update), so that two mixed losses cannot cancel
    on a row by symmetry. One sample: one pass, showing which outputs reach the loss at all.
    """
    if batch == 1:
        ones = torch.ones_like(losses)
        return ones, [(torch.zeros(0, dtype=torch.long, device=losses.device), ones)]
    n = 2
    while math.comb(n, n // 2) < batch:
        n += 1
    chosen = torch.tensor(list(itertools.islice(itertools.combinations(range(n), n // 2), batch)))
    words = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, chosen, True)  # (B, n)
    weights = torch.rand(batch, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = (1 + weights).to(losses.dtype)
    return weights.to(losses.device), [
        ((~keep).nonzero().squeeze(1).to(losses.device), (weights * keep).to(losses.device))
        for keep in words.T]


def _linear_tolerance(dtype: torch.dtype) -> float:
    """How far (relative to the whole pass's largest output gradient) the probes may miss adding
    up to it from rounding alone: they weight each loss differently, so fp32 matmuls in TF32 on
    a GPU round their inputs apart (~1e-3); a batch-wide rescale misses by a factor."""
    return 1e-7 if dtype == torch.float64 else 1e-2 if dtype == torch.float32 else 5e-2


def _first_tensor(tree: Any) -> Tensor | None:
    args = tree[0]
    if args and isinstance(args[0], Tensor) and args[0].dim() > 0:  # the common case: no tree walk
        return args[0]
    return next((t for t in tree_leaves(tree) if isinstance(t, Tensor) and t.dim() > 0), None)


def _tensors(inputs: tuple) -> tuple | list:
    """The tensors among a call's inputs (``(args, kwargs)``)."""
    args, kwargs = inputs
    if kwargs or not all([isinstance(a, Tensor) for a in args]):
        return [x for x in tree_leaves(inputs) if isinstance(x, Tensor)]
    return args


def _versions(inputs: tuple) -> tuple[int, ...]:
    """The version counters of a call's tensor inputs (``_modified`` compares them later)."""
    args, kwargs = inputs
    if not kwargs:
        try:  # the common case, tensors only: no type checks (~0.5 us per call)
            return tuple([a._version for a in args])
        except AttributeError:
            pass
    return tuple([x._version for x in _tensors(inputs)])


def _input_edges(inputs: tuple) -> list[tuple[object, int]]:
    """Where the gradient of each input of a call (``(args, kwargs)``) that requires grad enters
    the graph: (node, output number), for the graph walk."""
    return [(node, x.output_nr) if (node := x.grad_fn) is not None
            else tuple(get_gradient_edge(x))[:2]  # a leaf: its AccumulateGrad node
            for x in _tensors(inputs) if x.requires_grad]


def _described(name: str, module: nn.Module) -> str:
    return f"module {name or '<model>'} ({type(module).__name__})"


def _batchnorm_error(name: str, module: nn.Module) -> Refusal:
    return Refusal(
        f"{_described(name, module)} is a BatchNorm layer: it mixes samples of a batch, so "
        "per-sample gradients (and DP-SGD) are undefined. Replace it with GroupNorm (or LayerNorm), "
        "e.g. opacus.validators.ModuleValidator.fix(model)."
    )


def _owned(module: nn.Module) -> list[nn.Parameter]:
    """Parameters a module's call accounts for: its own, and its parametrizations' originals."""
    own = [p for p in module._parameters.values() if p is not None]
    if parametrize.is_parametrized(module):
        own += list(module.parametrizations.parameters())
    return own


class PerSampleClipper:
    """Clip per-sample gradients of ``model`` to ``max_grad_norm`` and sum them.

    ``strategy`` picks the norm computation: ``auto`` (cheaper of ghost norm and materialising, per
    layer, by FLOP estimate), or force ``ghost`` / ``materialise`` (for tests and benchmarks).
    Every module owning parameters is hooked (frozen ones too: unfreezing later is picked up);
    modules without a fast rule (:data:`trustml.privacy.layers.RULES`) take the generic path.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, *, strategy: Strategy = "auto"):
        if not 0 < max_grad_norm < float("inf"):  # C = inf: every clip factor 0 * inf = NaN
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if strategy not in ("auto", "ghost", "materialise"):
            raise ValueError(f"strategy must be 'auto', 'ghost' or 'materialise', got {strategy!r}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.strategy: Strategy = strategy
        self._records: list[_Record] = []
        self._batch = 0
        self._recording = True
        self._open: list[nn.Module] = []  # generic-path calls running: what runs inside is theirs
        self._entered: set[nn.Module] = set()  # generic-path modules with their pre-hook
        self._hooked: dict[nn.Module, str] = {}
        self._rules: dict[nn.Module, tuple[tuple, Rule, list[nn.Parameter], set[int]]] = {}
        self._trainable: list[nn.Parameter] = []
        self._trainable_ids: tuple[int, ...] = ()  # their ids, in order (the signature's part)
        self._trainable_set: frozenset[int] = frozenset()
        self._proven: dict[tuple, _Proof] = {}  # (signature, graph fingerprint) -> its proof
        self._signatures: Counter[tuple] = Counter()  # signature -> its proofs in _proven
        self._known: tuple[int, int, tuple] | None = None  # (records, batch, signature) at the
        # end of this forward, computed there for an expanded call: backward reuses it
        self._handles = [model.register_forward_pre_hook(self._note_batch, with_kwargs=True),
                         model.register_forward_hook(self._note_output, with_kwargs=True)]
        self._call: Call | None = None  # this model call, kept if a layer output is expanded
        self._calls: list[Call] = []  # the calls of this pass with an expanded output
        self._layout_key: list | None = None
        self._attach()

    @property
    def trainable(self) -> list[nn.Parameter]:
        """The parameters this clipper clips (those requiring grad as of the last forward); a new
        list object whenever the set changes."""
        return self._trainable

    # ---- which modules, which rules --------------------------------------------------------

    def _attach(self) -> None:
        """Hook every not-yet-hooked module owning parameters (each module once, however shared)."""
        self._rules.clear()  # parameters were added or (un)frozen: re-decide rules and coverage
        inner = {
            id(sub)
            for m in self.model.modules()
            if parametrize.is_parametrized(m)
            for sub in m.parametrizations.modules()
        }
        for name, module in self.model.named_modules():
            if isinstance(module, _BatchNorm):
                raise _batchnorm_error(name, module)
            if module in self._hooked or id(module) in inner or not _owned(module):
                continue
            self._hooked[module] = name
            self._handles.append(
                module.register_forward_hook(self._record, with_kwargs=True, prepend=True,
                                             always_call=True))
        for module in self._hooked:  # refuse unsupported layers now, not mid-training; and a
            self._rule(module)  # module turned generic gets its pre-hook before its next call
        self._layout_key = self._param_key()
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._trainable_ids = tuple(id(p) for p in self._trainable)
        self._trainable_set = frozenset(self._trainable_ids)

    def _param_key(self) -> list:
        """Every module holding parameters, each of its parameters and whether it is trainable:
        changes when one is added, removed, replaced, moved or (un)frozen, or a module holding
        one is (a bool follows each parameter's id, so equal keys are equal maps from modules
        to their parameters). Checked before every forward, so a plain walk of the modules' own
        dicts rather than ``model.parameters()`` (whose nested generators cost 3x as much on a
        small model); equality is all that counts. Modules go by id (a class may define
        ``__eq__``)."""
        key: list = []
        stack, seen = [self.model], set()
        for module in stack:  # the stack grows while it is read: every module is reached
            if module is None or id(module) in seen:
                continue
            seen.add(id(module))
            if module._parameters:
                key.append(id(module))
                for p in module._parameters.values():
                    if p is not None:
                        key.append(id(p))
                        key.append(p.requires_grad)
            if module._modules:
                stack += module._modules.values()
        return key

    def _name(self, module: nn.Module) -> str:
        return _described(self._hooked.get(module, ""), module)

    def _rule(self, module: nn.Module) -> Rule:
        """The module's rule, re-decided when its parameters change (e.g. one added later)."""
        key = (len(module._parameters), type(module))  # parametrizing changes the class
        cached = self._rules.get(module)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            rule = rule_for(module)
        except ValueError as err:
            raise Refusal(f"{self._name(module)}: {err}") from None
        if rule is None:
            for sub_name, sub in module.named_modules():
                if isinstance(sub, _BatchNorm):
                    raise _batchnorm_error(f"{self._hooked.get(module, '')}.{sub_name}", sub)
            rule = GenericRule()
            if module not in self._entered:  # from the next call on (see _record)
                self._entered.add(module)
                self._handles.append(module.register_forward_pre_hook(self._enter))
        covered = list(module.parameters()) if isinstance(rule, GenericRule) else _owned(module)
        self._rules[module] = (key, rule, covered, {id(p) for p in covered})
        return rule

    # ---- forward: record each call ---------------------------------------------------------

    def _note_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording:
            return
        self._open.clear()
        self._known = None
        if self._param_key() != self._layout_key:  # a module or parameter added, or unfrozen
            self._attach()
        first = _first_tensor((args, kwargs))
        if first is not None:
            self._batch = first.shape[0]
        # the random and autocast state the call starts from, in case a layer output is
        # expanded and the call must be replayed (broadcast.py): a few microseconds, taken
        # always, since an expansion is only known once the call is under way
        self._call = Call(args, kwargs, rng_state(),
                          autocast_state(None if first is None else first.device), [])

    def _note_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._recording and self._call is not None and self._call.expanded:
            # The output (an LM's logits) is what the proof replays against; held only while
            # this pass's structure is unproven, else it would cost a logits-sized copy per step.
            signature = self._signature(self._records, self._trainable_ids, self._batch)
            self._known = (len(self._records), self._batch, signature)
            if not self._calls_proven(signature):
                self._call.output = output
            self._calls.append(self._call)
        self._call = None

    def _calls_proven(self, signature: tuple) -> bool:
        """Whether a pass of these calls was proved (its expansions then hold, whatever the graph
        between the calls)."""
        return signature in self._signatures

    @staticmethod
    def _signature(records: list[_Record], trainable_ids: tuple[int, ...], batch: int) -> tuple:
        """What a proof covers: which calls ran under which rule, which of their output dims had
        the batch size, the trainable set (by id, in order), and the batch size. A proof made at
        one batch size says nothing of another: ``h + h.roll(2, 0)`` mixes no samples at B = 2,
        and mixes them at B = 4 in the same graph."""
        is_batch = batch.__eq__
        return (
            tuple([(id(r.module), type(r.rule),
                    tuple([tuple(map(is_batch, o[0])) for o in r.outputs])) for r in records]),
            trainable_ids,
            batch,
        )

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if self._recording and isinstance(self._rule(module), GenericRule):
            self._open.append(module)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._recording:
            return None
        rule = self._rule(module)
        if self._open:
            if self._open[-1] is module:
                self._open.pop()
            if self._open:
                return None  # inside a generic-path call: that call's rule covers this one
        if not torch.is_grad_enabled():
            return None
        for p in module._parameters.values():
            if p is not None and not isinstance(p, nn.Parameter):
                raise Refusal(
                    f"{self._name(module)}: one of its parameters was replaced for this call by a "
                    "computed tensor (torch.func.functional_call with weights derived from the "
                    "parameters?), whose per-sample gradient the clipper would credit to the "
                    "parameter itself; call the module with its own parameters")
        if isinstance(output, Tensor) and (self._batch <= 1 or output.dim() == 0
                                           or output.shape[0] != 1):
            # one tensor that cannot be expanded (every layer of an MLP): no tree, no expansion
            if output.requires_grad:
                self._records.append(_Record(
                    module, rule, rule.save(module, args, kwargs, output), [_edge(output)],
                    [(output.shape, output.dtype, output.device)], (args, kwargs),
                    _versions((args, kwargs))))
            return None
        leaves, spec = ([output], None) if isinstance(output, Tensor) else tree_flatten(output)
        generic = isinstance(rule, GenericRule)
        expand = (  # position-wise fast-rule layers on a batch-1 input (GPT-2's positions), and
            self._batch > 1  # generic calls with a batch input but a batch-1 output (BART's
            and any(isinstance(o, Tensor) and o.dim() > 0 and o.shape[0] == 1 for o in leaves)
            and (self._sees_batch(module, args, kwargs) if generic  # decoder positions)
                 else (first := _first_tensor((args, kwargs))) is not None
                 and first.shape[0] == 1)
        )
        if expand:  # give every sample its own output (and output gradient); proved by the probe
            if self._call is not None:  # and by replaying the model without it (broadcast.py)
                self._call.expanded.append(self._name(module))
            leaves = [
                batched(o, self._batch) if isinstance(o, Tensor) and o.dim() > 0 else o
                for o in leaves
            ]
            output = leaves[0] if spec is None else tree_unflatten(leaves, spec)
        outs = [o for o in leaves if isinstance(o, Tensor) and o.requires_grad]
        if outs:
            saved = rule.save(module, args, kwargs, output)
            if expand and generic:
                saved.broadcast = True
            self._records.append(
                _Record(module, rule, saved, [_edge(o) for o in outs],
                        [(o.shape, o.dtype, o.device) for o in outs], (args, kwargs),
                        _versions((args, kwargs)))
            )
        return output if expand else None

    def _sees_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        """A generic call given a tensor with the batch in dim 0. One given nothing of the batch
        (Swin's relative position bias) is not expanded: its consumer may broadcast it against
        another leading size (windows * batch), where an expanded copy would break the forward."""
        return type(module) not in KNOWN_LAYOUTS and any(
            isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == self._batch
            for x in tree_leaves((args, kwargs)))

    # ---- backward --------------------------------------------------------------------------

    def backward(self, per_sample_losses: Tensor, *, loss_scale: float = 1.0, scale: float = 1.0,
                 start: Callable[[nn.Parameter], Tensor | None] | None = None) -> Tensor:
        """Add ``scale`` sum_i c_i grad_i to each trainable parameter's ``.grad``; return the (B,)
        norms.

        Like ``loss.backward()`` this accumulates into ``.grad`` (zero it before a logical batch;
        several physical batches then add up). ``loss_scale`` (fp16) multiplies the backward pass's
        gradients; norms and the clipped sum are returned unscaled. ``start(p)``, if given, makes
        the ``.grad`` of a parameter that has none, right before its sum is added onto it (DPStep:
        the parameter's noise, see :mod:`trustml.privacy.noise`); when it returns None, or without
        it, the sum is written as a new ``.grad``. Raises :class:`Refusal` (a ValueError) when a
        gradient cannot be made exact, before touching any ``.grad``.
        """
        losses = per_sample_losses
        if losses.dim() != 1:
            raise ValueError(f"per_sample_losses must have shape (B,), got {tuple(losses.shape)}")
        records, self._records, self._batch = self._records, [], 0
        calls, self._calls = self._calls, []
        known, self._known = self._known, None
        batch = losses.shape[0]
        if batch == 0:
            return losses.detach().float()
        if not losses.requires_grad:
            raise ValueError(
                "per_sample_losses does not require grad "
                "(computed under no_grad, or no trainable parameters?)"
            )
        # the trainable set as of this forward (see _note_batch)
        trainable, ids, id_set = self._trainable, self._trainable_ids, self._trainable_set
        edges = [e for r in records for e in r.edges]
        signature = (known[2] if known is not None and known[:2] == (len(records), batch)
                     else self._signature(records, ids, batch))
        key = (signature, self._walk(losses, records, trainable, id_set))
        proof = self._proven.pop(key, None)
        if proof is not None:
            self._proven[key] = proof  # most recently used: last in line for eviction
        else:
            if not self._calls_proven(signature):
                self._prove_expansions(calls, batch)
            proof = self._prove(losses, records, edges, batch, trainable)
            while len(self._proven) >= PROOFS_KEPT:  # re-proving an evicted structure is safe
                old = next(iter(self._proven))
                del self._proven[old]
                self._signatures[old[0]] -= 1
                if not self._signatures[old[0]]:
                    del self._signatures[old[0]]
            self._proven[key] = proof
            self._signatures[signature] += 1
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in trainable) else torch.float32
        plans = self._plans(losses, records, edges, batch, proof, dtype, loss_scale)
        norm2 = (
            torch.stack([plan.norm2 for _, plan in plans]).sum(0) if len(plans) > 1
            else plans[0][1].norm2 if plans  # (a logistic regression: no stack, no sum)
            else torch.zeros(batch, dtype=dtype, device=losses.device)
        )
        norms = norm2.sqrt()
        if loss_scale != 1:
            norms = norms / loss_scale
        # what ``C / clamped`` computes (Tensor.__rtruediv__), without its Python wrapper (22 us
        # vs 10 on the Adult MLP); the max norm, the loss scale and ``scale`` (DPStep: 1 / the
        # expected batch size) in one multiplication, not in a pass over the sums; none when their
        # product is 1 (one kernel less)
        c = norms.clamp(min=self.max_grad_norm).reciprocal_()
        factor = self.max_grad_norm * scale / loss_scale
        if factor != 1:
            c.mul_(factor)
        # Pop each plan: its factors are freed once its sum is taken. Smallest parameter first, so
        # the largest sums (an embedding's) are allocated last, once most factors are freed.
        plans.sort(key=lambda item: item[0].numel(), reverse=True)
        while plans:
            p, plan = plans.pop()
            if start is not None:
                for q in (plan.weight, plan.bias) if type(plan) is _LinearPlan else (p,):
                    if q is not None and q.grad is None:
                        q.grad = start(q)
            if type(plan) is _LinearPlan:
                plan.write(c)
            elif p.grad is None:
                g = plan.weighted_sum(c)
                if g.dtype != p.dtype:
                    g = g.to(p.dtype)
                if g.shape != p.shape:
                    g = g.reshape(p.shape)
                p.grad = g
            else:
                plan.add_to(c, p.grad)
            del plan
        return norms

    def _prove(self, losses: Tensor, records: list[_Record], edges: list, batch: int,
               trainable: list) -> _Proof:
        """Prove a pass of a new signature (or refuse) and what follows from it."""
        used = Counter(id(p) for r in records for p in self._covered(r))
        if not edges and not any(id(p) not in used for p in trainable):
            raise ValueError(
                "no layer with trainable parameters ran in the forward pass since the last backward"
            )
        return _Proof(self._probe(losses, records, batch, trainable), dict(used))

    def _covered(self, record: _Record) -> list[nn.Parameter]:
        return self._rules[record.module][2]

    def _param_name(self, p: Tensor) -> str:
        for module, name in self._hooked.items():
            for pname, q in module.named_parameters(prefix=name, recurse=False):
                if q is p:
                    return f"{pname} ({type(module).__name__})"
        for pname, q in self.model.named_parameters():
            if q is p:
                owner = self.model.get_submodule(pname.rpartition(".")[0])
                return f"{pname} ({type(owner).__name__})"
        return "<unnamed>"

    def _layout_dims(self, r: _Record, batch: int) -> list[int]:
        return self._layout(r, batch).outputs

    def _layout(self, r: _Record, batch: int) -> Layout:
        try:
            return r.rule.layout_of(r.module, r.saved, batch)
        except Refusal as err:
            raise Refusal(f"{self._name(r.module)}: {err}") from None

    def _refuse(self, r: _Record, why: str, batch: int) -> Refusal:
        shapes = [s for s, _, _ in r.outputs] + [
            x.shape for x in tree_leaves(r.inputs) if isinstance(x, Tensor)
        ]
        kind = AmbiguousBatch if batch > 1 and any(batch in s[1:] for s in shapes) else Refusal
        return kind(f"{self._name(r.module)}: {why}")

    def _check_shape(self, r: _Record, g: Tensor, d: int, batch: int) -> None:
        if g.dim() > d and g.shape[d] == batch:
            return
        if d == 0 and g.dim() > 1 and g.shape[0] == batch * self._fold(r, g.shape, batch) > batch:
            return  # rows folded sample-major, proved by the probe (_probe)
        if g.dim() > d and g.shape[d] == 1:
            why = (
                "its output is computed once and shared by the whole batch (batch dim of size 1, "
                "e.g. a relative position bias), so its per-sample gradients cannot be separated; "
                "freeze its parameters (requires_grad_(False)) or compute it per sample"
            )
        else:
            why = (
                f"its output has shape {tuple(g.shape)}, whose batch dim {d} is not the batch "
                f"size {batch} of the loss: per-sample clipping needs batch-first layer inputs "
                "(a sequence-first model? windows or heads folded into the batch dim?)"
            )
        raise self._refuse(r, why, batch)

    def _prove_expansions(self, calls: list[Call], batch: int) -> None:
        """Refuse if expanding a batch-1 output changed the model's forward (broadcast.py)."""
        with self._not_recording():  # the replays run the model
            for call in calls:
                if call.output is None:  # released: its forward alone matched a proven pass
                    raise Refusal(
                        f"{call.expanded[0]}: its batch-1 output was expanded in a pass of a new "
                        "structure (the model called more than once before backward?) whose "
                        "expansion cannot be re-checked; call the clipper's backward after each "
                        "forward, or build a new PerSampleClipper for this pattern")
                how = unchanged(self.model, call)
                if how is not None:
                    raise Refusal(
                        f"{call.expanded[0]}: its output has batch dim 1 in a batch of "
                        f"{batch} samples, and giving each sample its own copy "
                        f"changes the model's forward ({how}), so dim 0 is not a batch broadcast "
                        "(a sequence-first layer on one token?); per-sample gradients of a call "
                        "shared this way are not provable: freeze its parameters or compute it "
                        "per sample")

    def _walk(self, losses: Tensor, records: list[_Record], trainable: list,
              ids: frozenset[int]) -> int:
        """Refuse a pass whose graph uses a trainable parameter outside the calls that own it;
        return the graph's fingerprint.

        Run on *every* pass, not only when a structure is first proved: the hooked calls alone do
        not fix the graph (``loss + (w ** 2).sum()`` or ``h + h.mean(0)`` on some steps only), so
        a proof is reused only for the same calls *and* the same graph fingerprint.
        """
        self._modified(records)
        hooked = gradient_hooked(trainable)
        if hooked:
            raise Refusal(
                f"parameter {self._param_name(hooked[0])} has a gradient hook (register_hook): "
                "per-sample clipping never forms its batch gradient, so the hook would not run; "
                "remove the hook (freeze the parameter, or mask its inputs or outputs instead)")
        rules = self._rules
        boxes = [Box([e[:2] for e in r.edges], _input_edges(r.inputs), rules[r.module][3])
                 for r in records]
        try:
            stray, fingerprint = stray_uses(losses, boxes, ids)
        except ReentrantCheckpoint:
            raise Refusal(
                f"{self._name(self.model)}: its forward uses a reentrant torch.utils.checkpoint "
                "(use_reentrant=True), whose backward cannot give the layer output gradients "
                "per-sample clipping needs; use use_reentrant=False (Hugging Face: model."
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
                "False}))") from None
        if stray:
            by_id = {id(p): p for p in trainable}
            pid, box = stray[0]
            name = self._param_name(by_id[pid])
            where = ("outside any module call" if box is None
                     else f"inside {self._name(records[box].module)}")
            raise Refusal(
                f"parameter {name} reaches the loss {where}, not only through its module's calls: "
                "per-sample clipping would drop that use. Call the module instead of using its "
                "weight directly (e.g. tie weights to an nn.Linear), or freeze the parameter."
            )
        return fingerprint

    def _modified(self, records: list[_Record]) -> None:
        """Refuse a pass in which a recorded call's input was modified in place after the call
        (``y = lin(x); x.mul_(2)``): its rule would read the modified values, which torch's own
        backward refuses ("modified by an inplace operation") -- unless nothing is trained there."""
        for r in records:
            if r.versions != _versions(r.inputs) and any(
                    p.requires_grad for p in self._covered(r)):
                raise Refusal(
                    f"{self._name(r.module)}: an input of this call was modified in place after "
                    "the call, so its per-sample gradient would read the modified values (torch's "
                    "backward refuses this too); use an out-of-place op (x = x * 2, not x.mul_(2))")

    def _probe(
        self, losses: Tensor, records: list[_Record], batch: int, trainable: list
    ) -> list[list[int]]:
        """Prove this pass's structure once (see the module docstring) or refuse; return the
        batch dim of every recorded output.

        Each probe's output gradients are reduced as they arrive (which dims hold rows of the kept
        samples only, whether folded rows do), so one probe's gradients are held at a time, beside
        one running sum. The sum checks that the probes, which hold each sample's loss n // 2
        times in all, add up to n // 2 times one pass over all the losses: a backward hook that
        rescales a gradient by a batch-wide quantity (``g / g.norm()``) keeps the other samples'
        rows at zero, but then its parts of the batch do not add up to the whole. (A hook acting
        on each row alone, a clamp, passes: each sample's rows are the same in every pass.)
        """
        edges = [e for r in records for e in r.edges]
        owner = [r for r in records for _ in r.edges]
        shapes = [o[0] for r in records for o in r.outputs]
        reached = [False] * len(edges)  # outputs that reach this loss (not a forward left unused)
        local = [{d: True for d, n in enumerate(s) if n == batch} for s in shapes]
        folds = [s[0] // batch if len(s) > 1 and s[0] % batch == 0 and s[0] > batch else 0
                 for s in shapes]  # rows per sample of a (B * T, d) output
        folded = [k > 0 for k in folds]
        weights, groups = _probe_groups(batch, losses) if edges else (None, [])
        with self._not_recording():  # a checkpointed forward re-run in backward
            rest = None
            if len(groups) > 1:  # each sample's loss is in n // 2 of the n probes
                whole = torch.autograd.grad(losses, edges, weights, retain_graph=True,
                                            allow_unused=True)
                count = len(groups) // 2
                scale = [None if g is None else count * float(g.abs().max()) for g in whole]
                rest = [None if g is None else g * count for g in whole]
                del whole
            for others, kept in groups:
                grads = torch.autograd.grad(losses, edges, kept, retain_graph=True,
                                            allow_unused=True)
                for i, g in enumerate(grads):
                    if g is None:
                        continue
                    reached[i] = True
                    for d, ok in local[i].items():
                        local[i][d] = ok and self._rows_local(g, d, others)
                    if folded[i]:
                        k = folds[i]
                        rows = others.unsqueeze(1) * k + torch.arange(k, device=others.device)
                        folded[i] = self._rows_local(g, 0, rows.flatten())
                    if rest is not None:  # out of place: autograd may hand one tensor to two edges
                        rest[i] = -g if rest[i] is None else rest[i] - g
                del grads
        if rest is not None:
            for i in reversed(range(len(edges))):  # the output nearest the loss names the culprit
                if rest[i] is not None and float(rest[i].abs().max()) > _linear_tolerance(
                        rest[i].dtype) * (scale[i] or 0.0):
                    raise self._refuse(
                        owner[i], "its output gradient is not linear in the per-sample losses "
                        "(the gradients of parts of the batch do not add up to the whole), so its "
                        "rows are not per-sample gradients: a backward hook after it rescaling "
                        "the gradient by a batch-wide quantity (g / g.norm())?", batch)
        live, at = [], 0  # per call: whether any of its outputs reached the loss
        for r in records:
            live.append(any(reached[at: at + len(r.edges)]))
            at += len(r.edges)
        try:
            with self._not_recording():  # a generic rule's check re-runs its module
                for r, alive in zip(records, live):
                    why = r.rule.check(r.module, r.saved, batch) if alive and isinstance(
                        r.rule, GenericRule) else None
                    if why:
                        raise self._refuse(r, why, batch)
        except Refusal as err:
            if err.args[0].startswith("module "):
                raise
            raise self._refuse(r, str(err), batch) from None
        dims, at = [], 0
        for r, alive in zip(records, live):
            if not alive:
                dims.append([0] * len(r.edges))
                at += len(r.edges)
                continue
            generic = isinstance(r.rule, GenericRule)
            fixed = self._layout_dims(r, batch) if generic else None
            mine = []
            for k, (shape, _, _) in enumerate(r.outputs):
                cands = [fixed[k]] if generic else batch_dims(r.rule, r.module, len(shape))
                ok = [d for d in cands if local[at + k].get(d, False)]
                if not ok and folded[at + k] and self._fold(r, shape, batch) == folds[at + k]:
                    ok = [0]  # rows folded sample-major, (B * T, d) (OPT's MLP): read as (B, T, d)
                if not ok:
                    if generic and len(shape) > fixed[k] and shape[fixed[k]] == batch:
                        raise self._refuse(
                            r, f"rows of its output (dim {fixed[k]}) reach the losses of other "
                            "samples, so that dim is not the batch (a sequence-first tensor, or "
                            "an input shared by the batch?)", batch)
                    self._check_shape(r, torch.empty(shape, device="meta"),
                                      cands[0] if cands else 0, batch)
                    raise self._refuse(
                        r, f"no dim of its output {tuple(shape)} holds one sample per row: "
                        "its rows reach other samples' losses (samples mixed after it: a loss "
                        "pairing samples or with in-batch negatives, a batch statistic, a roll or "
                        "an index across the batch?), or it is a batch-1 output that is not a "
                        "broadcast over the batch", batch)
                if len(ok) > 1 and batch > 1:
                    raise AmbiguousBatch(
                        f"{self._name(r.module)}: dims {ok} of its output {tuple(shape)} could "
                        f"each be the batch of size {batch}")
                mine.append(ok[0])
            dims.append(mine)
            at += len(r.edges)
        return dims

    def _fold(self, r: _Record, shape: torch.Size, batch: int) -> int:
        """How many rows of dim 0 each sample has, if its rule can read folded rows; else 1."""
        if isinstance(r.rule, GenericRule):
            lay = self._layout(r, batch)
            if batch == 1 and shape and all(d is None for d in lay.inputs):
                return shape[0]  # one sample, one call: every row is its own
            return lay.fold
        if isinstance(r.rule, FOLDABLE) and shape and shape[0] % batch == 0:
            return shape[0] // batch
        return 1

    @staticmethod
    def _rows_local(g: Tensor | None, d: int, others: Tensor) -> bool:
        """The gradient of the kept samples' losses is zero on the ``others``' rows (of dim d)."""
        return g is None or not bool(g.index_select(d, others).any())

    def _plans(self, losses: Tensor, records: list[_Record], edges: list[GradientEdge], batch: int,
               proof: _Proof, dtype: torch.dtype, loss_scale: float,
               ) -> list[tuple[nn.Parameter, _ParamPlan | _LinearPlan]]:
        """Run the backward pass and build every parameter's plan from the recorded calls.

        Each recorded call's output gradients are taken the moment autograd has them, by a
        pre-hook on the node that consumes them (``backward(inputs=edges)`` runs those nodes but,
        given gradient edges rather than tensors, accumulates no ``.grad``), and its rule's uses
        are taken at once (once :data:`STREAM_BYTES` of output gradients have arrived: small
        ones are taken together after the backward). A parameter's plan is built as soon as every
        call covering it has arrived, so a materialised layer drops its saved input and output
        gradient, and a ghost layer its Gram matrices, while autograd is still running: only the
        factors the clipped sums need are held, never every output gradient of the pass at once.

        A call whose nodes never run did not reach the loss (no use, as for autograd.grad's None);
        a call reached through only some of its outputs gets zeros for the others. A refusal
        raised in a hook leaves the backward with no ``.grad`` written.
        """
        dims = proof.dims
        if self.strategy == "materialise":
            linear = [False] * len(records)
        else:
            if proof.linear is None:
                proof.linear = [self._linear(r, ds, batch, proof) for r, ds in zip(records, dims)]
            linear = [ok and (x := r.saved).dim() == 2 and x.shape[0] == batch
                      and x.dtype == r.outputs[0][1] for ok, r in zip(proof.linear, records)]
        if records and all(linear):
            return self._linear_plans(losses, records, edges, dtype, loss_scale)
        calls = dict(proof.calls)
        uses: dict[int, tuple[nn.Parameter, list[Use | ConvFactors]]] = {}
        plans: list[tuple[nn.Parameter, _ParamPlan | _LinearPlan]] = []
        grams = Grams()  # shared Gram matrices (one input read by several layers, ...)
        got: list[list[Tensor | None] | None] = [[None] * len(r.edges) for r in records]
        waiting = [len(r.edges) for r in records]

        def take(k: int) -> None:
            r, ds, gs = records[k], dims[k], got[k]
            got[k] = None
            if linear[k]:
                plans.extend(_linear_plan(r, gs[0], dtype))
                return
            if any(g is not None for g in gs):  # else this call did not reach the loss
                if not all(g is not None for g in gs):
                    gs = [torch.zeros(s, dtype=d, device=dev) if g is None else g
                          for g, (s, d, dev) in zip(gs, r.outputs)]
                for g, d in zip(gs, ds):
                    if g.dim() <= d or g.shape[d] != batch:  # else a folded or bad batch dim
                        self._check_shape(r, g, d, batch)
                saved = r.saved
                r.saved = r.inputs = None
                if not isinstance(r.rule, GenericRule) and ds[0] != 0:  # sequence-first
                    gs, saved = [g.movedim(ds[0], 0) for g in gs], saved.movedim(ds[0], 0)
                try:
                    for p, use in r.rule.uses(r.module, saved, gs, batch):
                        uses.setdefault(id(p), (p, []))[1].append(use)
                except Refusal as err:
                    raise Refusal(f"{self._name(r.module)}: {err}") from None
                del gs, saved
            for p in self._covered(r):
                calls[id(p)] -= 1
                if not calls[id(p)] and id(p) in uses:
                    plans.append((p, _ParamPlan(uses.pop(id(p))[1], self.strategy, dtype, grams)))

        ready: list[int] = []  # calls with all their output gradients, not taken yet
        held = 0  # bytes of output gradients arrived since the last calls were taken

        def take_ready() -> None:
            nonlocal held
            for k in ready:
                take(k)
            ready.clear()
            held = 0

        def hook(targets: list[tuple[int, int, int]], leaf: bool):
            def arrived(grad_outputs: tuple) -> tuple | None:
                nonlocal held
                for k, j, nr in targets:
                    g = got[k][j] = grad_outputs[nr]
                    if g is not None:
                        held += g.nbytes
                    waiting[k] -= 1
                    if not waiting[k]:
                        ready.append(k)
                if held >= STREAM_BYTES:
                    take_ready()
                # a module returning a leaf tensor as is: its gradient must not reach its .grad
                return (None,) * len(grad_outputs) if leaf else None
            return arrived

        nodes: dict[Any, list[tuple[int, int, int]]] = {}
        for k, r in enumerate(records):
            for j, e in enumerate(r.edges):
                nodes.setdefault(e.node, []).append((k, j, e.output_nr))
        handles = [node.register_prehook(hook(targets, hasattr(node, "variable")))
                   for node, targets in nodes.items()]
        try:
            with self._not_recording():  # the generic path re-runs modules
                if nodes:  # (no inputs at all would mean every leaf's .grad)
                    torch.autograd.backward(losses, torch.full_like(losses, loss_scale),
                                            inputs=edges)
                take_ready()
                for k in range(len(records)):
                    if got[k] is not None:  # some output's node never ran: not reached that way
                        take(k)
        finally:
            for h in handles:
                h.remove()
        plans += [(p, _ParamPlan(u, self.strategy, dtype, grams)) for p, u in uses.values()]
        return plans

    def _linear(self, r: _Record, ds: list[int], batch: int, proof: _Proof) -> bool:
        """Whether a call may take :class:`_LinearPlan`, by what its proof fixes: an
        ``nn.Linear`` whose output (hence output gradient: autograd gives it the output's shape
        and dtype) is 2-D with the batch in dim 0, and the only call covering its parameters in
        the pass (no tied weight, no second call). :meth:`_plans` adds, per pass, a 2-D input
        with the batch in dim 0 (no broadcast input, no folded rows) of the output's dtype."""
        if type(r.rule) is not LinearRule:
            return False
        shape = r.outputs[0][0]
        return (len(shape) == 2 and ds[0] == 0 and shape[0] == batch
                and all(proof.calls.get(id(p)) == 1 for p in self._covered(r)))

    def _linear_plans(self, losses: Tensor, records: list[_Record], edges: list[GradientEdge],
                      dtype: torch.dtype, loss_scale: float) -> list[tuple[nn.Parameter, _LinearPlan]]:
        """:meth:`_plans` for a pass of :class:`_LinearPlan` calls only (an MLP): one
        ``autograd.grad`` for every output gradient, without a pre-hook per node. Streaming them
        would hold no less: each plan keeps its input and output gradient until the clip."""
        with self._not_recording():  # a checkpointed forward re-run in backward
            grads = torch.autograd.grad(losses, edges, torch.full_like(losses, loss_scale),
                                        allow_unused=True)  # one edge per 2-D Linear call
        return [plan for r, g in zip(records, grads) for plan in _linear_plan(r, g, dtype)]

    @contextmanager
    def _not_recording(self) -> Iterator[None]:
        """Module calls made meanwhile are the clipper's own (a replay, a rule's check re-running
        its module, a checkpointed forward re-run in backward), not a new pass to record."""
        self._recording = False
        try:
            yield
        finally:
            self._recording = True

    def remove(self) -> None:
        """Detach the hooks (the model behaves as before)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._records.clear()
