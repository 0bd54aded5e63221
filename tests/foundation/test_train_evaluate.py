import json

import pytest
import torch

from trustml import cli
from trustml import config as cfgmod
from trustml.training.checkpoint import CheckpointError, load_state, save_state
from trustml.runner import run_training

FAST = ["data.subset=3000", "train.batch_size=128", "run.device=cpu"]


def test_train_then_evaluate_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    assert cli.train_main(["--config", "configs/adult.yaml", "--run-dir", str(run_dir),
                           "--quiet", "--set", "train.epochs=1", *FAST]) == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors",
                 "checkpoint/state.json", "checkpoint/state.safetensors"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["test_accuracy"] > 0.75
    assert cli.evaluate_main(["--run", str(run_dir), "--device", "cpu"]) == 0
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())["classification"]
    for key in ("accuracy", "balanced_accuracy", "auc", "demographic_parity_difference",
                "equalized_odds_difference"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["groups"]) == {"Female", "Male"}
    report = (run_dir / "eval" / "report.md").read_text()
    assert "demographic_parity_difference" in report
    assert (run_dir / "eval" / "scores_by_group.png").stat().st_size > 1000


def test_resume_matches_uninterrupted(tmp_path):
    full = run_training(cfgmod.load("configs/adult.yaml", ["train.epochs=3", "model.dropout=0.2",
                                                           *FAST]),
                        tmp_path / "full", progress=False)
    part_cfg = cfgmod.load("configs/adult.yaml", ["train.epochs=2", "model.dropout=0.2", *FAST])
    run_training(part_cfg, tmp_path / "part", progress=False)
    resumed = run_training(part_cfg.model_copy(update={"train": part_cfg.train.model_copy(
        update={"epochs": 3})}), tmp_path / "part", resume=True, progress=False)
    assert resumed.summary["test_accuracy"] == full.summary["test_accuracy"]
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_resume_without_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("run:\n  name: x\n")
    assert cli.train_main(["--resume", str(tmp_path)]) == 2
    assert "no checkpoint/" in capsys.readouterr().err


def test_checkpoint_round_trip_and_corruption(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    save_state({"model": model.state_dict(), "opt": opt.state_dict(), "t": (1, 2.5, "a")},
               tmp_path / "ck")
    back = load_state(tmp_path / "ck")
    assert back["t"] == (1, 2.5, "a")
    assert torch.equal(back["model"]["weight"], model.weight)
    assert set(back["opt"]["state"]) == {0, 1}
    (tmp_path / "ck" / "state.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_state(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="expected state.json"):
        load_state(tmp_path / "nothing")


def test_dp_resume_keeps_spent_epsilon(tmp_path):
    dp = ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.secure_rng=false",
          "train.batch_size=256", *FAST]
    full = run_training(cfgmod.load("configs/adult.yaml", ["train.epochs=2", *dp]),
                        tmp_path / "full", progress=False)
    part_cfg = cfgmod.load("configs/adult.yaml", ["train.epochs=1", *dp])
    first = run_training(part_cfg, tmp_path / "part", progress=False)
    assert 0 < first.summary["epsilon"] < full.summary["epsilon"]
    resumed = run_training(cfgmod.load(tmp_path / "part" / "config.yaml", ["train.epochs=2"]),
                           tmp_path / "part", resume=True, progress=False)
    assert resumed.summary["epsilon"] == pytest.approx(full.summary["epsilon"], rel=1e-12)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)  # noise generator and Poisson draws continue exactly


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_runs(tmp_path, amp):
    result = run_training(cfgmod.load("configs/adult.yaml", ["train.epochs=1", f"train.amp={amp}",
                                                             *FAST]),
                          tmp_path / amp, progress=False)
    assert result.summary["test_accuracy"] > 0.7


def test_resume_with_a_different_model_is_one_clear_error(tmp_path, capsys):
    run_training(cfgmod.load("configs/adult.yaml", ["train.epochs=1", *FAST]), tmp_path / "r",
                 progress=False)
    code = cli.train_main(["--resume", str(tmp_path / "r"), "--set", "model.hidden=[8]",
                           "train.epochs=2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'model.hidden' cannot change on resume" in err[0]
