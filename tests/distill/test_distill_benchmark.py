"""Reduced held-out distillation benchmark, end to end through train.py's driver."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trustml import config as cfgmod
from trustml.distill.benchmark import bootstrap_means, run
from trustml.evaluation.report import evaluate_run

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["teacher", "plain_kd", "cda", "perturbation", "cda+perturbation"]


def test_smoke_benchmark(tmp_path):
    config = cfgmod.load(ROOT / "configs" / "cf_distill_offline.yaml", [
        "distill.corpus_size=300", "distill.teacher_epochs=1", "distill.generations=1",
        "train.epochs=1", "distill.student_layers=[1]", "distill.seeds=[0, 1]",
        "model.config={n_layer: 2, n_embd: 16, n_head: 2, n_positions: 32}",
    ])
    threads = torch.get_num_threads()
    summary = run(config, tmp_path)
    assert torch.get_num_threads() == threads  # one thread inside, restored after
    assert list(summary["results"]) == NAMES and summary["seeds"] == [0, 1]
    assert "checks" not in summary and "all_checks_pass" not in summary  # no verdict built in
    for name in NAMES:
        r = summary["results"][name]
        for probe in ("heldout", "novel", "seen"):
            low, high = r[f"{probe}_abs_gap_ci"]
            assert 0 <= low <= r[f"{probe}_abs_gap"] <= high
            low, high = r[f"{probe}_gap_ci"]
            assert low <= r[f"{probe}_gap"] <= high
        assert 1 < r["perplexity"] < 400 and len(r["perplexity_per_seed"]) == 2
    for seed in (0, 1):
        per_seed = json.loads((tmp_path / f"seed{seed}" / "results.json").read_text())
        gaps = per_seed["results"]["teacher"]["heldout_prompts"]
        assert len(gaps) == 18 * 4  # held-out professions x probe templates
        assert {p for p, _, _ in gaps}.isdisjoint(
            " ".join((tmp_path / f"seed{seed}" / "students.txt").read_text().split()).split())
        saved = yaml.safe_load((tmp_path / f"seed{seed}" / "cda" / "config.yaml").read_text())
        assert saved["run"]["seed"] == seed and saved["distill"]["cda"]
    report = (tmp_path / "report.md").read_text()
    assert report.count("\n| ") == 1 + 1 + len(NAMES) - 1
    assert (tmp_path / "seed0" / "gender_gap.png").stat().st_size > 1000
    # every model is an ordinary run directory that evaluate.py can report on
    evaluate_run(tmp_path / "seed0" / "cda+perturbation", device="cpu")
    metrics = json.loads((tmp_path / "seed0" / "cda+perturbation" / "eval" / "metrics.json")
                         .read_text())
    section = metrics["Language model: gender bias and perplexity"]
    assert {"mean_abs_gap", "mean_gap", "mean_polarity", "perplexity"} <= set(section)


def test_bootstrap_against_hand_cases():
    one = [np.array([1.0, -1.0, 3.0])]  # one seed: resampling prompts only
    draws = bootstrap_means(one, n=4000)
    assert draws.min() >= 1.0 and draws.max() <= 3.0
    assert draws.mean() == pytest.approx(5 / 3, abs=0.03)
    same = [np.array([2.0, 2.0])] * 3
    assert np.all(bootstrap_means(same, n=50) == 2.0)
    signed = bootstrap_means([np.array([1.0, -1.0])], n=4000, stat=lambda v: v)
    assert signed.mean() == pytest.approx(0.0, abs=0.05) and signed.min() == -1.0


def test_finished_seeds_are_read_back_not_rerun(tmp_path, monkeypatch):
    overrides = [
        "distill.corpus_size=100", "distill.teacher_epochs=1", "distill.generations=1",
        "train.epochs=1", "distill.student_layers=[0]", "distill.seeds=[3]",
        "model.config={n_layer: 1, n_embd: 8, n_head: 2, n_positions: 32}",
    ]
    config = cfgmod.load(ROOT / "configs" / "cf_distill_offline.yaml", overrides)
    first = run(config, tmp_path)
    import trustml.distill.benchmark as bench

    def refuse(*_, **__):
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr(bench, "run_training", refuse)
    assert run(config, tmp_path)["results"] == first["results"]
    changed = cfgmod.load(ROOT / "configs" / "cf_distill_offline.yaml",
                          [*overrides, "distill.alpha_lm=0.25"])
    with pytest.raises(AssertionError, match="trained again"):
        run(changed, tmp_path)
