"""Clipped sums written in place: a later physical batch adds into ``.grad`` (addmm_ / index_add_ /
addmv_, no temporary of the parameter's size), in any order of the parameters, and a bounded Gram
cache; each checked in float64 against one autograd call per sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trustml.privacy import PerSampleClipper
from trustml.privacy.factored import Grams

B, T, V, D = 7, 3, 9, 4


class TiedSeq(nn.Module):
    """An embedding tied to an output layer (one parameter, an index use and a dense use), a
    sequence Linear and a LayerNorm: every kind of plan (merged factors, dense, ghost)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.norm = nn.Embedding(V, D), nn.Linear(D, D), nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.norm(torch.tanh(self.lin(self.emb(ids)))))


def losses_of(model, ids):
    out = model(ids)
    return (out**2).flatten(1).sum(1) + out.flatten(1).sin().sum(1)


def clipped_sum_by_loop(model, ids, max_norm):
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(ids)):
        grads = torch.autograd.grad(losses_of(model, ids[i : i + 1]).sum(), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        for t, g in zip(total, grads):
            t += g * min(1.0, max_norm / norm.item())
    return total


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialise"])
def test_physical_batches_add_into_grad_exactly(strategy):
    torch.manual_seed(3)
    model = TiedSeq().double()
    ids = torch.randint(0, V, (B, T))
    expected = clipped_sum_by_loop(model, ids, 0.7)
    clipper = PerSampleClipper(model, 0.7, strategy=strategy)
    model.zero_grad(set_to_none=True)
    for part in (slice(0, 2), slice(2, 3), slice(3, B)):  # the later parts accumulate in place
        clipper.backward(losses_of(model, ids[part]))
    grads = [p.grad for p in model.parameters()]
    for g, ref in zip(grads, expected):
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)
    clipper.backward(losses_of(model, ids[:2]))  # and the buffers are the same tensors
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


def test_gram_cache_keeps_only_recent_grams_and_stays_exact():
    grams = Grams(keep=2)
    a, b, c = (torch.randn(3, 5, 4, dtype=torch.float64) for _ in range(3))
    first = grams(a, a)
    assert grams(a, a) is first  # a repeated read shares it
    grams(b, b), grams(c, c)  # two newer Grams: the first is dropped
    assert len(grams._cache) == 2
    again = grams(a, a)
    assert again is not first
    torch.testing.assert_close(again, torch.bmm(a, a.transpose(1, 2)), rtol=0, atol=0)
    torch.testing.assert_close(grams(c, a), torch.bmm(c, a.transpose(1, 2)))
