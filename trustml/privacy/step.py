"""DPStep: the DP-SGD GradientStep (see ARCHITECTURE.md).

One logical (Poisson-sampled) batch -> physical batches through the clipper (clipped sums add up)
-> one Gaussian noise draw N(0, sigma^2 C^2) per coordinate -> division by the EXPECTED batch size
(dividing by the realised size would leak it) -> optimizer step -> one accountant step.

Per-step bookkeeping stays off the critical path: the noise is drawn straight into each ``.grad``
before the clipped sums are added onto it, and the division by the expected batch size is folded
into the noise's std and the clip factors (:mod:`trustml.privacy.noise`: no pass over the
parameters of its own), the epsilon budget is checked by counting steps against a limit found once,
and epsilon is computed only when a step is logged (cached per accountant history).

The noised set is re-read from the optimizer at every step (a parameter unfrozen later is clipped
and noised from that step on; one frozen later is left alone). The first batch is self-checked
against the naive per-sample loop (:mod:`trustml.privacy.verify`). A physical batch whose size
collides with another dimension so that its batch role cannot be proved (:class:`AmbiguousBatch`)
is split into two parts of unequal size and retried: the clipped sum of the union is the same.

Where the noise comes from (``seed``):
- ``None`` (secure, the default of ``make_private``): every step draws its noise from a new
  generator seeded with 64 fresh bits of the OS CSPRNG (``secrets``, i.e. ``getrandom``). The seed
  and the generator's state live only for that step: they are not derived from ``run.seed``, never
  logged and never checkpointed, so two weight snapshots and the config do not reveal the noise.
  Re-seeding per step (rather than one long-lived stream) means that even someone who could invert
  one step's stream learns nothing about any other step, and a checkpoint has no stream to leak.
  torch's generators take 64-bit seeds: guessing one is a 2**64 search per step, each guess a
  model-sized noise draw. (The Gaussian sampler itself is torch's, not a constant-time one.)
- an int (reproducible, explicit opt-in): one generator seeded from it whose state is checkpointed,
  so a resumed run is bit-identical. Anyone with the seed can subtract the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from trustml.privacy.accounting import PrivacyAccountant
from trustml.privacy.clipping import PerSampleClipper
from trustml.privacy.generic import AmbiguousBatch
from trustml.privacy.noise import GaussianNoise, secret_generator
from trustml.privacy.verify import Verification, verify
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


def _clipped_fraction(norms: torch.Tensor, max_grad_norm: float) -> float:
    return (norms > max_grad_norm).float().mean().item() if len(norms) else 0.0


def _median(norms: torch.Tensor) -> float:
    return norms.median().item() if len(norms) else 0.0


def _all_reduce_grads(grads: list[torch.Tensor], world: World) -> None:
    """Sum ``grads`` over the ranks in one collective (one flat bucket, as DDP does)."""
    flat = torch._utils._flatten_dense_tensors(grads)
    all_reduce_sum(flat, world)
    for g, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(summed)


def _named(model: nn.Module, params: list[torch.Tensor]) -> str:
    """The names of ``params`` in ``model``, for a refusal (a shape where one has no name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return ", ".join(names.get(id(p), f"a {tuple(p.shape)} parameter") for p in params)


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
        seed: int | None = None,
        world: World = World(),
        verify: bool = True,
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
        self.params = self._trainable()
        if not self.params:
            raise ValueError("the optimizer holds no parameter that requires grad")
        device = self.params[0].device
        self.secure_rng = seed is None
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        self.loss_scale = 2.0**16 if amp == "fp16" else 1.0
        self.world = world
        self.verify = verify
        self.verification: Verification | None = None
        self._noise: tuple[list, GaussianNoise] | None = None  # (layout, its noise plan)
        self._limit: tuple[tuple, int] | None = None  # (what it depends on, step limit)
        self._held: tuple | None = None  # (clipped set, noise plan) found inside the optimizer

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

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
        """The accountant step count below which one more step surely stays within the budget:
        :meth:`exhausted` then decides by counting, with exactly the decisions of the per-step
        look-ahead (:meth:`PrivacyAccountant.steps_within`). Found again only when what it
        depends on changes: the history before this run of (sigma, q) (a resume), sigma (a
        recalibration), q, delta or the budget. 0 with PRV, whose epsilon is checked per step."""
        if self.accountant.kind != "rdp":
            return 0
        history = self.accountant.history
        ours = (self.noise_multiplier, self.sample_rate)
        current = history.pop()[2] if history and tuple(history[-1][:2]) == ours else 0
        key = (tuple(history), ours, self.delta, self.epsilon_budget)
        if self._limit is None or self._limit[0] != key:
            more = self.accountant.steps_within(self.epsilon_budget, self.delta, *ours)
            self._limit = (key, sum(n for _, _, n in history) + current + more)
        return self._limit[1]

    def step(
        self, model: nn.Module, objective: Any, batch: dict[str, torch.Tensor]
    ) -> dict[str, float | Callable[[], float]]:
        """One DP-SGD update; epsilon, the clipped fraction and the median norm are returned as
        zero-argument callables that compute them only when the loop logs the step."""
        if model is not self.clipper.model:
            raise ValueError("DPStep.step got a different model from the one made private")
        self.optimizer.zero_grad(set_to_none=True)
        self.params = self._trainable()  # what this step's optimizer.step() can update
        device = self.params[0].device
        n = batch_size(batch)
        if self.verify and self.verification is None and n:
            self.verification = verify(model, objective, batch, self.clipper)
        noise = self._noise_plan()
        # Noise is added exactly once in total: under data parallelism rank 0 adds it to its
        # clipped sum, then one flat all-reduce sums the ranks, so every rank holds the same
        # update as a single process on the union batch. It is divided by the expected batch
        # size, as the clipped sums are (dividing before the all-reduce is the same update).
        std = self.noise_multiplier * self.clipper.max_grad_norm if self.world.is_main else 0.0
        generator = self.generator
        if std > 0 and generator is None:  # secure: a fresh secret seed for this step only
            generator = secret_generator(device)
        noise.begin(std / self.expected_batch_size, generator)
        loss_sum, parts = 0.0, []
        for part in split(batch, self.physical_batch_size) if n else []:
            loss_sum += self._clip(model, objective, part, parts, noise)
        norms = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.zeros(
            0, device=device)
        # norms are >= 0, so their sum is finite iff each is (short of a sum past the dtype's
        # range, itself an overflow): one reduction instead of isfinite + all
        overflow = bool(n) and not math.isfinite(norms.sum().item())
        self._outside_optimizer(model, noise)
        if self.world.distributed:
            loss_sum, n, overflow = self._sum_over_ranks(loss_sum, n, overflow)
        self._noise_and_step(overflow, noise, model)
        self.accountant.step(
            self.noise_multiplier, self.sample_rate
        )  # a skipped step is still charged
        spent = partial(self.accountant.epsilon_of, self.accountant.history, self.delta)
        return {
            "loss": loss_sum / n if n else math.nan,
            "batch_size": float(n),
            "epsilon": spent,
            "clipped_fraction": partial(_clipped_fraction, norms, self.clipper.max_grad_norm),
            "grad_norm_median": partial(_median, norms),
        }

    def _clip(self, model: nn.Module, objective: Any, part: dict, norms: list,
              noise: GaussianNoise) -> float:
        """Clip one physical batch (split unequally and retried if its batch role is ambiguous):
        its clipped sum divided by the expected batch size is added onto ``.grad``, which a
        parameter's first clipped sum of the logical batch finds holding its noise."""
        try:
            with autocast(self.params[0].device, self.amp):
                losses = objective(model, part).losses
            norms.append(self.clipper.backward(
                losses.float(), loss_scale=self.loss_scale, scale=1 / self.expected_batch_size,
                start=noise.start))
            return losses.detach().float().sum().item()
        except AmbiguousBatch:
            n = batch_size(part)
            if n < 3:  # no two unequal non-empty parts: a real refusal
                raise
            cut = n // 2 + 1  # n = 4 -> 3 + 1, n = 5 -> 3 + 2: both parts differ from n
            return sum(
                self._clip(model, objective, {k: v[s] for k, v in part.items()}, norms, noise)
                for s in (slice(0, cut), slice(cut, n))
            )

    def _outside_optimizer(self, model: nn.Module, noise: GaussianNoise) -> None:
        """Refuse a parameter the clipper clipped (it requires grad) that the optimizer does not
        hold: it is never noised, so its ``.grad`` would keep an un-noised clipped sum for a
        second optimizer or any reader. Its ``.grad`` is dropped first. Checked again only when
        the clipped set or the noise plan (the optimizer's set) changes: two identity tests."""
        clipped = self.clipper.trainable
        if self._held is not None and self._held[0] is clipped and self._held[1] is noise:
            return
        held = {id(p) for p in self.params}
        outside = [p for p in clipped if id(p) not in held]
        if outside:
            for p in outside:
                p.grad = None
            raise ValueError(
                "DP step refused: " + _named(model, outside) + " requires grad but is not in the "
                "optimizer, so it would never be noised; add it to the optimizer or freeze it "
                "(requires_grad_(False))")
        self._held = (clipped, noise)

    def _sum_over_ranks(self, loss_sum: float, n: int, overflow: bool) -> tuple[float, int, bool]:
        """The logical batch's totals over all ranks (data parallelism)."""
        totals = torch.tensor([loss_sum, float(n), float(overflow)], device=self.params[0].device)
        all_reduce_sum(totals, self.world)
        return totals[0].item(), int(totals[1].item()), bool(totals[2].item())

    def _noise_and_step(self, skip: bool, noise: GaussianNoise, model: nn.Module) -> None:
        if skip:  # fp16 overflow (on any rank): drop this update, halve the loss scale
            self.loss_scale /= 2
            self.optimizer.zero_grad(set_to_none=True)
            return
        # Every parameter the optimizer can update is noised, including one the clipper gave no
        # gradient: its .grad is its noise alone.
        for p in self.params:
            if p.grad is None:
                p.grad = noise.zeros_or_noise(p)
        unnoised = noise.unnoised(self.params)
        if unnoised:  # a gradient written around the clipper: never step on it without noise
            raise RuntimeError(
                "DP step refused: the .grad of "
                + _named(model, unnoised)
                + " was written outside the clipper during this step (a hook or another backward"
                " pass?), so it holds no noise; the update was not applied")
        if self.world.distributed:
            for params in noise.groups:  # one flat bucket per (device, dtype)
                _all_reduce_grads([p.grad for p in params], self.world)
        self.optimizer.step()

    def _noise_plan(self) -> GaussianNoise:
        """The noise plan of ``self.params``, made again whenever the layout (every parameter,
        its shape, dtype and device, in order) differs from the last step's: a parameter
        unfrozen, frozen, added or cast since then is planned for."""
        key = [(id(p), p.shape, p.dtype, p.device) for p in self.params]
        if self._noise is None or self._noise[0] != key:
            self._noise = (key, GaussianNoise(self.params))
        return self._noise[1]

    def state_dict(self) -> dict[str, Any]:
        """The spent privacy and the loss scale; the noise generator only in reproducible mode."""
        state = {"accountant": self.accountant.state_dict(), "loss_scale": self.loss_scale,
                 "secure_rng": self.secure_rng}
        if self.generator is not None:
            state["noise_generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("secure_rng") is not self.secure_rng:
            raise ValueError(f"checkpoint was written with secure_rng={state.get('secure_rng')}, "
                             f"this run has secure_rng={self.secure_rng}")
        self.accountant.load_state_dict(state["accountant"])
        if self.generator is not None:
            generator = state["noise_generator"]
            if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
                raise ValueError("checkpoint field noise_generator: expected a uint8 tensor")
            self.generator.set_state(generator.cpu())
        scale = state["loss_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"checkpoint field loss_scale: expected a positive number, got {scale!r}")
        self.loss_scale = float(scale)
