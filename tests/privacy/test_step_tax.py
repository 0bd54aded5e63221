"""The DP step's fixed per-step costs, cut without changing a decision: the budget checked by step
count (same stops as the per-step look-ahead, resumes and recalibrations included), epsilon
computed only when logged and cached per history, all noise from one generator stream (drawn in
chunks) of the right std."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from trustml.privacy import make_private
from trustml.privacy.accounting import PrivacyAccountant
from trustml.training.loop import fit, resolved

from test_privacy_engine import Rows, squared

DELTA = 1e-5


def private(model, data, **kw):
    args = {"target_delta": DELTA, "epochs": 1, "max_grad_norm": 0.5, "batch_size": 10}
    args.update(kw)
    return make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data, **args)


def count_analyses(monkeypatch) -> list[int]:
    """A one-element list holding how many epsilon analyses the accountants have run."""
    calls, compute = [0], PrivacyAccountant._compute

    def counted(self, history, delta):
        calls[0] += 1
        return compute(self, history, delta)

    monkeypatch.setattr(PrivacyAccountant, "_compute", counted)
    return calls


def test_steps_within_is_the_step_by_step_look_ahead():
    accountant = PrivacyAccountant("rdp")
    for _ in range(7):  # an earlier segment at another noise level (a resumed run)
        accountant.step(2.0, 0.05)
    budget, sigma, q = 2.5, 1.0, 0.02
    more = accountant.steps_within(budget, DELTA, sigma, q)
    taken = 0
    while accountant.epsilon(DELTA, extra=(sigma, q, 1)) <= budget:
        accountant.step(sigma, q)
        taken += 1
    assert taken == more > 10
    assert accountant.steps_within(budget, DELTA, sigma, q) == 0
    with warnings.catch_warnings():  # epsilon is infinite at every order
        warnings.simplefilter("ignore")
        assert accountant.steps_within(1e9, DELTA, 0.0, q) == 0  # no noise: no step fits
    with pytest.raises(ValueError, match="rdp"):
        PrivacyAccountant("prv").steps_within(budget, DELTA, sigma, q)


def test_budget_decisions_equal_the_per_step_check_across_resume_and_recalibration():
    """Every decision of exhausted() equals `epsilon after one more step > budget`, through a
    resume onto another sigma segment and a mid-run recalibration of sigma. (PRV keeps the
    per-step check itself: its numerical epsilon is not provably monotone in the steps.)"""
    data, budget = Rows(100), 4.0
    first = private(nn.Linear(5, 2), data, noise_multiplier=1.2)
    for _ in range(6):
        first.accountant.step(1.2, 0.1)
    resumed = private(nn.Linear(5, 2), data, noise_multiplier=0.9, epsilon_budget=budget)
    resumed.load_state_dict(first.state_dict())  # history [(1.2, 0.1, 6)], now sigma 0.9
    dp, decisions = resumed.step, []
    for i in range(200):
        if i == 4:
            dp.noise_multiplier = 1.2  # what a recalibration on resume does
        refused = dp.exhausted() is not None
        over = dp.accountant.epsilon(DELTA, extra=(dp.noise_multiplier, 0.1, 1)) > budget
        assert refused == over, f"step {i}"
        decisions.append(refused)
        if refused:
            break
        dp.accountant.step(dp.noise_multiplier, 0.1)
    assert decisions[-1] and sum(decisions) == 1 and len(decisions) > 8
    assert [s for s, _, _ in dp.accountant.history] == [1.2, 0.9, 1.2]
    assert "budget" in dp.exhausted()


def test_budget_check_counts_steps_instead_of_converting(monkeypatch):
    calls = count_analyses(monkeypatch)
    model = nn.Linear(5, 2)
    dp = private(model, Rows(100), noise_multiplier=1.0, epsilon_budget=50.0)
    dp.step.exhausted()
    searched = calls[0]
    assert searched > 0
    for _ in range(30):
        assert dp.step.exhausted() is None
        dp.accountant.step(1.0, 0.1)
    assert calls[0] == searched  # no analysis per step once the limit is known
    dp.step.noise_multiplier = 2.0
    dp.step.exhausted()
    assert calls[0] > searched  # a new sigma: the limit is found again


def test_epsilon_only_when_logged_and_cached(monkeypatch, tmp_path):
    calls = count_analyses(monkeypatch)
    model = nn.Linear(5, 2)
    dp = private(model, Rows(200), noise_multiplier=1.0, secure_rng=False)
    metrics = dp.step.step(model, squared, next(iter(dp.batches.batches(0))))
    assert calls[0] == 0 and callable(metrics["epsilon"])
    spent = dp.accountant.epsilon(DELTA)
    dp.step.step(model, squared, next(iter(dp.batches.batches(1))))
    assert metrics["epsilon"]() == spent  # the value at its own step, whenever it is resolved
    assert calls[0] == 1  # and not computed again
    assert resolved(metrics)["batch_size"] == metrics["batch_size"]

    calls[0] = 0  # through the loop: one analysis per logged step, none for the others
    fit(model, squared, dp.step, dp.batches, epochs=1, run_dir=tmp_path, log_every=7,
        progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"] for r in records if "epsilon" in r}
    assert len(logged) == 3 and calls[0] == len(logged)  # steps 7, 14 and the epoch's 20


class PartlyUsed(nn.Module):
    """An MLP plus a layer its forward pass never calls."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(60, 70), nn.Tanh(), nn.Linear(70, 70), nn.Tanh(),
                                 nn.Linear(70, 2))
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.mlp(x)


def test_noise_has_std_sigma_c_per_coordinate_and_reaches_every_parameter():
    """Reproducible mode, SGD with lr 1: B * (noiseless update - noised update) is the noise.
    It has mean 0 and std sigma * C on every parameter, is independent across parameters, and
    a parameter the forward pass does not use (no clipped gradient) is noised too."""
    sigma, clip, size = 1.5, 0.5, 10

    def one_step(noise_multiplier):
        torch.manual_seed(0)
        model = PartlyUsed().double()
        data = Rows(20, d=60)
        data.x, data.y = data.x.double(), data.y.double()
        dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), data,
                          noise_multiplier=noise_multiplier, target_delta=DELTA, epochs=1,
                          max_grad_norm=clip, batch_size=size, secure_rng=False, seed=5,
                          verify=False)
        start = [p.detach().clone() for p in model.parameters()]
        dp.step.step(model, squared, {"x": data.x[:12], "y": data.y[:12]})
        return [s - p.detach() for s, p in zip(start, model.parameters())]

    noise = [size * (a - b) for a, b in zip(one_step(sigma), one_step(0.0))]
    flat = torch.cat([n.flatten() for n in noise])
    assert flat.numel() > 9000
    assert abs(flat.mean().item()) < 4 * sigma * clip / flat.numel() ** 0.5
    assert flat.std().item() == pytest.approx(sigma * clip, rel=0.03)
    for n in noise[:4]:  # each parameter of the first layers has its own draw of std sigma C
        assert n.std().item() == pytest.approx(sigma * clip, rel=0.25 if n.numel() < 100 else 0.05)
    a, b = noise[0].flatten(), noise[2].flatten()[: noise[0].numel()]
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / a.numel() ** 0.5
    assert (noise[-2] != 0).all() and (noise[-1] != 0).all()  # the unused Linear(3, 3)
