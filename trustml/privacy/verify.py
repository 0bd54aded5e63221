"""Self-check: the engine's clipped gradient sum against the naive per-sample loop, on the run's model.

The engine's exactness is proved by tests on a zoo of layers and architectures, but a user's model is
not in the zoo. Before the first DP step, :func:`verify` takes the first ``k`` samples of the first
real batch, a float64 copy of the model (eval mode: dropout would draw different masks in the two
computations) and compares, parameter by parameter, the engine's clipped sum with one autograd call
per sample, clip to C, sum. A mismatch refuses the run; the result string goes to the run summary.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trustml.privacy.clipping import PerSampleClipper
from trustml.privacy.generic import AmbiguousBatch, Refusal

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}  # by the dtype the objective's losses have


@dataclass
class Verification:
    samples: int
    max_rel_err: float
    worst: str  # the parameter with the largest relative error

    def __str__(self) -> str:
        return f"verified on {self.samples} samples, max rel err {self.max_rel_err:.1e}"

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "max_rel_err": self.max_rel_err, "worst": self.worst,
                "text": str(self)}


def _float64_copy(model: nn.Module, clipper: PerSampleClipper) -> nn.Module:
    """A float64 eval-mode copy without the clipper's hooks (the clipper itself is not copied)."""
    ref = copy.deepcopy(model, memo={id(clipper): clipper})
    ours = {h.id for h in clipper._handles}
    for m in ref.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._forward_hooks_with_kwargs,
                      m._forward_hooks_always_called, m._forward_pre_hooks_with_kwargs):
            for key in ours & set(hooks):
                del hooks[key]
    return ref.double().eval()


def _take(batch: dict[str, Tensor], index: slice | int) -> dict[str, Tensor]:
    out = {}
    for key, v in batch.items():
        v = v[index] if isinstance(index, slice) else v[index : index + 1]
        out[key] = v.double() if v.is_floating_point() else v
    return out


def verify(
    model: nn.Module, objective: Any, batch: dict[str, Tensor], clipper: PerSampleClipper,
    samples: int = 4,
) -> Verification:
    """Compare on the first ``samples`` samples of ``batch``; raise :class:`Refusal` on a mismatch."""
    n = len(next(iter(batch.values())))
    k = min(samples, n)
    ref = _float64_copy(model, clipper)
    c = clipper.max_grad_norm
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = [p for p in ref.parameters() if p.requires_grad]
    while True:  # a k that collides with another dimension is retried smaller
        engine = PerSampleClipper(ref, c, strategy=clipper.strategy)
        try:
            losses = objective(ref, _take(batch, slice(0, k))).losses
            engine.backward(losses)
            break
        except AmbiguousBatch:
            if k == 1:
                raise
            k -= 1
            ref.zero_grad(set_to_none=True)
        finally:
            engine.remove()
    got = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    want = [torch.zeros_like(p) for p in params]
    for i in range(k):
        loss = objective(ref, _take(batch, i)).losses.sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
        factor = min(1.0, c / norm) if norm > 0 else 1.0
        for w, g in zip(want, grads):
            w.add_(g, alpha=factor)
    total = math.sqrt(sum(float((w**2).sum()) for w in want))
    floor = max(1e-3 * total, 1e-300)
    errs = [float((g - w).norm()) / max(float(w.norm()), floor) for g, w in zip(got, want)]
    worst = max(range(len(errs)), key=errs.__getitem__) if errs else 0
    result = Verification(k, errs[worst] if errs else 0.0, names[worst] if names else "")
    tol = TOLERANCE.get(losses.dtype, 1e-3)
    if not result.max_rel_err <= tol:  # also refuses NaN
        raise Refusal(
            f"self-check failed: on {k} samples of the first batch the engine's clipped gradient of "
            f"parameter {result.worst} differs from the per-sample loop by a relative error of "
            f"{result.max_rel_err:.2e} (> {tol:g}); refusing to train. Please report the model; "
            "privacy.verify=false skips this check at your own risk."
        )
    return result
