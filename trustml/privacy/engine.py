"""make_private: turn (model, optimizer, data) into a DP-SGD step, batch source and accountant."""

from __future__ import annotations

import math
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
    "Poisson sampling with rate batch_size/N, so the reported epsilon is NOT a proven guarantee; "
    "set privacy.poisson: true (make_private(poisson_sampling=True)) for one"
)


@dataclass
class PrivateTraining:
    """What the training loop needs for DP-SGD; ``state_dict`` checkpoints the spent privacy.

    On resume the loop restores it (:meth:`load_state_dict`), then calls :meth:`restored`, which
    cross-checks the accountant history against the loop's step count and the metrics log, and,
    with a ``target_epsilon``, recalibrates the noise for the steps left given what was spent.
    """

    step: DPStep
    batches: PoissonBatches | ShuffledBatches
    clipper: PerSampleClipper
    accountant: PrivacyAccountant
    noise_multiplier: float
    sample_rate: float
    expected_batch_size: int
    note: str | None = None  # set when the epsilon is not a proven guarantee
    target_epsilon: float | None = None
    planned_steps: int = 0  # the steps target_epsilon was calibrated for

    @property
    def secure_rng(self) -> bool:
        return self.step.secure_rng

    @property
    def verification(self) -> Verification | None:
        """The self-check's result once the first batch has been stepped (None before, or off)."""
        return self.step.verification

    def state_dict(self) -> dict[str, Any]:
        return self.step.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        """What the metrics log records at every start and resume (the sigma of each segment)."""
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "accountant": self.accountant.kind, "secure_rng": self.secure_rng}

    def restored(self, step: int, records: list[dict[str, Any]]) -> None:
        """Refuse a restored privacy record that disagrees with the loop's ``step`` or the metrics
        log (its start/resume events give every segment's sigma and q, its step records the
        epsilon spent), then recalibrate the noise for the remaining steps if needed."""
        history = self.accountant.history
        if self.accountant.steps != step:
            raise ValueError(f"the accountant history charges {self.accountant.steps} steps but "
                             f"the checkpoint is at step {step}")
        for sigma, q, _ in history:
            if not math.isclose(q, self.sample_rate, rel_tol=1e-9):
                raise ValueError(f"the accountant history has sample rate {q}, this run "
                                 f"samples at {self.sample_rate}")
            if self.target_epsilon is None and sigma != self.noise_multiplier:
                raise ValueError(f"the accountant history has noise multiplier {sigma}, this "
                                 f"run's config {self.noise_multiplier}")
        logged = logged_history(records, step)
        if step and not logged:
            raise ValueError("metrics.jsonl has no start/resume record to cross-check the "
                             "accountant history against (the log is missing or truncated)")
        if _merged(history) != _merged(logged):
            raise ValueError(f"the accountant history {history} disagrees with the metrics "
                             f"log's segments {logged}")
        spent = self.accountant.epsilon(self.step.delta)
        at_step = [r["epsilon"] for r in records if "event" not in r and r.get("step") == step
                   and isinstance(r.get("epsilon"), (int, float))]
        if step and (not at_step or not math.isclose(at_step[-1], spent, rel_tol=1e-6)):
            raise ValueError(f"the checkpoint's epsilon {spent:.6g} at step {step} disagrees "
                             f"with the metrics log's {at_step[-1] if at_step else 'missing'}")
        remaining = self.planned_steps - step
        if self.target_epsilon is None or remaining <= 0:
            return
        ahead = (self.noise_multiplier, self.sample_rate, remaining)
        if self.accountant.epsilon(self.step.delta, extra=ahead) > self.target_epsilon:
            sigma = self.accountant.noise_for(self.target_epsilon, self.step.delta,
                                              self.sample_rate, remaining)
            self.noise_multiplier = self.step.noise_multiplier = sigma


def _merged(history: Sequence[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Adjacent segments with the same (sigma, q) joined, as Opacus stores them."""
    out: list[tuple[float, float, int]] = []
    for sigma, q, n in history:
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + n)
        elif n:
            out.append((sigma, q, n))
    return out


def logged_history(records: list[dict[str, Any]], step: int) -> list[tuple[float, float, int]]:
    """The (sigma, q, steps) segments up to ``step`` that the metrics log's start/resume events
    describe; a later event at step s replaces whatever an earlier (crashed) segment did from s."""
    starts: list[tuple[int, float, float]] = []
    for record in records:
        privacy = record.get("privacy")
        if record.get("event") not in ("start", "resume") or not isinstance(privacy, dict):
            continue
        at = record.get("step")
        if not isinstance(at, int) or at > step:
            continue
        starts = [s for s in starts if s[0] < at]
        starts.append((at, float(privacy["noise_multiplier"]), float(privacy["sample_rate"])))
    ends = [s[0] for s in starts[1:]] + [step]
    return [(sigma, q, end - at) for (at, sigma, q), end in zip(starts, ends)]


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
    secure_rng: bool = True,
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

    ``secure_rng=True`` (the default) draws the noise and the batches from the OS CSPRNG, never
    from ``seed`` and never into a checkpoint (``trustml.privacy.step``); ``secure_rng=False``
    seeds them from ``seed`` for bit-reproducible experiments and tests.
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
    rng_seed = None if secure_rng else seed
    batches = (
        PoissonBatches(dataset, sample_rate, seed=rng_seed, world=world)
        if poisson_sampling
        else ShuffledBatches(dataset, batch_size, seed=rng_seed, world=world)
    )
    steps = max(1, round(epochs * len(batches)))
    if target_epsilon is not None:  # calibrated for the steps this run will really take
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
        seed=rng_seed,
        world=world,
        verify=verify,
    )
    if world.distributed:  # every rank starts from rank 0's weights, as DDP would ensure
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)
    note = None if poisson_sampling else NOT_POISSON_NOTE
    if note:
        warnings.warn(note, stacklevel=2)
    return PrivateTraining(step, batches, clipper, acct, float(noise_multiplier), sample_rate,
                           batch_size, note, target_epsilon, steps)
