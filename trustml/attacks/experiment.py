"""Experiment drivers: the privacy audit ("theory vs practice") and canary exposure.

``audit`` trains the same target model at each epsilon in ``attack.audit_epsilons`` (inf =
non-private) on a small Adult subset, attacks each with the same reference models, and compares the
accountant's epsilon with the empirical lower bounds and the attack AUC.

``lm_canaries`` hides random canaries (inserted 1, 4, 16, ... times) in a generated text corpus,
trains the same small GPT-2 without and with DP, and compares the canaries' exposure and the LM
membership attacks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustml.attacks import plots
from trustml.attacks.evaluate import attack_metrics
from trustml.attacks.tabular import logits_of, reference_outputs, tabular_scores
from trustml.config import Config, ConfigError, from_dict
from trustml.evaluation.report import markdown_table


def variant(config: Config, **sections: dict[str, Any]) -> Config:
    """``config`` with some section fields replaced (validated again)."""
    raw = config.to_dict()
    for name, fields in sections.items():
        raw[name] = {**raw[name], **fields}
    return from_dict(raw)


def private_variant(config: Config, eps: float) -> Config:
    """The target's config at accountant epsilon ``eps`` (inf: privacy off)."""
    if math.isinf(eps):
        return variant(config, run={"experiment": "train"}, privacy={"enabled": False})
    return variant(config, run={"experiment": "train"},
                   privacy={"enabled": True, "target_epsilon": eps, "noise_multiplier": None})


def audit(config: Config, run_dir: str | Path) -> dict[str, Any]:
    """Train targets at every audited epsilon, attack them, plot theory vs practice."""
    from trustml.data.tabular import load_tabular
    from trustml.training.run import resolve_device, run_training

    if config.model.kind != "mlp":
        raise ConfigError("run.experiment 'audit' needs a tabular MLP (model.kind: mlp)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.run.device)
    cfg = config.attack
    attacks = cfg.attacks or ["loss", "lira", "rmia"]
    data = load_tabular(config.data, seed=config.run.seed)  # train = the members (data.subset)
    n = min(len(data.train), len(data.test))
    if n < len(data.train):
        raise ConfigError(f"data.subset: the audit needs as many held-out rows as members; "
                          f"use at most {len(data.test)}")
    pool_x = torch.cat([data.train.x, data.test.x[:n]])
    pool_y = torch.cat([data.train.y, data.test.y[:n]])
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    z = min(cfg.n_population, len(data.val))
    pop_x, pop_y = data.val.x[:z], data.val.y[:z]
    refs = None
    if {"lira", "rmia"} & set(attacks):
        refs = reference_outputs(variant(config, privacy={"enabled": False}), pool_x, pool_y,
                                 pop_x, device)
    rows: list[dict[str, Any]] = []
    for eps in cfg.audit_epsilons:
        result = run_training(private_variant(config, eps), run_dir / f"target_eps_{eps:g}")
        accountant = float(result.summary.get("epsilon", math.inf))
        model = result.model.to(device)
        scores = tabular_scores(attacks, cfg, logits_of(model, pool_x, device), pool_y,
                                logits_of(model, pop_x, device), pop_y, refs)
        row: dict[str, Any] = {"target_epsilon": eps, "accountant_epsilon": accountant,
                               "test_accuracy": result.summary.get("test_accuracy", math.nan)}
        for name, s in scores.items():
            m = attack_metrics(s, member, cfg.fpr, config.privacy.delta, n_boot=100)
            row.update({f"{name}_{k}": v for k, v in m.items()})
        rows.append(row)
        (run_dir / "audit.json").write_text(json.dumps(rows, indent=2))
    names = list(scores)
    eps_x = [r["accountant_epsilon"] for r in rows]
    figure = plots.plot_theory_vs_practice(
        eps_x,
        {f"{a} {b}": [r[f"{a}_eps_lb_{b}"] for r in rows]
         for a in names for b in ("clopper_pearson", "gdp")},
        {a: [r[f"{a}_auc"] for r in rows] for a in names},
        run_dir / "theory_vs_practice.png")
    cols = ["target_epsilon", "accountant_epsilon", "test_accuracy",
            *[f"{a}_{k}" for a in names for k in ("auc", "tpr@0.001fpr", "eps_lb_clopper_pearson",
                                                  "eps_lb_gdp")]]
    table = markdown_table(rows, cols, digits=".4g")
    (run_dir / "audit.md").write_text(
        f"# Privacy audit: {n} members vs {n} non-members, {config.attack.n_reference} reference "
        f"models, delta = {config.privacy.delta:g}\n\n{table}\n\n![theory vs practice]"
        f"({figure.name})\n")
    violations = [r["target_epsilon"] for r in rows for a in names
                  if r[f"{a}_eps_lb_clopper_pearson"] > r["accountant_epsilon"]]
    return {"rows": rows, "plot": str(figure), "table": str(run_dir / "audit.md"),
            "bound_exceeds_accountant": violations,
            **{f"eps_{r['target_epsilon']:g}_{a}_auc": r[f"{a}_auc"] for r in rows for a in names}}


def _lm_corpus(config: Config, run_dir: Path, canaries: list[str], repeats: dict[str, int],
               candidates: list[str]) -> Config:
    """Write the corpus with hidden canaries (and the word tokenizer, for ``data.tokenizer:
    words``) into ``run_dir``; return the config that trains on it."""
    from trustml.attacks.canaries import hide_canaries
    from trustml.distill.benchmark import WORD_TOKENIZER
    from trustml.distill.corpus import generate_corpus, word_tokenizer

    corpus = generate_corpus(config.attack.canary_corpus, seed=config.run.seed)
    lines = hide_canaries(corpus, repeats, config.data.val_fraction, config.run.seed)
    text_path = run_dir / "corpus.txt"
    text_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = config.data.tokenizer
    if tokenizer == WORD_TOKENIZER:
        tokenizer = str(run_dir / "tokenizer")
        word_tokenizer(corpus, extra_words=[*canaries, *candidates]).save_pretrained(tokenizer)
    return variant(config, run={"experiment": "train"}, distill={"enabled": False},
                   data={"dataset": "text", "text_path": str(text_path), "path": None,
                         "tokenizer": tokenizer, "subset": None})


def lm_canaries(config: Config, run_dir: str | Path) -> dict[str, Any]:
    """Canary exposure and LM attacks, non-private vs DP; writes report.md and exposure.png."""
    from trustml.attacks import lm
    from trustml.attacks.canaries import count_occurrences, exposures, secret_logppl
    from trustml.attacks.evaluate import lm_member_blocks, lm_scores_of
    from trustml.attacks.exposure import CanaryFormat, make_canaries
    from trustml.attacks.tabular import check_attacks
    from trustml.data.text import lm_datasets, load_tokenizer
    from trustml.training.run import resolve_device, run_training

    a, p = config.attack, config.privacy
    if config.model.kind != "gpt2":
        raise ConfigError("run.experiment 'lm_canaries' needs a language model (model.kind: gpt2)")
    if a.canaries < 1:
        raise ConfigError("attack.canaries: lm_canaries needs at least 1 canary")
    if (p.noise_multiplier is None) == (p.target_epsilon is None):
        raise ConfigError("lm_canaries trains a DP model too: set exactly one of "
                          "privacy.target_epsilon and privacy.noise_multiplier")
    attacks = a.attacks or ["loss", "zlib", "min_k", "min_k_pp"]
    check_attacks(attacks, lm.LM_ATTACKS)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.run.device)

    fmt = CanaryFormat()
    canaries = make_canaries(fmt, a.canaries, seed=config.run.seed)
    repeats = {c: a.canary_repeats[i % len(a.canary_repeats)] for i, c in enumerate(canaries)}
    candidates = make_canaries(fmt, a.canary_candidates, seed=config.run.seed + 1,
                               exclude=tuple(canaries))
    base = _lm_corpus(config, run_dir, canaries, repeats, candidates)
    tokenizer = load_tokenizer(base.data.tokenizer)
    train, val = lm_datasets(base.data, tokenizer)
    ids = {c: tokenizer(c)["input_ids"] for c in canaries}
    copies = {c: count_occurrences(train, ids[c]) for c in canaries}
    leaked = [c for c in canaries if count_occurrences(val, ids[c])]
    if leaked or any(copies[c] != repeats[c] for c in canaries):
        raise RuntimeError(f"canary insertion went wrong: {leaked or copies} (copies in the "
                           "validation text, or training copies != insertions)")
    blocks, member = lm_member_blocks(train, val, a.n_targets)
    reference = None
    if "reference" in attacks:
        if a.reference_run is None:
            raise ConfigError("attack 'reference' needs attack.reference_run")
        reference = lm.load_reference_lm(a.reference_run, tokenizer)

    counts = sorted(set(repeats.values()))
    results: dict[str, dict[str, Any]] = {}
    for name, cfg in (("non_private", private_variant(base, math.inf)),
                      ("private", variant(base, privacy={"enabled": True}))):
        trained = run_training(cfg, run_dir / name)
        model = trained.model.to(device)
        logppl = secret_logppl(model, tokenizer, [*canaries, *candidates], base.data.seq_len,
                               device)
        exp = exposures(logppl[: len(canaries)], logppl[len(canaries):])
        scores = lm_scores_of(model, blocks, attacks, base, tokenizer, device, reference)
        results[name] = {
            "epsilon": float(trained.summary.get("epsilon", math.inf)),
            "val_perplexity": trained.summary.get("val_perplexity", math.nan),
            "exposure": {est: {r: float(np.mean([v for c, v in zip(canaries, values)
                                                 if repeats[c] == r])) for r in counts}
                         for est, values in exp.items()},
            "canary_exposure": {c: {est: float(exp[est][i]) for est in exp}
                                for i, c in enumerate(canaries)},
            "attacks": {k: attack_metrics(s, member, a.fpr, p.delta) for k, s in scores.items()},
        }
    ceiling = math.log2(len(candidates) + 1)
    figure = plots.plot_exposure(
        counts, {f"{m} ({est})": [results[m]["exposure"][est][r] for r in counts]
                 for m in results for est in ("rank", "skewnorm")},
        run_dir / "exposure.png", rank_ceiling=ceiling)
    top = counts[-1]
    checks = {
        "non_private_exposes_most_repeated": results["non_private"]["exposure"]["rank"][top]
        >= ceiling - 1.0,
        "dp_lowers_exposure": results["private"]["exposure"]["skewnorm"][top]
        < results["non_private"]["exposure"]["skewnorm"][top],
    }
    report = _canary_report(config, fmt, results, counts, repeats, figure, checks, ceiling,
                            int(member.sum()))
    (run_dir / "report.md").write_text(report)
    summary = {"results": results, "checks": checks, "train_copies": copies,
               "report": str(run_dir / "report.md"), "plot": str(figure),
               **{f"{m}_exposure_{est}_x{top}": results[m]["exposure"][est][top]
                  for m in results for est in ("rank", "skewnorm")},
               **{f"{m}_epsilon": results[m]["epsilon"] for m in results}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _canary_report(config: Config, fmt, results: dict[str, dict[str, Any]], counts: list[int],
                   repeats: dict[str, int], figure: Path,
                   checks: dict[str, bool], ceiling: float, n_members: int) -> str:
    a = config.attack
    names = list(results)
    exposure_rows = []
    for r in counts:
        row: dict[str, Any] = {"insertions": r,
                               "canaries": sum(v == r for v in repeats.values())}
        for m in names:
            for est in ("rank", "skewnorm"):
                row[f"{m} {est}"] = results[m]["exposure"][est][r]
        exposure_rows.append(row)
    attack_rows = []
    for m in names:
        row = {"model": m, "epsilon": results[m]["epsilon"],
               "val perplexity": float(results[m]["val_perplexity"])}
        for k, v in results[m]["attacks"].items():
            row[f"{k} AUC"] = v["auc"]
            row[f"{k} TPR@{a.fpr[0]:g}"] = v[f"tpr@{a.fpr[0]:g}fpr"]
        attack_rows.append(row)
    return "\n".join([
        "# Canary exposure: non-private vs DP", "",
        (f"{len(repeats)} random canaries `{fmt.template}` ({fmt.length} symbols of "
         f"`{fmt.alphabet}`, 2^{fmt.log2_space:.1f} possible secrets) hidden in "
         f"{a.canary_corpus} generated sentences, inserted {counts} times; GPT-2 "
         f"{config.model.config}, {config.train.epochs} epochs, batch {config.train.batch_size}. "
         f"Exposure (bits) = log2|R| - log2 rank, mean over the canaries of each insertion count: "
         f"`rank` against {a.canary_candidates} non-inserted secrets (saturates at "
         f"{ceiling:.2f}), `skewnorm` extrapolated from a skew-normal fit to their "
         "log-perplexities."), "",
        markdown_table(exposure_rows, list(exposure_rows[0]), digits=".4g"), "",
        f"![exposure]({figure.name})", "",
        f"Membership inference on {n_members} training blocks vs as many held-out blocks:", "",
        markdown_table(attack_rows, list(attack_rows[0]), digits=".4g"), "",
        "Checks: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in checks.items()), "",
    ])
