"""Evaluator for ``evaluate.py --attacks``: member (train) vs non-member (held-out) scores of the
run's model, their metrics, empirical epsilon lower bounds, ROC curves and histograms.

Tabular runs: LOSS / LiRA / RMIA with batched reference MLPs, shared across the ranks under
torchrun (rank 0 alone scores and reports). Language-model runs (single process): LOSS, zlib,
Min-K%, Min-K%++ and the reference-model difference over token blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trustml.attacks import audit, lm, metrics, plots
from trustml.attacks.tabular import (
    attack_seed,
    check_attacks,
    logits_of,
    reference_outputs,
    tabular_scores,
)
from trustml.config import ConfigError
from trustml.evaluation.context import EvalContext, ReportSection
from trustml.training.distributed import current


def attack_metrics(scores: np.ndarray, is_member: np.ndarray, fprs: list[float], delta: float,
                   n_boot: int = 200) -> dict[str, float]:
    """Headline metrics of one attack, its Clopper-Pearson epsilon lower bound (valid for any
    mechanism) and the Gaussian-trade-off epsilon ESTIMATE (not a bound: ``eps_estimate_gdp``)."""
    out = metrics.summary(scores, is_member, fprs, n_boot=n_boot)
    out["eps_lb_clopper_pearson"] = audit.epsilon_lower_bound(scores, is_member, delta)
    out["eps_estimate_gdp"] = audit.gdp_epsilon_estimate(scores, is_member, delta)
    return out


def attack_section(all_scores: dict[str, np.ndarray], is_member: np.ndarray, fprs: list[float],
                   delta: float, out_dir: Path, title: str = "Membership inference"
                   ) -> ReportSection:
    """Metrics table, ROC (linear + log-log) and one IN/OUT histogram per attack."""
    out_dir = Path(out_dir)
    table = {name: attack_metrics(s, is_member, fprs, delta) for name, s in all_scores.items()}
    cols = ["auc", "balanced_accuracy", "advantage", *[f"tpr@{f:g}fpr" for f in fprs],
            "eps_lb_clopper_pearson", "eps_estimate_gdp"]
    lines = [(f"{int(is_member.sum())} members (training rows) vs {int((~is_member).sum())} "
              f"non-members (held out). TPR@FPR: best real threshold with FPR <= the target (ties "
              f"never split). `eps_lb_clopper_pearson`: epsilon lower bound at delta = {delta:g}, "
              "95% confidence, valid for any mechanism (members and non-members treated as "
              "independent trials). `eps_estimate_gdp`: NOT a bound, an estimate that assumes a "
              "Gaussian trade-off curve (mu-GDP); it can exceed the true epsilon."),
             "", "| attack | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4g}" for c in cols) + " |")
    lines.append("")
    lines.append("AUC 95% bootstrap intervals: " + ", ".join(
        f"{n} [{r['auc_ci_low']:.3f}, {r['auc_ci_high']:.3f}]" for n, r in table.items()))
    roc = plots.plot_roc({n: (s, is_member) for n, s in all_scores.items()},
                         out_dir / "attack_roc.png", title)
    hists = [plots.plot_histogram(s, is_member, out_dir / f"attack_hist_{n}.png", f"{n} scores")
             for n, s in all_scores.items()]
    return ReportSection(title, table, "\n".join(lines), [roc, *hists])


def _take(n: int | None, length: int) -> int:
    return length if n is None else min(n, length)


def evaluate_attacks(ctx: EvalContext, attacks: list[str]) -> ReportSection | None:
    """Membership inference against the run in ``ctx`` (tabular or language model). Under
    torchrun every rank trains its share of the reference models; None off rank 0."""
    if ctx.parts.data is None:
        return evaluate_lm_attacks(ctx, attacks) if current().is_main else None
    cfg = ctx.config
    delta = cfg.privacy.delta
    data = ctx.parts.data
    n = min(_take(cfg.attack.n_targets, len(data.train)), len(data.test))
    # sorted: when every training row is picked (an audit target) the pool is the audit's own, in
    # its order, so the reference models and figures equal audit.md's
    pick_in = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:n]
    pick_in = pick_in.sort().values
    pool_x = torch.cat([data.train.x[pick_in], data.test.x[:n]])
    pool_y = torch.cat([data.train.y[pick_in], data.test.y[:n]])
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    z = _take(cfg.attack.n_population, len(data.val))
    if z == 0 and "rmia" in attacks:
        raise ConfigError("attack rmia draws its population from the validation split, which "
                          "data.val_fraction=0 leaves empty; raise data.val_fraction")
    pop_x, pop_y = data.val.x[:z], data.val.y[:z]
    refs = None
    if {"lira", "rmia"} & set(attacks):
        refs = reference_outputs(cfg, pool_x, pool_y, pop_x, ctx.device)
    if not current().is_main:
        return None
    all_scores = tabular_scores(attacks, cfg.attack, logits_of(ctx.model, pool_x, ctx.device),
                                pool_y, logits_of(ctx.model, pop_x, ctx.device), pop_y, refs)
    section = attack_section(all_scores, member, cfg.attack.fpr, delta, ctx.out_dir)
    if refs is not None:
        section.markdown = (f"{cfg.attack.n_reference} reference models, seed "
                            f"{attack_seed(cfg)} (attack.seed; default run.seed): the same run "
                            f"evaluated again gives the same figures.\n\n{section.markdown}")
    return section


def lm_member_blocks(train, val, n_targets: int | None) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Equally many training blocks (members, a fixed random pick) and held-out blocks."""
    n = min(_take(n_targets, len(train)), len(val))
    pick_in = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    blocks = {key: torch.cat([train.gather(pick_in)[key], val.gather(torch.arange(n))[key]])
              for key in ("input_ids", "attention_mask")}
    return blocks, np.r_[np.ones(n, bool), np.zeros(n, bool)]


def lm_scores_of(model, blocks: dict[str, torch.Tensor], attacks: list[str], cfg, tokenizer,
                 device, reference=None) -> dict[str, np.ndarray]:
    """Every requested LM attack's scores for ``blocks`` (the reference model, when given, is
    scored on the same blocks)."""
    ids, mask = blocks["input_ids"], blocks["attention_mask"]
    target = lm.token_stats(model, ids, mask, device)
    ref = None if reference is None else lm.token_stats(reference.to(device), ids, mask, device)
    texts = lm.block_texts(tokenizer, ids, mask) if "zlib" in attacks else None
    return lm.lm_attack_scores(attacks, target, texts, ref, k=cfg.attack.min_k)


def evaluate_lm_attacks(ctx: EvalContext, attacks: list[str]) -> ReportSection:
    """LM attacks: training blocks (members) vs validation blocks (non-members)."""
    cfg = ctx.config
    check_attacks(attacks, lm.LM_ATTACKS)
    reference = None
    if "reference" in attacks:
        if cfg.attack.reference_run is None:
            raise ConfigError("attack 'reference' needs attack.reference_run (a run directory "
                              "whose model is the reference language model)")
        reference = lm.load_reference_lm(cfg.attack.reference_run, ctx.parts.tokenizer)
    blocks, member = lm_member_blocks(ctx.parts.train, ctx.parts.val, cfg.attack.n_targets)
    all_scores = lm_scores_of(ctx.model, blocks, attacks, cfg, ctx.parts.tokenizer, ctx.device,
                              reference)
    return attack_section(all_scores, member, cfg.attack.fpr, cfg.privacy.delta, ctx.out_dir,
                          title="Membership inference (language model)")
