"""Benchmark issue #13's CNN row: one DP-SGD step of trustml against the non-private step.

The model is three Conv2d(3x3, padding 1) + GroupNorm(8) + ReLU + AvgPool2d(2) blocks (3 -> 32 -> 64
-> 64 channels) and a linear head, on a batch of 64 random 32x32 RGB images (SGD, cross-entropy).

Time: CPU time of the process (``time.process_time``: other jobs on a shared machine do not count),
one thread, every method built in ONE process and stepped round-robin (warm-up, then ``--repeats``
rounds); the median and its ratio to the non-private step's median. Memory: every method again in
its OWN subprocess: growth of the peak RSS (glibc's mmap threshold pinned so that freed tensors
leave RSS) over the RSS once the model, its optimizer wrapper and the batch are built, over warm-up
+ one step, and over one later step. The timing process keeps glibc's default allocator (which reuses
freed blocks, as a training run does) unless ``--pinned-time``. (benchmarks/dp_step.py is the
multi-row script; this one is the CNN row alone.)

    python benchmarks/cnn_step.py --repeats 15
    python benchmarks/cnn_step.py --methods trustml --profile   # where trustml's step spends time
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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trustml.privacy import make_private  # noqa: E402
from trustml.training.step import PlainStep  # noqa: E402

BATCH = 64


def cnn() -> nn.Module:
    layers, c_in = [], 3
    for c_out in (32, 64, 64):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(),
                   nn.AvgPool2d(2)]
        c_in = c_out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, 10))


class Out:  # the objective contract: .losses (B,)
    def __init__(self, losses: torch.Tensor):
        self.losses, self.outputs = losses, {}


def objective(model: nn.Module, batch: dict) -> Out:
    return Out(F.cross_entropy(model(batch["x"]), batch["y"], reduction="none"))


class Rows(torch.utils.data.Dataset):
    """The benchmark batch as a dataset (make_private sizes its Poisson sampler from it)."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return BATCH

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def non_private(model: nn.Module, batch: dict) -> Callable[[], object]:
    step = PlainStep(torch.optim.SGD(model.parameters(), lr=1e-4))
    return lambda: step.step(model, objective, batch)


def trustml_dp(model: nn.Module, batch: dict) -> Callable[[], object]:
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=1e-4), Rows(batch),
                      noise_multiplier=1.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0,
                      batch_size=BATCH)
    return lambda: dp.step.step(model, objective, batch)


METHODS: dict[str, Callable] = {"non-private": non_private, "trustml": trustml_dp}


def build(method: str) -> Callable[[], object]:
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(BATCH, 3, 32, 32, generator=g),
             "y": torch.randint(0, 10, (BATCH,), generator=g)}
    torch.manual_seed(0)
    return METHODS[method](cnn(), batch)


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


def memory_growth(method: str, warmup: int) -> tuple[float, float]:
    """MiB of peak RSS growth over the built model (this process runs only this method): over
    warm-up + one step (the first DP step also runs the one-time probe and self-check), and over
    one later step alone."""
    step = build(method)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = rss_kib("VmRSS")
    for _ in range(warmup + 1):
        step()
    first = (rss_kib("VmHWM") - base) / 1024
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return first, (rss_kib("VmHWM") - base) / 1024


def memory_in_subprocess(method: str, warmup: int) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--memory-of", method, "--warmup", str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["mib"]


def cpu_time(step: Callable[[], object]) -> float:
    t0 = time.process_time()
    step()
    return time.process_time() - t0


def profile(step: Callable[[], object]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table per method")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--pinned-time", action="store_true",
                        help="time with glibc's mmap threshold pinned too (every large temporary "
                        "then page-faults fresh memory, as in benchmarks/dp_step.py)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_of or args.pinned_time:
        pin_malloc()
    if args.memory_of:
        print(json.dumps({"mib": memory_growth(args.memory_of, args.warmup)}))
        return
    methods = args.methods.split(",")
    steps = {m: build(m) for m in methods}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    if args.profile:
        for name, step in steps.items():
            print(name)
            profile(step)
        return
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(cpu_time(step))
    median = {m: statistics.median(t) for m, t in times.items()}
    memory = {m: memory_in_subprocess(m, args.warmup) for m in methods} if args.memory else {}
    base = "non-private"
    print(" ".join(["python", *sys.argv]))
    load = os.getloadavg()
    print(f"torch {torch.__version__}, 1 thread, CPU time, median of {args.repeats} round-robin "
          f"rounds after {args.warmup} warm-up; load average {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f}")
    print("| method | step ms | time x plain | rounds x plain (min-max) | peak growth MiB, from the "
          "first step / one later step | memory x plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for m in methods:
        ratio = per_round = mem = mem_ratio = ""
        if base in median:
            ratio = f"{median[m] / median[base]:.2f}x"
            rounds = [t / b for t, b in zip(times[m], times[base])]
            per_round = f"{min(rounds):.2f}-{max(rounds):.2f}"
        if m in memory:
            mem = " / ".join(f"{v:.1f}" for v in memory[m])
            if base in memory:
                mem_ratio = " / ".join(f"{v / b:.2f}x" for v, b in zip(memory[m], memory[base]))
        print(f"| {m} | {median[m] * 1e3:.1f} | {ratio} | {per_round} | {mem} | {mem_ratio} |")

if __name__ == "__main__":
    main()
