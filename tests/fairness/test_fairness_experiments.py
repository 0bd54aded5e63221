"""Smoke tests: every fairness experiment driver and the sweep run end to end on a tiny subset."""

import json

import numpy as np
import pytest

from trustml import config as cfgmod
from trustml.fairness import experiments
from trustml.fairness.penalty import with_penalty
from trustml.fairness.sweep import sweep_main

TINY = [
    "data.subset=400",
    "train.epochs=1",
    "train.batch_size=128",
    "model.hidden=[8]",
    "run.device=cpu",
    "train.log_every=1000",
]


def _config(tmp_path, *extra):
    return cfgmod.load(None, TINY + [f"run.output_dir={tmp_path}", *extra])


def test_transfer_driver(tmp_path):
    cfg = _config(
        tmp_path, "fairness.penalty=mmd", "fairness.weight=1", "run.experiment=fair_transfer",
        "run.seeds=[3,4]",
    )
    summary = experiments.transfer(cfg, tmp_path / "transfer")
    assert summary["seeds"] == [3, 4] and sorted(summary["per_seed"]) == ["3", "4"]
    dp = [summary["per_seed"][k]["fair"]["hours_test"]["demographic_parity_difference"]
          for k in ("3", "4")]
    assert summary["transfer_dp_fair"] == pytest.approx(sum(dp) / 2)
    for seed in ("3", "4"):
        for enc in ("fair", "plain"):
            r = summary["per_seed"][seed][enc]
            lo, hi = r["hours_dp_ci95"]
            assert lo <= r["hours_test"]["demographic_parity_difference"] <= hi
        matched = summary["per_seed"][seed]["plain_at_fair_rate"]
        fair_rate = summary["per_seed"][seed]["fair"]["hours_selection_rate"]
        assert matched["selection_rate"] == pytest.approx(fair_rate, abs=0.02)
        lo, hi = summary["per_seed"][seed]["dp_difference_ci95"]
        assert lo <= summary["per_seed"][seed]["dp_difference"] <= hi
    assert 0 <= summary["transfer_fair_lower_on_seeds"] <= 2
    assert summary["transfer_accuracy_plain"] > 0.5
    lo, hi = summary["transfer_dp_difference_ci95"]
    assert lo <= summary["transfer_dp_difference"] <= hi
    report = (tmp_path / "transfer" / "report.md").read_text()
    assert "lower on" in report and "paired difference" in report and "transfer.png" in report
    assert (tmp_path / "transfer" / "transfer.png").stat().st_size > 0
    with pytest.raises(cfgmod.ConfigError, match="fairness.penalty"):
        experiments.transfer(_config(tmp_path), tmp_path / "bad")


def _fake_seed(fair_dp, plain_dp, fair_acc, plain_acc):
    def encoder(dp, acc):
        return {"hours_test": {"demographic_parity_difference": dp, "accuracy": acc, "auc": 0.7},
                "income_test": {"accuracy": 0.84}}
    return {"fair": encoder(fair_dp, fair_acc), "plain": encoder(plain_dp, plain_acc),
            "dp_difference_ci95": [fair_dp - plain_dp - 0.02, fair_dp - plain_dp + 0.02],
            "hours_majority_accuracy": 0.6,
            "plain_at_fair_rate": {"dp": 0.08, "selection_rate": 0.07}}


def test_transfer_over_seeds_on_fake_rows():
    from scipy import stats

    fair, plain = [0.03, 0.02, 0.05], [0.15, 0.14, 0.16]
    per_seed = {k: _fake_seed(f, p, 0.70 + 0.01 * k, 0.72) for k, (f, p) in enumerate(zip(fair, plain))}
    agg = experiments._over_seeds(per_seed)
    assert agg["transfer_dp_fair"] == pytest.approx(np.mean(fair))
    assert agg["transfer_dp_fair_ci95"] == pytest.approx(
        list(stats.t.interval(0.95, 2, loc=np.mean(fair), scale=stats.sem(fair))))
    ci = stats.ttest_rel(fair, plain).confidence_interval()
    assert agg["transfer_dp_difference_ci95"] == pytest.approx([ci.low, ci.high])
    assert agg["transfer_accuracy_difference"] == pytest.approx(-0.01)
    assert agg["transfer_dp_difference_at_fair_rate"] == pytest.approx(np.mean(fair) - 0.08)
    assert agg["transfer_fair_lower_on_seeds"] == 3
    assert agg["transfer_difference_excludes_zero_on_seeds"] == 3
    one = experiments._over_seeds({0: _fake_seed(0.03, 0.15, 0.7, 0.7)})
    assert one["transfer_dp_fair_ci95"] == [None, None] and one["transfer_dp_fair_sd"] == 0


def test_postprocess_driver(tmp_path):
    summary = experiments.wasserstein(_config(tmp_path), tmp_path / "post")
    reg = summary["regression"]
    assert reg["ks_after"] < reg["ks_before"] and reg["ks_after"] < 0.05
    assert (tmp_path / "post" / "postprocess.png").stat().st_size > 0
    json.loads((tmp_path / "post" / "summary.json").read_text())


def test_ferm_driver(tmp_path):
    summary = experiments.ferm(_config(tmp_path), tmp_path / "ferm")
    assert summary["ferm_deo"] < summary["svm_deo"]
    assert "reference: linear FERM" in (tmp_path / "ferm" / "report.md").read_text()


def test_sweep_writes_json_report_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = [
        "--config",
        "configs/adult_fair_mmd.yaml",
        "--weights",
        "0,1",
        "--penalties",
        "mmd,sinkhorn",
        "--run-dir",
        str(out),
        "--quiet",
        "--set",
        *TINY,
    ]
    assert sweep_main(args) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [(r["penalty"], r["weight"]) for r in sweep["results"]] == [
        ("unpenalised", 0.0),
        ("mmd", 1.0),
        ("sinkhorn", 1.0),
    ]
    assert len(sweep["references"]) == 2 or sweep["note"]
    assert (out / "tradeoff.png").stat().st_size > 0
    assert "unpenalised MLP" in (out / "report.md").read_text()
    with pytest.raises(cfgmod.ConfigError, match="--penalties"):
        sweep_main(["--config", "configs/adult_fair_mmd.yaml", "--penalties", "kl"])


def test_sweep_drops_mmd_only_settings_for_other_penalties():
    config = cfgmod.load("configs/adult_fair_mmd.yaml", ["fairness.frequencies=64"])
    sinkhorn = with_penalty(config, "sinkhorn", 3.0)
    assert (sinkhorn.fairness.penalty, sinkhorn.fairness.weight) == ("sinkhorn", 3.0)
    assert sinkhorn.fairness.frequencies is None
    assert with_penalty(config, "mmd", 1.0).fairness.frequencies == 64
    assert config.fairness.frequencies == 64  # the base config is not touched
