"""The Linear fast path (clipping._LinearPlan: 2-D input, one call per pass) against one autograd
call per sample in float64, in a model where only some layers may take it: a tied pair, a layer
called twice and a 3-D input must not; frozen-bias, bias-free and frozen-weight layers must."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trustml.privacy import PerSampleClipper
from trustml.privacy import clipping


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(5, 6)  # fast
        self.frozen_bias = nn.Linear(6, 6)  # fast, weight only
        self.frozen_bias.bias.requires_grad_(False)
        self.no_bias = nn.Linear(6, 3, bias=False)  # fast
        self.frozen_weight = nn.Linear(3, 6)  # fast, bias only
        self.frozen_weight.weight.requires_grad_(False)
        self.twice = nn.Linear(6, 6)  # called twice: not fast
        self.tied_a, self.tied_b = nn.Linear(6, 4), nn.Linear(6, 4)  # one weight: not fast
        self.tied_b.weight = self.tied_a.weight
        self.seq = nn.Linear(4, 4)  # 3-D input: not fast
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        h = torch.tanh(self.frozen_weight(self.no_bias(torch.tanh(self.frozen_bias(
            torch.tanh(self.first(x)))))))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        h = self.tied_a(h) + self.tied_b(h.sin())
        s = self.seq(torch.stack([h, h.cos()], 1))  # (B, 2, 4)
        return self.norm(s.sum(1) + h)


FAST = ("first", "frozen_bias", "no_bias", "frozen_weight")


def losses_of(model, x):
    out = model(x)
    return (out**2).sum(1) + out.sin().sum(1)


def by_loop(model, x, max_norm, params=None):
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(losses_of(model, x[i : i + 1]).sum(), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(norm)
        for t, g in zip(total, grads):
            t += g * min(1.0, max_norm / norm.item())
    return torch.stack(norms), total


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialise"])
@pytest.mark.parametrize("batch", [1, 6])
def test_fast_linear_plans_match_the_per_sample_loop(strategy, batch, monkeypatch):
    torch.manual_seed(batch)
    model = Mixed().double()
    x = torch.randn(batch, 5, dtype=torch.float64)
    norms_ref, _ = by_loop(model, x, float("inf"))
    max_norm = norms_ref.median().item() if batch > 1 else norms_ref.item() / 2  # some clipped
    _, expected = by_loop(model, x, max_norm)
    taken = []
    real = clipping._LinearPlan.__init__

    def spy(self, weight, bias, *rest):
        taken.append(weight if weight is not None else bias)
        real(self, weight, bias, *rest)

    monkeypatch.setattr(clipping._LinearPlan, "__init__", spy)
    whole = []  # the all-Linear pass (one autograd.grad) must not be taken by this model
    monkeypatch.setattr(PerSampleClipper, "_linear_plans", lambda *a: whole.append(a))
    clipper = PerSampleClipper(model, max_norm, strategy=strategy)
    model.zero_grad(set_to_none=True)
    clipper.backward(losses_of(model, x[:0]))  # an empty batch writes nothing
    norms = clipper.backward(losses_of(model, x))
    torch.testing.assert_close(norms, norms_ref, rtol=1e-9, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    for p, ref in zip(params, expected):
        torch.testing.assert_close(p.grad, ref, rtol=1e-9, atol=1e-12)
    wanted = [] if strategy == "materialise" else [
        getattr(model, n).weight if n != "frozen_weight" else model.frozen_weight.bias
        for n in FAST]
    assert {id(p) for p in taken} == {id(p) for p in wanted}
    assert len(taken) == len(wanted)
    # a second physical batch adds into the same .grad tensors (addmm_ / addmv_ in place)
    taken.clear()
    grads = [p.grad for p in params]
    clipper.backward(losses_of(model, x))
    assert all(p.grad is g for p, g in zip(params, grads))
    for p, ref in zip(params, expected):
        torch.testing.assert_close(p.grad, 2 * ref, rtol=1e-9, atol=1e-12)
    assert len(taken) == len(wanted)
    assert not whole


class AllLinear(nn.Module):
    """Only fast Linear calls: the whole pass is one autograd.grad (_linear_plans); one layer's
    output never reaches the loss."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(5, 7)
        self.first.bias.requires_grad_(False)
        self.no_bias = nn.Linear(7, 3, bias=False)
        self.frozen_weight = nn.Linear(3, 4)
        self.frozen_weight.weight.requires_grad_(False)
        self.unused = nn.Linear(4, 2)

    def forward(self, x):
        h = self.frozen_weight(torch.tanh(self.no_bias(torch.tanh(self.first(x)))))
        self.unused(h)  # called, not in the loss
        return h


@pytest.mark.parametrize("batch", [1, 6])
def test_all_linear_pass_matches_the_per_sample_loop(batch, monkeypatch):
    torch.manual_seed(batch + 10)
    model = AllLinear().double()
    x = torch.randn(batch, 5, dtype=torch.float64)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "unused" not in n]
    norms_ref, _ = by_loop(model, x, float("inf"), params)
    max_norm = norms_ref.median().item() if batch > 1 else norms_ref.item() / 2
    _, expected = by_loop(model, x, max_norm, params)
    whole = []
    real = PerSampleClipper._linear_plans
    monkeypatch.setattr(PerSampleClipper, "_linear_plans",
                        lambda *a: whole.append(1) or real(*a))
    clipper = PerSampleClipper(model, max_norm)
    for scale in (1.0, 4.0):  # a second physical batch adds in place, loss scale undone
        norms = clipper.backward(losses_of(model, x), loss_scale=scale)
        torch.testing.assert_close(norms, norms_ref, rtol=1e-9, atol=1e-12)
        for p, ref in zip(params, expected):
            torch.testing.assert_close(p.grad, ref * (1 + (scale > 1)), rtol=1e-9, atol=1e-12)
    assert model.unused.weight.grad is None and model.unused.bias.grad is None
    assert len(whole) == 2  # both passes


def test_fast_linear_scales_either_factor():
    """Wide and narrow layers (the smaller factor is the one scaled), and float32 parameters with
    the loss scale of fp16 training, against the float64 loop."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    norms_ref, _ = by_loop(model, x, float("inf"))
    max_norm = norms_ref.median().item()
    _, expected = by_loop(model, x, max_norm)
    model32 = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 2))
    model32.load_state_dict(model.state_dict())
    clipper = PerSampleClipper(model32, max_norm)
    norms = clipper.backward(losses_of(model32, x.float()), loss_scale=8.0)
    torch.testing.assert_close(norms.double(), norms_ref, rtol=1e-5, atol=1e-6)
    for p, ref in zip(model32.parameters(), expected):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad.double(), ref, rtol=1e-5, atol=1e-6)


class Checkpointed(nn.Module):
    """Its middle Linear runs under activation checkpointing: backward re-runs that forward,
    which must not be recorded as a call of the next pass."""

    def __init__(self):
        super().__init__()
        self.first, self.mid, self.last = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(
            lambda t: torch.tanh(self.mid(t)), torch.tanh(self.first(x)), use_reentrant=False)
        return self.last(h)


def test_all_linear_pass_with_checkpointing_records_no_recomputed_call():
    torch.manual_seed(7)
    model = Checkpointed().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    norms_ref, _ = by_loop(model, x, float("inf"))
    max_norm = norms_ref.median().item()
    _, expected = by_loop(model, x, max_norm)
    clipper = PerSampleClipper(model, max_norm)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        norms = clipper.backward(losses_of(model, x))
        assert not clipper._records  # nothing recorded by the backward's re-run forward
        torch.testing.assert_close(norms, norms_ref, rtol=1e-9, atol=1e-12)
        for p, ref in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, ref, rtol=1e-9, atol=1e-12)
