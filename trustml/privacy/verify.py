"""Self-check: the engine's clipped gradient sum against the naive per-sample loop, on the run's model.

The engine's exactness is proved by tests on a zoo of layers and architectures, but a user's model is
not in the zoo. Before the first DP step, :func:`verify` takes the first ``k`` samples of the first
real batch, a float64 copy of the model (eval mode: dropout would draw different masks in the two
computations) and compares, parameter by parameter, the engine's clipped sum with one forward pass
per sample, its gradient clipped to C, summed. A mismatch refuses the run; the result string goes to
the run summary.

Memory: the check holds three float64 copies of the parameters (the model, the engine's sum, the
loop's sum) and one sample's activations. The loop never holds a whole per-sample gradient: hooks
consume each parameter's gradient as autograd produces it, first for the norm, then (a second
backward through the same graph) for the clipped sum. That bounds GPT-2 small's first step to about
3x its float64 parameters instead of 5x. Afterwards MKL's cached float64 GEMM buffers are released
(see :func:`_free_mkl_buffers`), so the check leaves no memory behind for the rest of the run.
"""

from __future__ import annotations

import copy
import ctypes
import math
from pathlib import Path
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
    ref = ref.double().eval()
    ref.zero_grad(set_to_none=True)  # a gradient the model still holds is no part of the check
    return ref


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
    dtype = losses.dtype
    del losses
    got = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    ref.zero_grad(set_to_none=True)
    want = _clipped_sum_by_loop(ref, objective, batch, k, c, params)
    total = math.sqrt(sum(float((w**2).sum()) for w in want))
    floor = max(1e-3 * total, 1e-300)
    errs = [float((g - w).norm()) / max(float(w.norm()), floor) for g, w in zip(got, want)]
    del ref, engine, got, want, params  # the engine refers to the float64 copy
    _free_mkl_buffers()
    worst = max(range(len(errs)), key=errs.__getitem__) if errs else 0
    result = Verification(k, errs[worst] if errs else 0.0, names[worst] if names else "")
    tol = TOLERANCE.get(dtype, 1e-3)
    if not result.max_rel_err <= tol:  # also refuses NaN
        raise Refusal(
            f"self-check failed: on {k} samples of the first batch the engine's clipped gradient of "
            f"parameter {result.worst} differs from the per-sample loop by a relative error of "
            f"{result.max_rel_err:.2e} (> {tol:g}); refusing to train. Please report the model; "
            "privacy.verify=false skips this check at your own risk."
        )
    return result


def _clipped_sum_by_loop(
    ref: nn.Module, objective: Any, batch: dict[str, Tensor], k: int, c: float, params: list[Tensor]
) -> list[Tensor]:
    """The naive per-sample loop: sample ``i`` alone through the model, its gradient's norm over all
    ``params``, the gradient clipped to ``c`` and summed over the first ``k`` samples.

    Each sample's graph is walked twice: once for the norm, once (retained) to add the gradient with
    its clip factor. Post-accumulate-grad hooks take each parameter's gradient as autograd produces
    it and drop it, so at most one parameter's per-sample gradient exists at a time (a tied weight
    gets one summed gradient, as in ``torch.autograd.grad``)."""
    want = [torch.zeros_like(p) for p in params]
    slot = {id(p): i for i, p in enumerate(params)}
    squares: list[float] = []
    factor: list[float] = []  # empty while the norm is taken

    def consume(p: Tensor) -> None:
        g, p.grad = p.grad, None
        if factor:
            want[slot[id(p)]].add_(g, alpha=factor[0])
        else:
            squares.append(float(torch.linalg.vector_norm(g)) ** 2)

    handles = [p.register_post_accumulate_grad_hook(consume) for p in params]
    try:
        for i in range(k):
            loss = objective(ref, _take(batch, i)).losses.sum()
            squares.clear()
            loss.backward(retain_graph=True)
            norm = math.sqrt(sum(squares))
            factor.append(min(1.0, c / norm) if norm > 0 else 1.0)
            loss.backward()
            factor.clear()
    finally:
        for h in handles:
            h.remove()
    return want


def _free_mkl_buffers() -> None:
    """Release the GEMM buffers MKL's memory manager keeps for reuse (``mkl_free_buffers``).

    MKL pools the packing buffers of its largest matrix products for the life of the process. The
    float64 products of the check are larger than the training step's float32 ones: on GPT-2 4x256
    with an 8000-token vocabulary the pool stays at 14.3 MiB after the check against 5.2 MiB after a
    plain step (``mkl_mem_stat``), 9 MiB held for the whole run for nothing. PyTorch links MKL into
    ``libtorch_cpu`` and exports the call under MKL's service-layer name; where neither name is
    found (another BLAS, another platform) there is nothing to release."""
    if not torch.backends.mkl.is_available():
        return
    for lib in (str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"), None):
        try:  # torch's own MKL first; then one the process links (conda's shared libmkl)
            handle = ctypes.CDLL(lib)
        except (OSError, TypeError):
            continue
        for name in ("mkl_free_buffers", "MKL_Free_Buffers", "mkl_serv_free_buffers"):
            free = getattr(handle, name, None)
            if free is not None:
                free.restype = None
                free()
                return
