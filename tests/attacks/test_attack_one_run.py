"""One-run audits of trustml's DP-SGD engine: gradient canaries, the driver and its alarm."""

import math

import numpy as np
import pytest
import torch

from trustml.attacks import one_run
from trustml.attacks.audit import one_run_audit
from trustml.attacks.gradient_canaries import log_likelihood_ratio
from trustml.config import from_dict
from trustml.data.tabular import load_tabular


def tiny(**attack):
    return from_dict({
        "run": {"device": "cpu", "name": "audit", "experiment": "audit", "seed": 0},
        "data": {"dataset": "adult", "subset": 200},
        "model": {"hidden": [4]},
        "train": {"epochs": 5, "batch_size": 50, "lr": 0.01},
        "privacy": {"delta": 1e-5, "max_grad_norm": 1.0},
        "attack": {"audit_input_canaries": 20, "audit_gradient_canaries": 20000, **attack},
    })


@pytest.fixture(scope="module")
def data():
    return load_tabular(tiny().data, seed=0)


def white_box(config, eps, data):
    canaries = one_run.mislabelled(data.val.subset(np.arange(config.attack.audit_input_canaries)))
    run = one_run.audited_run(config, eps, data, canaries, config.attack.audit_gradient_canaries,
                              one_run.secret_generator(1))
    return run, one_run_audit(run.gradient_scores, run.gradient_member, 1e-5,
                              independent_trials=True)


def test_white_box_audit_is_sound_and_finds_leakage(data):
    """Poisson-sampled DP-SGD through DPStep (q = 1/4, 20 steps) at epsilon 8, 20000 canaries."""
    run, bounds = white_box(tiny(), 8.0, data)
    assert run.accountant_epsilon == pytest.approx(8.0, abs=0.05)
    assert 0.5 < bounds["eps_lb"] <= run.accountant_epsilon
    assert bounds["eps_lb"] == max(bounds["eps_lb_clopper_pearson"], bounds["eps_lb_one_run"])


def test_mislabelled_canaries_flip_every_label(data):
    rows = data.val.subset(np.arange(50))
    assert (one_run.mislabelled(rows).y != rows.y).all()


def test_log_likelihood_ratio_matches_densities():
    from scipy import stats

    x, q, s = torch.tensor([-1.0, 0.3, 2.5], dtype=torch.float64), 0.3, 0.8
    ratio = ((1 - q) * stats.norm.pdf(x, 0, s) + q * stats.norm.pdf(x, 1, s)) / stats.norm.pdf(
        x, 0, s)
    np.testing.assert_allclose(log_likelihood_ratio(x, q, s).numpy(), np.log(ratio), rtol=1e-12)


def test_an_accountant_that_undercounts_is_reported_as_broken(tmp_path, monkeypatch, capsys):
    """If the accountant believed in 4x the noise the engine adds, its epsilon would be far too low;
    the audit must say so loudly (report, summary flag, stderr)."""
    from trustml.attacks.experiment import audit
    from trustml.privacy.accounting import PrivacyAccountant

    honest = PrivacyAccountant.step
    monkeypatch.setattr(PrivacyAccountant, "step",
                        lambda self, sigma, q: honest(self, 4 * sigma, q))
    summary = audit(tiny(audit_epsilons=[8.0]), tmp_path)
    row = summary["rows"][0]
    assert row["accountant_epsilon"] < row["white_box_eps_lb"]
    assert summary["privacy_broken"] == 1
    assert "PRIVACY BROKEN" in (tmp_path / "audit.md").read_text()
    assert "PRIVACY BROKEN" in capsys.readouterr().err
    assert math.isfinite(row["white_box_eps_estimate_gdp"])
