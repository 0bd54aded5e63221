"""DP noise added in place, chunk by chunk: the same stream as one flat draw, nothing skipped or
repeated, std sigma * C per coordinate, independent across parameters and chunks, and a fresh
OS-seeded generator every step in secure mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustml.privacy.noise as noise
from trustml.privacy import make_private
from trustml.privacy.noise import add_gaussian_
from trustml.training.objectives import ObjectiveOutput


def zero_loss(model, batch):
    return ObjectiveOutput((model(batch["x"]) * 0.0).sum(1))


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, d: int):
        self.x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i]}


@pytest.mark.parametrize("chunk", [7, 16, 1000, 10_000])
def test_chunks_walk_one_stream_over_every_coordinate(chunk):
    """Grads of odd sizes (a chunk spans several, a grad several chunks): each coordinate gets the
    next value of the generator's chunked stream exactly once, added to what was there, then
    divided; with one chunk for everything it is the single flat draw bit for bit."""
    shapes = [(13, 11), (5,), (1,), (40, 3), (2, 2, 3)]
    grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
    before = torch.cat([g.flatten() for g in grads])
    add_gaussian_(grads, 2.5, torch.Generator().manual_seed(7),
                  torch.empty(chunk, dtype=torch.float64), divisor=4.0)
    total = before.numel()
    replay, g = [], torch.Generator().manual_seed(7)
    for at in range(0, total, chunk):
        replay.append(torch.empty(min(chunk, total - at), dtype=torch.float64).normal_(
            0.0, 2.5, generator=g))
    expected = (before + torch.cat(replay)) / 4.0
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), expected, rtol=0, atol=0)
    if chunk >= total:
        flat = torch.empty(total, dtype=torch.float64).normal_(
            0.0, 2.5, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(torch.cat(replay), flat, rtol=0, atol=0)


def _noise_of_one_step(monkeypatch, chunk: int, secure: bool, steps: int = 1):
    """B * (start - after) of a zero-loss step with SGD lr 1: the noise alone, per parameter."""
    monkeypatch.setitem(noise.CHUNK, "cpu", chunk)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 70), nn.Linear(70, 30))
    kw = {} if secure else {"seed": 3, "secure_rng": False}
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), Rows(20, 60),
                      noise_multiplier=1.5, target_delta=1e-5, epochs=1, max_grad_norm=0.5,
                      batch_size=10, verify=False, **kw)
    out = []
    for _ in range(steps):
        start = [p.detach().clone() for p in model.parameters()]
        dp.step.step(model, zero_loss, {"x": Rows(20, 60).x[:12]})
        out.append([10 * (s - p.detach()) for s, p in zip(start, model.parameters())])
    return out


def test_chunked_step_noise_has_std_sigma_c_and_is_independent(monkeypatch):
    """A chunk (1000) much smaller than the model (6400 coordinates): std sigma * C = 0.75 on
    every parameter, no coordinate left unnoised, no chunk repeated, no correlation across
    parameters or across chunk boundaries."""
    (step,) = _noise_of_one_step(monkeypatch, 1000, secure=False)
    flat = torch.cat([n.flatten() for n in step])
    assert flat.numel() == 6400 and (flat != 0).all()
    assert flat.std().item() == pytest.approx(0.75, rel=0.05)
    assert abs(flat.mean().item()) < 4 * 0.75 / flat.numel() ** 0.5
    for n in step:
        assert n.std().item() == pytest.approx(0.75, rel=0.3 if n.numel() < 100 else 0.1)
    chunks = flat[:6000].view(6, 1000)
    corr = torch.corrcoef(chunks)
    off = corr[~torch.eye(6, dtype=torch.bool)]
    assert off.abs().max().item() < 4 / 1000**0.5  # distinct chunks: independent draws
    a, b = step[0].flatten()[:2100], step[2].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / 2100**0.5


def test_secure_mode_seeds_a_fresh_generator_every_step(monkeypatch):
    """Each step draws 64 fresh bits from the OS for its own generator: two steps (and two runs)
    get unrelated noise, also when the chunk is smaller than the model."""
    seeds = []
    real = noise.secrets.randbits

    def spy(k):
        seeds.append(real(k))
        return seeds[-1]

    monkeypatch.setattr(noise.secrets, "randbits", spy)
    first, second = _noise_of_one_step(monkeypatch, 1000, secure=True, steps=2)
    assert len(seeds) == 2 and seeds[0] != seeds[1]
    a, b = torch.cat([n.flatten() for n in first]), torch.cat([n.flatten() for n in second])
    assert a.std().item() == pytest.approx(0.75, rel=0.05)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / a.numel() ** 0.5


def _zero_loss_steps(model, dp, batch, size):
    """The noise of one zero-loss step with SGD lr 1, per trainable parameter: B * (start - after)."""
    start = [p.detach().clone() for p in model.parameters()]
    dp.step.step(model, zero_loss, batch)
    return [size * (s - p.detach()) for s, p in zip(start, model.parameters())]


@pytest.mark.parametrize("chunk", [1 << 16, 500])  # one chunk for all, and several
def test_noise_plan_follows_the_parameter_layout(monkeypatch, chunk):
    """The noise plan (groups, buffer, views) is made once per layout: a layer unfrozen or frozen
    after the first step, and a cast to float64, are noised from that step on with std sigma * C
    in the new dtype, and a frozen layer gets none."""
    monkeypatch.setitem(noise.CHUNK, "cpu", chunk)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 70), nn.Linear(70, 30))
    model[0].requires_grad_(False)
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), Rows(20, 60),
                      noise_multiplier=1.5, target_delta=1e-5, epochs=1, max_grad_norm=0.5,
                      batch_size=10, verify=False, seed=3, secure_rng=False)
    x = Rows(20, 60).x[:12]
    w0, b0, w1, b1 = _zero_loss_steps(model, dp, {"x": x}, 10)
    assert not w0.any() and not b0.any()  # frozen: no noise
    assert w1.std().item() == pytest.approx(0.75, rel=0.1)

    model[0].requires_grad_(True)  # unfrozen after the plan was made
    w0, b0, w1, b1 = _zero_loss_steps(model, dp, {"x": x}, 10)
    assert w0.std().item() == pytest.approx(0.75, rel=0.1) and (w0 != 0).all()
    assert w1.std().item() == pytest.approx(0.75, rel=0.1)

    model[1].requires_grad_(False)
    w0, b0, w1, b1 = _zero_loss_steps(model, dp, {"x": x}, 10)
    assert w0.std().item() == pytest.approx(0.75, rel=0.1) and not w1.any() and not b1.any()

    model.double()  # the same Parameter objects, now float64: a new plan in float64
    model[1].requires_grad_(True)
    w0, b0, w1, b1 = _zero_loss_steps(model, dp, {"x": x.double()}, 10)
    assert model[0].weight.dtype == torch.float64
    flat = torch.cat([w0.flatten(), w1.flatten()])
    assert flat.std().item() == pytest.approx(0.75, rel=0.05) and (flat != 0).all()


def test_gaussian_noise_of_one_chunk_is_the_flat_draw():
    """The planned single-chunk path adds exactly the single flat draw, then divides, on
    gradients of any strides (a transposed one included)."""
    shapes = [torch.Size((13, 11)), torch.Size((5,)), torch.Size((4, 3))]
    grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads[2] = torch.randn(3, 4, dtype=torch.float64).T  # not contiguous
    before = torch.cat([g.flatten() for g in grads])
    plan = noise.GaussianNoise(shapes, torch.device("cpu"), torch.float64, divisor=4.0)
    plan.add_(grads, 2.5, torch.Generator().manual_seed(7))
    flat = torch.empty(before.numel(), dtype=torch.float64).normal_(
        0.0, 2.5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), (before + flat) / 4.0,
                               rtol=0, atol=0)
