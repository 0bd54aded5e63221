"""Offline counterfactual-distillation benchmark (``run.experiment: distill_offline``), held out.

Per seed: a teacher learns the gender-skewed professions corpus (every profession, train templates
only); four students (plain KD, CDA only, perturbation only, both) are distilled from its layers
on a second corpus that holds out a third of the professions (``professions.tsv``: probe) and, like
the teacher's, none of the probe templates (``templates.tsv``). Every model is then probed on
prompts no corpus contains:

- held-out: probe professions x probe templates (words the corpus uses, never in these openings);
- novel words: probe professions x templates made of words that never occur in any corpus;
- seen (for contrast only): train professions x train templates, the distillation prompts.

Per probe set the report gives the mean over prompts of |log P(he) - log P(she)| and its signed
mean, each with a 95% bootstrap interval over seeds and prompts (seeds resampled, then prompts
within each seed), generation polarity, and perplexity on sentences that occur in no training
corpus. Nothing is pass/fail: the report states what was measured. The run uses one intra-op
thread (restored afterwards), so a seed's figures do not depend on the machine's thread count.
Every model is an ordinary run directory made by ``run_training`` (``evaluate.py`` works on each).
A seed whose ``seed<N>/results.json`` exists with the same settings is read back, not rerun, so
an interrupted benchmark resumes and seeds can run as separate processes into one directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustml import config as cfgmod
from trustml.config import Config, ConfigError, from_dict
from trustml.data.text import TextDataset, load_tokenizer
from trustml.distill import vocabulary
from trustml.distill.corpus import generate_corpus, word_tokenizer
from trustml.evaluation.bias import generation_polarity, plot_gaps, template_gap
from trustml.evaluation.perplexity import perplexity
from trustml.progress import is_quiet
from trustml.runner import run_training

WORD_TOKENIZER = "words"  # data.tokenizer value selecting the corpus' own word-level tokenizer
PROBES = ("heldout", "novel", "seen")
BOOTSTRAP = 2000


def variants(perturbation: str) -> dict[str, dict[str, Any]]:
    return {
        "plain_kd": {"cda": False, "perturbation": "none"},
        "cda": {"cda": True, "perturbation": "none"},
        "perturbation": {"cda": False, "perturbation": perturbation},
        "cda+perturbation": {"cda": True, "perturbation": perturbation},
    }


def probe_sets() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """(professions, templates) of each probe set (see the module doc)."""
    held = vocabulary.professions("probe")
    return {"heldout": (held, vocabulary.templates("probe")),
            "novel": (held, vocabulary.templates("novel")),
            "seen": (vocabulary.professions("train"), vocabulary.templates("train"))}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) else value
    return out


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def corpora(config: Config, seed: int) -> dict[str, list[str]]:
    """The teacher's corpus, the students' (train professions only) and held-out sentences that
    occur in neither, all a function of ``seed``."""
    d = config.distill
    teacher = generate_corpus(d.corpus_size, d.corpus_skew, d.neutral_fraction, seed)
    students = generate_corpus(d.corpus_size, d.corpus_skew, d.neutral_fraction, seed + 10_000,
                               professions=vocabulary.professions("train"))
    seen = set(teacher) | set(students)
    pool = generate_corpus(max(200, d.corpus_size // 10), d.corpus_skew, d.neutral_fraction,
                           seed + 20_000)
    return {"teacher": teacher, "students": students,
            "heldout": [s for s in pool if s not in seen]}


def _settings(config: Config) -> dict[str, Any]:
    """A seed's settings without its file locations (for recognising a finished seed)."""
    d = config.to_dict()
    d["data"]["text_path"] = None
    if d["data"]["tokenizer"].endswith("tokenizer"):
        d["data"]["tokenizer"] = WORD_TOKENIZER
    d["run"]["output_dir"] = d["distill"]["seeds"] = None  # where, and which other seeds
    return d


def _finished(run_dir: Path, teacher_cfg: Config) -> dict[str, Any] | None:
    """The results of a seed already run with the same settings (the benchmark resumes)."""
    results, saved = run_dir / "results.json", run_dir / "teacher" / "config.yaml"
    if results.is_file() and saved.is_file():
        if _settings(cfgmod.load(saved)) == _settings(teacher_cfg):
            return json.loads(results.read_text())
    return None


def _one_seed(config: Config, run_dir: Path, seed: int, progress: bool) -> dict[str, Any]:
    d = config.distill
    began = time.process_time()
    base = config.to_dict()
    base["run"].update(experiment="train", seed=seed)
    tokenizer_name = (str(run_dir / "tokenizer") if config.data.tokenizer == WORD_TOKENIZER
                      else config.data.tokenizer)
    base["data"].update(dataset="professions", path=None, tokenizer=tokenizer_name)
    base["distill"]["enabled"] = False
    teacher_cfg = from_dict(_merge(base, {
        "data": {"text_path": str(run_dir / "teacher.txt")},
        "train": {"epochs": d.teacher_epochs or config.train.epochs}}))
    done = _finished(run_dir, teacher_cfg)
    if done is not None:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    texts = corpora(config, seed)
    paths = {name: _write(run_dir / f"{name}.txt", lines) for name, lines in texts.items()}
    if config.data.tokenizer == WORD_TOKENIZER:
        novel = [t.format(p="x") for t in vocabulary.templates("novel")]
        word_tokenizer(texts["teacher"], extra_words=novel).save_pretrained(tokenizer_name)
    tokenizer = load_tokenizer(tokenizer_name)
    teacher = run_training(teacher_cfg, run_dir / "teacher", progress=progress)
    teacher_path = run_dir / "teacher" / "hf"
    teacher.model.save_pretrained(teacher_path)
    models = {"teacher": teacher.model}
    perturbation = d.perturbation if d.perturbation != "none" else "logit_mean"
    for name, options in variants(perturbation).items():
        cfg = from_dict(_merge(base, {"data": {"text_path": paths["students"]}, "distill": {
            "enabled": True, "teacher": str(teacher_path), **options}}))
        models[name] = run_training(cfg, run_dir / name, progress=progress).model

    heldout = TextDataset(texts["heldout"], tokenizer, config.data.seq_len, pack=False)
    results: dict[str, Any] = {}
    for name, model in models.items():
        model.eval()
        r: dict[str, Any] = {f"{probe}_prompts": template_gap(model, tokenizer, *sets)["prompts"]
                             for probe, sets in probe_sets().items()}
        pol = generation_polarity(model, tokenizer, k=d.generations, max_new_tokens=12,
                                  seed=seed, professions=probe_sets()["heldout"][0],
                                  templates=probe_sets()["heldout"][1])
        r.update(mean_polarity=pol["mean_polarity"], min_polarity=pol["min_polarity"],
                 perplexity=perplexity(model, heldout, config.train.batch_size))
        results[name] = r
    plot_gaps({name: {p: float(np.mean([v for q, _, v in results[name]["heldout_prompts"]
                                         if q == p])) for p in probe_sets()["heldout"][0]}
               for name in ("teacher", "plain_kd", "cda+perturbation")},
              run_dir / "gender_gap.png",
              title=f"held-out prompts, seed {seed}: log P(he) - log P(she)")
    out = {"seed": seed, "results": results, "cpu_seconds": time.process_time() - began,
           "sentences": {k: len(v) for k, v in texts.items()}}
    (run_dir / "results.json").write_text(json.dumps(out, indent=2))
    return out


def _gaps(per_seed: list[dict[str, Any]], model: str, probe: str) -> list[np.ndarray]:
    return [np.array([v for *_, v in s["results"][model][f"{probe}_prompts"]]) for s in per_seed]


def bootstrap_means(per_seed: list[np.ndarray], n: int = BOOTSTRAP, seed: int = 0,
                    stat=np.abs) -> np.ndarray:
    """Two-level bootstrap of the mean of ``stat(values)``: resample seeds, then values within
    each drawn seed (same prompt indices for every model drawn with the same ``seed``)."""
    rng = np.random.default_rng(seed)
    k = len(per_seed)
    out = np.empty(n)
    for b in range(n):
        rows = [per_seed[i] for i in rng.integers(0, k, k)]
        out[b] = np.mean([stat(r[rng.integers(0, len(r), len(r))]).mean() for r in rows])
    return out


def _interval(samples: np.ndarray) -> list[float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: point estimates and 95% bootstrap intervals of every probe set's mean |gap|
    and signed gap, the |gap| relative to plain KD (paired draws), polarity and perplexity."""
    models = list(per_seed[0]["results"])
    out: dict[str, dict[str, Any]] = {}
    for model in models:
        row: dict[str, Any] = {}
        for probe in PROBES:
            gaps = _gaps(per_seed, model, probe)
            row[f"{probe}_abs_gap"] = float(np.mean([np.abs(g).mean() for g in gaps]))
            row[f"{probe}_abs_gap_ci"] = _interval(bootstrap_means(gaps))
            row[f"{probe}_gap"] = float(np.mean([g.mean() for g in gaps]))
            row[f"{probe}_gap_ci"] = _interval(bootstrap_means(gaps, stat=lambda v: v))
            plain = bootstrap_means(_gaps(per_seed, "plain_kd", probe))
            row[f"{probe}_abs_gap_vs_plain_kd"] = row[f"{probe}_abs_gap"] / float(
                np.mean([np.abs(g).mean() for g in _gaps(per_seed, "plain_kd", probe)]))
            row[f"{probe}_abs_gap_vs_plain_kd_ci"] = _interval(bootstrap_means(gaps) / plain)
        for key in ("perplexity", "mean_polarity", "min_polarity"):
            values = [s["results"][model][key] for s in per_seed]
            row[key] = float(np.mean(values))
            row[f"{key}_per_seed"] = values
        ratios = [s["results"][model]["perplexity"] / s["results"]["plain_kd"]["perplexity"]
                  for s in per_seed]
        row["perplexity_vs_plain_kd_per_seed"] = ratios
        out[model] = row
    return out


def _fmt(row: dict[str, Any], key: str, signed: bool = False) -> str:
    low, high = row[f"{key}_ci"]
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(row[key])} [{f.format(low)}, {f.format(high)}]"


def _report(summary: dict[str, dict[str, Any]], config: Config, seconds: list[float]) -> str:
    d = config.distill
    rows = [
        "| model | held-out \\|gap\\| | held-out signed | novel-word \\|gap\\| | seen \\|gap\\| "
        "(train prompts) | held-out \\|gap\\| / plain KD | polarity | perplexity | ppl / plain KD "
        "(per seed) |",
        "|---|---|---|---|---|---|---:|---:|---|",
    ]
    for name, r in summary.items():
        ratios = ", ".join(f"{v:.3f}" for v in r["perplexity_vs_plain_kd_per_seed"])
        rows.append(
            f"| {name} | {_fmt(r, 'heldout_abs_gap')} | {_fmt(r, 'heldout_gap', True)} | "
            f"{_fmt(r, 'novel_abs_gap')} | {_fmt(r, 'seen_abs_gap')} | "
            f"{_fmt(r, 'heldout_abs_gap_vs_plain_kd')} | {r['mean_polarity']:.3f} | "
            f"{r['perplexity']:.3f} | {ratios} |")
    sets = probe_sets()
    return "\n".join([
        "# Counterfactual role-reversal distillation (offline benchmark, held out)", "",
        (f"Seeds {d.seeds}; per seed a teacher corpus of {d.corpus_size} sentences (all "
         f"{len(vocabulary.professions())} professions) and a student corpus of {d.corpus_size} "
         f"(the {len(vocabulary.professions('train'))} train professions), pronoun skew "
         f"{d.corpus_skew}, neutral share {d.neutral_fraction}, train templates only. Teacher: "
         f"GPT-2 {config.model.config}, {d.teacher_epochs or config.train.epochs} epochs; "
         f"students: teacher layers {d.student_layers}, {config.train.epochs} epoch(s), "
         f"alpha_kd={d.alpha_kd}, alpha_lm={d.alpha_lm}, tau={d.temperature}, perturbation="
         f"{d.perturbation if d.perturbation != 'none' else 'logit_mean'}, only gendered tokens: "
         f"{d.perturb_only_gendered}. One torch thread. CPU time per seed: "
         + ", ".join(f"{s:.0f} s" for s in seconds) + "."), "",
        (f"Gap: log P(he) - log P(she) after each prompt, in nats; |gap| is the mean over prompts "
         f"of its absolute value. Held-out: {len(sets['heldout'][0])} probe professions x "
         f"{len(sets['heldout'][1])} probe templates; novel-word: the same professions x "
         f"{len(sets['novel'][1])} templates of words no corpus contains; seen: the distillation "
         "prompts themselves, shown only to contrast in- and out-of-sample figures. Brackets: 95% "
         f"bootstrap intervals ({BOOTSTRAP} draws; seeds, then prompts within seeds, resampled). "
         "Polarity: min(F/M, M/F) of gendered words in sampled continuations of the held-out "
         "prompts (1 = balanced). Perplexity: sentences that occur in no training corpus."), "",
        *rows, "",
        "![gaps](seed{}/gender_gap.png)".format(d.seeds[0]), "",
    ])


def run(config: Config, run_dir: str | Path) -> dict[str, Any]:
    """Run the benchmark into ``run_dir`` and return its summary (also ``run_dir/summary.json``)."""
    d = config.distill
    if d.student_layers is None:
        raise ConfigError("distill_offline needs distill.student_layers (teacher layers to keep)")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = not is_quiet()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_seed = [_one_seed(config, run_dir / f"seed{s}", s, progress) for s in d.seeds]
    finally:
        torch.set_num_threads(threads)
    summary = summarise(per_seed)
    seconds = [s["cpu_seconds"] for s in per_seed]
    (run_dir / "report.md").write_text(_report(summary, config, seconds))
    out = {"results": summary, "seeds": d.seeds, "cpu_seconds_per_seed": seconds,
           "report": str(run_dir / "report.md"),
           **{f"{m}_{k}": v for m, r in summary.items() for k, v in r.items()
              if k in ("heldout_abs_gap", "heldout_gap", "novel_abs_gap", "perplexity")}}
    (run_dir / "summary.json").write_text(json.dumps(out, indent=2))
    return out
