"""Benchmark one training step: non-private vs trustml DP-SGD vs Opacus, in one process.

Cases: (a) tiny GPT-2 (4 layers, 256 wide, 4 heads, vocab 50257, batch 16 x 64 tokens),
(b) the Adult-sized MLP (~100 features, hidden [64, 32], batch 256), (c) GPT-2 small (124M, T=512,
CUDA only). Each method gets a fresh, identically initialised model; the table reports the median
step time over ``--repeats`` steps after ``--warmup`` steps and the step's peak working memory
(peak during the step minus memory before it: CUDA allocator stats, or the process's peak RSS on
CPU with glibc's mmap threshold pinned so freed tensors leave RSS). Ratios are against the
non-private step. Opacus runs in ``hooks`` mode with explicit batch-sized ``position_ids`` (its
hooks crash on GPT-2's default broadcast ones); its ghost-clipping mode is tried and its failure
recorded.

    python benchmarks/dp_step.py                    # (a) and (b) on CPU
    python benchmarks/dp_step.py --device cuda      # (a), (b), (c) on GPU
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trustml.privacy import make_private


class Out:  # the objective contract: .losses (B,)
    def __init__(self, losses):
        self.losses, self.outputs = losses, {}


def lm_objective(position_ids: bool = False):
    def objective(model, batch):
        ids = batch["input_ids"]
        kw = (
            {"position_ids": torch.arange(ids.shape[1], device=ids.device).expand_as(ids)}
            if position_ids
            else {}
        )
        logits = model(input_ids=ids, **kw).logits[:, :-1]
        losses = F.cross_entropy(
            logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
        )
        return Out(losses.view(ids.shape[0], -1).mean(1))

    return objective


def mlp_objective(model, batch):
    return Out(F.cross_entropy(model(batch["x"]), batch["y"], reduction="none"))


class Batch(torch.utils.data.Dataset):
    """A dataset that is just the benchmark batch (make_private wants one to size its sampler)."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(next(iter(self.batch.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def gpt2(n_layer, n_embd, n_head, n_positions):
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        vocab_size=50257,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def mlp():
    return nn.Sequential(
        nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2)
    )


CASES = {
    "a": ("tiny GPT-2 (4x256, V=50257, B=16, T=64)", lambda: gpt2(4, 256, 4, 64), "lm", 16, 64),
    "b": ("Adult MLP (100-64-32-2, B=256)", mlp, "mlp", 256, None),
    "c": ("GPT-2 small (124M, B=8, T=512)", lambda: gpt2(12, 768, 12, 1024), "lm", 8, 512),
}


# ---- methods: each returns a zero-argument step function -----------------------------------


def non_private(model, batch, kind, amp):
    from trustml.training.step import PlainStep

    step = PlainStep(torch.optim.SGD(model.parameters(), lr=1e-4), amp=amp)
    objective = lm_objective() if kind == "lm" else mlp_objective
    return lambda: step.step(model, objective, batch)


def trustml_dp(model, batch, kind, amp):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    dp = make_private(
        model,
        opt,
        Batch(batch),
        noise_multiplier=1.0,
        target_delta=1e-5,
        epochs=1,
        max_grad_norm=1.0,
        batch_size=len(next(iter(batch.values()))),
        amp=amp,
    )
    objective = lm_objective() if kind == "lm" else mlp_objective
    return lambda: dp.step.step(model, objective, batch)


def opacus_dp(model, batch, kind, amp, mode="hooks", positions=True):
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    size = len(next(iter(batch.values())))
    if mode == "ghost":
        return opacus_ghost(model, batch, size)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=1e-4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=size,
    )
    objective = lm_objective(position_ids=positions) if kind == "lm" else mlp_objective
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    device = next(model.parameters()).device

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(
            device.type, dtype=dtype, enabled=amp != "none" and device.type == "cuda"
        ):
            loss = objective(gsm, batch).losses.mean()
        loss.backward()
        opt.step()

    return step


def opacus_ghost(model, batch, size):
    """Opacus's ghost clipping (fast gradient clipping) on the LM, explicit position ids."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0, use_ghost_clipping=True
    )
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=1e-4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=size,
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), loss_reduction="mean")
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = gsm(input_ids=ids, position_ids=positions).logits[:, :-1]
        loss = criterion(logits.transpose(1, 2), ids[:, 1:])
        loss.backward()
        opt.step()

    return step


METHODS: dict[str, Callable] = {
    "non-private": non_private,
    "trustml DP": trustml_dp,
    "Opacus hooks": opacus_dp,
    "Opacus hooks, default position_ids": lambda m, b, k, a: opacus_dp(m, b, k, a, positions=False),
    "Opacus ghost": lambda m, b, k, a: opacus_dp(m, b, k, a, mode="ghost"),
}


# ---- measurement ---------------------------------------------------------------------------


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


def peak_working_memory(step: Callable, device: torch.device) -> float:
    """MiB the step needs on top of what is held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    base = rss_kib("VmRSS")
    step()
    return (rss_kib("VmHWM") - base) / 1024


def timed(step: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def make_batch(kind: str, size: int, seq: int | None, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    if kind == "lm":
        return {"input_ids": torch.randint(0, 50257, (size, seq), generator=g).to(device)}
    return {
        "x": torch.randn(size, 100, generator=g).to(device),
        "y": torch.randint(0, 2, (size,), generator=g).to(device),
    }


def run_case(key: str, device: torch.device, args) -> list[dict]:
    """Build every method's step, then time them round-robin (fair under a noisy machine)."""
    _title, factory, kind, size, seq = CASES[key]
    batch = make_batch(kind, size, seq, device)
    rows, steps = {}, {}
    for name, method in METHODS.items():
        if name in ("Opacus hooks, default position_ids", "Opacus ghost") and kind != "lm":
            continue
        torch.manual_seed(0)
        try:
            steps[name] = method(factory().to(device), batch, kind, args.amp)
            for _ in range(args.warmup):
                steps[name]()
            rows[name] = {"case": key, "method": name, "times": []}
        except Exception as err:  # noqa: BLE001 - a failure is a result here
            if args.verbose:
                traceback.print_exc()
            steps.pop(name, None)
            first = str(err).splitlines()[0][:100] if str(err) else ""
            rows[name] = {"case": key, "method": name, "error": f"{type(err).__name__}: {first}"}
            print(f"  [{key}] {name}: {rows[name]['error']}", flush=True)
    for _ in range(args.repeats):
        for name, step in steps.items():
            rows[name]["times"].append(timed(step, device))
    for name, step in steps.items():
        row = rows[name]
        row["seconds"] = statistics.median(row.pop("times"))
        row["memory"] = max(peak_working_memory(step, device) for _ in range(2))
        print(
            f"  [{key}] {name}: {row['seconds'] * 1e3:.1f} ms, {row['memory']:.1f} MiB", flush=True
        )
    steps.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def mem_ratio(row: dict, base: dict) -> str:
    return f"{row['memory'] / base['memory']:.2f}" if base["memory"] >= 1 else "(< 1 MiB)"


def table(rows: list[dict], device: torch.device) -> str:
    lines = [
        f"device: {device} ({torch.get_num_threads()} threads on CPU)"
        if device.type == "cpu"
        else f"device: {torch.cuda.get_device_name()}",
        "| case | method | step ms | x non-private | peak MiB | x non-private | trustml speed-up |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in dict.fromkeys(r["case"] for r in rows):
        case = [r for r in rows if r["case"] == key]
        base = next(r for r in case if r["method"] == "non-private")
        ours = next((r for r in case if r["method"] == "trustml DP" and "error" not in r), None)
        for r in case:
            if "error" in r:
                lines.append(f"| {key} | {r['method']} | failed: {r['error']} | | | | |")
                continue
            speed = (
                f"{r['seconds'] / ours['seconds']:.2f}x"
                if ours and r["method"].startswith("Opacus")
                else ""
            )
            lines.append(
                f"| {key} | {r['method']} | {r['seconds'] * 1e3:.1f} | {r['seconds'] / base['seconds']:.2f} "
                f"| {r['memory']:.1f} | {mem_ratio(r, base)} | {speed} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--cases", default=None, help="subset of a,b,c (default: a,b; plus c on cuda)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    pin_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = (args.cases or ("a,b,c" if device.type == "cuda" else "a,b")).split(",")
    rows = []
    for key in cases:
        print(f"case {key}: {CASES[key][0]}", flush=True)
        rows += run_case(key, device, args)
    print()
    print(" ".join(["python", *sys.argv]))
    print(table(rows, device))


if __name__ == "__main__":
    main()
