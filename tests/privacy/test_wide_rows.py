"""The speed paths for wide rows and materialised norms, each against the per-sample loop:
bias sums over >= 4 KiB rows as a product (torch's dim-1 reduction is slow there) and squared
norms of materialised gradients by one reduction."""

from __future__ import annotations

import pytest
import torch
from test_privacy_clipping import STRATEGIES, check, sq_loss
from torch import nn
from transformers.pytorch_utils import Conv1D

from trustml.privacy.factored import sqnorms
from trustml.privacy.layers import _positions_summed

B = 5


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("steps", [1, 3, 7])
def test_wide_linear_bias_exact(strategy, steps):
    """Linear(6, 520) in float64: 4160-byte output rows take the product path (T > 1)."""
    torch.manual_seed(21)
    layer = nn.Linear(6, 520)
    assert 520 * torch.finfo(torch.float64).bits // 8 >= 4096
    check(layer, sq_loss, [torch.randn(B, steps, 6), torch.randn(B, steps, 520)], strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_wide_conv1d_bias_exact(strategy):
    torch.manual_seed(22)
    check(Conv1D(600, 4), sq_loss, [torch.randn(B, 3, 4), torch.randn(B, 3, 600)], strategy)


def test_float32_wide_bias_matches_float32_loop():
    """BERT's FFN width in float32 (1024 x 4 bytes): the product path, within float32 rounding."""
    torch.manual_seed(23)
    check(nn.Linear(4, 1024), sq_loss, [torch.randn(B, 9, 4), torch.randn(B, 9, 1024)],
          dtype=torch.float32, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 300, 1030])
def test_positions_summed_equals_sum(dtype, width):
    g = torch.randn(3, 6, width, dtype=torch.float64)
    got = _positions_summed(g.to(dtype))
    assert got.dtype == dtype and got.shape == (3, width)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.double(), g.to(dtype).double().sum(1), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sqnorms_equals_rowwise_dot(dtype):
    t = torch.randn(4, 1000, dtype=torch.float64)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    got = sqnorms(t.to(dtype), wide)
    assert got.dtype == wide and got.shape == (4,)
    ref = (t.to(dtype).double() ** 2).sum(1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-12 if dtype == torch.float64 else 1e-5,
                               atol=0)
    zero = sqnorms(torch.zeros(2, 0, dtype=dtype), wide)
    assert zero.tolist() == [0.0, 0.0]
