"""fairness.target: dual ascent on the validation gap, constrained model selection, intervals."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from trustml import config as cfgmod
from trustml.evaluation.tabular import predict_scores
from trustml.fairness.bootstrap import bootstrap_interval
from trustml.fairness.constraint import ConstrainedStep
from trustml.fairness.metrics import demographic_parity_difference
from trustml.fairness.penalty import FairnessPenalty
from trustml.training.step import PlainStep


class Fixed(nn.Module):
    """Predicts y=1 exactly for the rows whose first feature is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), self.w * x[:, 0]], 1)


def _val(gap: float, n: int = 400) -> SimpleNamespace:
    """Two groups of n/2 whose positive-prediction rates differ by ``gap``."""
    half = n // 2
    s = torch.tensor([0] * half + [1] * half)
    first = torch.full((n,), -1.0)
    first[: int(0.5 * half)] = 1.0
    first[half: half + int((0.5 - gap) * half)] = 1.0
    return SimpleNamespace(x=first[:, None], y=(first > 0).long(), s=s)


def _constrained(val, target=0.05, lam=1.0) -> tuple[ConstrainedStep, FairnessPenalty]:
    model = Fixed()
    penalty = FairnessPenalty(lambda z, a, b: z.sum() * 0, lam)
    step = PlainStep(torch.optim.SGD(model.parameters(), lr=0.0), [penalty])
    return ConstrainedStep(step, penalty, val, target=target, notion="dp", dual_lr=0.5), penalty


def test_measured_gap_is_the_reported_metric():
    val = _val(0.2)
    con, _ = _constrained(val)
    pred = (val.x[:, 0] > 0).long().numpy()
    assert con.measure(Fixed())["val_gap"] == pytest.approx(
        demographic_parity_difference(val.y.numpy(), pred, val.s.numpy()))


@pytest.mark.parametrize("gap, direction", [(0.2, 1), (0.01, -1)])
def test_dual_step_raises_lambda_when_violated_and_lowers_it_when_slack(gap, direction):
    con, penalty = _constrained(_val(gap), target=0.05, lam=2.0)
    con.update(Fixed())
    violation = max(-1, min(1, (con.last_record["val_gap"] - 0.05) / 0.05))
    assert penalty.weight == pytest.approx(2.0 * math.exp(0.5 * violation))
    assert np.sign(penalty.weight - 2.0) == direction


def test_finish_restores_best_feasible_iterate_and_says_when_none_was():
    model = Fixed()
    con, _ = _constrained(_val(0.01), target=0.05)
    con.update(model)  # feasible: snapshot w = 10
    with torch.no_grad():
        model.w.fill_(-3.0)  # predicts nothing: still feasible, but less accurate
    summary = con.finish(model)
    assert summary["fairness_target_met_on_val"] and model.w.item() == 10.0
    infeasible, _ = _constrained(_val(0.3), target=0.05)
    summary = infeasible.finish(Fixed())
    assert not summary["fairness_target_met_on_val"] and "no iterate" in summary["fairness_note"]


def test_state_round_trip_keeps_lambda_and_best():
    con, penalty = _constrained(_val(0.01))
    con.update(Fixed())
    other, other_penalty = _constrained(_val(0.01))
    other.load_state_dict(con.state_dict())
    assert other_penalty.weight == penalty.weight and other.best_record == con.best_record
    assert torch.equal(other.best["w"], con.best["w"])


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)

    def interval(n):
        s = rng.integers(0, 2, n)
        pred = (rng.random(n) < np.where(s == 1, 0.3, 0.2)).astype(int)
        return demographic_parity_difference(pred, pred, s), bootstrap_interval(
            demographic_parity_difference, pred, pred, s, n_boot=300)

    gap, (lo, hi) = interval(4000)
    assert lo <= gap <= hi and lo < 0.1 < hi
    _, (lo_small, hi_small) = interval(400)
    assert hi_small - lo_small > hi - lo


def test_target_without_penalty_is_a_config_error():
    with pytest.raises(cfgmod.ConfigError, match="target"):
        cfgmod.load("configs/adult_fair_mmd.yaml", ["fairness.penalty=none", "fairness.target=0.05"])


def test_exclude_sensitive_drops_the_column():
    from trustml.data.tabular import load_tabular

    cfg = cfgmod.load("configs/adult.yaml", ["data.exclude_sensitive=true", "data.subset=200"])
    names = load_tabular(cfg.data).feature_names
    assert not any(n.startswith("sex=") for n in names) and any(n.startswith("race=") for n in names)


def test_constrained_run_meets_target_on_validation_and_reports_test_interval(tmp_path):
    from trustml.runner import run_training

    cfg = cfgmod.load("configs/adult_fair_mmd.yaml", [
        "data.subset=3000", "train.epochs=2", "data.exclude_sensitive=true",
        "fairness.target=0.05", "fairness.update_every=5"])
    summary = run_training(cfg, tmp_path / "run", progress=False).summary
    assert summary["fairness_target_met_on_val"]
    assert summary["fairness_selected_val_selected_gap"] <= 0.05
    # the chosen threshold is folded into the saved model: its decisions at 0.5 meet the bound
    from trustml.evaluation.report import load_run
    from trustml.evaluation.tabular import predict_scores

    ctx = load_run(tmp_path / "run", device="cpu")
    val = ctx.parts.data.val
    pred = (predict_scores(ctx.model, val) >= 0.5).astype(int)
    assert demographic_parity_difference(val.y.numpy(), pred, val.s.numpy()) == pytest.approx(
        summary["fairness_selected_val_selected_gap"], abs=2 / len(val.y))
    assert (pred == val.y.numpy()).mean() == pytest.approx(
        summary["fairness_selected_val_selected_accuracy"], abs=2 / len(val.y))
    lo, hi = summary["test_gap_ci95"]
    assert lo <= summary["test_gap"] <= hi
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["fairness_target"] == 0.05


def test_fairlearn_baselines_at_targets_and_prefit_mlp():
    pytest.importorskip("fairlearn")
    from trustml.fairness.baselines import fairlearn_predictions
    from trustml.fairness.frontier import point_metrics

    rng = np.random.default_rng(0)
    n = 1500
    s = rng.integers(0, 2, n)
    x = np.c_[rng.normal(size=(n, 3)), rng.normal(s, 1.0)]  # the last feature leaks the group
    y = (x[:, 0] + 0.8 * s + rng.normal(0, 0.5, n) > 0.5).astype(int)
    train, test = (x[:1000], y[:1000], s[:1000]), (x[1000:], y[1000:], s[1000:])

    def mlp(features):
        return 1 / (1 + np.exp(-3 * (features[:, 0] + 0.8 * features[:, 3] - 0.5)))

    rows = fairlearn_predictions(train, test, [0.02], "dp", seed=0, mlp=mlp,
                                 reductions_on=("LogReg",))
    methods = {r["method"] for r in rows}
    assert {"Fairlearn ThresholdOptimizer + MLP", "Fairlearn ExpGrad + LogReg",
            "Fairlearn ThresholdOptimizer + HistGB", "LogReg (unconstrained)"} <= methods
    assert "Fairlearn ExpGrad + MLP" not in methods  # a prefit model cannot be refitted
    gaps = {r["method"]: point_metrics(test[1], r["pred"], test[2], "dp")["gap"] for r in rows}
    assert gaps["Fairlearn ThresholdOptimizer + MLP"] < gaps["MLP (unconstrained)"]


def test_frontier_aggregates_seeds_and_resumes(tmp_path, monkeypatch):
    from trustml.fairness import frontier

    calls = []

    def fake_points(config, seed, targets, penalties, run_dir, progress):
        calls.append(seed)
        rows = [{"method": "MLP (unconstrained)", "target": None, "seed": seed, "accuracy": 0.85,
                 "gap": 0.2, "selection_rate": 0.2, "constant": False}]
        rows += [{"method": "trustml mmd (target)", "target": t, "seed": seed,
                  "accuracy": 0.8 + seed / 100, "gap": t - 0.01 + 0.015 * seed, "selection_rate": 0.2,
                  "constant": False} for t in targets]
        return rows, None

    monkeypatch.setattr(frontier, "_trustml_points", fake_points)
    cfg = cfgmod.load("configs/adult_fair_mmd.yaml")
    result = frontier.run_frontier(cfg, [0.02, 0.05], [0, 1], ["mmd"], tmp_path, references=False,
                                   progress=False)
    row = next(a for a in result["summary"] if a["target"] == 0.02)
    assert row["accuracy"] == pytest.approx(0.805) and row["met"] == 1 and row["seeds"] == 2
    assert row["accuracy_sd"] == pytest.approx(np.std([0.80, 0.81], ddof=1))
    report = (tmp_path / "report.md").read_text()
    assert "0.805 ± 0.007" in report and (tmp_path / "frontier.png").is_file()
    frontier.run_frontier(cfg, [0.02, 0.05], [0, 1], ["mmd"], tmp_path, references=False,
                          progress=False)
    assert calls == [0, 1]  # the second call resumed from points/


def test_with_penalty_none_drops_the_target():
    from trustml.fairness.penalty import with_penalty

    cfg = cfgmod.load("configs/adult_fair_target.yaml")
    assert cfg.fairness.target == 0.02
    plain = with_penalty(cfg, "none", 0.0)
    assert plain.fairness.target is None and plain.fairness.penalty == "none"
    assert with_penalty(cfg, "sinkhorn", 1.0).fairness.target == 0.02


class Linear2(nn.Module):
    """P(y=1) = sigmoid(x0) through a two-logit linear head, as the MLP's head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0], [1.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x)


def test_threshold_selection_finds_a_feasible_threshold_that_0_5_misses_and_folds_it():
    rng = np.random.default_rng(0)
    n = 2000
    s = rng.integers(0, 2, n)
    x0 = rng.normal(0.4 * s, 1.0)  # group 1 scores higher: at 0.5 the gap is large
    y = (x0 + rng.normal(0, 0.5, n) > 0.3).astype(np.int64)
    val = SimpleNamespace(x=torch.tensor(x0, dtype=torch.float32)[:, None],
                          y=torch.tensor(y), s=torch.tensor(s))
    model = Linear2()
    penalty = FairnessPenalty(lambda z, a, b: z.sum() * 0, 1.0)
    step = PlainStep(torch.optim.SGD(model.parameters(), lr=0.0), [penalty])
    plain = ConstrainedStep(step, penalty, val, target=0.1, notion="dp", select_threshold=False)
    assert plain.measure(model)["val_gap"] > 0.1 and not plain.finish(model)[
        "fairness_target_met_on_val"]
    con = ConstrainedStep(step, penalty, val, target=0.1, notion="dp", margin=0.2)
    summary = con.finish(model)
    assert summary["fairness_target_met_on_val"]
    chosen = summary["fairness_selected_threshold"]
    assert chosen != 0.5 and summary["fairness_selected_val_selected_gap"] <= 0.08
    pred = (predict_scores(model, val.x) >= 0.5).astype(np.int64)  # folded into the bias
    assert demographic_parity_difference(y, pred, s) == pytest.approx(
        summary["fairness_selected_val_selected_gap"], abs=2 / n)


def test_verdicts_compare_the_best_trustml_mean_with_threshold_optimizer():
    from trustml.fairness.frontier import aggregate, verdicts

    def row(method, seed, acc, gap):
        return {"method": method, "target": 0.02, "seed": seed, "accuracy": acc, "gap": gap,
                "selection_rate": 0.2, "constant": False}

    rows = [row("trustml rate on scores", s, 0.84 + s / 100, 0.015) for s in range(3)]
    rows += [row("trustml mmd on representation", s, 0.80, 0.01) for s in range(3)]
    rows += [row("Fairlearn ThresholdOptimizer + MLP", s, 0.845, 0.025 * s) for s in range(3)]
    (line,) = verdicts(aggregate(rows), [0.02])
    assert "trustml rate on scores at accuracy 0.850" in line and "3/3 seeds" in line
    assert "0.845" in line and "(1/3)" in line and "**met** (+0.005)" in line
    rows = [r | {"accuracy": 0.83} if r["method"].startswith("trustml rate") else r for r in rows]
    assert "**not met** (-0.015)" in verdicts(aggregate(rows), [0.02])[0]


def test_frontier_reductions_flag_is_checked(tmp_path):
    from trustml.fairness.sweep import sweep_main

    with pytest.raises(cfgmod.ConfigError, match="--reductions"):
        sweep_main(["--config", "configs/adult_fair_target.yaml", "--targets", "0.02",
                    "--reductions", "MLP", "--run-dir", str(tmp_path / "f")])
