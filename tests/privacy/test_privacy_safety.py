"""DPStep safety: no update without noise when the trainable set changes, unequal splits of
ambiguous batches, and the first-batch self-check (privacy.verify)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from trustml.privacy import make_private
from trustml.privacy.generic import Refusal
from trustml.privacy.verify import verify
from trustml.training.objectives import ObjectiveOutput

T = 4


class Rows(Dataset):
    def __init__(self, n: int, shape=(5,), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, *shape, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def squared(model, batch):
    out = model(batch["x"])
    return ObjectiveOutput(((out.flatten(1)[:, :2] - batch["y"]) ** 2).sum(1))


def zero_loss(model, batch):
    return ObjectiveOutput(model(batch["x"]).flatten(1).sum(1) * 0.0)


def private(model, data, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    args = {"target_delta": 1e-5, "epochs": 1, "max_grad_norm": 0.5, "batch_size": len(data)}
    args.update(kw)
    return make_private(model, opt, data, **args)


def clipped_sum(model, objective, batch, c):
    """Reference: one autograd call per sample, clip to c, sum (trainable parameters only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    n = len(next(iter(batch.values())))
    for i in range(n):
        loss = objective(model, {k: v[i : i + 1] for k, v in batch.items()}).losses.sum()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        for t, g in zip(total, grads):
            t += g * (min(1.0, c / norm.item()) if norm > 0 else 1.0)
    return params, total


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_unfrozen_later_is_clipped():
    """Gradual unfreezing: the first layer, frozen at make_private, is clipped from the step on
    which it is unfrozen, exactly like a layer trainable from the start."""
    data = Rows(8)
    data.x = data.x.double()
    data.y = data.y.double()
    model = mlp()
    model[0].requires_grad_(False)
    dp = private(model, data, noise_multiplier=0.0)
    batch = {"x": data.x, "y": data.y}
    before = model[0].weight.detach().clone()
    dp.step.step(model, squared, batch)
    assert torch.equal(model[0].weight, before)  # frozen: not updated
    model[0].requires_grad_(True)
    start = [p.detach().clone() for p in model.parameters()]
    params, total = clipped_sum(model, squared, batch, 0.5)
    assert len(params) == 4
    dp.step.step(model, squared, batch)
    for p, s, t in zip(model.parameters(), start, total):
        torch.testing.assert_close(p.detach(), s - t / 8, rtol=1e-10, atol=1e-12)


def test_unfrozen_later_is_noised_and_frozen_later_is_left_alone():
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 2))
    model[0].requires_grad_(False)
    dp = private(model, Rows(16, shape=(40,)), noise_multiplier=2.0)
    batch = {"x": torch.randn(16, 40), "y": torch.zeros(16, 2)}
    model[0].requires_grad_(True)
    model[2].requires_grad_(False)
    first, last = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    dp.step.step(model, zero_loss, batch)
    moved = model[0].weight.detach() - first
    assert moved.std().item() == pytest.approx(2.0 * 0.5 / 16, rel=0.1)  # sigma C / B
    assert torch.equal(model[2].weight, last)


class Gate(nn.Module):
    """A generic-path module that uses a Parameter added to it after make_private."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x):
        extra = getattr(self, "extra", None)
        return x * self.scale + (0.0 if extra is None else torch.tanh(x) * extra)


def test_parameter_added_later_is_picked_up():
    data = Rows(6)
    data.x, data.y = data.x.double(), data.y.double()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 5).double(), Gate())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = make_private(model, opt, data, noise_multiplier=0.0, target_delta=1e-5, epochs=1,
                      max_grad_norm=0.5, batch_size=6)
    batch = {"x": data.x, "y": data.y}
    dp.step.step(model, squared, batch)
    model[1].extra = nn.Parameter(torch.full((5,), 0.3, dtype=torch.float64))
    opt.add_param_group({"params": [model[1].extra]})
    start = [p.detach().clone() for p in model.parameters()]
    _, total = clipped_sum(model, squared, batch, 0.5)
    dp.step.step(model, squared, batch)
    for p, s, t in zip(model.parameters(), start, total):
        torch.testing.assert_close(p.detach(), s - t / 6, rtol=1e-10, atol=1e-12)


class MaskedMix(nn.Module):
    """A generic-path block with a (T, T) mask shared by all samples: sliced as if it were per
    sample when T == batch size, so such a batch is ambiguous."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))

    def forward(self, x, mask):
        scores = (x @ self.w @ x.transpose(-1, -2)).masked_fill(mask, -1e9)
        return scores.softmax(-1) @ x


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = MaskedMix()

    def forward(self, x):
        return self.mix(x, torch.ones(T, T, dtype=torch.bool).triu(1))


def test_ambiguous_batch_is_split_and_retried():
    data = Rows(T, shape=(T, 3))
    data.x, data.y = data.x.double(), data.y.double()
    torch.manual_seed(2)
    model = Masked()
    batch = {"x": data.x, "y": data.y}
    start = [p.detach().clone() for p in model.parameters()]
    _, total = clipped_sum(model, squared, batch, 0.5)
    dp = private(model, data, noise_multiplier=0.0, verify=False)
    metrics = dp.step.step(model, squared, batch)  # batch size 4 == T: split into 3 + 1
    assert metrics["batch_size"] == T
    for p, s, t in zip(model.parameters(), start, total):
        torch.testing.assert_close(p.detach(), s - t / T, rtol=1e-10, atol=1e-12)


def test_verification_recorded_and_mismatch_refused():
    data = Rows(8)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    dp = private(model, data, noise_multiplier=1.0)
    assert dp.verification is None
    dp.step.step(model, squared, {"x": data.x, "y": data.y})
    assert dp.verification.samples == 4 and dp.verification.max_rel_err < 1e-6
    assert str(dp.verification).startswith("verified on 4 samples, max rel err")
    # a broken engine is caught: a rule that doubles the Linear weight's per-sample gradient
    from trustml.privacy import layers

    class Doubled(layers.LinearRule):
        def uses(self, module, saved, grads, batch):
            for p, use in super().uses(module, saved, grads, batch):
                yield p, (layers.Factored(use.x * 2, use.y) if p is module.weight else use)

    original = layers.RULES[nn.Linear]
    layers.RULES[nn.Linear] = Doubled()
    try:
        with pytest.raises(Refusal, match=r"self-check failed.*relative error"):
            verify(model, squared, {"x": data.x, "y": data.y}, dp.clipper)
    finally:
        layers.RULES[nn.Linear] = original


def test_verify_off_skips_the_check():
    data = Rows(8)
    model = nn.Sequential(nn.Linear(5, 2))
    dp = private(model, data, noise_multiplier=1.0, verify=False)
    dp.step.step(model, squared, {"x": data.x, "y": data.y})
    assert dp.verification is None
