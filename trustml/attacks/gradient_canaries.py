"""Gradient (Dirac) canaries: a white-box audit of the DP-SGD step itself.

Canary i, if its fair coin says IN, is one more example of the training set whose gradient is
``C e_i`` (norm C = max_grad_norm, so clipping leaves it whole): at every step it is Poisson-sampled
at the step's rate q, like the real examples, and its gradient joins the clipped sum before the
noise. The auditor observes every noisy update (the threat model the accountant covers: all
intermediate models are released) and scores each canary by the log-likelihood ratio of its
coordinate's observations, the Neyman-Pearson optimal test for one canary.

Where the coordinates live: a :class:`CanarySlot`, a parameter block that the model never calls, so
no real example's gradient reaches it and a canary's coordinate carries only its own gradient and
the engine's noise -- the worst case that the accountant must cover, and what makes the audit
tight. The coordinates are independent given the coins (independent noise, independent sampling),
so the m canaries are m independent trials of the mechanism.

The hook wraps the DP step's optimizer (which receives the noisy, averaged gradient): adding the
canary term ``C / B`` there equals adding ``C`` to the clipped sum before the noise and the division
by the expected batch size B, because the noise is additive. No line of the DP engine changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


class CanarySlot(nn.Module):
    """``m`` parameters no forward pass uses (their data gradient is exactly zero)."""

    def __init__(self, m: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(m))


class WithCanarySlot(nn.Module):
    """``model`` plus a :class:`CanarySlot`; computes exactly what ``model`` computes."""

    def __init__(self, model: nn.Module, m: int):
        super().__init__()
        self.net, self.slot = model, CanarySlot(m)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)


class GradientCanaries:
    """Optimizer wrapper that inserts the IN canaries' gradients and records the observations.

    ``step(optimizer)`` of :class:`trustml.privacy.DPStep` calls ``zero_grad`` and ``step``; install
    with ``dp_step.optimizer = GradientCanaries(dp_step.optimizer, ...)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, slot: CanarySlot, included: np.ndarray,
                 *, max_grad_norm: float, expected_batch_size: float, sample_rate: float,
                 noise_multiplier: float, generator: torch.Generator):
        if slot.weight.numel() != len(included):
            raise ValueError(f"{len(included)} canaries for a slot of {slot.weight.numel()}")
        self.optimizer, self.slot = optimizer, slot
        self.included = torch.as_tensor(np.asarray(included, bool))
        self.c, self.b = float(max_grad_norm), float(expected_batch_size)
        self.q, self.sigma = float(sample_rate), float(noise_multiplier)
        self.generator = generator
        self.llr = torch.zeros(len(included), dtype=torch.float64)
        self.total = torch.zeros(len(included), dtype=torch.float64)
        self.steps = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        grad = self.slot.weight.grad
        sampled = (torch.rand(len(self.included), generator=self.generator) < self.q) & self.included
        grad.add_(sampled.to(grad.dtype).to(grad.device), alpha=self.c / self.b)
        x = grad.detach().double().cpu() * (self.b / self.c)  # canary present: mean 1, sd sigma
        self.total += x
        self.llr += log_likelihood_ratio(x, self.q, self.sigma)
        self.steps += 1
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def log_likelihood_ratio(x: torch.Tensor, q: float, sigma: float) -> torch.Tensor:
    """log [(1 - q) N(x; 0, s^2) + q N(x; 1, s^2)] / N(x; 0, s^2) of one observed step.

    sigma = 0 (no noise): an observation equals 0 or 1 exactly, so the ratio is 0 / +inf-like; a
    large finite value keeps the scores finite and the ranking right."""
    if sigma == 0:
        return torch.where(x > 0.5, torch.full_like(x, 1e6), torch.zeros_like(x))
    present = (2 * x - 1) / (2 * sigma**2) + np.log(q)
    if q >= 1:
        return present
    return torch.logaddexp(torch.full_like(x, float(np.log1p(-q))), present)
