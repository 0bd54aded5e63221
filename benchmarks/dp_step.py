"""Benchmark one DP-SGD step against the non-private step and the peers, model family by family.

Rows (``--rows``; default every row the device runs): GPT-2 4x256 with an 8000-token and the real
50257-token vocabulary, GPT-2 small (12x768), BERT 4x256 (sequence classification), a CNN of three
Conv2d + GroupNorm blocks on 32x32 images, the Adult-sized MLP (Adam at batch 256, SGD at 1024);
with ``--device cuda`` also GPT-2 small at T=512 (``--amp bf16`` for autocast).

Methods (``--methods``): the non-private step (``PlainStep``); trustml (``make_private(...).step``:
the Poisson-batch step with exact per-sample clipping, noise and RDP accounting, on the untouched
model); Opacus ``GradSampleModule`` in hooks and functorch modes with ``DPOptimizer``; Opacus ghost
clipping (``GradSampleModuleFastGradientClipping``); fastDP and private-transformers when they
import. Every peer runs the untouched model first; when that fails on a transformer, the failure is
kept and the peer is run again with the usual workaround, explicit batch-sized *contiguous*
``position_ids`` (and BERT's ``token_type_ids``), and the table says so.

Time: CPU time of the process (``time.process_time``: other jobs on a shared machine do not count),
one thread by default, user plus system time (page faults of freshly mapped large tensors count)
with glibc's default allocator; every method built in ONE process and stepped round-robin (warm-up, then
``--repeats`` rounds). "time x plain" is the median over rounds of the method's time over the plain
step's time in the same round (the interquartile range beside it). On CUDA, synchronised wall clock.
Memory: every method again in its OWN subprocess; peak growth over the memory held once the model,
the method's wrappers and the batch are built (RSS high-water mark with glibc's mmap threshold pinned
on CPU, ``torch.cuda.max_memory_allocated`` on CUDA): of a steady step after warm-up (what training
pays every step, including what the previous step left held), and of the first step (trustml's
one-time probe and float64 self-check, Opacus's first allocations). On CPU the steady figure is
reported twice: in total (the ratio the targets are checked on), and without the file-backed pages
("w/o file": the steady figure minus the file-backed RSS -- shared libraries' code and read-only
data -- that the steps paged in since the baseline, taken as the steady step starts). Those pages
are one-time: code the warm-up steps touched for the first time, resident for the life of the
process, not growing with the batch (the CNN row: 19.2-19.3 MiB for the plain step and 21.2-21.3
MiB for trustml at B = 32, 64 and 128), and not working memory. The file-backed RSS only grows,
so the figure without it can only overstate the step's anonymous peak (by code first touched
during the steady step itself), never understate it. Code that a library JIT-compiles (oneDNN's
kernels) is anonymous memory and stays in both figures.

    python benchmarks/dp_step.py --out dp_step.md                 # every CPU row (prints an estimate)
    python benchmarks/dp_step.py --rows cnn,mlp256 --repeats 9    # a subset
    python benchmarks/dp_step.py --device cuda --rows gpt2small512 --amp bf16
    python benchmarks/dp_step.py --rows mlp256 --methods "non-private,trustml,trustml budget,trustml clipper"
    python benchmarks/dp_step.py --rows bert --profile "trustml clipper"   # top ops

trustml's parts (not in the default run): ``trustml budget`` checks an epsilon budget before every
step as the training loop does; ``trustml clipper`` is ``PerSampleClipper.backward`` and the
optimizer, without noise or accountant.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trustml.privacy import PerSampleClipper, make_private  # noqa: E402
from trustml.training.step import PlainStep  # noqa: E402


@dataclass(frozen=True)
class Row:
    title: str
    build: Callable[[], nn.Module]
    kind: str  # lm | cls (sequence classification) | image | tabular
    batch: int
    seq: int | None = None
    vocab: int = 50257
    adam: bool = False
    cuda_only: bool = False
    plain_s: float = 1.0  # plain step, CPU seconds at one thread on the 2-core VM (for the estimate)
    warmup: int = 1
    repeats: int = 3
    time_target: float | None = None  # issue 13's targets, ratio to the plain step
    memory_target: float | None = None


def gpt2(n_layer: int, n_embd: int, vocab: int, positions: int = 1024) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    special = min(50256, vocab - 1)  # GPT-2's <|endoftext|>, kept inside a smaller vocabulary
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(n_embd // 64, 1),
                        vocab_size=vocab, n_positions=positions, bos_token_id=special,
                        eos_token_id=special, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config)


def cnn() -> nn.Module:
    layers, c_in = [], 3
    for c_out in (32, 64, 64):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(),
                   nn.AvgPool2d(2)]
        c_in = c_out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 2))


ROWS = {
    "gpt2v8k": Row("GPT-2 4x256, V=8000, B=16, T=64", lambda: gpt2(4, 256, 8000), "lm", 16, 64,
                   8000, plain_s=1.4, time_target=1.12, memory_target=1.05),
    "gpt2v50k": Row("GPT-2 4x256, V=50257, B=8, T=128", lambda: gpt2(4, 256, 50257), "lm", 8, 128,
                    plain_s=4.4, memory_target=1.05),
    "gpt2small": Row("GPT-2 small 12x768, B=4, T=128", lambda: gpt2(12, 768, 50257), "lm", 4, 128,
                     plain_s=10.0, time_target=1.12, memory_target=1.05),
    "bert": Row("BERT 4x256 (classifier), B=16, T=128", bert, "cls", 16, 128, 30522, plain_s=1.5,
                time_target=1.15, memory_target=1.05),
    "cnn": Row("CNN 3x(Conv2d+GroupNorm), B=64, 32x32", cnn, "image", 64, plain_s=0.27,
               warmup=2, repeats=9, time_target=1.35, memory_target=1.15),
    "mlp256": Row("Adult MLP 100-64-32-2, B=256 (Adam)", mlp, "tabular", 256, adam=True,
                  plain_s=0.004, warmup=5, repeats=41, time_target=1.30),
    "mlp1024": Row("Adult MLP 100-64-32-2, B=1024", mlp, "tabular", 1024, plain_s=0.006,
                   warmup=5, repeats=41),
    "gpt2small512": Row("GPT-2 small 12x768, B=8, T=512", lambda: gpt2(12, 768, 50257), "lm", 8,
                        512, cuda_only=True, plain_s=0.15, warmup=3, repeats=10,
                        time_target=1.10, memory_target=1.05),
}


# ---- data and objectives (the trustml contract: objective(model, batch).losses is (B,)) ---------


class Out:
    def __init__(self, losses: torch.Tensor):
        self.losses, self.outputs = losses, {}


def make_batch(row: Row, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = row.batch
    if row.kind in ("lm", "cls"):
        batch = {"input_ids": torch.randint(0, row.vocab, (b, row.seq), generator=g)}
        if row.kind == "cls":
            batch["y"] = torch.randint(0, 2, (b,), generator=g)
    elif row.kind == "image":
        batch = {"x": torch.randn(b, 3, 32, 32, generator=g),
                 "y": torch.randint(0, 10, (b,), generator=g)}
    else:
        batch = {"x": torch.randn(b, 100, generator=g), "y": torch.randint(0, 2, (b,), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def objective_for(row: Row, explicit_ids: bool) -> Callable:
    """Per-sample losses; ``explicit_ids`` passes batch-sized contiguous position (and token type)
    ids, the peers' workaround for per-sample gradients of position embeddings."""

    def ids_kwargs(ids: torch.Tensor) -> dict:
        if not explicit_ids:
            return {}
        kw = {"position_ids": torch.arange(ids.shape[1], device=ids.device).repeat(len(ids), 1)}
        if row.kind == "cls":
            kw["token_type_ids"] = torch.zeros_like(ids)
        return kw

    def lm(model, batch):
        ids = batch["input_ids"]
        logits = model(input_ids=ids, **ids_kwargs(ids)).logits[:, :-1]
        losses = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                 reduction="none")
        return Out(losses.view(ids.shape[0], -1).mean(1))

    def cls(model, batch):
        ids = batch["input_ids"]
        logits = model(input_ids=ids, **ids_kwargs(ids)).logits
        return Out(F.cross_entropy(logits.float(), batch["y"], reduction="none"))

    def plain(model, batch):
        return Out(F.cross_entropy(model(batch["x"]), batch["y"], reduction="none"))

    return {"lm": lm, "cls": cls}.get(row.kind, plain)


class Rows(torch.utils.data.Dataset):
    """The benchmark batch as a dataset (make_private sizes its Poisson sampler from it)."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


# ---- methods: (model, batch, row, amp, explicit_ids) -> zero-argument step function ---------------


def optimizer(params, row: Row) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-4) if row.adam else torch.optim.SGD(params, lr=1e-4)


def amp_context(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def non_private(model, batch, row, amp, explicit_ids):
    step = PlainStep(optimizer(model.parameters(), row), amp=amp)
    objective = objective_for(row, explicit_ids)
    return lambda: step.step(model, objective, batch)


def trustml_dp(model, batch, row, amp, explicit_ids):
    dp = make_private(model, optimizer(model.parameters(), row), Rows(batch), noise_multiplier=1.0,
                      target_delta=1e-5, epochs=1, max_grad_norm=1.0, batch_size=row.batch, amp=amp)
    objective = objective_for(row, explicit_ids)
    return lambda: dp.step.step(model, objective, batch)


def trustml_budget(model, batch, row, amp, explicit_ids):
    """trustml as the loop drives it under ``privacy.epsilon_budget``: ``exhausted()`` every step."""
    dp = make_private(model, optimizer(model.parameters(), row), Rows(batch), noise_multiplier=1.0,
                      target_delta=1e-5, epochs=1, max_grad_norm=1.0, batch_size=row.batch, amp=amp,
                      epsilon_budget=1e3)
    objective = objective_for(row, explicit_ids)

    def step():
        if dp.step.exhausted():
            raise RuntimeError("budget spent")
        dp.step.step(model, objective, batch)

    return step


def trustml_clipper(model, batch, row, amp, explicit_ids):
    """The per-sample clipper alone (no noise, no accountant): what clipping costs by itself."""
    clipper, opt = PerSampleClipper(model, 1.0), optimizer(model.parameters(), row)
    objective = objective_for(row, explicit_ids)
    device = device_of(model)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp_context(device, amp):
            losses = objective(model, batch).losses
        clipper.backward(losses)
        opt.step()

    return step


def backward_then_step(model, opt, objective, batch, amp, reduce=lambda losses: losses.mean()):
    """The usual loop body of the hook-based peers: zero, forward, backward, step."""
    device = device_of(model)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp_context(device, amp):
            loss = reduce(objective(model, batch).losses)
        loss.backward()
        opt.step()

    return step


def opacus_sample(model, batch, row, amp, explicit_ids, functorch=False):
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean",
                           force_functorch=functorch)
    opt = DPOptimizer(optimizer(gsm.parameters(), row), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=row.batch)
    return backward_then_step(gsm, opt, objective_for(row, explicit_ids), batch, amp)


class PerSampleLosses(nn.Module):
    """A 'criterion' that returns the objective's per-sample losses (for Opacus's ghost wrapper)."""

    reduction = "mean"

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return losses


def opacus_ghost(model, batch, row, amp, explicit_ids):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                               max_grad_norm=1.0, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(optimizer(gsm.parameters(), row), noise_multiplier=1.0,
                                          max_grad_norm=1.0, expected_batch_size=row.batch,
                                          loss_reduction="mean")
    criterion = DPLossFastGradientClipping(gsm, opt, PerSampleLosses(), loss_reduction="mean")
    return backward_then_step(gsm, opt, objective_for(row, explicit_ids), batch, amp, criterion)


def fastdp(model, batch, row, amp, explicit_ids):
    """fastDP's documented loop (README: engine attached to the optimizer, then backward + step),
    mixed ghost norm / book-keeping ('MixOpt') with Abadi clipping at noise 1.0."""
    from fastDP import PrivacyEngine

    opt = optimizer(model.parameters(), row)
    PrivacyEngine(model, batch_size=row.batch, sample_size=100 * row.batch, epochs=1,
                  noise_multiplier=1.0, max_grad_norm=1.0, clipping_fn="Abadi",
                  clipping_mode="MixOpt", clipping_style="all-layer").attach(opt)
    return backward_then_step(model, opt, objective_for(row, explicit_ids), batch, amp)


def private_transformers(model, batch, row, amp, explicit_ids):
    """private-transformers' documented loop: per-sample losses passed to ``optimizer.step``,
    which runs the backward itself (ghost clipping)."""
    from private_transformers import PrivacyEngine

    opt = optimizer(model.parameters(), row)
    PrivacyEngine(model, batch_size=row.batch, sample_size=100 * row.batch, epochs=1,
                  max_grad_norm=1.0, noise_multiplier=1.0, clipping_mode="ghost").attach(opt)
    objective, device = objective_for(row, explicit_ids), device_of(model)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp_context(device, amp):
            losses = objective(model, batch).losses
        opt.step(loss=losses)

    return step


@dataclass(frozen=True)
class Method:
    make: Callable
    module: str | None = None  # the package it needs (recorded as absent when it does not import)
    peer: bool = True  # runs the untouched model first, then the workaround
    cost: float = 2.5  # rough step time over the plain step (for the estimate)
    diagnostic: bool = False  # trustml's parts, for profiling: only when --methods names it


METHODS: dict[str, Method] = {
    "non-private": Method(non_private, peer=False, cost=1.0),
    "trustml": Method(trustml_dp, peer=False, cost=1.3),
    "trustml budget": Method(trustml_budget, peer=False, cost=1.3, diagnostic=True),
    "trustml clipper": Method(trustml_clipper, peer=False, cost=1.2, diagnostic=True),
    "Opacus hooks": Method(opacus_sample, "opacus"),
    "Opacus functorch": Method(lambda *a: opacus_sample(*a, functorch=True), "opacus", cost=3.0),
    "Opacus ghost": Method(opacus_ghost, "opacus"),
    "fastDP": Method(fastdp, "fastDP", cost=1.5),
    "private-transformers": Method(private_transformers, "private_transformers", cost=2.0),
}
WORKAROUND = "explicit contiguous batch-sized position_ids"


# ---- measurement -------------------------------------------------------------------------------


def pin_malloc() -> None:
    """Make glibc return freed large blocks to the OS so RSS tracks live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so no dynamic growth
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def absent(method: str) -> str | None:
    module = METHODS[method].module
    if module and importlib.util.find_spec(module) is None:
        return f"not installed (no `{module}` module; not on the PyPI index reachable here)"
    return None


def build(row_key: str, method: str, device: torch.device, amp: str, explicit_ids: bool
          ) -> Callable:
    row = ROWS[row_key]
    torch.manual_seed(0)
    model = row.build().to(device)
    return METHODS[method].make(model, make_batch(row, device), row, amp, explicit_ids)


def error_text(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0][:110] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> int:
    """Reset the peak to the current usage; return the current usage in bytes."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    return rss_kib("VmRSS") * 1024


def peak(device: torch.device) -> int:
    sync(device)
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kib("VmHWM") * 1024


def memory_growth(row_key: str, method: str, device: torch.device, amp: str, warmup: int,
                  explicit_ids: bool) -> dict[str, float]:
    """MiB of peak growth over the built model, first step and a steady step (own process); on
    CPU also the file-backed pages the steps paged in before the steady step ("file": library code
    and read-only data, counted by RSS though no step allocates it) and the steady figure without
    them ("steady_no_file", see the module docstring)."""
    step = build(row_key, method, device, amp, explicit_ids)
    base = reset_peak(device)
    file_base = file_backed(device)
    step()
    first = peak(device) - base
    for _ in range(max(warmup - 1, 0)):
        step()
    reset_peak(device)
    file = file_backed(device) - file_base
    step()
    steady = peak(device) - base
    return {"steady": steady / 2**20, "first": first / 2**20,
            **({"file": file / 2**20, "steady_no_file": (steady - file) / 2**20}
               if device.type == "cpu" else {})}


def file_backed(device: torch.device) -> int:
    """Resident file-backed pages in bytes (RssFile: shared libraries' code and data)."""
    return rss_kib("RssFile") * 1024 if device.type == "cpu" else 0


def memory_in_subprocess(row_key: str, method: str, explicit_ids: bool, args) -> dict | str:
    cmd = [sys.executable, __file__, "--memory-of", f"{row_key}:{method}:{int(explicit_ids)}",
           "--device", args.device, "--amp", args.amp, "--warmup", str(warmup_of(row_key, args)),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return f"memory run failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:100]}"
    return json.loads(lines[-1])


def step_time(step: Callable, device: torch.device) -> float:
    if device.type == "cuda":  # the GPU's work is not CPU time: wall clock, synchronised
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        return time.perf_counter() - t0
    t0 = time.process_time()
    step()
    return time.process_time() - t0


def warmup_of(row_key: str, args) -> int:
    return ROWS[row_key].warmup if args.warmup is None else args.warmup


def repeats_of(row_key: str, args) -> int:
    return ROWS[row_key].repeats if args.repeats is None else args.repeats


def start(row_key: str, name: str, device: torch.device, args) -> tuple[Callable | None, dict]:
    """Build and warm a method: untouched model first, then (peers on transformers) the workaround."""
    result: dict = {"row": row_key, "method": name}
    if reason := absent(name):
        result["error"] = reason
        return None, result
    tries = [False, True] if METHODS[name].peer and ROWS[row_key].kind in ("lm", "cls") else [False]
    for explicit_ids in tries:
        try:
            step = build(row_key, name, device, args.amp, explicit_ids)
            for _ in range(warmup_of(row_key, args)):
                step()
        except Exception as err:  # noqa: BLE001 - a failure is a result here
            if args.verbose:
                traceback.print_exc()
            key = "workaround_error" if explicit_ids else "error"
            result[key] = error_text(err)
            print(f"  [{row_key}] {name}{' + workaround' if explicit_ids else ''}: {result[key]}",
                  flush=True)
            continue
        result["explicit_ids"] = explicit_ids
        return step, result
    return None, result


def profile_row(row_key: str, method: str, device: torch.device, args) -> None:
    """Where one method's step spends its time: the top ops of three warm steps."""
    from torch.profiler import ProfilerActivity, profile

    step, result = start(row_key, method, device, args)
    if step is None:
        print(f"{row_key}: {method} did not run: {result}")
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(f"{row_key}: {method}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def run_row(row_key: str, methods: list[str], device: torch.device, args) -> list[dict]:
    """Build every method, warm up, then time them round-robin; memory in subprocesses."""
    results, steps = {}, {}
    for name in methods:
        step, results[name] = start(row_key, name, device, args)
        if step is not None:
            steps[name] = step
    rounds = {name: [] for name in steps}
    for _ in range(repeats_of(row_key, args)):
        for name, step in steps.items():
            rounds[name].append(step_time(step, device))
    steps.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    plain = rounds.get("non-private")
    for name, times in rounds.items():
        r = results[name]
        r["seconds"] = statistics.median(times)
        if plain:
            ratios = sorted(t / p for t, p in zip(times, plain, strict=True))
            r["ratio"] = statistics.median(ratios)
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            r["ratio_iqr"] = (q[0], q[2])
        r["memory"] = (memory_in_subprocess(row_key, name, r["explicit_ids"], args)
                       if args.memory else None)
        print(f"  [{row_key}] {name}: {r['seconds'] * 1e3:.1f} ms, {r.get('ratio', 0):.2f}x, "
              f"memory {r['memory']}", flush=True)
    return list(results.values())


# ---- reporting ---------------------------------------------------------------------------------


def note_of(r: dict) -> str:
    if r.get("explicit_ids"):
        return f"needs {WORKAROUND}; untouched model: {r['error']}"
    if "workaround_error" in r:
        return f"with {WORKAROUND} too: {r['workaround_error']}"
    return ""


def mib(memory, key: str) -> float | None:
    return memory.get(key) if isinstance(memory, dict) else None


def table(results: list[dict]) -> str:
    lines = [
        "| model | method | step ms | time x plain (IQR) | tokens/s | steady peak growth MiB "
        "| memory x plain | w/o file MiB | w/o file x plain | first-step peak MiB | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for key in dict.fromkeys(r["row"] for r in results):
        row = ROWS[key]
        case = [r for r in results if r["row"] == key]
        base = next((r for r in case if r["method"] == "non-private" and "seconds" in r), None)
        for r in case:
            if "seconds" not in r:
                lines.append(f"| {row.title} | {r['method']} | failed: {r['error']} | | | | | | | "
                             f"| {note_of(r)} |")
                continue
            ratio = (f"{r['ratio']:.2f}x ({r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f})"
                     if "ratio" in r else "")
            tokens = f"{row.batch * row.seq / r['seconds']:.0f}" if row.seq else ""
            steady, first = mib(r["memory"], "steady"), mib(r["memory"], "first")
            anon = mib(r["memory"], "steady_no_file")
            mem_ratio, anon_ratio = (
                "" if (x := memory_ratio(r, base, key)) is None else f"{x:.2f}x"
                for key in ("steady", "steady_no_file"))
            mem = f"{steady:.1f}" if steady is not None else (r["memory"] or "")
            anon_text = f"{anon:.1f}" if anon is not None else ""
            first_text = f"{first:.1f}" if first is not None else ""
            lines.append(f"| {row.title} | {r['method']} | {r['seconds'] * 1e3:.1f} | {ratio} "
                         f"| {tokens} | {mem} | {mem_ratio} | {anon_text} | {anon_ratio} "
                         f"| {first_text} | {note_of(r)} |")
    return "\n".join(lines)


MIN_BASE_MIB = 1.0  # a ratio to a base this small (the Adult MLP's step without file pages: about
# 0 MiB, even below 0 as the heap shrinks) is noise, not a memory figure: none is given


def memory_ratio(r: dict, base: dict | None, key: str = "steady") -> float | None:
    value, base_mem = mib(r.get("memory"), key), mib((base or {}).get("memory"), key)
    if value is None or base_mem is None or base_mem < MIN_BASE_MIB:
        return None
    return value / base_mem


def targets(results: list[dict]) -> str:
    """Issue 13's targets per row: trustml's ratios, met or not, and the fastest peer that ran."""
    lines = ["| model | target (time / memory x plain) | trustml time | trustml memory "
             "| trustml memory w/o file | fastest peer that ran | faster than every peer |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in dict.fromkeys(r["row"] for r in results):
        row = ROWS[key]
        by = {r["method"]: r for r in results if r["row"] == key}
        ours, base = by.get("trustml", {}), by.get("non-private", {})
        if "ratio" not in ours:
            continue

        def verdict(value: float | None, target: float | None) -> str:
            if value is None:
                return "not measured"
            if target is None:
                return f"{value:.2f}x"
            return f"{value:.2f}x ({'met' if value <= target else '**not met**'})"

        peers = [r for name, r in by.items() if METHODS[name].peer and "ratio" in r]
        best = min(peers, key=lambda r: r["ratio"], default=None)
        fastest = f"{best['method']} {best['ratio']:.2f}x" if best else "none ran"
        anon = memory_ratio(ours, base, "steady_no_file")
        goal = " / ".join(f"<= {t:.2f}x" if t else "-" for t in (row.time_target,
                                                                  row.memory_target))
        lines.append(
            f"| {row.title} | {goal} | {verdict(ours['ratio'], row.time_target)} "
            f"| {verdict(memory_ratio(ours, base), row.memory_target)} "
            f"| {'-' if anon is None else f'{anon:.2f}x'} "
            f"| {fastest} "
            f"| {'-' if not best else 'yes' if ours['ratio'] < best['ratio'] else '**no**'} |")
    return "\n".join(lines)


def estimate(keys: list[str], methods: list[str], args) -> float:
    """Rough CPU seconds for the run on the 2-core VM at one thread (the rows' reference steps)."""
    total = 0.0
    for key in keys:
        row = ROWS[key]
        ran = [m for m in methods if not absent(m)]
        steps = warmup_of(key, args) + repeats_of(key, args)
        if args.memory:
            steps += warmup_of(key, args) + 1
        failed_tries = sum(1 for m in ran if METHODS[m].peer) if row.kind in ("lm", "cls") else 0
        total += row.plain_s * (sum(METHODS[m].cost for m in ran) * steps + 2.5 * failed_tries)
        if "trustml" in ran:  # first step: probe and float64 self-check, in each process
            total += row.plain_s * 6.0 * (2 if args.memory else 1)
        total += (8.0 if args.memory else 0.0) * len(ran) + 3.0 * len(ran)  # imports, builds
    return total / (50.0 if args.device == "cuda" else 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", default=None, help=f"comma list of {', '.join(ROWS)} (default: "
                        "every row the device runs)")
    parser.add_argument("--methods", default=",".join(k for k, m in METHODS.items()
                                                      if not m.diagnostic),
                        help=f"comma list of {', '.join(METHODS)} (default: all but trustml's "
                        "parts)")
    parser.add_argument("--profile", default=None, metavar="METHOD",
                        help="print a torch.profiler table of METHOD's step on each row instead")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default per row)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default per row)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the per-method memory subprocesses")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # ROW:METHOD:IDS
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, per step
    device = torch.device(args.device)
    if args.memory_of:  # only here: the timed rounds run with the allocator users get
        pin_malloc()
        row_key, method, explicit_ids = args.memory_of.split(":")
        print(json.dumps(memory_growth(row_key, method, device, args.amp, args.warmup,
                                       explicit_ids == "1")))
        return
    keys = args.rows.split(",") if args.rows else [
        k for k, r in ROWS.items() if device.type == "cuda" or not r.cuda_only
    ]
    methods = args.methods.split(",")
    unknown = [k for k in keys if k not in ROWS] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown rows/methods: {unknown}")
    if args.profile:
        if args.profile not in METHODS:
            parser.error(f"unknown --profile method {args.profile!r}")
        for key in keys:
            profile_row(key, args.profile, device, args)
        return
    if "non-private" not in methods:
        parser.error("--methods must include non-private (the ratios are to it)")
    print(f"estimated run time: ~{estimate(keys, methods, args) / 60:.0f} min of CPU time "
          "(2-core VM, one thread; wall clock grows with the machine's load)", flush=True)
    t0, results = time.monotonic(), []
    for done, key in enumerate(keys, 1):
        print(f"{key}: {ROWS[key].title}", flush=True)
        results += run_row(key, methods, device, args)
        text = report(results, keys[:done], device, args, time.monotonic() - t0)
        if args.out:  # after every row, so a long run that is stopped keeps what it measured
            args.out.write_text(text + ("\n" if done == len(keys) else "\n\n(partial)\n"))
    print()
    print(text)


def report(results: list[dict], keys: list[str], device: torch.device, args, seconds: float
           ) -> str:
    versions = {name: __import__(name).__version__ for name in ("torch", "transformers", "opacus")}
    load = os.getloadavg()
    where = (f"CPU, {torch.get_num_threads()} thread(s), CPU time (time.process_time)"
             if device.type == "cpu" else f"{torch.cuda.get_device_name()}, wall clock, amp={args.amp}")
    return "\n".join([
        "    " + " ".join(["python", *sys.argv]),
        "",
        ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; {where}; per-row warm-up / rounds: "
        + ", ".join(f"{k} {warmup_of(k, args)}/{repeats_of(k, args)}" for k in keys)
        + f"; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the "
        f"end; {seconds / 60:.0f} min wall clock",
        "",
        table(results),
        "",
        targets(results),
    ])

if __name__ == "__main__":
    main()
