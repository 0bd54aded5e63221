"""The DP step's fixed per-step cost on the Adult-sized MLP: CPU-time ratio to the plain step.

The model is issue #13's Adult MLP (100-64-32-2, Adam, B=256), where fixed per-step work (budget
check, epsilon, noise, clipper bookkeeping) dominates a step of a few milliseconds. Three steps
run round-robin in one process, each timed in CPU time (``time.process_time``, steadier than wall
time on a shared machine): the plain step, the DP step as the loop drives it without a budget,
and with an epsilon budget (``exhausted()`` before every step). Metrics are not resolved (a step
that is not logged). The figure is the median over rounds of the per-round median ratio.

    python benchmarks/dp_tax.py --threads 1 --rounds 20 --per-round 25
    python benchmarks/dp_tax.py --profile      # torch.profiler table of the DP step's ops
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trustml.privacy import make_private
from trustml.training.objectives import ObjectiveOutput
from trustml.training.step import PlainStep

BATCH, FEATURES, ROWS = 256, 100, 30000


def objective(model, batch):
    return ObjectiveOutput(F.cross_entropy(model(batch["x"]), batch["y"], reduction="none"))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 2))


class Rows(torch.utils.data.Dataset):
    """Adult-sized random rows (make_private sizes its sampler from the dataset)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(ROWS, FEATURES, generator=g)
        self.y = torch.randint(0, 2, (ROWS,), generator=g)

    def __len__(self):
        return ROWS

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def steps(data: Rows, batch: dict) -> dict:
    plain_model = mlp()
    plain = PlainStep(torch.optim.Adam(plain_model.parameters(), lr=1e-3))
    out = {"plain": lambda: plain.step(plain_model, objective, batch)}
    for name, budget in (("DP", None), ("DP + budget", 1e3)):
        model = mlp()
        dp = make_private(model, torch.optim.Adam(model.parameters(), lr=1e-3), data,
                          noise_multiplier=1.0, target_delta=1e-5, epochs=1, max_grad_norm=1.0,
                          batch_size=BATCH, epsilon_budget=budget)

        def step(dp=dp, model=model):
            if dp.step.exhausted():
                raise RuntimeError("budget spent")
            return dp.step.step(model, objective, batch)

        out[name] = step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Rows()
    batch = {"x": data.x[:BATCH], "y": data.y[:BATCH]}
    fns = steps(data, batch)
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                fns["DP"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        return
    ratios: dict[str, list[float]] = {k: [] for k in fns if k != "plain"}
    medians: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.per_round):
            for name, fn in fns.items():
                t0 = time.process_time()
                fn()
                times[name].append(time.process_time() - t0)
        for name in fns:
            medians[name].append(statistics.median(times[name]))
        for name in ratios:
            ratios[name].append(medians[name][-1] / medians["plain"][-1])
    print(" ".join(["python", *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{args.rounds} rounds x {args.per_round} steps each, CPU time")
    print(f"plain step: {statistics.median(medians['plain']) * 1e3:.2f} ms")
    for name, values in ratios.items():
        q = statistics.quantiles(values, n=4)
        print(f"{name}: {statistics.median(medians[name]) * 1e3:.2f} ms, "
              f"{statistics.median(values):.2f}x plain (quartiles {q[0]:.2f}-{q[2]:.2f})")


if __name__ == "__main__":
    main()
