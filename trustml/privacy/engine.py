"""make_private: turn (model, optimizer, data) into a DP-SGD step, batch source and accountant."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trustml.data.sampling import ShuffledBatches
from trustml.privacy.accounting import PrivacyAccountant, calibrate_noise
from trustml.privacy.clipping import PerSampleClipper, Strategy
from trustml.privacy.sampling import PoissonBatches
from trustml.privacy.step import DPStep
from trustml.privacy.verify import Verification
from trustml.training.distributed import World

NOT_POISSON_NOTE = (
    "poisson_sampling=False: batches are shuffled fixed-size mini-batches, but the accountant assumes "
    "Poisson sampling with rate batch_size/N, so the reported epsilon is NOT a proven guarantee"
)


@dataclass
class PrivateTraining:
    """What the training loop needs for DP-SGD; ``state_dict`` checkpoints the spent privacy."""

    step: DPStep
    batches: PoissonBatches | ShuffledBatches
    clipper: PerSampleClipper
    accountant: PrivacyAccountant
    noise_multiplier: float
    sample_rate: float
    expected_batch_size: int
    note: str | None = None  # set when the epsilon is not a proven guarantee

    @property
    def verification(self) -> Verification | None:
        """The self-check's result once the first batch has been stepped (None before, or off)."""
        return self.step.verification

    def state_dict(self) -> dict[str, Any]:
        return self.step.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step.load_state_dict(state)


def ensure_decomposable(penalties: Sequence[Any]) -> None:
    """Refuse DP with losses that couple samples (fairness penalties): clipping cannot bound them."""
    if penalties:
        raise ValueError(
            "DP-SGD bounds each sample's gradient by per-sample clipping; a penalty over the batch "
            "(e.g. fairness.penalty) couples samples, so its sensitivity is unbounded. Disable the "
            "penalty (fairness.penalty=none) or privacy (privacy.enabled=false)."
        )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset | DataLoader,
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float,
    epochs: float,
    max_grad_norm: float,
    accountant: str = "rdp",
    poisson_sampling: bool = True,
    physical_batch_size: int | None = None,
    batch_size: int | None = None,
    epsilon_budget: float | None = None,
    seed: int = 0,
    amp: str = "none",
    strategy: Strategy = "auto",
    world: World = World(),
    verify: bool = True,
) -> PrivateTraining:
    """DP-SGD for ``model``: Poisson batches of expected size ``batch_size`` (a DataLoader's own
    batch size when ``data`` is one), clipping to ``max_grad_norm``, noise ``noise_multiplier`` or
    calibrated to reach ``target_epsilon`` at ``target_delta`` after ``epochs``.

    ``poisson_sampling=False`` draws shuffled fixed-size batches instead; the accountant still
    assumes Poisson sampling, so this warns and sets ``.note`` (the epsilon is then heuristic).

    ``verify`` self-checks the first real batch against the naive per-sample loop (a float64 copy
    of the model; see :mod:`trustml.privacy.verify`) and refuses the run on a mismatch; the
    result is ``.verification``. Modules whose per-sample gradients cannot be made exact are
    refused here or at the first step, with the module's name and the reason.
    """
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(data, DataLoader):
        if batch_size is not None and data.batch_size is not None and batch_size != data.batch_size:
            raise ValueError(
                f"batch_size={batch_size} differs from the DataLoader's {data.batch_size}"
            )
        batch_size = batch_size or data.batch_size
    if batch_size is None or batch_size < 1:
        raise ValueError(
            f"batch_size (expected logical batch size) must be >= 1, got {batch_size!r}"
        )
    n = len(dataset)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the dataset size {n}")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("set exactly one of noise_multiplier and target_epsilon")
    if noise_multiplier is not None and noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r}")
    if epsilon_budget is not None and not epsilon_budget > 0:
        raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget!r}")
    owned = {id(p) for p in model.parameters()}
    if any(id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("the optimizer holds parameters that are not the model's")
    sample_rate = batch_size / n
    batches = (
        PoissonBatches(dataset, sample_rate, seed=seed, world=world)
        if poisson_sampling
        else ShuffledBatches(dataset, batch_size, seed=seed, world=world)
    )
    if target_epsilon is not None:  # calibrated for the steps this run will really take
        steps = max(1, round(epochs * len(batches)))
        noise_multiplier = calibrate_noise(
            target_epsilon, target_delta, sample_rate, steps, accountant
        )
    acct = PrivacyAccountant(accountant)
    clipper = PerSampleClipper(model, max_grad_norm, strategy=strategy)
    step = DPStep(
        optimizer,
        clipper,
        noise_multiplier=noise_multiplier,
        expected_batch_size=batch_size,
        sample_rate=sample_rate,
        accountant=acct,
        delta=target_delta,
        physical_batch_size=physical_batch_size,
        epsilon_budget=epsilon_budget,
        amp=amp,
        seed=seed,
        world=world,
        verify=verify,
    )
    if world.distributed:  # every rank starts from rank 0's weights, as DDP would ensure
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)
    note = None if poisson_sampling else NOT_POISSON_NOTE
    if note:
        warnings.warn(note, stacklevel=2)
    return PrivateTraining(
        step, batches, clipper, acct, float(noise_multiplier), sample_rate, batch_size, note
    )
