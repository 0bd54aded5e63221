"""Overhead of the fairness penalty: training-step time with an MMD / Sinkhorn penalty vs without.

python benchmarks/fair_penalty.py [--batch-size 512] [--device cpu|cuda] [--repeats 200]

One step = forward, penalty, backward, Adam update of the Adult MLP (the configs' [64, 32] widths)
on real group-stratified Adult batches, through the same PlainStep the trainer uses. Prints a
Markdown table of the median step time and the ratio to the unpenalised step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trustml.config import DataConfig, FairnessConfig
from trustml.data.tabular import load_tabular
from trustml.fairness.penalty import build_penalty
from trustml.fairness.sampling import GroupBalancedBatches
from trustml.models.mlp import MLP
from trustml.training.objectives import ClassificationObjective
from trustml.training.step import PlainStep


def time_steps(
    penalty: FairnessConfig,
    batches: list[dict],
    in_features: int,
    hidden: list[int],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> float:
    """Median seconds per step."""
    torch.manual_seed(0)
    model = MLP(in_features, hidden).to(device)
    built = build_penalty(penalty)
    step = PlainStep(torch.optim.Adam(model.parameters(), lr=1e-3), [built] if built else [])
    objective = ClassificationObjective()
    times = []
    for i in range(warmup + repeats):
        batch = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step.step(model, objective, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--hidden", default="64,32", help="MLP widths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--blur", type=float, default=0.05)
    parser.add_argument("--frequencies", type=int, default=64, help="for the Fourier MMD row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hidden = [int(h) for h in args.hidden.split(",")]
    data = load_tabular(DataConfig(dataset="adult", sensitive="sex"))
    source = GroupBalancedBatches(data.train, args.batch_size, seed=0)
    batches = [
        {k: v.to(device) for k, v in b.items()} for _, b in zip(range(32), source.batches(0))
    ]
    cases = {
        "none": FairnessConfig(penalty="none"),
        "mmd (median bandwidth)": FairnessConfig(penalty="mmd", weight=10.0),
        "mmd (3 bandwidths)": FairnessConfig(penalty="mmd", weight=10.0, bandwidth=[0.5, 2.0, 8.0]),
        f"mmd ({args.frequencies} Fourier frequencies)": FairnessConfig(
            penalty="mmd", weight=10.0, frequencies=args.frequencies
        ),
        f"sinkhorn (blur {args.blur:g})": FairnessConfig(
            penalty="sinkhorn", weight=3.0, blur=args.blur
        ),
    }
    base = None
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"device: {name}; batch {args.batch_size}; MLP {hidden}; median of {args.repeats} steps\n"
    )
    print("| penalty | step time (ms) | ratio to unpenalised |\n|---|---|---|")
    for label, cfg in cases.items():
        seconds = time_steps(
            cfg, batches, data.n_features, hidden, device, args.repeats, args.warmup
        )
        base = base or seconds
        print(f"| {label} | {seconds * 1e3:.3f} | {seconds / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
