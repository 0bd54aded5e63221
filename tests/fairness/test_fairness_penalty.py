"""The training penalty: which samples and features it compares, multi-group sums, errors."""

from functools import partial

import pytest
import torch

from trustml.config import FairnessConfig
from trustml.fairness.losses import mmd, mmd_between, sinkhorn
from trustml.fairness.penalty import FairnessPenalty, build_penalty


def _batch(seed=0, n=40, groups=2, d=3):
    g = torch.Generator().manual_seed(seed)
    s = torch.arange(n) % groups
    y = (torch.arange(n) // groups) % 2
    z = torch.randn(n, d, generator=g, dtype=torch.float64) + s[:, None]
    logits = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return {"x": z, "y": y, "s": s}, {"z": z, "logits": logits}


def test_dp_on_representation_is_weighted_distance_between_groups():
    batch, out = _batch()
    pen = build_penalty(FairnessConfig(penalty="mmd", weight=3.0, bandwidth=1.0))
    z, s = out["z"], batch["s"]
    assert pen(batch, out).item() == pytest.approx(3.0 * mmd(z[s == 0], z[s == 1], 1.0).item())


def test_eo_uses_positives_only_and_scores_use_p_class_1():
    batch, out = _batch()
    pen = build_penalty(
        FairnessConfig(penalty="sinkhorn", weight=1.0, notion="eo", acts_on="scores", blur=0.1)
    )
    p = torch.softmax(out["logits"], -1)[:, 1:2]
    pos = batch["y"] == 1
    s = batch["s"]
    expected = sinkhorn(p[pos & (s == 0)], p[pos & (s == 1)], blur=0.1)
    assert pen(batch, out).item() == pytest.approx(expected.item(), rel=1e-6)
    # a single logit column means sigmoid
    out1 = {"logits": out["logits"][:, :1]}
    p1 = torch.sigmoid(out["logits"][:, :1])
    expected1 = sinkhorn(p1[pos & (s == 0)], p1[pos & (s == 1)], blur=0.1)
    assert pen(batch, out1).item() == pytest.approx(expected1.item(), rel=1e-6)


@pytest.mark.parametrize("notion", ["dp", "eo"])
def test_three_groups_sum_each_group_against_pooled_rest(notion):
    batch, out = _batch(groups=3, n=60)
    pen = FairnessPenalty(partial(mmd_between, bandwidth=1.0), weight=0.5, notion=notion)
    z, s = out["z"], batch["s"]
    if notion == "eo":
        keep = batch["y"] == 1
        z, s = z[keep], s[keep]
    expected = sum(mmd(z[s == g], z[s != g], 1.0) for g in range(3))
    assert pen(batch, out).item() == pytest.approx(0.5 * expected.item(), rel=1e-6)  # float32
    # sinkhorn has no pooled form: the same masks, split into samples
    pen = build_penalty(FairnessConfig(penalty="sinkhorn", notion=notion, blur=0.5))
    expected = sum(sinkhorn(z[s == g], z[s != g], blur=0.5) for g in range(3))
    assert pen(batch, out).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_reaches_the_representation():
    batch, out = _batch()
    z = out["z"].clone().requires_grad_(True)
    build_penalty(FairnessConfig(penalty="mmd"))(batch, {"z": z}).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_group_with_one_sample_is_a_clear_error_and_single_group_is_zero():
    batch, out = _batch()
    batch["s"] = torch.zeros_like(batch["s"])
    batch["s"][0] = 1
    with pytest.raises(ValueError, match="group 1 has 1 samples.*balanced_batches"):
        build_penalty(FairnessConfig(penalty="mmd"))(batch, out)
    # sinkhorn is defined for one sample; one group alone gives zero
    assert torch.isfinite(build_penalty(FairnessConfig(penalty="sinkhorn"))(batch, out))
    batch["s"][0] = 0
    assert build_penalty(FairnessConfig(penalty="mmd"))(batch, out).item() == 0.0
    assert build_penalty(FairnessConfig(penalty="none")) is None


def test_missing_output_is_a_clear_error():
    batch, out = _batch()
    with pytest.raises(ValueError, match=r"outputs\['z'\]"):
        build_penalty(FairnessConfig(penalty="mmd"))(batch, {"logits": out["logits"]})


@pytest.mark.parametrize("groups", [2, 3])
def test_rate_penalty_is_the_gap_of_mean_p_class_1(groups):
    batch, out = _batch(groups=groups)
    pen = build_penalty(FairnessConfig(penalty="rate", weight=2.0, acts_on="scores"))
    p, s = torch.softmax(out["logits"], -1)[:, 1], batch["s"]
    if groups == 2:
        expected = abs(p[s == 0].mean() - p[s == 1].mean())
    else:  # each group against the pooled rest
        expected = sum(abs(p[s == g].mean() - p[s != g].mean()) for g in range(groups))
    assert pen(batch, out).item() == pytest.approx(2.0 * float(expected))
    # the same decisions for every sample: no gap, whatever the groups
    out["logits"] = torch.zeros_like(out["logits"])
    assert pen(batch, out).item() == pytest.approx(0.0)


def test_rate_penalty_needs_scores():
    with pytest.raises(ValueError, match="acts_on: scores"):
        FairnessConfig(penalty="rate")
