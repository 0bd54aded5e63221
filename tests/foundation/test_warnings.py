"""Warnings a user cannot act on are fixed at their source: a small-vocabulary GPT-2 gets valid
bos/eos ids, and DP runs no longer print Opacus's "Optimal order is the largest alpha"."""

import warnings

import pytest
from opacus.accountants import RDPAccountant

from trustml import config as cfgmod
from trustml.config import ModelConfig
from trustml.models.lm import build_lm
from trustml.privacy.accounting import PrivacyAccountant
from trustml.runner import run_training

TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}


def test_small_vocabulary_gpt2_has_valid_special_tokens():
    model = build_lm(ModelConfig(kind="gpt2", config=TINY), 227, eos_token_id=3)
    assert model.config.bos_token_id == model.config.eos_token_id == 3
    assert model.generation_config.eos_token_id == 3
    unknown = build_lm(ModelConfig(kind="gpt2", config=TINY), 227)  # no tokenizer id: none
    assert unknown.config.eos_token_id is None
    assert build_lm(ModelConfig(kind="gpt2", config=TINY), 50257).config.eos_token_id == 50256


def test_dp_run_prints_no_optimal_order_warning(tmp_path):
    config = cfgmod.load("configs/adult_dp.yaml", ["train.epochs=1", "data.subset=3000",
                                                   "train.batch_size=64", "run.device=cpu"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_training(config, tmp_path / "dp", progress=False)
    assert not [w for w in caught if "Optimal order" in str(w.message)]


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.01, 1000), (0.8, 0.03, 500), (5.0, 0.11, 1)])
def test_extra_rdp_orders_match_opacus_or_tighten(sigma, q, steps):
    ours = PrivacyAccountant("rdp")
    opacus = RDPAccountant()
    for _ in range(steps):
        ours.step(sigma, q)
    opacus.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, best = opacus.get_privacy_spent(delta=1e-5)
    if best < max(RDPAccountant.DEFAULT_ALPHAS):  # optimum inside Opacus's grid: equal
        assert ours.epsilon(1e-5) == pytest.approx(theirs, rel=1e-12)
    else:  # at its edge: the larger orders give a tighter valid bound
        assert ours.epsilon(1e-5) < theirs
