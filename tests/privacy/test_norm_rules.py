"""GroupNorm's rule (autograd's saved statistics, folded backward kernel) equals a per-sample loop."""

from __future__ import annotations

import pytest
import torch
from test_conv_rules import assert_exact  # the float64 per-sample-loop reference
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from trustml.privacy import PerSampleClipper
from trustml.privacy.layers import GroupNormRule, rule_for


@pytest.mark.parametrize("shape", [(5, 6, 7), (4, 6, 3, 5), (3, 6, 2, 3, 2), (1, 6, 4)])
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_exact(shape, groups, affine):
    torch.manual_seed(0)
    gn = nn.GroupNorm(groups, 6, affine=affine)
    # a layer before it gives the norm a varied, trainable input (and the model parameters when
    # the norm has none); a second one after it makes the output gradient depend on the sample
    before = nn.Linear(shape[-1], shape[-1]) if len(shape) < 4 else nn.Conv2d(6, 6, 1)
    before = nn.Conv3d(6, 6, 1) if len(shape) == 5 else before
    model = nn.Sequential(before, gn, nn.Tanh())
    if affine:
        nn.init.normal_(gn.weight), nn.init.normal_(gn.bias)
    x = torch.randn(shape) * 3 + 1.5  # a mean far from 0: the kernel's expansion is exercised
    assert_exact(model, x)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_one_parameter_frozen(frozen):
    torch.manual_seed(1)
    gn = nn.GroupNorm(3, 6)
    nn.init.normal_(gn.weight), nn.init.normal_(gn.bias)
    getattr(gn, frozen).requires_grad_(False)
    assert_exact(nn.Sequential(nn.Conv1d(4, 6, 2), gn, nn.Tanh()), torch.randn(4, 4, 5) + 2)


def test_statistics_are_autograd_s_and_recomputed_ones_agree():
    """The statistics read off the autograd node equal the fallback's recomputed ones, and the
    backward runs no GroupNorm forward (the old rule re-normalised the input)."""
    torch.manual_seed(2)
    gn = nn.GroupNorm(3, 6).double()
    nn.init.normal_(gn.weight)
    x = torch.randn(4, 6, 5, dtype=torch.float64) + 2
    g = torch.randn(4, 6, 5, dtype=torch.float64)
    rule = rule_for(gn)
    assert isinstance(rule, GroupNormRule)
    from_node = rule.save(gn, (x,), {}, gn(x.requires_grad_()))
    recomputed = rule.save(gn, (x,), {}, gn(x).detach())  # no autograd node: from the input
    for a, b in zip(from_node, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    clipper = PerSampleClipper(gn, 1.0)
    losses = (gn(x) * g).flatten(1).sum(1)
    with OpLog() as log:
        clipper.backward(losses)
    assert "aten.native_group_norm.default" not in log.ops
    assert "aten.native_group_norm_backward.default" in log.ops


class OpLog(TorchDispatchMode):
    """The aten ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class Broadcast(nn.Module):
    """A GroupNorm applied to one batch-1 tensor shared by the batch, then added to each sample."""

    def __init__(self):
        super().__init__()
        self.seed = nn.Parameter(torch.randn(1, 6, 4))
        self.gn = nn.GroupNorm(2, 6)
        nn.init.normal_(self.gn.weight)

    def forward(self, x):
        return torch.tanh(x * self.gn(self.seed))


def test_broadcast_batch_one_input():
    """The clipper expands a fast-rule layer's batch-1 output to the batch; the norm's statistics
    then come from its input and are every sample's."""
    torch.manual_seed(3)
    module = Broadcast()
    module.seed.requires_grad_(False)
    assert_exact(module, torch.randn(5, 6, 4))


def test_autocast_bf16_keeps_float32_statistics():
    """Under CPU autocast the kernel runs bf16 in, float32 statistics; the rule reads both."""
    torch.manual_seed(4)
    gn = nn.GroupNorm(2, 4)
    x = torch.randn(3, 4, 5)
    clipper = PerSampleClipper(gn, 1e6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gn(x.bfloat16().requires_grad_())
    clipper.backward(out.float().pow(2).flatten(1).sum(1))
    clipper.remove()
    want = [torch.autograd.grad(gn(x[i : i + 1].bfloat16()).float().pow(2).sum(), gn.weight)[0]
            for i in range(3)]
    torch.testing.assert_close(gn.weight.grad, sum(want), rtol=2e-2, atol=2e-2)
