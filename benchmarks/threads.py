"""Benchmark: torch intra-op threads (1, 2, 4, ...) on two end-to-end runs, wall and CPU time.

    python benchmarks/threads.py --threads 1,2,4 --repeats 3

Runs ``run_training`` on the Adult baseline (``configs/adult.yaml``) and a small DP run
(``configs/adult_dp.yaml`` for ``--dp-epochs`` epochs) with each thread count in turn, round-robin in
one process (every repeat times all counts back to back, so a busy machine slows them alike). Wall
time is what the user waits; CPU time (``time.process_time``: all threads of the process) is what the
run takes from everyone else on a shared machine. The 1-minute load average is printed with each
repeat. Run it without ``OMP_NUM_THREADS`` set, so that torch's own default is the one measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trustml import config as cfgmod
from trustml.runner import run_training

CASES = {"adult baseline": ("configs/adult.yaml", []),
         "adult DP": ("configs/adult_dp.yaml", ["run.device=cpu"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4", help="comma-separated intra-op thread counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dp-epochs", type=int, default=3)
    args = parser.parse_args()
    default = torch.get_num_threads()
    counts = [int(t) for t in args.threads.split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch default threads {default}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    configs = {name: cfgmod.load(path, [*sets, "run.device=cpu"]
                                 + ([f"train.epochs={args.dp_epochs}"] if "DP" in name else []))
               for name, (path, sets) in CASES.items()}
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # repeat 0 warms up (imports, data caches)
            load = os.getloadavg()[0]
            for name, config in configs.items():
                for n in counts:
                    torch.set_num_threads(n)
                    wall, cpu = time.perf_counter(), time.process_time()
                    run_training(config, Path(tmp) / f"{name}-{n}-{repeat}".replace(" ", "_"),
                                 progress=False)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    if repeat:
                        times.setdefault((name, n), []).append((wall, cpu))
                    print(json.dumps({"repeat": repeat, "load1": load, "case": name, "threads": n,
                                      "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}),
                          flush=True)
    print("\n| case | threads | wall s (median) | wall s (min-max) | CPU s (median) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for (name, n), values in times.items():
        walls, cpus = [w for w, _ in values], [c for _, c in values]
        print(f"| {name} | {n}{' (default)' if n == default else ''} | "
              f"{statistics.median(walls):.2f} | {min(walls):.2f}-{max(walls):.2f} | "
              f"{statistics.median(cpus):.2f} |")


if __name__ == "__main__":
    main()
