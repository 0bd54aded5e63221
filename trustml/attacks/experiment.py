"""Experiment drivers: the privacy audit ("theory vs practice") and canary exposure.

``audit`` runs one audited DP-SGD training per epsilon in ``attack.audit_epsilons`` (inf = no
noise) with coin-flip canaries (white-box gradient canaries and black-box mislabelled rows, see
:mod:`trustml.attacks.one_run`) and compares the accountant's epsilon with the sound empirical lower
bounds; a bound above the accountant is reported as broken privacy.

``lm_canaries`` hides random canaries (inserted 1, 4, 16, ... times) in a generated text corpus,
trains the same small GPT-2 without and with DP, and compares the canaries' exposure and the LM
membership attacks.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustml.attacks import plots
from trustml.attacks.evaluate import attack_metrics
from trustml.config import Config, ConfigError, from_dict
from trustml.evaluation.context import markdown_table
from trustml.progress import is_quiet


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
    """One-run audits at every epsilon in ``attack.audit_epsilons``: accountant epsilon beside the
    white-box and black-box lower bounds; loud when a bound exceeds the accountant."""
    from trustml.attacks.audit import one_run_audit
    from trustml.attacks.metrics import auc
    from trustml.attacks.one_run import audited_run, mislabelled, secret_generator
    from trustml.data.tabular import load_tabular

    if config.model.kind != "mlp":
        raise ConfigError("run.experiment 'audit' needs a tabular MLP (model.kind: mlp)")
    if not config.privacy.poisson:
        raise ConfigError("privacy.poisson: the audit checks the accountant, which assumes "
                          "Poisson sampling; set it to true")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, delta = config.attack, config.privacy.delta
    alpha = 1.0 - cfg.audit_confidence
    data = load_tabular(config.data, seed=config.run.seed)
    if cfg.audit_input_canaries > len(data.val):
        raise ConfigError(f"attack.audit_input_canaries: at most {len(data.val)} (validation rows)")
    input_canaries = mislabelled(data.val.subset(np.arange(cfg.audit_input_canaries)))
    coins = secret_generator(cfg.audit_seed)
    rows: list[dict[str, Any]] = []
    for eps in cfg.audit_epsilons:
        run = audited_run(config, eps, data, input_canaries, cfg.audit_gradient_canaries, coins,
                          progress=not is_quiet())
        row: dict[str, Any] = {"target_epsilon": eps, "accountant_epsilon": run.accountant_epsilon,
                               "noise_multiplier": run.noise_multiplier,
                               "test_accuracy": run.test_accuracy}
        for kind, scores, member, independent in (
                ("white_box", run.gradient_scores, run.gradient_member, True),
                ("black_box", run.input_scores, run.input_member, False)):
            row[f"{kind}_auc"] = auc(scores, member)
            row.update({f"{kind}_{k}": v for k, v in one_run_audit(
                scores, member, delta, alpha, independent_trials=independent).items()})
        row["privacy_broken"] = any(row[f"{k}_eps_lb"] > row["accountant_epsilon"]
                                    for k in ("white_box", "black_box"))
        if row["privacy_broken"]:
            print(f"ERROR: PRIVACY BROKEN at accountant epsilon {row['accountant_epsilon']:.4g}: "
                  f"empirical lower bound {row['white_box_eps_lb']:.4g} (white-box) / "
                  f"{row['black_box_eps_lb']:.4g} (black-box) exceeds it", file=sys.stderr)
        rows.append(row)
        (run_dir / "audit.json").write_text(json.dumps(rows, indent=2))
    figure = plots.plot_theory_vs_practice(
        [r["accountant_epsilon"] for r in rows],
        {f"{k.replace('_', '-')} lower bound": [r[f"{k}_eps_lb"] for r in rows]
         for k in ("white_box", "black_box")},
        {f"{k.replace('_', '-')} canaries": [r[f"{k}_auc"] for r in rows]
         for k in ("white_box", "black_box")},
        run_dir / "theory_vs_practice.png")
    broken = [r["target_epsilon"] for r in rows if r["privacy_broken"]]
    report = _audit_report(config, rows, figure, broken, len(data.train))
    (run_dir / "audit.md").write_text(report)
    tightness = {f"{r['target_epsilon']:g}": r["white_box_eps_lb"] / r["accountant_epsilon"]
                 for r in rows if math.isfinite(r["accountant_epsilon"])}
    flat = {f"{k}@eps={r['target_epsilon']:g}": r[k] for r in rows
            for k in ("accountant_epsilon", "white_box_eps_lb", "black_box_eps_lb", "test_accuracy")}
    return {"privacy_broken": len(broken), **flat, "rows": rows, "plot": str(figure),
            "table": str(run_dir / "audit.md"), "white_box_tightness": tightness,
            "bound_exceeds_accountant": broken}


def _audit_report(config: Config, rows: list[dict[str, Any]], figure: Path, broken: list[float],
                  n_train: int) -> str:
    a, p = config.attack, config.privacy
    batch = (f"{config.train.batch_size}" if config.train.batch_size < n_train
             else "= all rows (full-batch, sample rate 1)")
    cols = ["target_epsilon", "accountant_epsilon", "noise_multiplier", "test_accuracy",
            *[f"{k}_{m}" for k in ("white_box", "black_box")
              for m in ("eps_lb", "eps_lb_clopper_pearson", "eps_lb_one_run", "auc",
                        "eps_estimate_gdp")]]
    alarm = ([f"**ERROR: PRIVACY BROKEN.** At target epsilon {broken} an empirical lower bound "
              "exceeds the accountant's epsilon: the DP engine or its accountant is wrong.", ""]
             if broken else ["No lower bound exceeds the accountant's epsilon.", ""])
    return "\n".join([
        f"# Privacy audit (one run per epsilon, seed {config.run.seed}, coins seed {a.audit_seed})",
        "", *alarm,
        (f"DP-SGD on {n_train} Adult rows, MLP {config.model.hidden}, {config.train.epochs} "
         f"epochs, expected batch {batch}, {p.accountant.upper()} accountant, "
         f"delta = {p.delta:g}. Each run holds {a.audit_gradient_canaries} white-box gradient "
         f"canaries (Dirac gradients of norm C = max_grad_norm in coordinates no example touches; "
         f"score: log-likelihood ratio of every noisy update) and {a.audit_input_canaries} "
         "black-box canaries (held-out rows with flipped labels; score: minus the loss), each "
         "included by its own fair coin."), "",
        (f"`eps_lb`: epsilon lower bound at {a.audit_confidence:.0%} confidence, valid for any "
         "mechanism, the one checked against the accountant. White-box: the larger of "
         "Clopper-Pearson over thresholds (Bonferroni; the gradient canaries are independent "
         "trials) and the one-run bound of Steinke, Nasr, Jagielski (2023), each at half the "
         "level. Black-box: the one-run bound alone (the canaries share one model, so they are "
         "not independent trials; their Clopper-Pearson column is shown for reference only). "
         "`eps_estimate_gdp` is NOT a bound: an estimate assuming a Gaussian trade-off curve, "
         "never used in the violation check. epsilon inf: clipping without noise."), "",
        markdown_table(rows, cols, digits=".4g"), "",
        f"![theory vs practice]({figure.name})", "",
    ])


def canary_extraction(config: Config, run_dir: str | Path) -> dict[str, Any]:
    """Parikh et al. (2022) canary extraction against word-level intent classifiers, non-private
    and DP (``attack.extraction_epsilons``): success rates of the relaxed (gradient) and exhaustive
    model inversions and the true PIN's rank among all 10^4; writes report.md."""
    from trustml.attacks import extraction as ex

    a, p, t = config.attack, config.privacy, config.train
    if not config.model.hidden:
        raise ConfigError("model.hidden: canary_extraction needs one hidden layer size, e.g. [64]")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.run.seed)
    pins = [tuple(ex.DIGITS[i] for i in rng.integers(10, size=4)) for _ in range(a.extraction_trials)]
    rows: list[dict[str, Any]] = []
    for eps in a.extraction_epsilons:
        results, spent, accuracy = [], math.inf, []
        for trial, pin in enumerate(pins):
            seed = config.run.seed + trial
            corpus = ex.command_corpus(a.canary_corpus, list(pin), a.extraction_repeats, seed)
            held_out = ex.command_corpus(1000, None, 0, seed + 10_000)
            model, spent = ex.train_classifier(
                corpus, eps, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                hidden=config.model.hidden[0], delta=p.delta, max_grad_norm=p.max_grad_norm,
                accountant=p.accountant, seed=seed)
            with torch.no_grad():
                accuracy.append(float((model(held_out.ids).argmax(1) == held_out.labels)
                                      .float().mean()))
            results.append(ex.extract(model, corpus, pin, seed=seed))
        ranks = np.array([r.rank for r in results])
        rows.append({
            "target_epsilon": eps, "accountant_epsilon": spent,
            "test_accuracy": float(np.mean(accuracy)),
            "relaxed_success": float(np.mean([r.relaxed_exact for r in results])),
            "exhaustive_success": float(np.mean([r.exhaustive_exact for r in results])),
            "relaxed_digits_correct": float(np.mean([r.digits_correct for r in results])),
            "median_rank": float(np.median(ranks)),
            "median_exposure_bits": float(np.median(np.log2(1e4) - np.log2(ranks))),
        })
        (run_dir / "extraction.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows, list(rows[0]), digits=".4g")
    (run_dir / "report.md").write_text("\n".join([
        "# Canary extraction (Parikh et al. 2022): non-private vs DP", "",
        (f"Per epsilon, {a.extraction_trials} word-level intent classifiers (embeddings by "
         f"position -> MLP {config.model.hidden}), each trained on {a.canary_corpus} generated "
         f"commands plus {a.extraction_repeats} copies of its own canary `my pin is D D D D` "
         f"(label `{ex.CANARY_INTENT}`, random PIN, run seed {config.run.seed}); {t.epochs} "
         f"epochs, batch {t.batch_size}, Adam lr {t.lr}; DP-SGD via trustml at delta "
         f"{p.delta:g}. The white-box attacker knows the prefix and the label. `relaxed_success`: "
         "the gradient-based relaxation over the digit embeddings recovers the whole PIN; "
         "`exhaustive_success`: the PIN maximising the model's confidence among all 10^4 is the "
         "canary; `median_rank`: the true PIN's rank by that confidence (random: ~5000); "
         "exposure = log2(10^4 / rank); test accuracy on 1000 held-out commands."), "",
        table, ""]))
    summary = {f"{k}@eps={r['target_epsilon']:g}": r[k] for r in rows
               for k in ("relaxed_success", "exhaustive_success", "median_rank", "test_accuracy")}
    return {**summary, "rows": rows, "report": str(run_dir / "report.md")}


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
    from trustml.runner import resolve_device, run_training

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
