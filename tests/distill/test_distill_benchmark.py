"""Reduced offline distillation benchmark, end to end through train.py's driver."""

import json
from pathlib import Path

import yaml

from trustml import config as cfgmod
from trustml.distill.benchmark import run
from trustml.evaluation.report import evaluate_run

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_benchmark(tmp_path):
    config = cfgmod.load(ROOT / "configs" / "cf_distill_offline.yaml", [
        "distill.corpus_size=400", "distill.teacher_epochs=1", "distill.generations=1",
        "train.epochs=1", "distill.student_layers=[1]",
        "model.config={n_layer: 2, n_embd: 16, n_head: 2, n_positions: 32}",
    ])
    summary = run(config, tmp_path)
    names = ["teacher", "plain_kd", "cda", "perturbation", "cda+perturbation"]
    assert list(summary["results"]) == names
    for name in names:
        r = summary["results"][name]
        assert r["mean_abs_gap"] >= 0 and 0 < r["min_polarity"] <= r["mean_polarity"] <= 1
        assert 1 < r["perplexity"] < 400  # vocabulary of the word tokenizer is ~210
    for name in names[1:]:
        saved = yaml.safe_load((tmp_path / name / "config.yaml").read_text())["distill"]
        assert saved["enabled"] and saved["teacher"] == str(tmp_path.resolve() / "teacher" / "hf")
    options = {n: yaml.safe_load((tmp_path / n / "config.yaml").read_text())["distill"]
               for n in names[1:]}
    assert [(o["cda"], o["perturbation"]) for o in options.values()] == [
        (False, "none"), (True, "none"), (False, "logit_mean"), (True, "logit_mean")]
    report = (tmp_path / "report.md").read_text()
    assert report.count("\n| ") == 1 + 1 + len(names) - 1  # header, rule, one row per model
    assert (tmp_path / "gender_gap.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["checks"] == summary["checks"]
    # every model is an ordinary run directory that evaluate.py can report on
    evaluate_run(tmp_path / "cda+perturbation", device="cpu")
    metrics = json.loads((tmp_path / "cda+perturbation" / "eval" / "metrics.json").read_text())
    section = metrics["Language model: gender bias and perplexity"]
    assert {"mean_abs_gap", "mean_polarity", "min_polarity", "perplexity"} <= set(section)
    assert (tmp_path / "cda+perturbation" / "eval" / "gender_gap.png").is_file()
