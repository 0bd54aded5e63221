"""Benchmark: R Adult reference MLPs trained batched (stacked parameters + vmap) vs one by one.

    python benchmarks/reference_models.py --models 64 --pool 2000 --epochs 5 --repeats 3 --threads 1

All paths run the same optimiser updates on the same batches (tests/attacks check the parameters
agree), so the ratios are purely the cost of launching R small models separately. Baselines, one
model at a time: ``suite`` is exactly the suite's training step (``PlainStep`` +
``ClassificationObjective`` + the configured optimiser, as ``run_training`` builds it);
``suite_fused`` is the same with the fused optimiser kernel the batched path uses (the strongest
one-by-one baseline). The timings of one repeat are taken back to back, so a ratio compares like with
like on a shared, noisy machine; the load average is reported with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from trustml.attacks.reference import half_masks, train_reference_mlps
from trustml.config import from_dict
from trustml.data.tabular import load_tabular

PATHS = {"batched": {"batched": True, "fused": True},
         "suite": {"batched": False, "fused": False},
         "suite_fused": {"batched": False, "fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--pool", type=int, default=2000, help="pool rows (each model trains on half)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = from_dict({"model": {"hidden": args.hidden},
                        "train": {"epochs": args.epochs, "batch_size": args.batch_size,
                                  "optimizer": args.optimizer}})
    data = load_tabular(config.data)
    x, y = data.train.x[: args.pool], data.train.y[: args.pool]
    mask = half_masks(args.models, len(x), seed=0)
    cuda = args.device.startswith("cuda")
    train_reference_mlps(config, x, y, mask[:2], device=args.device, progress=False)  # warm-up
    runs = []
    for _ in range(args.repeats):
        load_before = os.getloadavg()[0]
        seconds = {}
        for name, options in PATHS.items():
            start = time.perf_counter()
            train_reference_mlps(config, x, y, mask, device=args.device, progress=False,
                                 **options)
            if cuda:
                torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - start
        runs.append({"seconds": seconds, "load_1min": [load_before, os.getloadavg()[0]],
                     "speedup_vs_suite": seconds["suite"] / seconds["batched"],
                     "speedup_vs_suite_fused": seconds["suite_fused"] / seconds["batched"]})
        print(json.dumps(runs[-1]), flush=True)
    result = {**vars(args), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "median_speedup_vs_suite": statistics.median(r["speedup_vs_suite"] for r in runs),
              "median_speedup_vs_suite_fused": statistics.median(
                  r["speedup_vs_suite_fused"] for r in runs),
              "runs": runs}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
