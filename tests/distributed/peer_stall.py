"""One rank of a 2-process gloo job for the stopped-peer test (tests/foundation/test_faults.py).

Joins the process group as ``trustml.training.distributed.setup`` does under torchrun (env
RANK/WORLD_SIZE/MASTER_*), touches ``<dir>/ready<rank>`` after a first all-reduce, then all-reduces
in a loop through the CLI's error guard, so a stalled peer ends this rank with the CLI's one line.
"""

import sys
import time
from pathlib import Path

import torch

from trustml.cli import _guarded
from trustml.training import distributed


@_guarded
def main(argv: list[str] | None = None) -> int:
    folder = Path(sys.argv[1])
    world = distributed.setup(torch.device("cpu"), timeout_s=None)
    value = torch.ones(1)
    distributed.all_reduce_sum(value, world)
    (folder / f"ready{world.rank}").touch()
    while True:
        distributed.all_reduce_sum(value, world)
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main(None))
