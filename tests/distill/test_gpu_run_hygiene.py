"""What configs/gpt2_cf_distill.yaml relies on for a long GPU run, checked on CPU with tiny
models: LR warmup and decay, gradient clipping, gradient accumulation, step-based checkpoints
(resumed mid-epoch exactly) and validation, the metric names of a distillation run, and the
DistilGPT-2 student layers."""

import json
import math

import pytest
import torch
import yaml
from torch import nn

from trustml import config as cfgmod
from trustml.config import TrainConfig
from trustml.data.sampling import ShuffledBatches
from trustml.evaluation.perplexity import perplexity
from trustml.training.loop import fit
from trustml.training.objectives import ObjectiveOutput
from trustml.runner import make_scheduler, run_training
from trustml.training.step import PlainStep

class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, generator=g), torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class _MSE:
    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, model, batch):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return ObjectiveOutput((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2)


def _parts(cfg):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    scheduler = make_scheduler(cfg, optimizer, total_steps=12)
    return model, optimizer, scheduler


def test_schedule_warmup_then_linear_or_cosine_decay():
    # 12 steps in all: warmup over steps 0-2, then decay from step 3 over 9 steps, 0 at step 12
    linear = [1 / 3, 2 / 3, 1, *(1 - k / 9 for k in range(10))]
    cosine = [1 / 3, 2 / 3, 1, *(0.5 * (1 + math.cos(math.pi * k / 9)) for k in range(10))]
    for kind, expected in (("linear", linear), ("cosine", cosine)):
        cfg = TrainConfig(lr=1.0, lr_schedule=kind, warmup_steps=3)
        model, optimizer, scheduler = _parts(cfg)
        seen = []
        for _ in range(len(expected)):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert seen == pytest.approx(expected, abs=1e-12)
    assert make_scheduler(TrainConfig(), optimizer, 10) is None  # constant, no warmup


def test_accumulation_gives_the_same_update_and_clipping_bounds_it():
    data = _Rows(8)
    batch = {"x": data.x, "y": data.y}
    results = []
    for accumulate in (1, 2, 3):
        torch.manual_seed(0)
        model = nn.Linear(3, 1).double()
        step = PlainStep(torch.optim.SGD(model.parameters(), lr=0.1), accumulate=accumulate)
        metrics = step.step(model, _MSE(), {k: v.double() for k, v in batch.items()})
        results.append((torch.cat([p.flatten() for p in model.parameters()]), metrics["loss"]))
    for params, loss in results[1:]:
        assert torch.allclose(params, results[0][0], atol=1e-12)
        assert loss == pytest.approx(results[0][1], rel=1e-6)  # PlainStep reports float32
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    before = torch.cat([p.flatten() for p in model.parameters()]).clone()
    loss = _MSE()(model, {k: v.double() for k, v in batch.items()}).losses.mean()
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    step = PlainStep(torch.optim.SGD(model.parameters(), lr=1.0), clip=0.01)
    metrics = step.step(model, _MSE(), {k: v.double() for k, v in batch.items()})
    after = torch.cat([p.flatten() for p in model.parameters()])
    assert metrics["grad_norm"] == pytest.approx(grad.norm().item())
    assert torch.allclose(before - after, 0.01 * grad / grad.norm(), atol=1e-12)
    with pytest.raises(ValueError, match="penalty"):
        PlainStep(step.optimizer, penalties=[lambda b, o: 0], accumulate=2)


def test_step_checkpoints_resume_mid_epoch_exactly(tmp_path):
    cfg = TrainConfig(lr=0.05, lr_schedule="cosine", warmup_steps=2)
    data = _Rows(24)

    def train(run_dir, objective, resume=False):
        model, optimizer, scheduler = _parts(cfg)
        fit(model, objective, PlainStep(optimizer), ShuffledBatches(data, 4, seed=1), epochs=2,
            run_dir=run_dir, state={"optimizer": optimizer, "scheduler": scheduler},
            scheduler=scheduler, checkpoint_steps=4, eval_every_steps=3, resume=resume,
            progress=False, evaluate=lambda: {"val_loss": 0.0})
        return model

    whole = train(tmp_path / "whole", _MSE())
    with pytest.raises(RuntimeError, match="crash"):
        train(tmp_path / "crashed", _MSE(fail_after=9))  # checkpoint at step 8: epoch 2, batch 2
    resumed = train(tmp_path / "crashed", _MSE(), resume=True)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6, 9, 12]  # 6 batches/epoch


def test_distillation_run_logs_distill_loss_and_real_perplexity(tmp_path, gpu_config):
    config = gpu_config([
        "run.device=cpu", "train.amp=bf16", "train.max_steps=4", "train.batch_size=4",
        "data.seq_len=16", "train.log_every=1", "train.eval_every_steps=2",
        "train.checkpoint_steps=2", "train.warmup_steps=2", "train.grad_accum=2",
    ], sentence="The nurse said that her shift ended at {i}.")
    assert config.distill.student_layers == [0, 2, 4, 7, 9, 11]  # DistilGPT-2's extraction
    result = run_training(config, tmp_path / "run", progress=False)
    summary = result.summary
    assert "val_loss" not in summary and summary["val_distill_loss"] > 0
    from trustml.data.text import lm_datasets, load_tokenizer

    _, val = lm_datasets(config.data, load_tokenizer("gpt2"))
    assert summary["val_perplexity"] == pytest.approx(perplexity(result.model, val, 4), rel=1e-5)
    assert summary["val_perplexity"] != pytest.approx(math.exp(summary["val_distill_loss"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "val_distill_loss" in r][:1] == [2]
    steps = [r for r in records if "grad_norm" in r and "val_distill_loss" not in r
             and "partial_batches" not in r]  # step checkpoints log their position too
    assert len(steps) == 4 and all(r["grad_norm"] > 0 for r in steps)
    assert [r["lr"] for r in steps][:2] == pytest.approx([0.5e-4, 1e-4])  # warmup of 2 steps
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert saved["lr_schedule"] == "cosine" and saved["grad_clip"] == 1.0


def test_student_starts_from_distilgpt2_layers(local_teacher, gpu_config):
    from trustml.data.text import load_tokenizer
    from trustml.distill.objective import build_distillation

    config = gpu_config()
    student, objective = build_distillation(config, load_tokenizer("gpt2"))
    assert student.config.n_layer == 6
    for i, j in enumerate([0, 2, 4, 7, 9, 11]):
        for a, b in zip(student.transformer.h[i].parameters(),
                        local_teacher.transformer.h[j].parameters()):
            assert torch.equal(a, b)
    ids = torch.tensor([load_tokenizer("gpt2").encode("I told her the news.")])
    assert objective.counterfactual(ids).swapped == 1  # the real counterfactual, not a token map


def test_privacy_refuses_plain_step_settings(tmp_path):
    from trustml.config import ConfigError

    config = cfgmod.load(None, ["privacy.enabled=true", "privacy.noise_multiplier=1.0",
                                "train.grad_clip=1.0", "data.subset=50", "train.epochs=1"])
    with pytest.raises(ConfigError, match="train.grad_clip"):
        run_training(config, tmp_path / "dp", progress=False)
