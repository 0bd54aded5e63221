"""DP-SGD plumbing: noise, accounting against Opacus, Poisson batches, resume, budget, refusals."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trustml.privacy import ensure_decomposable, make_private
from trustml.training.loop import resolved
from trustml.training.objectives import ObjectiveOutput


class Rows(Dataset):
    def __init__(self, n: int, d: int = 5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, d, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def squared(model, batch):
    return ObjectiveOutput(((model(batch["x"]) - batch["y"]) ** 2).sum(1))


def zero_loss(model, batch):
    return ObjectiveOutput((model(batch["x"]) * 0.0).sum(1))


def private(model, data, lr=0.1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    args = {"target_delta": 1e-5, "epochs": 1, "max_grad_norm": 0.5, "batch_size": 8}
    args.update(kw)
    return make_private(model, opt, data, **args)


@pytest.mark.parametrize("physical", [None, 3])
def test_full_batch_without_noise_is_clipped_sgd(physical):
    torch.manual_seed(0)
    data = Rows(8)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    ref = [p.detach().clone() for p in model.parameters()]
    # reference: one autograd call per sample, clip to C, sum, divide by the batch, SGD step
    total = [torch.zeros_like(p) for p in ref]
    for i in range(8):
        loss = squared(model, {"x": data.x[i : i + 1], "y": data.y[i : i + 1]}).losses.sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        for t, g in zip(total, grads):
            t += g * min(1.0, 0.5 / norm.item())
    dp = private(model, data, noise_multiplier=0.0, physical_batch_size=physical)
    assert dp.sample_rate == 1.0
    batch = next(iter(dp.batches.batches(0)))
    assert len(batch["x"]) == 8
    metrics = resolved(dp.step.step(model, squared, batch))
    for p, r, t in zip(model.parameters(), ref, total):
        torch.testing.assert_close(p.detach(), r - 0.1 * t / 8, rtol=1e-5, atol=1e-6)
    assert (
        metrics["batch_size"] == 8 and metrics["loss"] > 0 and 0 < metrics["clipped_fraction"] <= 1
    )


def test_noise_std_and_seeding():
    model = nn.Linear(100, 60)
    start = [p.detach().clone() for p in model.parameters()]
    dp = private(model, Rows(40, d=100), lr=1.0, noise_multiplier=2.0, seed=3, secure_rng=False)
    dp.step.step(model, zero_loss, next(iter(dp.batches.batches(0))))
    delta = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
    expected = 2.0 * 0.5 / 8  # sigma * C / expected batch size
    assert abs(delta.mean().item()) < 4 * expected / delta.numel() ** 0.5
    assert delta.std().item() == pytest.approx(expected, rel=0.04)
    # the same seed gives the same noise; the next step gives fresh noise
    model2 = nn.Linear(100, 60)
    model2.load_state_dict({k: v for k, v in zip(["weight", "bias"], start)})
    dp2 = private(model2, Rows(40, d=100), lr=1.0, noise_multiplier=2.0, seed=3,
                  secure_rng=False)
    dp2.step.step(model2, zero_loss, next(iter(dp2.batches.batches(0))))
    torch.testing.assert_close(model2.weight, model.weight)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_matches_opacus_and_resume_keeps_it(kind):
    data = Rows(200)
    model = nn.Linear(5, 2)
    dp = private(model, data, noise_multiplier=1.1, accountant=kind, batch_size=10,
                 secure_rng=False)
    assert dp.sample_rate == 0.05 and len(dp.batches) == 20
    for _, batch in zip(range(7), dp.batches.batches(0)):
        dp.step.step(model, squared, batch)
    ref = create_accountant(kind)
    for _ in range(7):
        ref.step(noise_multiplier=1.1, sample_rate=0.05)
    assert dp.accountant.epsilon(1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    state = dp.state_dict()
    resumed = private(nn.Linear(5, 2), data, noise_multiplier=1.1, accountant=kind, batch_size=10,
                      secure_rng=False)
    assert resumed.accountant.epsilon(1e-5) == 0.0
    resumed.load_state_dict(state)
    assert resumed.accountant.epsilon(1e-5) == dp.accountant.epsilon(1e-5)
    assert torch.equal(resumed.step.generator.get_state(), dp.step.generator.get_state())


def test_target_epsilon_calibration():
    dp = private(nn.Linear(5, 2), Rows(200), target_epsilon=3.0, batch_size=10, epochs=2)
    ref = get_noise_multiplier(
        target_epsilon=3.0,
        target_delta=1e-5,
        sample_rate=0.05,
        steps=40,
        accountant="rdp",
        epsilon_tolerance=0.01,
    )
    assert dp.noise_multiplier == pytest.approx(ref)
    spent = dp.accountant.epsilon(
        1e-5, extra=(dp.noise_multiplier, dp.sample_rate, 2 * len(dp.batches))
    )
    assert 2.9 < spent <= 3.0
    # a sample rate whose 1/q is not whole: calibrated for the steps really taken, never above target
    odd = private(nn.Linear(5, 2), Rows(286), target_epsilon=3.0, batch_size=10, epochs=15)
    assert len(odd.batches) == 29
    assert (
        odd.accountant.epsilon(1e-5, extra=(odd.noise_multiplier, odd.sample_rate, 15 * 29)) <= 3.0
    )


def test_poisson_batches_mean_size_reproducible_and_empty_batches():
    data = Rows(1000)
    dp = private(nn.Linear(5, 2), data, noise_multiplier=1.0, batch_size=50, secure_rng=False)
    sizes = [len(b["x"]) for e in range(5) for b in dp.batches.batches(e)]
    assert len(sizes) == 100 and len(set(sizes)) > 5  # random sizes around 50
    assert abs(sum(sizes) / len(sizes) - 50) < 3 * (50 * 0.95 / len(sizes)) ** 0.5
    again = [b["x"] for b in dp.batches.batches(3)]
    assert all(torch.equal(a, b["x"]) for a, b in zip(again, dp.batches.batches(3), strict=True))
    tiny = private(nn.Linear(5, 2), Rows(30), noise_multiplier=1.0, batch_size=1)
    empty = next(b for e in range(5) for b in tiny.batches.batches(e) if len(b["x"]) == 0)
    before = tiny.accountant.steps
    metrics = tiny.step.step(tiny.clipper.model, squared, empty)
    assert metrics["batch_size"] == 0 and tiny.accountant.steps == before + 1


def test_budget_stops_before_overspending():
    data = Rows(100)
    model = nn.Linear(5, 2)
    dp = private(model, data, noise_multiplier=1.0, batch_size=10, epsilon_budget=1.5)
    taken = 0
    while dp.step.exhausted() is None:
        dp.step.step(model, squared, next(iter(dp.batches.batches(taken))))
        taken += 1
        assert taken < 200
    assert dp.accountant.epsilon(1e-5) <= 1.5
    assert dp.accountant.epsilon(1e-5, extra=(1.0, 0.1, 1)) > 1.5
    assert "budget" in dp.step.exhausted()


def test_dataloader_batch_size_and_refusals():
    data = Rows(64)
    model = nn.Linear(5, 2)
    dp = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(data, batch_size=16),
        noise_multiplier=1.0,
        target_delta=1e-5,
        epochs=1,
        max_grad_norm=1.0,
    )
    assert dp.sample_rate == 0.25 and dp.expected_batch_size == 16
    with pytest.raises(ValueError, match="exactly one"):
        private(nn.Linear(5, 2), data)
    with pytest.raises(ValueError, match="GroupNorm"):
        private(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), data, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="penalty"):
        ensure_decomposable([lambda batch, outputs: 0.0])
    ensure_decomposable([])
    with pytest.warns(UserWarning, match="Poisson"):
        shuffled = private(nn.Linear(5, 2), data, noise_multiplier=1.0, poisson_sampling=False)
    assert "NOT a proven guarantee" in shuffled.note


def _one_noisy_update(secure_rng: bool, seed: int = 0):
    """(start weights, weights after one step at sigma 5, the noiseless clipped sum, the DP state)."""
    torch.manual_seed(1)
    model = nn.Linear(6, 2)
    data = Rows(8, d=6)
    start = [p.detach().clone() for p in model.parameters()]
    dp = private(model, data, lr=1.0, noise_multiplier=5.0, seed=seed, secure_rng=secure_rng)
    batch = next(iter(dp.batches.batches(0)))  # q = 1: the whole set
    dp.step.step(model, squared, batch)
    clean = nn.Linear(6, 2)
    clean.load_state_dict(dict(zip(["weight", "bias"], start)))
    ref = private(clean, data, lr=1.0, noise_multiplier=0.0)
    ref.step.step(clean, squared, batch)
    clipped_sum = [8 * (s - p.detach()) for s, p in zip(start, clean.parameters())]
    return start, [p.detach().clone() for p in model.parameters()], clipped_sum, dp


def _attack(start, after, seed: int) -> list[torch.Tensor]:
    """Issue #12's attack: with run.seed and two snapshots, regenerate the noise and subtract it."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.empty(sum(s.numel() for s in start)).normal_(0.0, 5.0 * 0.5, generator=generator)
    noise = [n.view_as(s) for s, n in zip(start, flat.split([s.numel() for s in start]))]
    return [8 * (s - a) - n for s, a, n in zip(start, after, noise)]


def test_seeded_noise_is_recoverable_and_secure_noise_is_not():
    start, after, truth, _ = _one_noisy_update(secure_rng=False)
    for guess, real in zip(_attack(start, after, seed=0), truth):
        torch.testing.assert_close(guess, real, rtol=1e-4, atol=1e-4)  # the leak is real
    start, after, truth, _ = _one_noisy_update(secure_rng=True)
    error = torch.cat([(g - r).flatten() for g, r in zip(_attack(start, after, 0), truth)])
    assert error.abs().max() > 1.0  # off by noise of std sigma * C = 2.5, not recovered


def test_secure_mode_differs_across_runs_and_keeps_no_generator():
    first = _one_noisy_update(secure_rng=True, seed=0)
    second = _one_noisy_update(secure_rng=True, seed=0)
    assert not torch.equal(first[1][0], second[1][0])  # same seed, same data: different noise
    state = first[3].state_dict()
    assert "noise_generator" not in state and state["secure_rng"] is True
    assert first[3].batches.seed is None  # Poisson masks from a fresh secret seed per epoch
    seeded = _one_noisy_update(secure_rng=False)[3].state_dict()
    assert seeded["noise_generator"].dtype == torch.uint8  # the opt-in mode checkpoints it
    with pytest.raises(ValueError, match="secure_rng"):
        first[3].load_state_dict(seeded)


def test_secure_poisson_batches_are_fresh_but_still_poisson():
    data = Rows(1000)
    dp = private(nn.Linear(5, 2), data, noise_multiplier=1.0, batch_size=50)
    one = [b["x"] for b in dp.batches.batches(3)]
    two = [b["x"] for b in dp.batches.batches(3)]
    assert not all(len(a) == len(b) and torch.equal(a, b) for a, b in zip(one, two))
    sizes = [len(b["x"]) for e in range(5) for b in dp.batches.batches(e)]
    assert abs(sum(sizes) / len(sizes) - 50) < 4 * (50 * 0.95 / len(sizes)) ** 0.5


def test_resume_recalibrates_noise_for_what_is_left():
    """A target_epsilon run resumed with more steps: sigma grows so the total stays <= target."""
    data = Rows(200)
    dp = private(nn.Linear(5, 2), data, target_epsilon=3.0, batch_size=10, epochs=1)
    for batch in dp.batches.batches(0):
        dp.step.step(dp.clipper.model, squared, batch)
    records = [{"event": "start", "step": 0, "privacy": dp.describe()},
               {"epoch": 1, "step": 20, "epsilon": dp.accountant.epsilon(1e-5)}]
    longer = private(nn.Linear(5, 2), data, target_epsilon=3.0, batch_size=10, epochs=3)
    longer.load_state_dict(dp.state_dict())
    fresh_sigma = longer.noise_multiplier  # calibrated as if nothing had been spent
    assert longer.accountant.epsilon(1e-5, extra=(fresh_sigma, 0.05, 40)) > 3.0
    longer.restored(20, records)
    total = longer.accountant.epsilon(1e-5, extra=(longer.noise_multiplier, 0.05, 40))
    assert longer.noise_multiplier > fresh_sigma and 2.99 - 0.01 <= total <= 3.0
    halfway = private(nn.Linear(5, 2), data, target_epsilon=3.0, batch_size=10, epochs=2)
    unchanged = private(nn.Linear(5, 2), data, target_epsilon=3.0, batch_size=10, epochs=2)
    for batch in halfway.batches.batches(0):
        halfway.step.step(halfway.clipper.model, squared, batch)
    unchanged.load_state_dict(halfway.state_dict())
    unchanged.restored(20, [{**records[0], "privacy": halfway.describe()},
                            {"step": 20, "epsilon": halfway.accountant.epsilon(1e-5)}])
    assert unchanged.noise_multiplier == halfway.noise_multiplier  # same plan: same sigma
    spent = private(nn.Linear(5, 2), data, target_epsilon=1.0, batch_size=10, epochs=3)
    spent.load_state_dict(dp.state_dict())
    with pytest.raises(ValueError, match="already spent epsilon 2.9"):
        spent.restored(20, records)
    # the cross-checks: a history that does not match the step count or the log is refused
    with pytest.raises(ValueError, match="charges 20 steps"):
        longer.restored(21, records)
    forged = [{**records[0], "privacy": {**dp.describe(), "noise_multiplier": 100.0}},
              records[1]]
    with pytest.raises(ValueError, match="disagrees with the metrics log"):
        longer.restored(20, forged)
