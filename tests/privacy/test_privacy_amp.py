"""Mixed precision: autocast runs on the CPU too, so CI exercises the bf16/fp16 paths that pay off
on CUDA. Norms must stay fp32 and close to the fp32 reference."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trustml.privacy import PerSampleClipper, make_private
from trustml.training.loop import resolved
from trustml.training.objectives import LMObjective
from trustml.training.step import autocast


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    ids = torch.randint(0, 100, (4, 12))
    return GPT2LMHeadModel(config), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_bf16_autocast_norms_and_clipped_sum_match_fp32():
    model, batch = tiny_gpt2()
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    reference = clipper.backward(LMObjective()(model, batch).losses)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with autocast(torch.device("cpu"), "bf16"):
        losses = LMObjective()(model, batch).losses
    norms = clipper.backward(losses.float())
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, reference, rtol=2e-2, atol=0)
    for p, g in zip(model.parameters(), grads):
        assert p.grad.dtype == torch.float32
        assert (p.grad - g).norm() <= 0.05 * g.norm() + 1e-6


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_dp_step_under_autocast_is_finite(amp):
    model, batch = tiny_gpt2()

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {k: v[i] for k, v in batch.items()}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(model, opt, Blocks(), noise_multiplier=0.5, target_delta=1e-5,
                           epochs=1, max_grad_norm=1.0, batch_size=2, amp=amp)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(20):  # fp16 starts at loss scale 2^16: overflowing steps are skipped, scale halves
        metrics = private.step.step(model, LMObjective(), batch)
        if any(not torch.equal(a, p) for a, p in zip(before, model.parameters())):
            break
    else:
        pytest.fail("no update in 20 steps")
    assert resolved(metrics)["epsilon"] > 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
