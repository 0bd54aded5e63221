"""The side-by-side frontier's statistics: the gap's bootstrap interval, seeds meeting a target
surely, the too-noisy-to-certify verdict, the paired accuracy verdict, and ExpGrad on every seed."""

import json

import numpy as np
import pytest
from scipy import stats

from trustml import config as cfgmod
from trustml.fairness import frontier
from trustml.fairness.bootstrap import bootstrap_interval
from trustml.fairness.metrics import demographic_parity_difference, equal_opportunity_difference


@pytest.mark.parametrize("notion, groups", [("dp", 2), ("eo", 5)])
def test_cell_count_bootstrap_matches_the_row_bootstrap(notion, groups):
    rng = np.random.default_rng(groups)
    n = 1500
    s = rng.choice(groups, n, p=np.r_[0.5, np.full(groups - 1, 0.5 / (groups - 1))])
    y = rng.integers(0, 2, n)
    pred = (rng.random(n) < 0.3 + 0.1 * (s % 2) + 0.2 * y).astype(np.int64)
    metric = {"dp": demographic_parity_difference, "eo": equal_opportunity_difference}[notion]
    rows = bootstrap_interval(metric, y, pred, s, n_boot=1500, seed=1)
    cells = frontier.gap_interval(y, pred, s, notion, n_boot=4000, seed=2)
    # the same distribution, up to the Monte Carlo error of two bootstraps' 2.5% tails
    assert cells == pytest.approx(rows, abs=max(0.01, 0.05 * (rows[1] - rows[0])))
    assert cells[0] < metric(y, pred, s) < cells[1]


def test_an_equal_rate_shows_its_noise_and_one_sample_group_is_wider():
    n = 20000
    s = np.r_[np.zeros(n // 2, int), np.ones(n // 2, int)]
    y = np.zeros(n, int)
    pred = np.tile([0, 1], n // 2)  # rate 0.5 in both groups: gap 0
    lo, hi = frontier.gap_interval(y, pred, s, "dp")
    assert 0 <= lo < hi < 0.03  # about 2.24 * sqrt(2 * 0.25 / 10000) = 0.016
    small = np.r_[s[: n - 200], np.full(200, 2)]
    assert frontier.gap_interval(y, pred, small, "dp")[1] > 2 * hi


def _row(method, seed, acc, gap, target=0.02, ci=None, sizes=None):
    row = {"method": method, "target": target, "seed": seed, "accuracy": acc, "gap": gap,
           "selection_rate": 0.2, "constant": False}
    if ci is not None:
        row["gap_ci95"] = ci
    if sizes is not None:
        row["group_sizes"] = sizes
    return row


def test_aggregate_counts_seeds_met_and_sure():
    rows = [_row("trustml rate on scores", 0, 0.83, 0.015, ci=(0.008, 0.019)),
            _row("trustml rate on scores", 1, 0.84, 0.018, ci=(0.010, 0.026)),
            _row("trustml rate on scores", 2, 0.85, 0.022, ci=(0.014, 0.030))]
    (a,) = frontier.aggregate(rows)
    assert (a["met"], a["certified"], a["seeds"], a["seed_list"]) == (2, 1, 3, [0, 1, 2])
    assert a["accuracy_sd"] == pytest.approx(0.01)
    assert "0.840 ± 0.010 (gap 0.018; 2/3, 1 sure)" in frontier.table([a], [0.02])
    (old,) = frontier.aggregate([{k: v for k, v in r.items() if k != "gap_ci95"} for r in rows])
    assert old["certified"] is None  # points saved before intervals: no claim either way


def test_verdict_pairs_the_accuracy_by_seed():
    ours = [0.840, 0.846, 0.852]
    ref = [0.837, 0.842, 0.847]
    rows = [_row("trustml rate on scores", s, a, 0.015) for s, a in enumerate(ours)]
    rows += [_row("trustml mmd on representation", s, 0.80, 0.01) for s in range(3)]
    rows += [_row(frontier.REFERENCE, s, a, 0.016) for s, a in enumerate(ref)]
    (line,) = frontier.verdicts(frontier.aggregate(rows), [0.02], rows)
    ci = stats.ttest_rel(ours, ref).confidence_interval()
    assert "trustml rate on scores" in line and "**met** (+0.004)" in line
    assert f"+0.004 [{ci.low:+.3f}, {ci.high:+.3f}]" in line and ci.low > 0
    assert line.endswith("higher")
    rows = [r | {"accuracy": r["accuracy"] - 0.01} if r["method"].startswith("trustml rate")
            else r for r in rows]
    (line,) = frontier.verdicts(frontier.aggregate(rows), [0.02], rows)
    assert "**not met**" in line and line.endswith("lower")
    rows = [r | {"constant": r["seed"] == 1} if r["method"].startswith("trustml rate") else r
            for r in rows]
    assert "3/3 seeds; 1 near-constant)" in frontier.verdicts(frontier.aggregate(rows), [0.02])[0]
    only_zero = [r for r in rows if r["seed"] == 0 or r["method"] != frontier.REFERENCE]
    assert "paired" not in frontier.verdicts(frontier.aggregate(only_zero), [0.02], only_zero)[0]


def test_noise_lines_say_when_the_test_set_cannot_certify_a_target():
    sizes = {"White": 13000, "Black": 1500, "Other": 120}
    rows = [_row("trustml rate on scores", s, 0.81, 0.008, target=0.01, ci=(0.002, 0.06),
                 sizes=sizes) for s in range(3)]
    rows += [_row("trustml rate on scores", s, 0.82, 0.04, target=0.1, ci=(0.02, 0.07),
                  sizes=sizes) for s in range(3)]
    lines = frontier.noise_lines(rows, [0.01, 0.1])
    assert "Other with 120 rows" in lines[0] and "Black 1500" in lines[0]
    low, high = lines[2:]
    assert "3 of 3 (method, seed) points meet it on test, 0 surely" in low
    assert "too noisy to certify 0.01" in low and "± 0.029" in low
    assert "3 surely" in high and "too noisy" not in high


def _fakes(monkeypatch, calls):
    def fake_trustml(config, seed, targets, penalties, run_dir, progress):
        return ([_row("MLP (unconstrained)", seed, 0.85, 0.2, target=None)]
                + [_row("trustml rate on scores", seed, 0.83, t - 0.005, target=t,
                        ci=(t - 0.01, t + 0.005), sizes={"Female": 50, "Male": 100})
                   for t in targets]), ("data", "model")

    def fake_baselines(config, seed, targets, data, model, reductions_on, estimators_on=None,
                       keep="Fairlearn"):
        calls.append((seed, reductions_on, keep))
        method = ("Fairlearn ExpGrad + LogReg" if keep == "Fairlearn ExpGrad"
                  else frontier.REFERENCE)
        return [_row(method, seed, 0.834, t - 0.004, target=t, ci=(0.0, 0.049))
                for t in targets]

    monkeypatch.setattr(frontier, "_trustml_points", fake_trustml)
    monkeypatch.setattr(frontier, "_baseline_points", fake_baselines)
    monkeypatch.setattr(frontier, "_reload_plain", lambda config, seed, run_dir: ("d", "m"))


def test_one_command_fits_expgrad_on_every_seed(tmp_path, monkeypatch):
    calls = []
    _fakes(monkeypatch, calls)
    cfg = cfgmod.load("configs/adult_fair_target.yaml")
    for seed in (0, 1):  # seeds fitted one process each, without ExpGrad
        frontier.run_frontier(cfg, [0.02, 0.05], [seed], ["rate"], tmp_path, progress=False,
                              reductions_on=())
    assert calls == [(0, (), "Fairlearn"), (1, (), "Fairlearn")]
    result = frontier.run_frontier(cfg, [0.02, 0.05], [0, 1], ["rate"], tmp_path,
                                   progress=False)
    assert calls[2:] == [(0, ("LogReg",), "Fairlearn ExpGrad"),
                         (1, ("LogReg",), "Fairlearn ExpGrad")]
    expgrad = [a for a in result["summary"] if a["method"] == "Fairlearn ExpGrad + LogReg"]
    assert [a["seeds"] for a in expgrad] == [2, 2]
    report = (tmp_path / "report.md").read_text()
    assert ("Fairlearn ExpGrad + LogReg | n/a | 0.834 ± 0.000 (gap 0.016; 2/2, 0 sure) | "
            "0.834 ± 0.000 (gap 0.046; 2/2, 2 sure)") in report
    assert "Verdict per target" in report and "too noisy to certify 0.02" in report
    assert "too noisy to certify 0.05" not in report and "Female with 50 rows" in report
    assert (tmp_path / "frontier.png").stat().st_size > 0
    with pytest.raises(cfgmod.ConfigError, match="targets"):
        frontier.run_frontier(cfg, [0.03], [0], ["rate"], tmp_path, progress=False)


def test_expgrad_rows_of_the_older_layout_are_not_counted_twice(tmp_path, monkeypatch):
    calls = []
    _fakes(monkeypatch, calls)
    (tmp_path / "points").mkdir()
    old = [_row(frontier.REFERENCE, 0, 0.838, 0.015), _row("Fairlearn ExpGrad + LogReg", 0, 0.83,
                                                              0.016)]
    (tmp_path / "points" / "fairlearn-s0.json").write_text(json.dumps(old))
    result = frontier.run_frontier(cfgmod.load("configs/adult_fair_target.yaml"), [0.02], [0],
                                   ["rate"], tmp_path, progress=False)
    assert calls == [(0, ("LogReg",), "Fairlearn ExpGrad")]
    seeds = {a["method"]: a["seeds"] for a in result["summary"]}
    assert seeds["Fairlearn ExpGrad + LogReg"] == 1 and seeds[frontier.REFERENCE] == 1
