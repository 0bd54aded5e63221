"""The clipper takes each layer's output gradient while autograd runs (clipping.py, ``_plans``):
what it holds during the backward is bounded, the gradients stay exact against the per-sample loop
in float64 on every shape of pass the streaming has to get right, and a refusal mid-backward writes
no ``.grad``."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from test_conv_rules import Twice, assert_exact
from test_conv_rules import loss_fn as conv_loss
from test_privacy_clipping import STRATEGIES, Gated, naive, sq_loss
from trustml.privacy import PerSampleClipper
from trustml.privacy import clipping
from trustml.privacy import conv as conv_rules
from trustml.privacy.conv import ConvFactors
from trustml.privacy.generic import Refusal

B, T = 6, 3


def _watch_output_grads(clipper: PerSampleClipper, model: nn.Module, monkeypatch) -> list[int]:
    """Note, each time a layer's rule runs, how many output gradients of the hooked layers that
    autograd has produced so far in this pass are still alive (held by the clipper or autograd)."""
    made: list[weakref.ref] = []
    alive: list[int] = []

    def note(module, args, output):
        output.register_hook(lambda g: made.append(weakref.ref(g)))

    for module in clipper._hooked:
        module.register_forward_hook(note)
    for rule in {id(entry[1]): entry[1] for entry in clipper._rules.values()}.values():

        def watched(mod, saved, grads, batch, uses=rule.uses):
            alive.append(sum(ref() is not None for ref in made))
            yield from uses(mod, saved, grads, batch)

        monkeypatch.setattr(rule, "uses", watched)  # rules are shared: undone after the test
    return alive


def test_output_gradients_are_not_all_held_at_once(monkeypatch):
    """A 12-layer stack: materialised layers (Linear, LayerNorm) drop their output gradient as
    soon as their per-sample gradients exist, so whenever a rule runs at most two output
    gradients are alive (when autograd handed over all twelve at the end of the backward, the
    first rule to run saw all twelve)."""
    monkeypatch.setattr(clipping, "STREAM_BYTES", 0)  # these are bytes: take each as it arrives
    torch.manual_seed(0)
    depth = 6
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh()]
    model = nn.Sequential(*layers).double()
    clipper = PerSampleClipper(model, 1.0, strategy="materialise")
    x, y = torch.randn(B, T, 8, dtype=torch.float64), torch.randn(B, T, 8, dtype=torch.float64)
    clipper.backward(sq_loss(model, x, y))  # the first pass proves the structure
    model.zero_grad(set_to_none=True)
    alive = _watch_output_grads(clipper, model, monkeypatch)
    clipper.backward(sq_loss(model, x, y))  # a steady pass
    assert len(alive) == 2 * depth
    assert max(alive) <= 2, alive


class Fork(nn.Module):
    """A layer with two outputs (no fast rule: the generic path), from two different autograd
    nodes; ``drop`` leaves one of them out of the loss."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * self.w, x.tanh() * self.w.sin()


class Split(nn.Module):
    """A layer with two outputs from ONE autograd node (a split)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(4, 8) / 2)

    def forward(self, x):
        return (x @ self.proj).chunk(2, dim=-1)


class Streams(nn.Module):
    """Everything whose output gradients arrive in an order, or a number, other than the
    forward's: a tied weight read by an embedding and a head, a layer called twice, a layer whose
    output never reaches the loss, two-output calls reached through one output only (from two
    nodes and from one node), and generic-path calls."""

    def __init__(self, drop: bool):
        super().__init__()
        self.drop = drop
        self.emb = nn.Embedding(9, 4)
        self.mix = nn.Linear(4, 4)
        self.side = nn.Linear(4, 4)
        self.fork, self.split, self.gated = Fork(), Split(), Gated()
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        self.side(h)  # computed, never used: its call does not reach the loss
        h = self.mix(torch.tanh(self.mix(h)))
        a, b = self.fork(h)
        c, d = self.split(a if self.drop else a + b)
        h = self.gated(c if self.drop else c * d)
        return self.head(h)


# each call taken as it arrives, or (small gradients under the default budget) after the backward
BUDGETS = [0, clipping.STREAM_BYTES]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("drop", [False, True])
def test_exact_whatever_the_arrival_order(strategy, drop, budget, monkeypatch):
    monkeypatch.setattr(clipping, "STREAM_BYTES", budget)
    torch.manual_seed(3)
    model = Streams(drop).double()
    ids, y = torch.randint(0, 9, (B, T)), torch.randn(B, T, 9, dtype=torch.float64)
    norms_ref, _ = naive(model, sq_loss, [ids, y])
    max_norm = norms_ref.median().item()  # some samples clipped, some not
    _, grads_ref = naive(model, sq_loss, [ids, y], max_norm)
    clipper = PerSampleClipper(model, max_norm, strategy=strategy)
    torch.testing.assert_close(clipper.backward(sq_loss(model, ids, y)), norms_ref,
                               rtol=1e-6, atol=1e-12)
    for (name, p), ref in zip(model.named_parameters(), grads_ref):
        if name.startswith("side."):  # never reached the loss: no .grad, as with loss.backward()
            assert p.grad is None and not ref.any(), name
        else:
            torch.testing.assert_close(p.grad, ref, rtol=1e-6, atol=1e-10, msg=name)


def test_exact_on_a_steady_pass_accumulating():
    """The second pass of a structure (proof cached) accumulates into .grad exactly."""
    torch.manual_seed(4)
    model = Streams(True).double()
    ids, y = torch.randint(0, 9, (B, T)), torch.randn(B, T, 9, dtype=torch.float64)
    clipper = PerSampleClipper(model, 0.3)
    clipper.backward(sq_loss(model, ids, y))
    once = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    assert sum(g is not None for g in once) == len(once) - 2  # all but the unreached side layer
    clipper.backward(sq_loss(model, ids, y))
    for p, g in zip(model.parameters(), once):
        assert p.grad is None if g is None else torch.allclose(p.grad, 2 * g, rtol=1e-12)


@pytest.mark.parametrize("budget", BUDGETS)
def test_refusal_mid_backward_writes_no_grad(budget, monkeypatch):
    """A rule refusing while autograd runs (here the third layer to arrive), or after it, stops
    the backward with the same Refusal, naming the module, and no parameter's .grad has been
    touched."""
    monkeypatch.setattr(clipping, "STREAM_BYTES", budget)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    clipper = PerSampleClipper(model, 1.0)
    x, y = torch.randn(B, T, 4), torch.randn(B, T, 4)  # rows per sample: rules, not _LinearPlan
    clipper.backward(sq_loss(model, x, y))
    before = [p.grad.clone() for p in model.parameters()]
    rule = clipper._rules[model[0]][1]
    calls = []

    def refusing(mod, saved, grads, batch):
        calls.append(mod)
        if mod is model[0]:
            raise Refusal("cannot")
        yield from type(rule).uses(rule, mod, saved, grads, batch)

    monkeypatch.setattr(rule, "uses", refusing)  # the three Linear layers share one rule
    with pytest.raises(Refusal, match=r"^module 0 \(Linear\): cannot$"):
        clipper.backward(sq_loss(model, x, y))
    assert calls == [model[4], model[2], model[0]]  # the other two were taken first
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)


def test_stray_use_refused_before_any_grad():
    """A trainable parameter no recorded call covers, used functionally: the per-pass graph walk
    refuses it before the backward runs (the streamed backward no longer asks autograd for that
    parameter's gradient), and nothing is accumulated into any .grad."""
    model = nn.Sequential(nn.Linear(3, 2))
    extra = nn.Parameter(torch.randn(2))
    model.register_parameter("extra", extra)
    clipper = PerSampleClipper(model, 1.0)
    with pytest.raises(Refusal, match=r"parameter extra \(Sequential\) reaches the loss outside"):
        clipper.backward(((model(torch.randn(4, 3)) * model.extra) ** 2).sum(1))
    assert all(p.grad is None for p in model.parameters())


HELD_CASES = [  # small output maps of wide patches: input + output gradient < per-sample grads
    (nn.Conv2d, (8, 8, 3), dict(padding=1), (5, 8, 3, 3)),
    (nn.Conv2d, (8, 8, 3), dict(stride=2, padding=1, dilation=2, groups=2,
                                padding_mode="circular"), (5, 8, 5, 5)),
    (nn.Conv1d, (6, 6, 3), dict(padding="same", groups=2, padding_mode="reflect"), (5, 6, 4)),
    (nn.Conv3d, (6, 6, 2), dict(groups=2, bias=False), (5, 6, 2, 2, 3)),
]


@pytest.mark.parametrize("case", range(len(HELD_CASES)))
def test_convolution_held_as_input_and_output_gradient(monkeypatch, case):
    """A convolution whose per-sample gradients are larger than its input and output gradient
    keeps those two (ConvFactors): norms chunk by chunk, the clipped sum as one weight-gradient
    convolution, exact in float64 for a fresh .grad and when accumulating into one, and for a
    layer called twice (its two calls' gradients summed per sample before the norm)."""
    torch.manual_seed(case)
    cls, args, kwargs, shape = HELD_CASES[case]
    summed = []
    real = ConvFactors.weighted_sum
    monkeypatch.setattr(ConvFactors, "weighted_sum",
                        lambda self, c: summed.append(1) or real(self, c))
    monkeypatch.setattr(conv_rules, "CHUNK_ELEMENTS", 1)  # one sample per chunk: several chunks
    conv = cls(*args, **kwargs)
    assert_exact(conv, torch.randn(shape))
    assert summed  # the held route was taken
    model = nn.Sequential(conv, nn.Tanh()).double()
    model.zero_grad(set_to_none=True)
    x = torch.randn(shape, dtype=torch.float64)
    clipper = PerSampleClipper(model, 0.5)
    clipper.backward(conv_loss(model, x))
    once = [p.grad.clone() for p in model.parameters()]
    clipper.backward(conv_loss(model, x))
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=1e-14)


def test_convolution_called_twice_with_held_factors():
    torch.manual_seed(7)
    assert_exact(Twice(8), torch.randn(5, 8, 3, 3))  # 8 channels on 3x3 maps: factors held
