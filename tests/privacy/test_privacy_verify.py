"""The self-check's own reference (privacy.verify): the streamed per-sample loop equals the naive one,
and the check leaves none of MKL's float64 GEMM buffers behind."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from torch import nn

from trustml.privacy import PerSampleClipper
from trustml.privacy.verify import _clipped_sum_by_loop, verify
from trustml.training.objectives import ObjectiveOutput


class TiedLM(nn.Module):
    """Embedding and output head share one weight; ``unused`` gets no gradient."""

    def __init__(self, vocab: int = 7, width: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def lm_loss(model, batch):
    ids = batch["ids"]
    logits = model(ids)[:, :-1]
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return ObjectiveOutput(losses.mean(1) * batch["w"])


def test_streamed_loop_equals_the_naive_per_sample_loop():
    torch.manual_seed(0)
    model = TiedLM().double()
    g = torch.Generator().manual_seed(1)
    batch = {"ids": torch.randint(0, 7, (5, 6), generator=g),
             "w": torch.tensor([0.1, 3.0, 1.0, 0.02, 5.0], dtype=torch.float64)}
    params = [p for p in model.parameters() if p.requires_grad]
    grads, norms = [], []
    for i in range(5):
        loss = lm_loss(model, {k: v[i : i + 1] for k, v in batch.items()}).losses.sum()
        gi = torch.autograd.grad(loss, params, allow_unused=True)
        gi = [torch.zeros_like(p) if x is None else x for p, x in zip(params, gi)]
        grads.append(gi)
        norms.append(float(torch.sqrt(sum((x**2).sum() for x in gi))))
    c = sorted(norms)[2]  # some samples clipped, some not
    assert min(norms) < c < max(norms)
    want = [sum(x * min(1.0, c / n) for x, n in zip(per_param, norms))
            for per_param in zip(*grads)]
    got = _clipped_sum_by_loop(model, lm_loss, batch, 5, c, params)
    for p, w, x in zip(params, want, got):
        torch.testing.assert_close(x, w, rtol=1e-12, atol=1e-14)
        assert p.grad is None  # each gradient was consumed
    assert params[0] is model.unused and torch.count_nonzero(got[0]) == 0  # no gradient
    # the hooks are gone: a plain backward fills .grad again
    lm_loss(model, batch).losses.sum().backward()
    assert all(p.grad is not None for p in params[1:])


def mkl_pool_bytes() -> int | None:
    """Bytes held by MKL's memory manager (``mkl_mem_stat``), or None where it cannot be read."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        stat = lib.mkl_serv_mem_stat
    except (OSError, AttributeError):
        return None
    stat.restype = ctypes.c_int64
    return stat(ctypes.byref(ctypes.c_int(0)))


def test_verify_leaves_no_mkl_buffers():
    a = torch.randn(600, 600, dtype=torch.float64)
    _ = a @ a  # a float64 product large enough for MKL to pool its packing buffers
    before = mkl_pool_bytes()
    if not before:
        pytest.skip("MKL's memory manager cannot be read here, or pools nothing")
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    clipper = PerSampleClipper(model, 0.5)
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(6, 5, generator=g), "y": torch.randn(6, 2, generator=g)}

    def squared(m, b):
        return ObjectiveOutput(((m(b["x"]) - b["y"]) ** 2).sum(1))

    assert verify(model, squared, batch, clipper).max_rel_err < 1e-6
    assert mkl_pool_bytes() == 0

