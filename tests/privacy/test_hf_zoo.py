"""Every architecture of the Hugging Face zoo: the DP engine is exact (to 1e-6 in float64, against the
naive per-sample loop) or refuses with an error naming a module -- never silently wrong.

Four cases per architecture (:func:`zoo_models.shapes`): a plain batch (B=3, T=5, one sample padded
with the pad token), a batch whose size collides with the sequence length (B == T; for vision, B ==
a token or window count), one whose size equals the number of heads (B == 2) and a batch of one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from zoo_models import (
    ZOO,
    ZooModel,
    check_trustml,
    clip_norm_for,
    clipped_sum,
    compare_grads,
    per_sample_grads,
    reference,
    shapes,
)

import trustml.privacy.verify as verify_module
from trustml.privacy import PerSampleClipper, make_private
from trustml.training.objectives import ObjectiveOutput

CASES = ["plain", "b_eq_t", "b_eq_heads", "single"]
README = Path(__file__).resolve().parents[2] / "README.md"

# The README's refused rows (each with the module named and why). Every other architecture must be
# exact in all four cases: a regression to a refusal fails, not only a silent error.
REFUSED = {
    "mpnet", "funnel", "t5", "mt5", "umt5", "longt5", "blenderbot", "blenderbot-small", "swin",
    "resnet", "mobilenet-v2", "regnet", "mobilevit",
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("spec", ZOO, ids=[s.name for s in ZOO])
def test_exact_or_refused(spec: ZooModel, case: str) -> None:
    batch, seq = shapes(spec)[case]
    verdict = check_trustml(spec, batch, seq, onto=case == "plain")  # onto DPStep's noise
    allowed = ("exact", "refused") if spec.name in REFUSED else ("exact",)
    assert verdict.kind in allowed, f"{spec.name} (B={batch}, T={seq}): {verdict}"


def test_readme_table_matches_the_zoo() -> None:
    """The README's table says exact for exactly the architectures the test above holds exact."""
    rows = re.findall(r"^\| ([\w.-]+) \| [\w-]+ \| (exact|refused)", README.read_text(), re.M)
    table = dict(rows)
    assert set(table) == {s.name for s in ZOO}
    assert {name for name, kind in table.items() if kind == "refused"} == REFUSED


# ---- make_private(..., verify=True): the self-check on the run's own model --------------------

VERIFIED = ["gpt2", "llama", "bert", "vit"]


class ZooObjective:
    """A trustml objective (batch -> per-sample losses) from a zoo entry's loss."""

    def __init__(self, spec: ZooModel):
        self.spec = spec

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        return ObjectiveOutput(self.spec.loss(model, batch))


def private_step(
    spec: ZooModel, batch_size: int, seq: int, model: nn.Module | None = None
) -> tuple[nn.Module, Any, list[Tensor], float]:
    """One noiseless DP step (lr 1) of a zoo model through ``make_private(verify=True)``; returns the
    model, the PrivateTraining, the naive clipped sum and its C."""
    model = model or spec.build()
    batch = spec.batch(batch_size, seq)
    _, grads, norms = per_sample_grads(model, spec.loss, batch)
    c = clip_norm_for(norms)
    model.zero_grad(set_to_none=True)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch_size)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    training = make_private(
        model, optimizer, rows, noise_multiplier=0.0, target_delta=1e-5, epochs=1.0,
        max_grad_norm=c, batch_size=batch_size, verify=True,
    )
    training.step.step(model, ZooObjective(spec), batch)
    return model, training, clipped_sum(grads, norms, c), c


@pytest.mark.parametrize("name", VERIFIED)
def test_make_private_self_check_passes_and_step_is_exact(name: str) -> None:
    spec = next(s for s in ZOO if s.name == name)
    batch, seq = shapes(spec)["b_eq_t"]  # a batch that collides with the sequence length
    model, training, ref, _ = private_step(spec, batch, seq)
    check = training.verification
    assert check is not None and check.samples >= 1 and check.max_rel_err <= 1e-6, check
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    update = [p.grad for _, p in named]  # the noiseless DP gradient: clipped sum / expected B
    verdict = compare_grads(named, update, [r / batch for r in ref], rtol=1e-6, atol=1e-9)
    assert verdict.kind == "exact", verdict


@pytest.mark.parametrize("name", VERIFIED)
def test_gradient_checkpointing_step_is_exact(name: str) -> None:
    """Hugging Face gradient checkpointing (non-reentrant): the blocks' forward runs again inside
    the backward pass, and the self-check and the step stay exact."""
    spec = next(s for s in ZOO if s.name == name)
    model = spec.build()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch, seq = shapes(spec)["plain"]
    model, training, ref, _ = private_step(spec, batch, seq, model)
    assert training.verification is not None and training.verification.max_rel_err <= 1e-6
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    verdict = compare_grads(named, [p.grad for _, p in named], [r / batch for r in ref],
                            rtol=1e-6, atol=1e-9)
    assert verdict.kind == "exact", verdict


def test_self_check_refuses_a_silently_wrong_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that is off by 1% on one parameter: the self-check refuses before any update."""

    class Skewed(PerSampleClipper):
        def backward(self, per_sample_losses: Tensor, **kwargs: Any) -> Tensor:
            norms = super().backward(per_sample_losses, **kwargs)
            next(p for p in self.model.parameters() if p.grad is not None).grad.mul_(1.01)
            return norms

    monkeypatch.setattr(verify_module, "PerSampleClipper", Skewed)
    spec = next(s for s in ZOO if s.name == "gpt2")
    model = spec.build()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Exception, match="self-check") as err:
        private_step(spec, 3, 5, model)
    assert any(name in str(err.value) for name, _ in model.named_parameters())  # names the parameter
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update


@pytest.mark.parametrize("case", ["plain", "b_eq_t"])
def test_make_private_refuses_t5_before_any_update(case: str) -> None:
    """A refused architecture (T5's relative attention bias is shared by the batch) stops the DP step
    with an error naming the module, and no parameter moves (B == T is split and retried first)."""
    spec = next(s for s in ZOO if s.name == "t5")
    model = spec.build()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Exception, match="relative_attention_bias"):
        private_step(spec, *shapes(spec)[case], model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["bart", "opt", "mixtral"])
def test_one_clipper_stays_exact_across_shapes(name: str) -> None:
    """Layouts proved on the first pass (expanded positions, folded rows) are reused on later
    passes of new lengths and batch sizes, including one where B == T: each pass stays exact."""
    spec = next(s for s in ZOO if s.name == name)
    model = spec.build()
    clipper = PerSampleClipper(model, 1.0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        for b, t in [(3, 5), (3, 6), (4, 4), (2, 7)]:
            batch = spec.batch(b, t, seed=10 * b + t)
            clipper._recording = False  # the naive loop's forwards are not the engine's passes
            ref = reference(spec, model, batch)
            clipper._recording = True
            assert ref is not None
            clipper.max_grad_norm = ref[1]
            model.zero_grad(set_to_none=True)
            clipper.backward(spec.loss(model, batch))
            verdict = compare_grads(named, [p.grad for _, p in named], ref[0], 1e-6, 1e-6)
            assert verdict.kind == "exact", f"B={b}, T={t}: {verdict}"
    finally:
        clipper.remove()
