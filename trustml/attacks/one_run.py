"""One audited DP-SGD training run (Steinke, Nasr, Jagielski 2023): canaries by coin flips.

Two kinds of canaries ride in the same run, each canary IN with probability 1/2, independently:

* input-space canaries (black-box): held-out rows with their label flipped (mislabelled examples,
  the ones a model must memorise to fit); the IN ones join the training set. Score: minus the
  target's loss on the canary (the LOSS attack, black-box).
* gradient canaries (white-box): Dirac gradients of norm C in coordinates no real example touches
  (:mod:`trustml.attacks.gradient_canaries`). Score: the log-likelihood ratio of every observed
  noisy update in the canary's coordinate.

The training itself is trustml's DP engine (``make_private``: Poisson sampling, per-sample
clipping, noise, accountant) on the configured MLP and optimizer; ``epsilon = inf`` keeps the
clipping and drops the noise (non-private).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from trustml.attacks.gradient_canaries import GradientCanaries, WithCanarySlot
from trustml.attacks.scores import loss_score
from trustml.attacks.tabular import logits_of
from trustml.config import Config
from trustml.data.tabular import TabularData, TabularSplit


@dataclass
class AuditedRun:
    accountant_epsilon: float
    noise_multiplier: float
    test_accuracy: float
    input_scores: np.ndarray  # (m_input,) minus loss on the flipped label
    input_member: np.ndarray
    gradient_scores: np.ndarray  # (m_gradient,) per-step log-likelihood ratios
    gradient_member: np.ndarray


def coin_flips(m: int, generator: np.random.Generator) -> np.ndarray:
    return generator.random(m) < 0.5


def secret_generator(seed: int | None) -> np.random.Generator:
    """The auditor's coins: from ``seed`` when the user wants a reproducible audit, else from the
    OS (secret: the trained model's randomness must not be able to echo them)."""
    return np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(8)))


def mislabelled(rows: TabularSplit) -> TabularSplit:
    n_classes = int(rows.y.max()) + 1 if len(rows) else 2
    flipped = (rows.y + 1) % max(n_classes, 2)
    return TabularSplit(rows.x.numpy(), flipped.numpy(), rows.s.numpy(), {})


def with_rows(base: TabularSplit, extra: TabularSplit, keep: np.ndarray) -> TabularSplit:
    index = torch.as_tensor(np.nonzero(keep)[0])
    return TabularSplit(torch.cat([base.x, extra.x[index]]).numpy(),
                        torch.cat([base.y, extra.y[index]]).numpy(),
                        torch.cat([base.s, extra.s[index]]).numpy(), {})


def audited_run(config: Config, epsilon: float, data: TabularData, input_canaries: TabularSplit,
                n_gradient: int, coins: np.random.Generator, progress: bool = False) -> AuditedRun:
    """Train the configured MLP with DP-SGD at accountant ``epsilon`` (inf: no noise) with fresh
    coin-flip canaries of both kinds; return the accountant's epsilon and the canaries' scores."""
    from trustml.models.mlp import MLP
    from trustml.privacy import make_private
    from trustml.training.objectives import ClassificationObjective
    from trustml.runner import make_optimizer

    torch.manual_seed(config.run.seed)
    p, t = config.privacy, config.train
    input_member = coin_flips(len(input_canaries), coins)
    gradient_member = coin_flips(n_gradient, coins)
    train = with_rows(data.train, input_canaries, input_member)
    net = MLP(data.n_features, config.model.hidden, 2, config.model.activation,
              config.model.dropout, config.model.norm)
    model = WithCanarySlot(net, n_gradient)
    optimizer = make_optimizer(t, model.parameters())
    noise = {"noise_multiplier": 0.0} if math.isinf(epsilon) else {"target_epsilon": epsilon}
    # no noise: epsilon is infinite whatever the accountant (Opacus's PRV cannot even say so)
    accountant = "rdp" if math.isinf(epsilon) else p.accountant
    private = make_private(model, optimizer, train, target_delta=p.delta, epochs=t.epochs,
                           max_grad_norm=p.max_grad_norm, accountant=accountant,
                           batch_size=min(t.batch_size, len(train)),
                           physical_batch_size=p.physical_batch_size,
                           seed=int(coins.integers(2**31)), **noise)
    canaries = GradientCanaries(
        private.step.optimizer, model.slot, gradient_member, max_grad_norm=p.max_grad_norm,
        expected_batch_size=private.expected_batch_size, sample_rate=private.sample_rate,
        noise_multiplier=private.noise_multiplier,
        generator=torch.Generator().manual_seed(int(coins.integers(2**31))))
    private.step.optimizer = canaries
    objective = ClassificationObjective()
    model.train()
    bar = tqdm(total=t.epochs * len(private.batches), disable=not progress,
               desc=f"audit eps={epsilon:g}", leave=False)
    for epoch in range(t.epochs):
        for batch in private.batches.batches(epoch):
            private.step.step(model, objective, batch)
            bar.update()
    bar.close()
    net.eval()
    test_pred = logits_of(net, data.test.x, "cpu").argmax(1)
    return AuditedRun(
        accountant_epsilon=private.accountant.epsilon(p.delta) if private.noise_multiplier > 0
        else math.inf,
        noise_multiplier=private.noise_multiplier,
        test_accuracy=float((test_pred == data.test.y).float().mean()),
        input_scores=loss_score(logits_of(net, input_canaries.x, "cpu"), input_canaries.y),
        input_member=input_member,
        gradient_scores=canaries.llr.numpy(),
        gradient_member=gradient_member,
    )
