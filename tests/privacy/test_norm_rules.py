"""GroupNorm's rule (autograd's saved statistics, no re-normalisation) equals a per-sample loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trustml.privacy.layers import rule_for
from trustml.privacy.norms import GroupNormRule

from test_conv_rules import assert_exact  # the float64 per-sample-loop reference


@pytest.mark.parametrize("shape", [(5, 6, 7), (4, 6, 3, 5), (3, 6, 2, 3, 2), (1, 6, 4)])
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_exact(shape, groups, affine):
    torch.manual_seed(0)
    gn = nn.GroupNorm(groups, 6, affine=affine)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(shape) - 3](6, 6, 1)  # gives gn a varied input
    model = nn.Sequential(conv, gn)
    if affine:
        nn.init.normal_(gn.weight), nn.init.normal_(gn.bias)
    x = torch.randn(shape) * 3 + 1.5  # a mean far from 0: the expansion's cancellation is exercised
    assert_exact(model, x)


def test_frozen_scale_and_recomputed_statistics():
    torch.manual_seed(1)
    gn = nn.GroupNorm(3, 6).double()
    nn.init.normal_(gn.weight)
    x, g = torch.randn(4, 6, 5, dtype=torch.float64) + 2, torch.randn(4, 6, 5, dtype=torch.float64)
    rule = rule_for(gn)
    assert isinstance(rule, GroupNormRule)
    from_autograd = rule.save(gn, (x,), {}, gn(x.requires_grad_()))
    recomputed = rule.save(gn, (x,), {}, gn(x).detach())  # no grad_fn: statistics from the input
    for a, b in zip(rule.uses(gn, from_autograd, [g], 4), rule.uses(gn, recomputed, [g], 4)):
        assert a[0] is b[0]
        torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=1e-12)
    gn.weight.requires_grad_(False)
    assert [p for p, _ in rule.uses(gn, from_autograd, [g], 4)] == [gn.bias]
    assert_exact(nn.Sequential(nn.Linear(5, 5), gn), torch.randn(4, 6, 5))
