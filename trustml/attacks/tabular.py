"""Membership attacks on a tabular classifier: target outputs + reference models -> scores.

The pool is the examples being attacked (target members and non-members, mixed); reference models
train on random halves of that pool, so every pool example has IN and OUT reference models. The
population (RMIA's z) is data no model trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trustml.attacks import scores as sc
from trustml.attacks.reference import half_masks, train_reference_mlps
from trustml.config import AttackConfig, Config, ConfigError

TABULAR_ATTACKS = ("loss", "lira", "rmia")


@dataclass
class ReferenceOutputs:
    pool_logits: torch.Tensor  # (R, N, C)
    population_logits: torch.Tensor  # (R, Z, C)
    in_mask: np.ndarray  # (R, N)


def check_attacks(attacks: list[str], known: tuple[str, ...]) -> None:
    unknown = [a for a in attacks if a not in known]
    if unknown:
        raise ConfigError(f"attack.attacks: unknown {unknown}; expected some of {list(known)}")


def attack_seed(config: Config) -> int:
    """The reference models' seed: ``attack.seed``, else ``run.seed`` (same run, same figures)."""
    return config.run.seed if config.attack.seed is None else config.attack.seed


def reference_outputs(config: Config, pool_x: torch.Tensor, pool_y: torch.Tensor,
                      population_x: torch.Tensor, device, progress: bool = True
                      ) -> ReferenceOutputs:
    """Train ``attack.n_reference`` MLPs (batched) with the run's model and training settings.

    The reference models are trained without DP even for a DP target: the attacker only needs to
    know how the signal of an example behaves IN and OUT, and the audit bound is valid for any
    attack, however the attacker built it."""
    seed = attack_seed(config)
    mask = half_masks(config.attack.n_reference, len(pool_x), seed=seed + 1)
    refs = train_reference_mlps(config, pool_x, pool_y, mask, device=device, seed=seed + 1000,
                                progress=progress)
    return ReferenceOutputs(refs.logits(pool_x), refs.logits(population_x), mask)


def tabular_scores(
    attacks: list[str],
    cfg: AttackConfig,
    target_pool_logits: torch.Tensor,
    pool_y: torch.Tensor,
    target_population_logits: torch.Tensor | None = None,
    population_y: torch.Tensor | None = None,
    refs: ReferenceOutputs | None = None,
) -> dict[str, np.ndarray]:
    """Score every pool example with each attack (higher = member)."""
    check_attacks(attacks, TABULAR_ATTACKS)
    out: dict[str, np.ndarray] = {}
    if "loss" in attacks:
        out["loss"] = sc.loss_score(target_pool_logits, pool_y)
    if ("lira" in attacks or "rmia" in attacks) and refs is None:
        raise ValueError("lira and rmia need reference model outputs")
    suffix = "" if cfg.online else "_offline"
    if "lira" in attacks:
        out["lira" + suffix] = sc.lira(sc.lira_signal(target_pool_logits, pool_y),
                                       sc.lira_signal(refs.pool_logits, pool_y), refs.in_mask,
                                       online=cfg.online)
    if "rmia" in attacks:
        if target_population_logits is None or population_y is None:
            raise ValueError("rmia needs population samples")
        marg_x = sc.rmia_marginal(sc.true_class_prob(refs.pool_logits, pool_y), refs.in_mask,
                                  online=cfg.online, a=cfg.rmia_a)
        marg_z = sc.rmia_marginal(sc.true_class_prob(refs.population_logits, population_y), None,
                                  online=cfg.online, a=cfg.rmia_a)
        out["rmia" + suffix] = sc.rmia(sc.true_class_prob(target_pool_logits, pool_y), marg_x,
                                       sc.true_class_prob(target_population_logits, population_y),
                                       marg_z, gamma=cfg.rmia_gamma)
    return out


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, device, chunk: int = 8192) -> torch.Tensor:
    model.eval()
    return torch.cat([model(part.to(device)).float().cpu() for part in x.split(chunk)])
