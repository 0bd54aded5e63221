"""The DP step's per-step bookkeeping: budget by step count, lazy epsilon, one fused noise draw."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trustml.privacy import make_private
from trustml.privacy.accounting import PrivacyAccountant
from trustml.training.loop import resolved


def test_steps_within_equals_step_by_step_look_ahead():
    accountant = PrivacyAccountant("rdp")
    for _ in range(7):  # an earlier phase at another noise level (a resumed run, say)
        accountant.step(2.0, 0.05)
    budget, sigma, q = 2.5, 1.0, 0.02
    more = accountant.steps_within(budget, 1e-5, sigma, q)
    taken = 0
    while accountant.epsilon(1e-5, extra=(sigma, q, 1)) <= budget:
        accountant.step(sigma, q)
        taken += 1
    assert taken == more > 10
    assert accountant.steps_within(0.0, 1e-5, sigma, q) == 0


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 100):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 5, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Out:
    def __init__(self, losses):
        self.losses, self.outputs = losses, {}


def squared(model, batch):
    return Out(((model(batch["x"]) - batch["y"]) ** 2).sum(1))


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_budget_check_stops_where_the_look_ahead_does(kind):
    model = nn.Linear(5, 2)
    dp = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        Rows(),
        noise_multiplier=1.0,
        target_delta=1e-5,
        epochs=1,
        max_grad_norm=1.0,
        batch_size=10,
        epsilon_budget=3.5,
        accountant=kind,
    )
    taken = 0
    while dp.step.exhausted() is None:
        assert dp.accountant.epsilon(1e-5, extra=(1.0, 0.1, 1)) <= 3.5
        metrics = dp.step.step(model, squared, next(iter(dp.batches.batches(taken))))
        taken += 1
        assert taken < 100
    assert taken > 5 and dp.accountant.epsilon(1e-5, extra=(1.0, 0.1, 1)) > 3.5
    logged = resolved(metrics)  # epsilon is computed when logged, and equals the accountant's
    assert logged["epsilon"] == dp.accountant.epsilon(1e-5) > 0 and logged["batch_size"] >= 0


def test_noise_is_one_draw_over_all_parameters():
    """Zero gradients and lr 1: the update is -std * (one flat draw of the generator) / B."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    dp = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        Rows(40),
        noise_multiplier=2.0,
        target_delta=1e-5,
        epochs=1,
        max_grad_norm=0.5,
        batch_size=8,
        seed=3,
    )
    state = dp.step.generator.get_state()
    dp.step.step(model, lambda m, b: Out(m(b["x"]).sum(1) * 0), next(iter(dp.batches.batches(0))))
    expected = torch.randn(start.numel(), generator=torch.Generator().set_state(state))
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    torch.testing.assert_close(moved, -expected * 2.0 * 0.5 / 8, rtol=1e-5, atol=1e-7)
