"""One-time costs of the DP engine's checks, as multiples of one (warm) DP step.

* probe: the first backward of a new pass signature (graph walk for stray parameter uses; about
  log2 B + 1 backward passes proving that each layer's rows reach only their own sample's loss and
  that the batch's parts add up to the whole; per-sample replay of generic-path calls);
* self-check (``verify=True``): the first batch's float64 naive per-sample loop on 4 samples.

Both run once per run (the probe again when the pass's signature changes, e.g. for each new
Poisson batch size), never per step. CPU time of the process (``time.process_time``), as
dp_step.py measures: steadier than wall clock on a shared machine.

    python benchmarks/dp_checks.py --repeats 5
    python benchmarks/dp_checks.py --rows gpt2v50k,cnn   # any row of dp_step.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_step import ROWS, Row, Rows, make_batch, objective_for  # noqa: E402
from trustml.privacy import make_private  # noqa: E402


def first_and_warm(row: Row, batch, verify: bool, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = row.build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    dp = make_private(model, opt, Rows(batch), noise_multiplier=1.0, target_delta=1e-5, epochs=1,
                      max_grad_norm=1.0, batch_size=row.batch, verify=verify)
    objective = objective_for(row, explicit_ids=False)
    t0 = time.process_time()
    dp.step.step(model, objective, batch)
    first = time.process_time() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.process_time()
        dp.step.step(model, objective, batch)
        warm.append(time.process_time() - t0)
    return first, statistics.median(warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="gpt2v8k,mlp256", help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| case | warm step ms | first step extra: probe (x step) "
          "| probe + self-check (x step) |")
    print("| --- | ---: | ---: | ---: |")
    for key in args.rows.split(","):
        row = ROWS[key]
        batch = make_batch(row, torch.device("cpu"))
        probe_first, warm = first_and_warm(row, batch, False, args.repeats)
        both_first, warm2 = first_and_warm(row, batch, True, args.repeats)
        step = statistics.median([warm, warm2])
        print(f"| {row.title} | {step * 1e3:.1f} | {(probe_first - step) / step:.2f} "
              f"| {(both_first - step) / step:.2f} |")


if __name__ == "__main__":
    main()
