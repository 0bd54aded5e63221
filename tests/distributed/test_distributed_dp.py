"""Two gloo processes on one CPU machine against one process: DP-SGD under data parallelism must
give the same clipped sum, the same total noise and the same epsilon."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from trustml.privacy import make_private
from trustml.training.distributed import World, current
from trustml.training.objectives import ObjectiveOutput

ROOT = Path(__file__).resolve().parents[2]
N, D = 64, 5


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(N, D, generator=g), torch.randn(N, generator=g)

    def __len__(self):
        return N

    def gather(self, index):
        return {"x": self.x[index], "y": self.y[index]}


def squared_error(model, batch):
    return ObjectiveOutput((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2)


def zero_loss(model, batch):
    return ObjectiveOutput(model(batch["x"]).squeeze(-1) * 0.0)


def run_steps(world: World, sigma: float, objective, steps: int,
              secure: bool = False) -> dict[str, torch.Tensor]:
    """``steps`` DP steps; returns every step's update (grad), batch sizes and final epsilon."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    private = make_private(model, opt, Rows(), noise_multiplier=sigma, target_delta=1e-5,
                           epochs=1, max_grad_norm=0.5, batch_size=16, seed=3, world=world,
                           secure_rng=secure)
    grads, sizes = [], []
    batches = private.batches.batches(0)
    for _ in range(steps):
        batch = next(batches, None) or next(iter(private.batches.batches(1)))
        sizes.append(private.step.step(model, objective, batch)["batch_size"])
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return {"grads": torch.stack(grads), "sizes": torch.tensor(sizes),
            "epsilon": torch.tensor(private.accountant.epsilon(1e-5), dtype=torch.float64)}


def _worker(rank: int, init_file: str, out: str, sigma: float, objective_name: str,
            steps: int, secure: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    objective = {"squared_error": squared_error, "zero_loss": zero_loss}[objective_name]
    result = run_steps(current(), sigma, objective, steps, secure)
    save_file(result, os.path.join(out, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


def two_ranks(tmp_path, sigma, objective_name, steps, secure=False):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), sigma, objective_name, steps,
                            secure), nprocs=2, join=True)
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]


def test_clipped_sum_and_epsilon_match_single_process(tmp_path):
    ranks = two_ranks(tmp_path, 0.0, "squared_error", 4)
    single = run_steps(World(), 0.0, squared_error, 4)
    for result in ranks:
        torch.testing.assert_close(result["grads"], single["grads"], rtol=1e-5, atol=1e-7)
    assert single["grads"].abs().sum() > 0


def test_noise_is_added_once_in_total(tmp_path):
    """In the secure (default) mode: rank 0's secret noise and secret sampling seed."""
    steps, sigma = 150, 1.3
    ranks = two_ranks(tmp_path, sigma, "zero_loss", steps, secure=True)
    single = run_steps(World(), sigma, zero_loss, steps, secure=True)
    torch.testing.assert_close(ranks[0]["grads"], ranks[1]["grads"])  # one update on all ranks
    expected = sigma * 0.5 / 16  # sigma * C / expected batch size
    n = ranks[0]["grads"].numel()  # 150 steps x 57 coordinates: std known to ~2.4% (4 sigma)
    for grads in (ranks[0]["grads"], single["grads"]):
        assert abs(grads.std().item() / expected - 1) < 4 / (2 * n) ** 0.5
    assert ranks[0]["epsilon"].item() == pytest.approx(single["epsilon"].item(), rel=1e-12)
    assert ranks[1]["epsilon"].item() == pytest.approx(single["epsilon"].item(), rel=1e-12)
    # every rank saw the same global (secretly drawn) batch: the all-reduced sizes agree, and
    # their mean is q * N = 16 (150 Poisson draws of Binomial(64, 1/4): sd 3.46 / sqrt(150))
    assert torch.equal(ranks[0]["sizes"], ranks[1]["sizes"])
    assert abs(ranks[0]["sizes"].float().mean().item() - 16) < 4 * 3.47 / steps**0.5


def test_poisson_shards_partition_the_global_sample():
    from trustml.privacy import PoissonBatches

    data = Rows()
    whole = [b["y"] for b in PoissonBatches(data, 0.25, seed=1).batches(0)]
    parts = [[b["y"] for b in PoissonBatches(data, 0.25, seed=1, world=World(r, 2)).batches(0)]
             for r in range(2)]
    for k, batch in enumerate(whole):
        union = torch.cat([parts[0][k], parts[1][k]])
        assert sorted(union.tolist()) == sorted(batch.tolist())


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["privacy.enabled=true", "privacy.noise_multiplier=1.0"],
                                   ["fairness.penalty=mmd", "fairness.weight=1.0"]])
def test_torchrun_train_writes_once(tmp_path, extra):
    """The real entry point under torchrun: 2 CPU processes, rank 0 writes the run directory."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--config", str(ROOT / "configs/adult.yaml"), "--quiet",
           "--run-dir", str(run_dir), "--set", "data.subset=2000", "train.epochs=1",
           "run.device=cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_accuracy"] > 0.7
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 1
    assert done.stdout.count("run directory:") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_torchrun_distillation(tmp_path):
    """Distillation (two student passes for CDA, frozen teacher) under DDP with 2 CPU processes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=8, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "teacher")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"The doctor said that he saw patient {i}." for i in range(40)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--config", str(ROOT / "configs/gpt2_cf_distill.yaml"),
           "--quiet", "--run-dir", str(tmp_path / "run"), "--set",
           f"distill.teacher={tmp_path / 'teacher'}", "data.path=", f"data.text_path={text}",
           "run.device=cpu", "train.amp=none", "train.max_steps=2", "train.batch_size=4",
           "data.seq_len=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2


def test_experiment_drivers_refuse_torchrun(monkeypatch, capsys):
    from trustml import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.train_main(["--config", str(ROOT / "configs/audit_adult.yaml")]) == 2
    assert "single-process driver" in capsys.readouterr().err
