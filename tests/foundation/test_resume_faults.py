"""Fault injection on resume (issue #15): SIGKILL, tampered checkpoints, half-finished checkpoint
swaps and changed settings. A resumed DP run continues exactly, or is refused with one line and
exit code 2; it never forgets or under-reports the epsilon it spent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trustml import cli
from trustml.privacy import PrivacyAccountant
from trustml.training.checkpoint import _digest, load_state, save_state

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.subset=800", "train.batch_size=100", "run.device=cpu", "train.log_every=3",
        "model.hidden=[16]"]
DP = ["privacy.enabled=true", "privacy.noise_multiplier=1.0", *TINY]
SEEDED = [*DP, "privacy.secure_rng=false", "train.epochs=12"]  # q = 100/800: 8 steps per epoch


def train(capsys, *args: str) -> tuple[int, list[str]]:
    """Run the CLI in-process; return its exit code and the lines it wrote to stderr."""
    capsys.readouterr()
    code = cli.train_main(["--quiet", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def fresh(capsys, run_dir: Path, *sets: str, config: str = "configs/adult.yaml") -> dict:
    code, err = train(capsys, "--config", config, "--run-dir", str(run_dir), "--set", *sets)
    assert code == 0, err
    return json.loads((run_dir / "summary.json").read_text())


def resume(capsys, run_dir: Path, *sets: str) -> tuple[int, list[str]]:
    return train(capsys, "--resume", str(run_dir), *(["--set", *sets] if sets else []))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def refused(code: int, err: list[str], *words: str) -> None:
    assert code == 2 and len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    """One uninterrupted seeded DP run (12 epochs of 8 steps): the reference, and the run that
    each tampering case copies and damages."""
    run_dir = tmp_path_factory.mktemp("seeded") / "run"
    assert cli.train_main(["--quiet", "--config", "configs/adult.yaml", "--run-dir", str(run_dir),
                           "--set", *SEEDED]) == 0
    return run_dir


def same_run(run_dir: Path, reference: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    full = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == full["steps"] == 96 and summary["epochs_completed"] == 12
    assert [r["step"] for r in summary["history"]] == list(range(8, 97, 8))
    assert summary["epsilon"] == pytest.approx(full["epsilon"], rel=1e-12)
    for name, tensor in weights(reference).items():
        assert torch.equal(weights(run_dir)[name], tensor), name


def test_sigkill_then_resume_equals_uninterrupted(seeded_run, tmp_path, capsys):
    """A real SIGKILL of the training process, wherever it lands (mid-step or mid-checkpoint)."""
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--quiet", "--config",
                             str(ROOT / "configs/adult.yaml"), "--run-dir", str(run_dir),
                             "--set", *SEEDED], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint" / "state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()  # killed before the end
    code, err = resume(capsys, run_dir)
    assert code == 0, err
    same_run(run_dir, seeded_run)


def test_max_steps_stop_resumes_mid_epoch(seeded_run, tmp_path, capsys):
    part = fresh(capsys, tmp_path / "part", *SEEDED, "train.max_steps=13")
    assert part["steps"] == 13 and part["epochs_completed"] == 1  # epoch 2 is not complete
    assert part["partial_epoch"]["partial_batches"] == 5
    code, err = resume(capsys, tmp_path / "part", "train.max_steps=")
    assert code == 0, err
    same_run(tmp_path / "part", seeded_run)


def _forge(run_dir: Path, edit) -> None:
    """Edit state.json as a careful forger would: recompute its digest afterwards."""
    path = run_dir / "checkpoint" / "state.json"
    meta = json.loads(path.read_text())
    edit(meta["state"])
    meta["sha256"] = _digest(meta["state"], run_dir / "checkpoint" / "state.safetensors")
    path.write_text(json.dumps(meta))


def _history(state: dict) -> list:
    return state["extra"]["privacy"]["accountant"]["history"]


TAMPERS = {
    "history emptied": lambda s: _history(s).clear(),
    "sigma 100": lambda s: _history(s)[0].__setitem__(0, 100.0),
    "steps removed": lambda s: _history(s)[0].__setitem__(2, 3),
    "history of the wrong type": lambda s: s["extra"]["privacy"]["accountant"].update(history="x"),
    "epoch edited": lambda s: s.update(epoch=0),
    "step edited": lambda s: s.update(step=s["step"] + 8),
    "step and history edited together": lambda s: (s.update(step=8),
                                                   _history(s)[0].__setitem__(2, 8)),
    "step of the wrong type": lambda s: s.update(step="96"),
    "position of the wrong type": lambda s: s.update(batch=None),
    "secure_rng flipped": lambda s: s["extra"]["privacy"].update(secure_rng=True),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_checkpoint_is_one_clear_error(seeded_run, tmp_path, capsys, case):
    run_dir = tmp_path / "run"
    shutil.copytree(seeded_run, run_dir)
    summary = (run_dir / "summary.json").read_bytes()
    _forge(run_dir, TAMPERS[case])
    code, err = resume(capsys, run_dir, "train.epochs=13")
    refused(code, err, str(run_dir))
    assert (run_dir / "summary.json").read_bytes() == summary  # no lower epsilon reported


def test_edit_without_new_digest_is_detected(seeded_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(seeded_run, run_dir)
    path = run_dir / "checkpoint" / "state.json"
    path.write_text(path.read_text().replace('"history": [[1.0,', '"history": [[100.0,'))
    refused(*resume(capsys, run_dir, "train.epochs=13"), "SHA-256 does not match")


def test_half_finished_checkpoint_swap_recovers(seeded_run, tmp_path, capsys):
    """A crash between the swap's renames: only `.old` (and a complete `.tmp`) remain."""
    run_dir = tmp_path / "run"
    shutil.copytree(seeded_run, run_dir)
    live = run_dir / "checkpoint"
    shutil.copytree(live, run_dir / "checkpoint.tmp")
    os.replace(live, run_dir / "checkpoint.old")
    (run_dir / "checkpoint.tmp" / "state.safetensors").write_bytes(b"torn")  # .tmp unfinished
    assert load_state(live)["step"] == 96  # found in .old, verified
    code, err = resume(capsys, run_dir, "train.epochs=13")
    assert code == 0, err
    assert load_state(live)["step"] == 104 and not (run_dir / "checkpoint.old").exists()
    assert not (run_dir / "checkpoint.tmp").exists()


def test_checkpoint_swap_prefers_a_complete_tmp(tmp_path):
    save_state({"step": 1}, tmp_path / "ck")
    save_state({"step": 2}, tmp_path / "new")
    os.replace(tmp_path / "new", tmp_path / "ck.tmp")  # step 2 fully written as .tmp
    os.replace(tmp_path / "ck", tmp_path / "ck.old")  # the live one renamed away, .tmp not yet in
    assert load_state(tmp_path / "ck")["step"] == 2
    save_state({"step": 3}, tmp_path / "ck")
    assert load_state(tmp_path / "ck")["step"] == 3
    assert not (tmp_path / "ck.tmp").exists() and not (tmp_path / "ck.old").exists()


def test_privacy_cannot_be_turned_off_on_resume(seeded_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(seeded_run, run_dir)
    refused(*resume(capsys, run_dir, "privacy.enabled=false"), "'privacy.enabled'",
            "cannot change on resume")
    saved = run_dir / "config.yaml"  # the same edit in the run's own config.yaml
    saved.write_text(saved.read_text().replace("enabled: true", "enabled: false", 1))
    refused(*resume(capsys, run_dir, "train.epochs=13"), "privacy.enabled (checkpoint True, now "
            "False)")


def test_resume_with_another_config_names_the_keys(seeded_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(seeded_run, run_dir)
    code, err = train(capsys, "--config", "configs/german.yaml", "--resume", str(run_dir))
    refused(code, err, "--config configs/german.yaml differs", "data.dataset (run 'adult', "
            "--config 'german')")
    code, err = train(capsys, "--config", "configs/adult.yaml", "--resume", str(run_dir),
                      "--set", *SEEDED, "train.epochs=13")
    refused(code, err, "'privacy.enabled' cannot change on resume")  # even to its value


def test_resume_with_more_epochs_stays_within_target_epsilon(tmp_path, capsys):
    sets = [*TINY, "privacy.enabled=true", "privacy.target_epsilon=2.0", "train.epochs=1"]
    first = fresh(capsys, tmp_path / "run", *sets)
    assert 1.98 <= first["epsilon"] <= 2.0
    code, err = resume(capsys, tmp_path / "run", "train.epochs=3")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (sigma0, _, n0), (sigma1, _, n1) = summary["accountant_history"]
    assert (sigma0, n0) == (first["noise_multiplier"], 8) and n1 == 16 and sigma1 > sigma0
    assert first["epsilon"] < summary["epsilon"] <= 2.0  # every step counted, none overspent
    acct = PrivacyAccountant()
    acct.load_state_dict({"kind": "rdp", "history": summary["accountant_history"]})
    assert summary["epsilon"] == pytest.approx(acct.epsilon(1e-5), rel=1e-12)
    refused(*resume(capsys, tmp_path / "run", "train.epochs=5", "privacy.target_epsilon=1.0"),
            "already spent epsilon")


def test_secure_run_keeps_no_randomness_and_resumes_fresh(tmp_path, capsys):
    first = fresh(capsys, tmp_path / "a", *DP, "train.epochs=1")
    other = fresh(capsys, tmp_path / "b", *DP, "train.epochs=1")
    assert first["privacy_rng"] == "secure"
    assert not all(torch.equal(t, weights(tmp_path / "b")[k])
                   for k, t in weights(tmp_path / "a").items())  # same run.seed, other noise
    assert first["epsilon"] == other["epsilon"]
    checkpoint = tmp_path / "a" / "checkpoint"
    assert "generator" not in (checkpoint / "state.json").read_text()
    assert not any("generator" in key for key in load_file(str(checkpoint / "state.safetensors")))
    code, err = resume(capsys, tmp_path / "a", "train.epochs=2")
    assert code == 0, err
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    acct = PrivacyAccountant()
    acct.load_state_dict({"kind": "rdp", "history": [[1.0, 100 / 800, 16]]})
    assert summary["steps"] == 16 and summary["epsilon"] == pytest.approx(acct.epsilon(1e-5))
    assert cli.evaluate_main(["--run", str(tmp_path / "a"), "--device", "cpu"]) == 0
    assert "privacy_rng = secure" in (tmp_path / "a" / "eval" / "report.md").read_text()
