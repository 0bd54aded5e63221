"""Offline counterfactual-distillation benchmark (``run.experiment: distill_offline``).

Generate the gender-skewed professions corpus, train a small GPT-2 teacher on it, distil four
students from the teacher's layers (plain KD, CDA only, perturbation only, both) and compare their
template gap, generation polarity and held-out perplexity in one table and one plot. Every model is
an ordinary run directory made by ``run_training`` (so ``evaluate.py`` works on each of them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trustml.config import Config, ConfigError, from_dict
from trustml.data.text import lm_datasets, load_tokenizer
from trustml.distill.corpus import generate_corpus, word_tokenizer
from trustml.evaluation.bias import evaluate_lm_model, plot_gaps
from trustml.training.run import run_training

WORD_TOKENIZER = "words"  # data.tokenizer value selecting the corpus' own word-level tokenizer


def variants(perturbation: str) -> dict[str, dict[str, Any]]:
    return {
        "plain_kd": {"cda": False, "perturbation": "none"},
        "cda": {"cda": True, "perturbation": "none"},
        "perturbation": {"cda": False, "perturbation": perturbation},
        "cda+perturbation": {"cda": True, "perturbation": perturbation},
    }


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) else value
    return out


def _checks(results: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The acceptance criteria of the method (issue 5)."""
    teacher, plain, both = results["teacher"], results["plain_kd"], results["cda+perturbation"]
    return {
        "teacher_gap_at_least_1": teacher["mean_abs_gap"] >= 1.0,
        "plain_kd_keeps_80pct_gap": plain["mean_abs_gap"] >= 0.8 * teacher["mean_abs_gap"],
        "both_cut_gap_70pct": both["mean_abs_gap"] <= 0.3 * plain["mean_abs_gap"],
        "both_perplexity_within_5pct": both["perplexity"] <= 1.05 * plain["perplexity"],
        "both_polarity_rises": both["mean_polarity"] > plain["mean_polarity"],
    }


def _report(results: dict[str, dict[str, float]], checks: dict[str, bool], plot: Path,
            config: Config) -> str:
    d = config.distill
    rows = [
        "| model | mean abs gap (nats) | polarity mean | polarity min | perplexity |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        rows.append(f"| {name} | {r['mean_abs_gap']:.3f} | {r['mean_polarity']:.3f} | "
                    f"{r['min_polarity']:.3f} | {r['perplexity']:.3f} |")
    return "\n".join([
        "# Counterfactual role-reversal distillation (offline benchmark)", "",
        (f"Corpus: {d.corpus_size} sentences, pronoun skew {d.corpus_skew}, neutral share "
         f"{d.neutral_fraction}, seed {config.run.seed}. Teacher: GPT-2 {config.model.config}; "
         f"students: teacher layers {d.student_layers}, alpha_kd={d.alpha_kd}, "
         f"alpha_lm={d.alpha_lm}, tau={d.temperature}, perturbation={d.perturbation}."), "",
        ("Gap: mean over professions of |log P(he) - log P(she)| after the probe templates. "
         "Polarity: min(F/M, M/F) of gendered words in sampled continuations (1 = balanced). "
         "Perplexity: held-out corpus text."), "",
        *rows, "",
        "Checks: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in checks.items()), "",
        f"![gaps]({plot.name})", "",
    ])


def run(config: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run the benchmark into ``run_dir`` and return its summary (also ``run_dir/summary.json``)."""
    d = config.distill
    if d.student_layers is None:
        raise ConfigError("distill_offline needs distill.student_layers (teacher layers to keep)")
    perturbation = d.perturbation if d.perturbation != "none" else "logit_mean"
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    corpus = generate_corpus(d.corpus_size, d.corpus_skew, d.neutral_fraction, config.run.seed)
    corpus_path = run_dir / "corpus.txt"
    corpus_path.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    tokenizer_name = config.data.tokenizer
    if tokenizer_name == WORD_TOKENIZER:
        tokenizer_name = str(run_dir / "tokenizer")
        word_tokenizer(corpus).save_pretrained(tokenizer_name)
    tokenizer = load_tokenizer(tokenizer_name)

    base = config.to_dict()
    base["run"]["experiment"] = "train"
    base["data"].update(dataset="professions", text_path=str(corpus_path), path=None,
                        tokenizer=tokenizer_name)
    base["distill"]["enabled"] = False
    teacher_cfg = from_dict(_merge(base, {"train": {"epochs": d.teacher_epochs or
                                                    config.train.epochs}}))
    teacher = run_training(teacher_cfg, run_dir / "teacher")
    teacher_path = run_dir / "teacher" / "hf"
    teacher.model.save_pretrained(teacher_path)
    models = {"teacher": teacher.model}
    for name, options in variants(perturbation).items():
        cfg = from_dict(_merge(base, {"distill": {"enabled": True, "teacher": str(teacher_path),
                                                  **options}}))
        models[name] = run_training(cfg, run_dir / name).model

    _, val = lm_datasets(teacher_cfg.data, tokenizer)
    results, gaps = {}, {}
    for name, model in models.items():
        with torch.no_grad():
            metrics, _, _ = evaluate_lm_model(
                model, tokenizer, run_dir, val_dataset=val, k=d.generations,
                max_new_tokens=12, seed=config.run.seed, batch_size=config.train.batch_size,
                plot=False,
            )
        gaps[name] = metrics["gap"]
        results[name] = {k: metrics[k] for k in
                         ("mean_abs_gap", "mean_polarity", "min_polarity", "perplexity")}
    plot = plot_gaps({k: gaps[k] for k in ("teacher", "plain_kd", "cda+perturbation")},
                     run_dir / "gender_gap.png")
    checks = _checks(results)
    (run_dir / "report.md").write_text(_report(results, checks, plot, config))
    summary = {"results": results, "checks": checks, "all_checks_pass": all(checks.values()),
               "report": str(run_dir / "report.md"),
               **{f"{m}_{k}": v for m, r in results.items() for k, v in r.items()}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
