"""DP noise drawn straight into ``.grad`` before the clipped sums are added onto it: std
sigma * C / B per coordinate (the division by the expected batch size folded into the std and the
clip factors), added exactly once per logical batch however it is split into physical batches,
on every noised parameter (tied, without a gradient, small or large groups) and on no frozen one,
from one generator stream, and from a fresh OS-seeded generator every step in secure mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trustml.privacy.noise as noise
from trustml.privacy import make_private
from trustml.privacy.noise import GaussianNoise
from trustml.training.objectives import ObjectiveOutput

SIGMA, CLIP, SIZE = 1.5, 0.5, 10
V, D, T = 50, 40, 3


class Tied(nn.Module):
    """A tied embedding / output layer (one parameter, two uses), a sequence Linear, a LayerNorm,
    a Linear the forward never calls (no clipped gradient: noise only) and a frozen Linear."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.norm = nn.Embedding(V, D), nn.Linear(D, D), nn.LayerNorm(D)
        self.frozen = nn.Linear(D, D).requires_grad_(False)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight
        self.unused = nn.Linear(30, 30)

    def forward(self, ids):
        return self.head(self.norm(torch.tanh(self.frozen(self.lin(self.emb(ids))))))


def squared(model, batch):
    out = model(batch["ids"])
    return ObjectiveOutput((out**2).flatten(1).sum(1) + out.flatten(1).sin().sum(1))


class Ids(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.ids = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"ids": self.ids[i]}


def clipped_sum_by_loop(model, ids, max_norm):
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(ids)):
        losses = squared(model, {"ids": ids[i : i + 1]}).losses.sum()
        grads = torch.autograd.grad(losses, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        for t, g in zip(total, grads):
            t += g * min(1.0, max_norm / norm.item())
    return total


def one_step(sigma: float, physical: int | None, seed: int = 5, loss_scale: float = 1.0,
             secure: bool = False, steps: int = 1):
    """Each step's update per trainable parameter (SGD, lr 1: the DP gradient itself)."""
    torch.manual_seed(0)
    model = Tied().double()
    kw = {} if secure else {"secure_rng": False, "seed": seed}
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), Ids(20),
                      noise_multiplier=sigma, target_delta=1e-5, epochs=1, max_grad_norm=CLIP,
                      batch_size=SIZE, physical_batch_size=physical, verify=False, **kw)
    dp.step.loss_scale = loss_scale
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p.detach().clone() for p in model.frozen.parameters()]
    out = []
    for _ in range(steps):
        start = [p.detach().clone() for p in params]
        dp.step.step(model, squared, {"ids": Ids(20).ids[:12]})
        out.append([s - p.detach() for s, p in zip(start, params)])
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.frozen.parameters()))
    return model, out


@pytest.mark.parametrize("small", [1 << 16, 100])  # one flat group, and one draw per parameter
@pytest.mark.parametrize("physical", [None, 5, 1])
@pytest.mark.parametrize("loss_scale", [1.0, 2.0**10])
def test_noiseless_update_is_the_clipped_sum_over_b_in_float64(monkeypatch, small, physical,
                                                               loss_scale):
    """sigma 0: the update is sum_i c_i g_i / B to float64 precision, physical batches added onto
    each other, a parameter without a gradient left at zero, a tied weight's two uses summed."""
    monkeypatch.setitem(noise.SMALL, "cpu", small)
    _, (update,) = one_step(0.0, physical, loss_scale=loss_scale)
    torch.manual_seed(0)
    fresh = Tied().double()  # the model before its step
    expected = clipped_sum_by_loop(fresh, Ids(20).ids[:12], CLIP)
    for u, e in zip(update, expected):
        torch.testing.assert_close(u, e / SIZE, rtol=1e-10, atol=1e-13)
    assert not update[-1].any() and not update[-2].any()  # the unused Linear: no gradient


def noise_of(physical: int | None, seed: int = 5, secure: bool = False, steps: int = 1):
    """SIZE * (noised update - noiseless update): the noise alone, per parameter, in N(0, 1)
    units of sigma * C."""
    _, noisy = one_step(SIGMA, physical, seed, secure=secure, steps=steps)
    _, (clean,) = one_step(0.0, physical)
    return [[SIZE * (a - b) / (SIGMA * CLIP) for a, b in zip(step, clean)] for step in noisy]


@pytest.mark.parametrize("small", [1 << 16, 100])
def test_noise_is_added_exactly_once_however_the_batch_is_split(monkeypatch, small):
    """The same seed gives the same noise for one physical batch, five and twelve (twice would
    double its variance, zero times leave none): std sigma * C / B on every parameter, the
    tied weight (two uses, one draw) and the unused Linear included."""
    monkeypatch.setitem(noise.SMALL, "cpu", small)
    (whole,) = noise_of(None)
    for physical in (5, 1):
        (split,) = noise_of(physical)
        for a, b in zip(whole, split):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    flat = torch.cat([n.flatten() for n in whole])
    assert flat.numel() == V * D + D * D + D + 2 * D + 30 * 30 + 30
    assert flat.std().item() == pytest.approx(1.0, rel=0.05)
    assert abs(flat.mean().item()) < 4 / flat.numel() ** 0.5
    for n in whole:
        if n.numel() >= 100:
            assert n.std().item() == pytest.approx(1.0, rel=0.15)
        assert (n != 0).all()


def test_each_parameters_grad_is_started_once_per_logical_batch(monkeypatch):
    """Every noised parameter gets its noise from one ``start`` per logical batch (the clipper
    calls it for the first physical batch's sum, DPStep for a parameter left without one)."""
    calls: list[int] = []
    real = GaussianNoise.start

    def spy(self, p):
        grad = real(self, p)
        if grad is not None:
            calls.append(id(p))
        return grad

    monkeypatch.setattr(GaussianNoise, "start", spy)
    monkeypatch.setitem(noise.SMALL, "cpu", 100)
    torch.manual_seed(0)
    model = Tied().double()
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), Ids(20),
                      noise_multiplier=SIGMA, target_delta=1e-5, epochs=1, max_grad_norm=CLIP,
                      batch_size=SIZE, physical_batch_size=4, verify=False)
    trainable = sorted(id(p) for p in model.parameters() if p.requires_grad)
    for _ in range(2):
        calls.clear()
        dp.step.step(model, squared, {"ids": Ids(20).ids[:12]})
        assert sorted(calls) == trainable


def test_per_coordinate_variance_with_a_fixed_generator():
    """Each coordinate's variance over many draws of a test-only generator is (sigma C / B)^2,
    for a small (one flat draw) and a large (one draw per tensor) group alike, and consecutive
    tensors and steps are uncorrelated."""
    params = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in [(30, 20), (7,), (1,)]]
    big = [nn.Parameter(torch.zeros(s)) for s in [(70_000,), (3, 5)]]  # over SMALL: one by one
    plan = GaussianNoise(params + big)
    generator = torch.Generator().manual_seed(11)
    draws = []
    for _ in range(400):
        plan.begin(0.25, generator)
        draws.append(torch.cat([plan.start(p).flatten().double() for p in params + big]))
    draws = torch.stack(draws)
    var = draws.var(0)  # per coordinate, over the 400 steps
    assert var.mean().item() == pytest.approx(0.0625, rel=0.01)
    assert (var / 0.0625 - 1).abs().max().item() < 6 * (2 / 399) ** 0.5
    assert draws.mean().abs().max().item() < 6 * 0.25 / 400**0.5
    a, b = draws[:, 0], draws[:, 600]  # two tensors of the small group
    c, d = draws[:-1, 700], draws[1:, 700]  # one coordinate, two consecutive steps
    for x, y in ((a, b), (c, d)):
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 4 / 400**0.5


def test_one_stream_small_group_is_the_flat_draw_and_large_tensors_are_drawn_whole():
    """A small group is the single flat draw bit for bit; a large one's tensors are consecutive
    draws of the same stream (nothing skipped or repeated); a parameter outside the plan, or a
    large one at std 0, is left to the clipper (None), a small group at std 0 is zeros."""
    small = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in [(13, 11), (5,), (4, 3)]]
    plan = GaussianNoise(small)
    plan.begin(2.5, torch.Generator().manual_seed(7))
    got = [plan.start(p) for p in small]
    assert plan.start(small[0]) is got[0]  # drawn once per logical batch
    flat = torch.empty(143 + 5 + 12, dtype=torch.float64).normal_(
        0.0, 2.5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(torch.cat([g.flatten() for g in got]), flat, rtol=0, atol=0)
    assert plan.start(nn.Parameter(torch.zeros(3))) is None
    plan.begin(0.0, None)
    assert all(not plan.start(p).any() for p in small)

    large = [nn.Parameter(torch.zeros(s)) for s in [(300, 300), (17,)]]
    plan = GaussianNoise(large)
    plan.begin(2.5, torch.Generator().manual_seed(7))
    second, first = plan.start(large[1]), plan.start(large[0])  # in the order the sums come
    replay = torch.Generator().manual_seed(7)
    torch.testing.assert_close(second, torch.empty(17).normal_(0.0, 2.5, generator=replay),
                               rtol=0, atol=0)
    torch.testing.assert_close(first, torch.empty(300, 300).normal_(0.0, 2.5, generator=replay),
                               rtol=0, atol=0)
    assert first.is_contiguous() and first is not plan.start(large[0])  # a fresh one each call
    plan.begin(0.0, None)
    assert plan.start(large[0]) is None and not plan.zeros_or_noise(large[0]).any()


def test_secure_mode_seeds_a_fresh_generator_every_step(monkeypatch):
    """Each step draws 64 fresh bits from the OS for its own generator: two steps (and two runs)
    get unrelated noise, for a small and a large group."""
    for small in (1 << 16, 100):
        monkeypatch.setitem(noise.SMALL, "cpu", small)
        seeds = []
        real = noise.secrets.randbits

        def spy(k, real=real, seeds=seeds):
            seeds.append(real(k))
            return seeds[-1]

        monkeypatch.setattr(noise.secrets, "randbits", spy)
        first, second = noise_of(None, secure=True, steps=2)
        assert len(seeds) == 2 and seeds[0] != seeds[1]
        a, b = torch.cat([n.flatten() for n in first]), torch.cat([n.flatten() for n in second])
        assert a.std().item() == pytest.approx(1.0, rel=0.05)
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / a.numel() ** 0.5
        monkeypatch.undo()


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, d: int):
        self.x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i]}


def zero_loss(model, batch):
    return ObjectiveOutput((model(batch["x"]) * 0.0).sum(1))


def _zero_loss_steps(model, dp, batch, size):
    """The noise of one zero-loss step with SGD lr 1, per trainable parameter: B * (start - after)."""
    start = [p.detach().clone() for p in model.parameters()]
    dp.step.step(model, zero_loss, batch)
    return [size * (s - p.detach()) for s, p in zip(start, model.parameters())]


@pytest.mark.parametrize("small", [1 << 16, 500])  # one flat group, and one draw per tensor
def test_noise_plan_follows_the_parameter_layout(monkeypatch, small):
    """The noise plan (groups, flat buffer, views) is made once per layout: a layer unfrozen or
    frozen after the first step, and a cast to float64, are noised from that step on with std
    sigma * C in the new dtype, and a frozen layer gets none."""
    monkeypatch.setitem(noise.SMALL, "cpu", small)
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


def test_a_grad_written_around_the_clipper_is_refused_not_stepped_without_noise():
    """A ``.grad`` the step did not start (here the objective writes one for the Linear the
    forward never calls) would hold no noise: the step refuses, naming it, and applies nothing."""
    torch.manual_seed(0)
    model = Tied().double()
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), Ids(20),
                      noise_multiplier=SIGMA, target_delta=1e-5, epochs=1, max_grad_norm=CLIP,
                      batch_size=SIZE, verify=False)

    def writes_a_grad(model, batch):
        model.unused.weight.grad = torch.ones_like(model.unused.weight)
        return squared(model, batch)

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"unused\.weight was written outside the clipper"):
        dp.step.step(model, writes_a_grad, {"ids": Ids(20).ids[:12]})
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    dp.step.step(model, squared, {"ids": Ids(20).ids[:12]})  # the next step is noised as usual
    assert not torch.equal(before[-2], model.unused.weight)
