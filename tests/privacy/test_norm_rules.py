"""GroupNorm's and LayerNorm's rules (autograd's saved statistics, no second forward) equal a
per-sample loop (float64)."""

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


def _groupnorm() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(4)
    return nn.GroupNorm(2, 4), torch.randn(3, 4, 5)


def _layernorm() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(10)
    ln = nn.LayerNorm(6)
    nn.init.normal_(ln.weight)
    return ln, torch.randn(3, 4, 6) * 2 + 1


@pytest.mark.parametrize("build", [_groupnorm, _layernorm], ids=["groupnorm", "layernorm"])
def test_autocast_bf16_keeps_float32_statistics(build):
    """Under CPU autocast the kernel runs bf16 in and saves float32 statistics; the rule reads
    both (GroupNorm and LayerNorm)."""
    norm, x = build()
    clipper = PerSampleClipper(norm, 1e6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16().requires_grad_())
    clipper.backward(out.float().pow(2).flatten(1).sum(1))
    clipper.remove()
    want = [torch.autograd.grad(norm(x[i : i + 1].bfloat16()).float().pow(2).sum(), norm.weight)[0]
            for i in range(3)]
    torch.testing.assert_close(norm.weight.grad, sum(want), rtol=2e-2, atol=2e-2)


# ---- LayerNorm: autograd's saved mean / rstd instead of a second forward ----------------------


class Around(nn.Module):
    """A Linear before the norm (a varied, trainable input) and a tanh after it; ``layout`` lays
    the (B, T, d) rows out for the norm: batch-first, sequence-first (T, B, d) or folded (B*T, d)."""

    def __init__(self, norm: nn.Module, width: int, layout: str = "batch-first"):
        super().__init__()
        self.before, self.norm, self.layout = nn.Linear(width, width), norm, layout

    def forward(self, x):
        h = self.before(x) * 3 + 1.5  # a mean far from 0
        if self.layout == "sequence-first":
            return torch.tanh(self.norm(h.transpose(0, 1)).transpose(0, 1))
        if self.layout == "folded":
            return torch.tanh(self.norm(h.reshape(-1, h.shape[-1])).reshape(h.shape))
        return torch.tanh(self.norm(h))


@pytest.mark.parametrize("layout", ["batch-first", "sequence-first", "folded"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 5])
def test_layernorm_exact(layout, bias, batch):
    torch.manual_seed(5)
    ln = nn.LayerNorm(6, bias=bias)
    nn.init.normal_(ln.weight)
    if bias:
        nn.init.normal_(ln.bias)
    assert_exact(Around(ln, 6, layout), torch.randn(batch, 4, 6))


@pytest.mark.parametrize("shape", [(5, 6), (5, 3, 2, 6)])
def test_layernorm_over_several_dims_and_2d_input(shape):
    """normalized_shape of two dims (the statistics have two trailing 1s), and a (B, d) input."""
    torch.manual_seed(6)
    normalized = shape[-1:] if len(shape) == 2 else shape[-2:]
    ln = nn.LayerNorm(normalized)
    nn.init.normal_(ln.weight), nn.init.normal_(ln.bias)
    assert_exact(Around(ln, shape[-1]), torch.randn(shape))


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_layernorm_one_parameter_frozen(frozen):
    torch.manual_seed(7)
    ln = nn.LayerNorm(6)
    nn.init.normal_(ln.weight), nn.init.normal_(ln.bias)
    getattr(ln, frozen).requires_grad_(False)
    assert_exact(Around(ln, 6), torch.randn(5, 4, 6))


def test_layernorm_statistics_are_autograd_s_and_no_second_forward():
    """The statistics read off the autograd node equal the fallback's recomputed ones, and the
    backward runs no LayerNorm forward (the old rule re-normalised the input)."""
    torch.manual_seed(8)
    ln = nn.LayerNorm(6).double()
    nn.init.normal_(ln.weight)
    x = torch.randn(4, 3, 6, dtype=torch.float64) * 2 + 1
    rule = rule_for(ln)
    from_node = rule.save(ln, (x,), {}, ln(x.requires_grad_()))
    assert from_node.mean is not None and from_node.x.data_ptr() == x.data_ptr()
    fallback = rule.save(ln, (x,), {}, ln(x).detach())  # no autograd node: computed at backward
    assert fallback.mean is None
    _, mean, rstd = torch.native_layer_norm(x.detach(), (6,), None, None, ln.eps)
    torch.testing.assert_close(from_node.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_node.rstd, rstd, rtol=1e-12, atol=1e-12)
    clipper = PerSampleClipper(ln, 1.0)
    losses = (ln(x) * torch.randn(4, 3, 6, dtype=torch.float64)).flatten(1).sum(1)
    with OpLog() as log:
        clipper.backward(losses)
    assert "aten.native_layer_norm.default" not in log.ops


class BroadcastLN(nn.Module):
    """A LayerNorm applied to one batch-1 tensor shared by the batch, then added to each sample:
    the clipper expands its output, so the rule computes the statistics from the input."""

    def __init__(self):
        super().__init__()
        self.seed = nn.Parameter(torch.randn(1, 4, 6), requires_grad=False)
        self.ln = nn.LayerNorm(6)
        nn.init.normal_(self.ln.weight)

    def forward(self, x):
        return torch.tanh(x * self.ln(self.seed))


def test_layernorm_broadcast_batch_one_input():
    torch.manual_seed(9)
    assert_exact(BroadcastLN(), torch.randn(5, 4, 6))
