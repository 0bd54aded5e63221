"""Guard for the DP engine and the audit: on DP runs of the suite, no empirical lower bound may exceed
the accountant's epsilon, while the same pipeline does find leakage in a non-private model."""

import numpy as np
import pytest
import torch

from trustml.attacks.audit import epsilon_lower_bound
from trustml.attacks.metrics import auc
from trustml.attacks.scores import loss_score
from trustml.attacks.tabular import logits_of
from trustml.config import from_dict
from trustml.runner import run_training


def _attack(eps, tmp_path):
    privacy = ({"enabled": True, "target_epsilon": eps, "max_grad_norm": 0.5, "secure_rng": False}
               if eps is not None else {"enabled": False})
    cfg = from_dict({
        "run": {"device": "cpu", "checkpoint_every": 100, "name": f"eps{eps}"},
        "data": {"dataset": "adult", "subset": 300},
        "model": {"hidden": [64, 64]},
        "train": {"epochs": 40 if eps is None else 6, "batch_size": 50 if eps is None else 100,
                  "lr": 3e-3, "log_every": 1000},
        "privacy": privacy,
    })
    result = run_training(cfg, tmp_path / f"eps{eps}", progress=False)
    from trustml.data.tabular import load_tabular

    data = load_tabular(cfg.data, seed=cfg.run.seed)
    x = torch.cat([data.train.x, data.test.x[:300]])
    y = torch.cat([data.train.y, data.test.y[:300]])
    member = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    scores = loss_score(logits_of(result.model, x, "cpu"), y)
    return result.summary.get("epsilon"), scores, member


@pytest.mark.slow
def test_bound_never_exceeds_accountant(tmp_path):
    for eps in (1.0, 4.0):
        accountant, scores, member = _attack(eps, tmp_path)
        assert accountant <= eps + 1e-6
        for selection in ("bonferroni", "split"):
            bound = epsilon_lower_bound(scores, member, 1e-5, selection=selection)
            assert bound <= accountant, (eps, selection, bound)
    _, scores, member = _attack(None, tmp_path)
    assert auc(scores, member) > 0.52  # the pipeline is not vacuous: plain training leaks
    assert epsilon_lower_bound(scores, member, 1e-5) > 0
