"""Batched (vmap) reference models equal models trained one by one; IN/OUT masks are halves."""

import numpy as np
import pytest
import torch

from trustml.attacks.reference import half_masks, train_reference_mlps
from trustml.config import from_dict


def test_half_masks():
    mask = half_masks(64, 101, seed=0)
    assert mask.shape == (64, 101) and (mask.sum(1) == 50).all()
    frac = mask.mean(0)
    assert 0.25 < frac.min() and frac.max() < 0.75  # every example IN for about half the models
    assert not np.array_equal(mask, half_masks(64, 101, seed=1))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_batched_training_equals_one_by_one(optimizer):
    cfg = from_dict({"model": {"hidden": [16, 8]},
                     "train": {"epochs": 2, "batch_size": 16, "optimizer": optimizer, "lr": 0.05,
                               "momentum": 0.9, "weight_decay": 1e-3}})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=gen)
    y = (x[:, 0] + 0.3 * torch.randn(90, generator=gen) > 0).long()
    mask = half_masks(4, 90, seed=0)
    a = train_reference_mlps(cfg, x, y, mask, progress=False)
    b = train_reference_mlps(cfg, x, y, mask, batched=False, progress=False)
    for name in a.params:
        torch.testing.assert_close(a.params[name], b.params[name], atol=1e-5, rtol=1e-4)
    logits = a.logits(x)
    assert logits.shape == (4, 90, 2)
    # each model fits its own IN half better than its OUT half
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(4), reduction="none")
    loss = loss.view(4, 90).numpy()
    assert (np.where(mask, loss, 0).sum(1) / mask.sum(1)
            < np.where(~mask, loss, 0).sum(1) / (~mask).sum(1)).all()
