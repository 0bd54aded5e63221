"""Benchmark one DP-SGD step against the non-private step and the peers, model family by family.

Rows (``--rows``, default all CPU rows): GPT-2 4x256 with a 8000-token and the real 50257-token
vocabulary, GPT-2 small (12x768), BERT 4x256 (sequence classification), a CNN of three
Conv2d + GroupNorm blocks on 32x32 images, and the Adult-sized MLP (Adam at batch 256, SGD at 1024);
with ``--device cuda`` also GPT-2 small at T=512. Methods: the non-private step (``PlainStep``),
trustml (``make_private(...).step``: Poisson-batch step with exact per-sample clipping, noise and
RDP accounting), Opacus 1.6 ``GradSampleModule`` in hooks and functorch modes with ``DPOptimizer``,
and Opacus ghost clipping (``GradSampleModuleFastGradientClipping``). Opacus is given explicit
batch-sized ``position_ids`` (and BERT's ``token_type_ids``): its hooks fail on the models' default
broadcast ones (the workaround is recorded in the table). fastDP and private-transformers are tried
by import and recorded when absent or failing.

Time: CPU time of the process (``time.process_time``: other jobs on a shared machine do not count),
one thread by default, all methods built in ONE process and stepped round-robin (warm-up, then
``--repeats`` rounds); the table gives the median and its ratio to the non-private step's median.
Memory: every method runs again in its OWN subprocess; growth of the peak (RSS high-water mark on CPU
with glibc's mmap threshold pinned so freed tensors leave RSS, ``max_memory_allocated`` on CUDA) over
the memory held once the model, its optimizer wrapper and the batch are built, over warm-up + one step.

    python benchmarks/dp_step.py --out bench.md                 # every CPU row
    python benchmarks/dp_step.py --rows cnn,mlp256 --repeats 9  # a subset
    python benchmarks/dp_step.py --device cuda --rows gpt2small512 --amp bf16
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trustml.privacy import make_private  # noqa: E402
from trustml.training.step import PlainStep  # noqa: E402


@dataclass(frozen=True)
class Row:
    title: str
    build: Callable[[], nn.Module]
    kind: str  # lm | cls (token classification of a sequence) | image | tabular
    batch: int
    seq: int | None = None
    vocab: int = 50257
    adam: bool = False
    cuda_only: bool = False


def gpt2(n_layer: int, n_embd: int, vocab: int, positions: int = 1024) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64, vocab_size=vocab,
                        n_positions=positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
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
    "gpt2v8k": Row("GPT-2 4x256, V=8000, B=16, T=64", lambda: gpt2(4, 256, 8000), "lm", 16, 64, 8000),
    "gpt2v50k": Row("GPT-2 4x256, V=50257, B=8, T=128", lambda: gpt2(4, 256, 50257), "lm", 8, 128),
    "gpt2small": Row("GPT-2 small 12x768, B=4, T=128", lambda: gpt2(12, 768, 50257), "lm", 4, 128),
    "bert": Row("BERT 4x256 (classifier), B=16, T=128", bert, "cls", 16, 128, 30522),
    "cnn": Row("CNN 3x(Conv2d+GroupNorm), B=64, 32x32", cnn, "image", 64),
    "mlp256": Row("Adult MLP 100-64-32-2, B=256 (Adam)", mlp, "tabular", 256, adam=True),
    "mlp1024": Row("Adult MLP 100-64-32-2, B=1024", mlp, "tabular", 1024),
    "gpt2small512": Row("GPT-2 small 12x768, B=8, T=512", lambda: gpt2(12, 768, 50257), "lm", 8,
                        512, cuda_only=True),
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
        batch = {"x": torch.randn(b, 3, 32, 32, generator=g), "y": torch.randint(0, 10, (b,), generator=g)}
    else:
        batch = {"x": torch.randn(b, 100, generator=g), "y": torch.randint(0, 2, (b,), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def objective_for(row: Row, explicit_ids: bool) -> Callable:
    """Per-sample losses; ``explicit_ids`` passes batch-sized position (and token type) ids."""

    def ids_kwargs(ids: torch.Tensor) -> dict:
        if not explicit_ids:
            return {}
        kw = {"position_ids": torch.arange(ids.shape[1], device=ids.device).expand_as(ids)}
        if row.kind == "cls":
            kw["token_type_ids"] = torch.zeros_like(ids)
        return kw

    def lm(model, batch):
        ids = batch["input_ids"]
        logits = model(input_ids=ids, **ids_kwargs(ids)).logits[:, :-1]
        losses = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
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


# ---- methods: (model, batch, row, amp) -> zero-argument step function ------------------------------


def optimizer(params, row: Row) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-4) if row.adam else torch.optim.SGD(params, lr=1e-4)


def amp_context(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def non_private(model, batch, row, amp):
    step = PlainStep(optimizer(model.parameters(), row), amp=amp)
    objective = objective_for(row, explicit_ids=False)
    return lambda: step.step(model, objective, batch)


def trustml_dp(model, batch, row, amp):
    dp = make_private(model, optimizer(model.parameters(), row), Rows(batch), noise_multiplier=1.0,
                      target_delta=1e-5, epochs=1, max_grad_norm=1.0, batch_size=row.batch, amp=amp)
    objective = objective_for(row, explicit_ids=False)
    return lambda: dp.step.step(model, objective, batch)


def opacus_sample(model, batch, row, amp, functorch=False):
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=functorch)
    opt = DPOptimizer(optimizer(gsm.parameters(), row), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=row.batch)
    objective = objective_for(row, explicit_ids=True)
    device = next(model.parameters()).device

    def step():
        opt.zero_grad(set_to_none=True)
        with amp_context(device, amp):
            loss = objective(gsm, batch).losses.mean()
        loss.backward()
        opt.step()

    return step


class PerSampleLosses(nn.Module):
    """A 'criterion' that returns the objective's per-sample losses (for Opacus's ghost wrapper)."""

    reduction = "mean"

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return losses


def opacus_ghost(model, batch, row, amp):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                               max_grad_norm=1.0, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(optimizer(gsm.parameters(), row), noise_multiplier=1.0,
                                          max_grad_norm=1.0, expected_batch_size=row.batch,
                                          loss_reduction="mean")
    criterion = DPLossFastGradientClipping(gsm, opt, PerSampleLosses(), loss_reduction="mean")
    objective = objective_for(row, explicit_ids=True)
    device = next(model.parameters()).device

    def step():
        opt.zero_grad(set_to_none=True)
        with amp_context(device, amp):
            loss = criterion(objective(gsm, batch).losses)
        loss.backward()
        opt.step()

    return step


def fastdp(model, batch, row, amp):
    from fastDP import PrivacyEngine  # noqa: F401 - not on PyPI; recorded when absent

    raise NotImplementedError("fastDP imported, but no driver is written for it here")


def private_transformers(model, batch, row, amp):
    from private_transformers import PrivacyEngine  # noqa: F401 - recorded when absent/failing

    raise NotImplementedError("private-transformers imported, but no driver is written for it here")


METHODS: dict[str, Callable] = {
    "non-private": non_private,
    "trustml": trustml_dp,
    "Opacus hooks": opacus_sample,
    "Opacus functorch": lambda m, b, r, a: opacus_sample(m, b, r, a, functorch=True),
    "Opacus ghost": opacus_ghost,
    "fastDP": fastdp,
    "private-transformers": private_transformers,
}


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


def build(row_key: str, method: str, device: torch.device, amp: str) -> Callable:
    row = ROWS[row_key]
    torch.manual_seed(0)
    model = row.build().to(device)
    return METHODS[method](model, make_batch(row, device), row, amp)


def error_text(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0][:110] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"


def memory_growth(row_key: str, method: str, device: torch.device, amp: str, warmup: int) -> float:
    """MiB of peak growth over the built model (this process runs only this method)."""
    step = build(row_key, method, device, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        base = rss_kib("VmRSS") * 1024
    for _ in range(warmup + 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (rss_kib("VmHWM") * 1024 - base) / 2**20


def memory_in_subprocess(row_key: str, method: str, args) -> float | str:
    cmd = [sys.executable, __file__, "--memory-of", f"{row_key}:{method}", "--device", args.device,
           "--amp", args.amp, "--warmup", str(args.warmup), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return f"memory run failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:100]}"
    return json.loads(lines[-1])["mib"]


def cpu_time(step: Callable, device: torch.device) -> float:
    if device.type == "cuda":  # the GPU's work is not CPU time: wall clock, synchronised
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    t0 = time.process_time()
    step()
    return time.process_time() - t0


def run_row(row_key: str, methods: list[str], device: torch.device, args) -> list[dict]:
    """Build every method, warm up, then time them round-robin; memory in subprocesses."""
    results, steps = {}, {}
    for name in methods:
        results[name] = {"row": row_key, "method": name}
        try:
            steps[name] = build(row_key, name, device, args.amp)
            for _ in range(args.warmup):
                steps[name]()
            results[name]["times"] = []
        except Exception as err:  # noqa: BLE001 - a failure is a result here
            if args.verbose:
                traceback.print_exc()
            steps.pop(name, None)
            results[name]["error"] = error_text(err)
            print(f"  [{row_key}] {name}: {results[name]['error']}", flush=True)
    for _ in range(args.repeats):
        for name, step in steps.items():
            results[name]["times"].append(cpu_time(step, device))
    steps.clear()
    for name in list(results):
        r = results[name]
        if "error" in r:
            continue
        r["seconds"] = statistics.median(r.pop("times"))
        r["memory"] = memory_in_subprocess(row_key, name, args) if args.memory else None
        print(f"  [{row_key}] {name}: {r['seconds'] * 1e3:.1f} ms, memory {r['memory']}", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(results.values())


def table(rows: list[dict], device: torch.device, args) -> str:
    where = (f"CPU, {torch.get_num_threads()} thread(s), CPU time" if device.type == "cpu"
             else f"{torch.cuda.get_device_name()}, wall clock, amp={args.amp}")
    lines = [
        f"{where}; median of {args.repeats} round-robin rounds after {args.warmup} warm-up",
        "",
        "| model | method | step ms | time x plain | peak growth MiB | memory x plain |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for key in dict.fromkeys(r["row"] for r in rows):
        case = [r for r in rows if r["row"] == key]
        base = next((r for r in case if r["method"] == "non-private" and "error" not in r), None)
        for r in case:
            if "error" in r:
                lines.append(f"| {ROWS[key].title} | {r['method']} | failed: {r['error']} | | | |")
                continue
            ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else ""
            mem = r["memory"]
            if isinstance(mem, float):
                base_mem = base["memory"] if base and isinstance(base["memory"], float) else None
                mem_ratio = f"{mem / base_mem:.2f}x" if base_mem and base_mem >= 1 else ""
                mem = f"{mem:.1f}"
            else:
                mem, mem_ratio = mem or "", ""
            lines.append(f"| {ROWS[key].title} | {r['method']} | {r['seconds'] * 1e3:.1f} | {ratio} "
                         f"| {mem} | {mem_ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", default=None, help=f"comma list of {', '.join(ROWS)} (default: all "
                        "rows the device runs)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the per-method memory subprocesses")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # ROW:METHOD (internal)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    pin_malloc()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_of:
        row_key, method = args.memory_of.split(":", 1)
        print(json.dumps({"mib": memory_growth(row_key, method, device, args.amp, args.warmup)}))
        return
    keys = args.rows.split(",") if args.rows else [
        k for k, r in ROWS.items() if device.type == "cuda" or not r.cuda_only
    ]
    unknown = [k for k in keys if k not in ROWS] + [
        m for m in args.methods.split(",") if m not in METHODS
    ]
    if unknown:
        parser.error(f"unknown rows/methods: {unknown}")
    results = []
    for key in keys:
        print(f"{key}: {ROWS[key].title}", flush=True)
        results += run_row(key, args.methods.split(","), device, args)
    versions = {name: __import__(name).__version__ for name in ("torch", "transformers", "opacus")}
    load = os.getloadavg()
    text = "\n".join([
        " ".join(["python", *sys.argv]),
        "",
        ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the end",
        "",
        table(results, device, args),
    ])
    print()
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
