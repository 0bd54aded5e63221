"""DPStep: the DP-SGD GradientStep (see ARCHITECTURE.md).

One logical (Poisson-sampled) batch -> physical batches through the clipper (clipped sums add up)
-> one Gaussian noise draw N(0, sigma^2 C^2) per coordinate -> division by the EXPECTED batch size
(dividing by the realised size would leak it) -> optimizer step -> one accountant step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trustml.privacy.accounting import PrivacyAccountant
from trustml.privacy.clipping import PerSampleClipper
from trustml.training.distributed import World, all_reduce_sum
from trustml.training.step import autocast

AMP = ("none", "bf16", "fp16")


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    return next(iter(batch.values())).shape[0]


def split(batch: dict[str, torch.Tensor], size: int | None) -> list[dict[str, torch.Tensor]]:
    n = batch_size(batch)
    if size is None or n <= size:
        return [batch]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


class DPStep:
    """Clip per sample, add noise, step the optimizer and the accountant.

    ``epsilon_budget`` makes :meth:`exhausted` refuse any step after which epsilon (at ``delta``)
    would exceed it. ``amp`` autocasts the forward pass on CUDA (bf16, or fp16 with a dynamic loss
    scale); per-sample norms are always accumulated in fp32.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clipper: PerSampleClipper,
        *,
        noise_multiplier: float,
        expected_batch_size: float,
        sample_rate: float,
        accountant: PrivacyAccountant,
        delta: float,
        physical_batch_size: int | None = None,
        epsilon_budget: float | None = None,
        amp: str = "none",
        seed: int = 0,
        world: World = World(),
    ):
        if amp not in AMP:
            raise ValueError(f"amp must be one of {AMP}, got {amp!r}")
        if physical_batch_size is not None and physical_batch_size < 1:
            raise ValueError(f"physical_batch_size must be >= 1, got {physical_batch_size!r}")
        self.optimizer, self.clipper, self.accountant = optimizer, clipper, accountant
        self.noise_multiplier, self.expected_batch_size = (
            float(noise_multiplier),
            float(expected_batch_size),
        )
        self.sample_rate, self.delta = float(sample_rate), float(delta)
        self.physical_batch_size, self.epsilon_budget, self.amp = (
            physical_batch_size,
            epsilon_budget,
            amp,
        )
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        device = self.params[0].device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.loss_scale = 2.0**16 if amp == "fp16" else 1.0
        self.world = world
        self._limit: tuple[tuple, int] | None = None

    def exhausted(self) -> str | None:
        if self.epsilon_budget is None or self.accountant.steps < self._step_limit():
            return None
        after = self.accountant.epsilon(
            self.delta, extra=(self.noise_multiplier, self.sample_rate, 1)
        )
        if after > self.epsilon_budget:
            return (f"privacy budget spent: one more step would reach epsilon {after:.3f} "
                    f"> {self.epsilon_budget}")
        return None

    def _step_limit(self) -> int:
        """Accountant steps up to which one more step surely stays within the budget (RDP only;
        0 for PRV, whose numerical epsilon is checked before every step). Found once per history
        that precedes this step's run of (sigma, q) -- a resumed run's, say -- and then reused."""
        if self.accountant.kind != "rdp":
            return 0
        history = self.accountant.history
        ours = (self.noise_multiplier, self.sample_rate)
        prefix = tuple(history[:-1] if history and tuple(history[-1][:2]) == ours else history)
        key = (prefix, self.delta, self.epsilon_budget, ours)
        if self._limit is None or self._limit[0] != key:
            more = self.accountant.steps_within(self.epsilon_budget, self.delta, *ours)
            self._limit = (key, self.accountant.steps + more)
        return self._limit[1]

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (cached per accountant history)."""
        return self.accountant.epsilon(self.delta)

    def step(
        self, model: nn.Module, objective: Any, batch: dict[str, torch.Tensor]
    ) -> dict[str, float | Callable[[], float]]:
        if model is not self.clipper.model:
            raise ValueError("DPStep.step got a different model from the one made private")
        self.optimizer.zero_grad(set_to_none=True)
        device = self.params[0].device
        n = batch_size(batch)
        loss_sum, norms = 0.0, []
        for part in split(batch, self.physical_batch_size) if n else []:
            with autocast(device, self.amp):
                losses = objective(model, part).losses
            loss_sum += losses.detach().float().sum().item()
            norms.append(self.clipper.backward(losses.float(), loss_scale=self.loss_scale))
        norms = torch.cat(norms) if norms else torch.zeros(0, device=device)
        overflow = not bool(torch.isfinite(norms).all())
        if self.world.distributed:
            loss_sum, n, overflow = self._sum_over_ranks(loss_sum, n, overflow)
        self._noise_and_step(skip=overflow)
        self.accountant.step(
            self.noise_multiplier, self.sample_rate
        )  # a skipped step is still charged
        clipped = (norms > self.clipper.max_grad_norm).float().mean().item() if n else 0.0
        return {
            "loss": loss_sum / n if n else math.nan,
            "batch_size": float(n),
            "epsilon": self.epsilon,  # computed only when the loop logs it
            "clipped_fraction": clipped,
            "grad_norm_median": norms.median().item() if n else 0.0,
        }

    def _sum_over_ranks(self, loss_sum: float, n: int, overflow: bool) -> tuple[float, int, bool]:
        """The logical batch's totals over all ranks (data parallelism)."""
        totals = torch.tensor([loss_sum, float(n), float(overflow)], device=self.params[0].device)
        all_reduce_sum(totals, self.world)
        return totals[0].item(), int(totals[1].item()), bool(totals[2].item())

    def _noise_and_step(self, skip: bool) -> None:
        if skip:  # fp16 overflow (on any rank): drop this update, halve the loss scale
            self.loss_scale /= 2
            self.optimizer.zero_grad(set_to_none=True)
            return
        # Noise is added exactly once in total: under data parallelism rank 0 adds it to its
        # clipped sum, then one flat all-reduce sums the ranks, so every rank holds the same
        # update as a single process on the union batch.
        std = self.noise_multiplier * self.clipper.max_grad_norm if self.world.is_main else 0.0
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for params in self._by_dtype():
            grads = [p.grad for p in params]
            if std > 0:  # one draw for all parameters of a dtype, then one fused add
                noise = self._draw(sum(p.numel() for p in params), params[0])
                views = [c.view_as(p) for p, c in zip(params, noise.split([p.numel() for p in params]))]
                torch._foreach_add_(grads, views, alpha=std)
        if self.world.distributed:
            flat = torch.cat([p.grad.reshape(-1) for p in self.params])
            all_reduce_sum(flat, self.world)
            for p, chunk in zip(self.params, flat.split([p.numel() for p in self.params])):
                p.grad.copy_(chunk.view_as(p))
        torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size)
        self.optimizer.step()

    def _draw(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """``numel`` standard normal values from ``self.generator`` (the step's noise source)."""
        return torch.randn(numel, generator=self.generator, device=like.device, dtype=like.dtype)

    def _by_dtype(self) -> list[list[nn.Parameter]]:
        """The parameters grouped by (device, dtype), in order: one noise draw per group."""
        groups: dict[tuple, list[nn.Parameter]] = {}
        for p in self.params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        return list(groups.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "noise_generator": self.generator.get_state(),
            "loss_scale": self.loss_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.generator.set_state(state["noise_generator"].cpu())
        self.loss_scale = float(state["loss_scale"])
