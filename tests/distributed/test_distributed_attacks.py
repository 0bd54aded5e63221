"""Membership-inference evaluation under torchrun: two gloo processes share the reference models
and must give exactly the single-process reference logits, metrics and report; rank 0 alone
writes and prints."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from trustml import config as cfgmod
from trustml.attacks.reference import half_masks, train_reference_mlps
from trustml.cli import evaluate_main
from trustml.config import ConfigError, from_dict
from trustml.training.distributed import World

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--attacks", "loss,lira,rmia", "--device", "cpu"]
SMALL = {"model": {"hidden": [16, 8]}, "train": {"epochs": 2, "batch_size": 16, "lr": 0.05}}


def small_references() -> torch.Tensor:
    """Logits of 5 reference models (an uneven 3 + 2 share over two ranks) on their pool."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    refs = train_reference_mlps(from_dict(SMALL), x, y, half_masks(5, 90, seed=0), seed=7,
                                progress=False)
    return refs.logits(x)


def flat(tree, prefix: str = "") -> dict:
    """Nested metrics as {"a/b": leaf}, so pytest.approx can compare them."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}/{key}").items()}


def _worker(rank: int, init_file: str, out: str, run_dirs: list[str]) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK="0")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    save_file({"logits": small_references()}, os.path.join(out, f"refs{rank}.safetensors"))
    with open(os.path.join(out, f"stdout{rank}.txt"), "w") as stdout:
        with contextlib.redirect_stdout(stdout):
            code = evaluate_main(["--run", run_dirs[rank], *ARGS])
    assert code == 0
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def adult_run(tmp_path_factory) -> Path:
    """A small trained Adult run, evaluated by one process into its eval/."""
    from trustml.runner import run_training

    config = cfgmod.load(ROOT / "configs/adult.yaml", [
        "data.subset=2000", "train.epochs=2", "attack.n_reference=4", "run.device=cpu"])
    run_dir = run_training(config, tmp_path_factory.mktemp("adult") / "run",
                           progress=False).run_dir
    assert evaluate_main(["--run", str(run_dir), *ARGS]) == 0
    return run_dir


def fresh_copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("eval"))
    return to


def assert_same_metrics(two: dict, single: dict) -> None:
    assert set(two["Membership inference"]) == {"loss", "lira", "rmia"}
    numbers = {k: v for k, v in flat(single).items() if isinstance(v, float)}
    assert len(numbers) > 50 and set(flat(two)) == set(flat(single))
    assert {k: flat(two)[k] for k in numbers} == pytest.approx(numbers, abs=1e-6, nan_ok=True)


def test_two_ranks_equal_one_process(adult_run, tmp_path):
    """Each rank evaluates its own copy of the run, so the copy's eval/ shows who wrote."""
    copies = [fresh_copy(adult_run, tmp_path / f"rank{rank}") for rank in range(2)]
    single = json.loads((adult_run / "eval" / "metrics.json").read_text())

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), [str(c) for c in copies]),
             nprocs=2, join=True)

    expected = small_references()
    for rank in range(2):  # every rank holds all 5 models' outputs, in model order
        assert torch.equal(load_file(str(tmp_path / f"refs{rank}.safetensors"))["logits"],
                           expected)
    assert_same_metrics(json.loads((copies[0] / "eval" / "metrics.json").read_text()), single)
    assert sorted(p.name for p in (copies[0] / "eval").iterdir()) == sorted(
        p.name for p in (adult_run / "eval").iterdir())
    assert not any((copies[1] / "eval").iterdir())  # rank 1 wrote nothing ...
    assert (tmp_path / "stdout0.txt").read_text().count("report:") == 1
    assert (tmp_path / "stdout1.txt").read_text() == ""  # ... and printed nothing


def test_torchrun_evaluate(adult_run, tmp_path):
    """The README command: torchrun's own parser claims --run (for --run-path), hence --run-dir."""
    run_dir = fresh_copy(adult_run, tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "evaluate.py"), "--run-dir", str(run_dir), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("report:") == 1  # rank 0 alone reports
    assert_same_metrics(json.loads((run_dir / "eval" / "metrics.json").read_text()),
                        json.loads((adult_run / "eval" / "metrics.json").read_text()))


def test_fewer_models_than_ranks_is_a_config_error():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(ConfigError, match="attack.n_reference"):
        train_reference_mlps(from_dict(SMALL), x, y, half_masks(1, 10, seed=0),
                             world=World(0, 2), progress=False)
