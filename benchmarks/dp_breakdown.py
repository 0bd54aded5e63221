"""Where a DP step's time goes, beside the plain step's: CPU milliseconds per step, by part.

Wraps the engine's functions with CPU-time counters (``time.process_time``; nested parts are
counted once, in the innermost part) and steps the plain and the DP model round-robin in one
process, as ``dp_step.py`` does. The parts: the forward (with the clipper's hooks), the
output-gradient backward, the per-layer rules, each parameter's norm by kind (materialised,
ghost: its Gram matrices and inner products, dense small parameters), the clipped sums (matmuls,
the embedding's ``index_add``), the noise, the optimizer and the accountant; "rest" is what no
counter covers (Python between the parts). Beside each part, its minor page faults per step
(``getrusage``): a part that maps fresh memory pays the kernel's zeroing of every page. The last
line is the DP-only work (``DP_ONLY``): the share of the plain step that the noise draw alone (timed
apart) and the Gram products take. Not a strict bound: the DP step's other parts can undercut the
plain step's (GPT-2 small: its output-gradient backward and clipped sums cost less than the plain
backward, which also makes and fills every ``.grad``).

    python benchmarks/dp_breakdown.py --row bert --repeats 5
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dp_step  # noqa: E402
from dp_step import ROWS, build  # noqa: E402

import trustml.privacy.accounting as accounting  # noqa: E402
import trustml.privacy.clipping as clipping  # noqa: E402
import trustml.privacy.conv as conv  # noqa: E402
import trustml.privacy.factored as factored  # noqa: E402
import trustml.privacy.layers as layers  # noqa: E402
import trustml.privacy.noise as noise  # noqa: E402
import trustml.privacy.step as dpstep  # noqa: E402


# Work an exact DP step does that the plain step does not, and cannot skip without holding more
# memory: one Gaussian number per noised
# coordinate, timed on its own (torch's generator into a warm 256 KiB buffer: the step's noise part
# also pays for the ``.grad`` it fills, page faults included, which the plain step's backward pays
# too), and the Gram matrices of the layers clipped from them (the alternative, materialising their
# per-sample gradients, holds B x their size until the clip factors are known).
DRAW = "noise draw alone (timed apart)"
DP_ONLY = (DRAW, "Gram bmm")
NOISED: list[int] = []  # the noised coordinates of the DP step (set when its noise is planned)


def draw_ms(n: int, repeats: int = 3) -> float:
    """CPU ms to draw ``n`` N(0, 1) numbers with torch's CPU generator into a reused 256 KiB
    buffer (median of ``repeats``)."""
    buffer, generator = torch.empty(1 << 16), torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for at in range(0, n, len(buffer)):
            buffer[: n - at].normal_(generator=generator)
        times.append(1e3 * (time.process_time() - start))
    return statistics.median(times)


def minor_faults() -> int:
    """Page faults so far: a fresh large tensor is mapped and zeroed by the kernel page by page."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Counters:
    """Exclusive CPU time per label: a wrapped call inside another counts only in the inner one."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self.faults: dict[str, int] = defaultdict(int)
        self._stack: list[tuple[float, int]] = []

    def timed(self, label: str | Callable[..., str], fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            name = label(*args, **kwargs) if callable(label) else label
            self._stack.append((0.0, 0))
            start, faults = time.process_time(), minor_faults()
            try:
                return fn(*args, **kwargs)
            finally:
                spent, faulted = time.process_time() - start, minor_faults() - faults
                inner, inner_faults = self._stack.pop()
                self.ms[name] += 1e3 * (spent - inner)
                self.faults[name] += faulted - inner_faults
                if self._stack:
                    ms, f = self._stack[-1]
                    self._stack[-1] = (ms + spent, f + faulted)

        return wrapper

    def timed_generator(self, label: str, fn: Callable) -> Callable:
        """A generator's work runs inside each ``next``: time those."""

        def wrapper(*args, **kwargs):
            it = fn(*args, **kwargs)
            step = self.timed(label, lambda: next(it, None))
            while (item := step()) is not None:
                yield item

        return wrapper

    def patch(self, owner, name: str, label) -> None:
        setattr(owner, name, self.timed(label, getattr(owner, name)))


def plan_kind(plan, uses, strategy, dtype, grams) -> str:
    if any(isinstance(u, conv.ConvFactors) for u in uses):
        return "norms: convolution (input and output gradient held)"
    fs = [u for u in uses if isinstance(u, factored.Factored)]
    if len(fs) < len(uses):
        return "norms: dense (biases, LayerNorm)"
    if any(f.indexed for f in fs):
        return "norms: embeddings (ghost)"
    f = fs[0]
    shape = f"{f.x.shape[2]}x{f.y.shape[2]}"
    how = "ghost" if len(fs) > 1 or f.ghost_cheaper() else "materialised"
    return f"norms: {shape} {how} (T={f.x.shape[1]})"


def sum_kind(plan, c, grad=None) -> str:
    """What a clipped sum is (``weighted_sum(c)``, or ``add_to(c, grad)`` onto its noise)."""
    if plan.factors is not None:
        return "clipped sums: convolution (held factors)"
    if plan.dense is not None:
        return "clipped sums: materialised (c @ G)"
    if any(f.indexed for f in plan.factored):
        return "clipped sums: embeddings (index_add)"
    return "clipped sums: ghost layers (X^T diag(c) Y)"


def instrument(counters: Counters) -> None:
    c = counters
    c.patch(clipping.PerSampleClipper, "_walk", "graph walk")
    grad, backward = torch.autograd.grad, torch.autograd.backward
    torch.autograd.grad = c.timed("output-gradient backward", grad)  # the probe too
    # the clipper's streamed backward passes ``inputs``; Tensor.backward (the plain step) does not
    torch.autograd.backward = c.timed(
        lambda *args, **kwargs: "output-gradient backward" if kwargs.get("inputs") is not None
        else "backward (plain)", backward)
    for rule in (layers.LinearRule, layers.Conv1DRule, layers.EmbeddingRule, layers.LayerNormRule):
        rule.uses = c.timed_generator(f"rule: {rule.__name__}", rule.uses)
    c.patch(factored.Factored, "materialise", lambda f: "materialise bmm" + (
        " (ids)" if f.indexed else ""))
    c.patch(factored.Grams, "__call__", "Gram bmm")
    c.patch(factored, "gram", lambda u, v, g=None: "Gram of ids (eq / gather)" if (
        u.indexed or v.indexed) else "Gram bmm")
    c.patch(factored.Factored, "__post_init__", "factor dtype casts")
    init = clipping._ParamPlan.__init__
    clipping._ParamPlan.__init__ = c.timed(plan_kind, init)
    c.patch(clipping._ParamPlan, "weighted_sum", sum_kind)
    c.patch(clipping._ParamPlan, "add_to", sum_kind)
    c.patch(clipping._LinearPlan, "__init__", "norms: 2-D Linear (weight and bias)")
    c.patch(clipping._LinearPlan, "write", "clipped sums: 2-D Linear")
    c.patch(noise.GaussianNoise, "start", "noise (drawn into .grad)")
    plan = noise.GaussianNoise.__init__

    def planned(self, params) -> None:
        NOISED[:] = [sum(p.numel() for p in params)]
        plan(self, params)

    noise.GaussianNoise.__init__ = planned
    c.patch(dpstep.DPStep, "_trainable", "trainable set")
    c.patch(accounting.PrivacyAccountant, "step", "accountant step")
    c.patch(torch.Tensor, "backward", "backward (plain)")


ORIGINAL = dp_step.objective_for, dp_step.optimizer


def wrap_parts(c: Counters, name: str) -> None:
    """The objective (forward) and the optimizer's step of the method built next."""
    objective_for, make_optimizer = ORIGINAL

    def timed_objective(*args):
        return c.timed(f"forward ({name})", objective_for(*args))

    def timed_optimizer(*args):
        opt = make_optimizer(*args)
        opt.step = c.timed(f"optimizer step ({name})", opt.step)
        return opt

    dp_step.objective_for, dp_step.optimizer = timed_objective, timed_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", default="bert", choices=sorted(ROWS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    counters = Counters()
    instrument(counters)

    row = ROWS[args.row]
    steps = {}
    for name, method in (("plain", "non-private"), ("trustml", "trustml")):
        wrap_parts(counters, name)
        steps[name] = build(args.row, method, device, "none", False)
    for _ in range(row.warmup + 1):
        for step in steps.values():
            step()
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    fault_counts: dict[str, list[int]] = defaultdict(list)
    for _ in range(args.repeats):
        for name, step in steps.items():
            counters.ms.clear()
            counters.faults.clear()
            start, faults = time.process_time(), minor_faults()
            step()
            total = 1e3 * (time.process_time() - start)
            parts = dict(counters.ms)
            rest = f"rest ({name}: Python between the parts)"
            parts[rest] = total - sum(parts.values())
            parts["TOTAL"] = total
            rounds[name].append(parts)
            counters.faults[rest] = minor_faults() - faults - sum(counters.faults.values())
            for k, n in counters.faults.items():
                fault_counts[k].append(n)
    median = {}
    for name in steps:
        for k in {k for r in rounds[name] for k in r} - {"TOTAL"}:
            median[k] = statistics.median(r.get(k, 0.0) for r in rounds[name])
    median[DRAW] = draw_ms(NOISED[0]) if NOISED else 0.0
    plain_ms = statistics.median(r["TOTAL"] for r in rounds["plain"])
    dp_ms = statistics.median(r["TOTAL"] for r in rounds["trustml"])
    print(f"{ROWS[args.row].title}: plain {plain_ms:.1f} ms, trustml {dp_ms:.1f} ms "
          f"({dp_ms / plain_ms:.3f}x), medians of {args.repeats} rounds: CPU ms and page faults "
          "per step")
    for k in sorted(median, key=lambda k: -median[k]):
        faults = statistics.median(fault_counts[k]) if fault_counts[k] else 0
        print(f"  {median[k]:8.1f} ms {faults:8.0f}  {k}")
    dp_only = sum(median.get(k, 0.0) for k in DP_ONLY)
    print(f"DP-only work: {' + '.join(DP_ONLY)} ({NOISED[0] if NOISED else 0} numbers) = "
          f"{dp_only:.1f} ms, {dp_only / plain_ms:.1%} of the plain step (work it does not do; the DP "
          "step's other parts must undercut their plain counterparts by as much to go below "
          f"{1 + dp_only / plain_ms:.3f}x)")


if __name__ == "__main__":
    main()
