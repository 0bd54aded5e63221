"""fairness.method=group_posterior: the (c, t) selection on a hand-computed case, folding into the
head, and a run whose saved model decides without the sensitive attribute. (The cut curve it
selects on, trustml.fairness.threshold.cutoff_curve, is tested in test_fairness_threshold.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trustml import config as cfgmod
from trustml.fairness.metrics import demographic_parity_difference
from trustml.fairness.posterior import (
    Decision,
    decide,
    fold_decision,
    select_decision,
)
from trustml.models.mlp import MLP


# Hand-computed case: two groups of four, both with positives exactly at their top two task logits.
#   group 0: l = 3, 2, 1, -1      y = 1, 1, 0, 0
#   group 1: l = 1.5, -0.5, -2, -3  y = 1, 1, 0, 0
# One threshold for all (c = 0) ranks 3, 2, 1.5, 1, -0.5, ...; only k = 0 and k = 8 select as many of
# each group, so at gap 0 the best is 4/8 correct; at gap <= 0.25, the top 3 (2 of group 0, 1 of
# group 1) give 7/8. With the perfect proxy d = +1 (group 1) / -1 (group 0), the rule l - c d
# shifts group 1 by -2c against group 0: for -2 < c < -0.75 the top two of each group come first
# (2 + c > -2 - c and -0.5 - c > 1 + c), every decision is right at gap 0.
HAND_L = np.array([3, 2, 1, -1, 1.5, -0.5, -2, -3], dtype=float)
HAND_Y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
HAND_S = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_selection_on_the_hand_computed_case():
    proxy = np.stack([np.zeros(8), np.where(HAND_S == 1, 1.0, -1.0)], 1)
    chosen = select_decision(HAND_L, proxy, HAND_Y, HAND_S, bound=0.0)
    assert chosen.accuracy == 1.0 and chosen.gap == 0.0 and chosen.selection_rate == 0.5
    assert -2 < chosen.coefficients[0] < -0.75
    assert (decide(HAND_L, proxy, chosen) == HAND_Y).all()
    useless = np.zeros((8, 2))  # a group head that knows nothing: one threshold for all
    assert select_decision(HAND_L, useless, HAND_Y, HAND_S, bound=0.0).accuracy == 0.5
    loose = select_decision(HAND_L, useless, HAND_Y, HAND_S, bound=0.25)
    assert loose.accuracy == 7 / 8 and loose.gap == 0.25
    assert (decide(HAND_L, useless, loose) == [1, 1, 0, 0, 1, 0, 0, 0]).all()


def test_five_groups_feasible_and_no_worse_than_one_threshold():
    rng = np.random.default_rng(3)
    n, groups = 2000, 5
    s = rng.choice(groups, n, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    y = (rng.random(n) < 0.15 + 0.08 * s).astype(np.int64)
    group_logits = np.eye(groups)[s] * 2 + rng.normal(size=(n, groups))  # a noisy proxy
    task = 2.0 * y + 0.3 * s + rng.normal(size=n)
    for bound in (0.02, 0.05):
        chosen = select_decision(task, group_logits, y, s, bound, grid=81)
        pred = decide(task, group_logits, chosen)
        assert demographic_parity_difference(y, pred, s) == pytest.approx(chosen.gap)
        assert chosen.gap <= bound and (pred == y).mean() == pytest.approx(chosen.accuracy)
        single = select_decision(task, np.zeros((n, groups)), y, s, bound, grid=81)
        assert chosen.accuracy > single.accuracy  # the proxy buys accuracy at the same gap


@pytest.mark.parametrize("groups", [2, 5])
def test_folded_head_gives_the_decisions_of_c_and_t(groups):
    torch.manual_seed(groups)
    model = MLP(6, [8, 4]).double()
    group_head = torch.nn.Linear(4, groups).double()
    x = torch.randn(1000, 6, dtype=torch.float64)
    with torch.no_grad():
        logits, z = model(x, with_representation=True)
        task = (logits[:, 1] - logits[:, 0]).numpy()
        group_logits = group_head(z).numpy()
    coefficients = tuple(float(v) for v in np.random.default_rng(groups).normal(size=groups - 1))
    score = task - (group_logits[:, 1:] - group_logits[:, :1]) @ np.array(coefficients)
    threshold = float(np.quantile(score, 0.6))
    expected = decide(task, group_logits, Decision(coefficients, threshold, 0, 0, 0))
    assert expected.mean() == pytest.approx(0.4, abs=0.01)
    fold_decision(model.head, group_head, coefficients, threshold)
    with torch.no_grad():
        folded = torch.softmax(model(x), -1)[:, 1].numpy()
    assert ((folded >= 0.5).astype(int) == expected).all()
    with pytest.raises(ValueError, match="coefficients"):
        fold_decision(model.head, group_head, coefficients + (1.0,), threshold)


def test_config_refuses_what_the_method_cannot_do():
    with pytest.raises(cfgmod.ConfigError, match="group_posterior"):
        cfgmod.load("configs/adult_fair_posterior.yaml", ["fairness.target=null"])
    with pytest.raises(cfgmod.ConfigError, match="group_posterior"):
        cfgmod.load("configs/adult_fair_posterior.yaml", ["fairness.notion=eo"])
    with pytest.raises(cfgmod.ConfigError, match="group_posterior"):
        cfgmod.load("configs/adult_fair_posterior.yaml",
                    ["privacy.enabled=true", "privacy.noise_multiplier=1.0"])


def test_with_penalty_switches_between_the_method_and_the_penalties():
    from trustml.fairness.penalty import with_penalty

    base = cfgmod.load("configs/adult_fair_target.yaml")
    ours = with_penalty(base, "group_posterior", 1.0)
    assert (ours.fairness.method, ours.fairness.penalty, ours.fairness.target) == (
        "group_posterior", "none", 0.02)
    plain = with_penalty(ours, "none", 0.0)
    assert plain.fairness.method == "penalty" and plain.fairness.target is None
    assert with_penalty(ours, "rate", 1.0).fairness.method == "penalty"


def test_run_decides_without_the_sensitive_attribute(tmp_path):
    from trustml.evaluation.report import load_run
    from trustml.evaluation.tabular import predict_scores
    from trustml.runner import run_training

    cfg = cfgmod.load("configs/adult_fair_posterior.yaml", [
        "data.subset=3000", "train.epochs=2", "fairness.target=0.03"])
    summary = run_training(cfg, tmp_path / "run", progress=False).summary
    assert summary["fairness_selected_val_selected_gap"] <= 0.03 * 0.9
    ctx = load_run(tmp_path / "run", device="cpu")
    data = ctx.parts.data
    assert not any(name.startswith("sex=") for name in data.feature_names)  # not an input
    fresh = MLP(data.n_features, cfg.model.hidden).state_dict()
    assert ctx.model.state_dict().keys() == fresh.keys()  # a plain MLP: no group head left
    val, test = data.val, data.test
    pred = (predict_scores(ctx.model, val) >= 0.5).astype(int)  # x alone
    assert demographic_parity_difference(val.y.numpy(), pred, val.s.numpy()) == pytest.approx(
        summary["fairness_selected_val_selected_gap"], abs=1 / len(val.y))
    assert (pred == val.y.numpy()).mean() == pytest.approx(
        summary["fairness_selected_val_selected_accuracy"], abs=1 / len(val.y))
    assert 0.05 < pred.mean() < 0.95  # not a near-constant predictor
    test_pred = (predict_scores(ctx.model, test) >= 0.5).astype(int)
    assert summary["test_gap"] == pytest.approx(
        demographic_parity_difference(test.y.numpy(), test_pred, test.s.numpy()))
