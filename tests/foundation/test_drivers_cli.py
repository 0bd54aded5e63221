"""What a user sees from the entry points: --quiet silences every driver but keeps the headline
numbers, evaluate.py understands an experiment's directory and gives the same figures every time
(and the audit's own), and an interrupted sweep leaves a partial report and resumes."""

import json

import pytest

from trustml import cli
from trustml.fairness import sweep

AUDIT = ["--config", "configs/audit_adult.yaml", "--set", "data.subset=300", "train.epochs=2",
         "attack.n_reference=2", "attack.n_population=100", "attack.audit_epsilons=[inf]",
         "run.device=cpu"]


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("audit") / "run"


def test_quiet_audit_prints_only_the_summary(audit_dir, capfd):
    assert cli.train_main([*AUDIT[:2], "--run-dir", str(audit_dir), "--quiet", *AUDIT[2:]]) == 0
    out, err = capfd.readouterr()
    assert "epoch" not in out + err and "it/s" not in out + err and "%|" not in err
    summary = json.loads(out[: out.rindex("}") + 1])
    rows = json.loads((audit_dir / "audit.json").read_text())
    # headline numbers, not only paths
    assert summary["white_box_eps_lb@eps=inf"] == rows[0]["white_box_eps_lb"]


def test_progress_without_quiet(tmp_path, capfd):
    assert cli.train_main(["--config", "configs/adult.yaml", "--run-dir", str(tmp_path / "r"),
                           "--set", "train.epochs=1", "data.subset=500", "run.device=cpu"]) == 0
    out, err = capfd.readouterr()
    assert "epoch=1" in out + err


def test_evaluate_an_experiment_dir_lists_its_runs_and_repeats(tmp_path, capfd):
    transfer = tmp_path / "transfer"
    assert cli.train_main(["--config", "configs/adult_fair_transfer.yaml", "--run-dir",
                           str(transfer), "--quiet", "--set", *TINY, "run.seeds=[0]",
                           "attack.n_reference=2", "attack.n_population=100",
                           "attack.n_targets=100"]) == 0
    capfd.readouterr()
    assert cli.evaluate_main(["--run", str(transfer), "--quiet", "--attacks", "loss,lira"]) == 0
    out, err = capfd.readouterr()
    assert "holds 2 runs; evaluating each: encoder_fair_seed0, encoder_plain_seed0" in err
    assert "lira AUC" in out and "accuracy" in out  # headline numbers
    target = transfer / "encoder_plain_seed0"
    first = json.loads((target / "eval" / "metrics.json").read_text())
    assert "2 reference models, seed 0 (attack.seed" in (target / "eval" / "report.md").read_text()
    assert cli.evaluate_main(["--run", str(target), "--quiet", "--attacks", "loss,lira"]) == 0
    assert json.loads((target / "eval" / "metrics.json").read_text()) == first


def test_evaluate_names_what_it_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.evaluate_main(["--run", str(tmp_path / "empty")]) == 2
    assert "is not a run directory (no config.yaml, no model.safetensors)" in capsys.readouterr().err
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("run:\n  name: x\n")
    assert cli.evaluate_main(["--run", str(tmp_path / "unfinished")]) == 2
    assert "no model.safetensors" in capsys.readouterr().err


TINY = ["data.subset=400", "train.epochs=2", "train.batch_size=128", "model.hidden=[8]",
        "run.device=cpu", "train.log_every=1000"]


def test_interrupted_sweep_leaves_a_partial_report_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = ["--config", "configs/adult_fair_mmd.yaml", "--weights", "0,1", "--penalties", "mmd",
            "--run-dir", str(out), "--no-references", "--quiet", "--set", *TINY]
    real = sweep.train_point
    calls = []

    def interrupted(config, run_dir, resume=False):
        calls.append((run_dir.name, resume))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(config, run_dir, resume=resume)

    monkeypatch.setattr(sweep, "train_point", interrupted)
    assert cli.sweep_main(args) == 130
    partial = json.loads((out / "sweep.json").read_text())
    assert partial["pending"] == 1 and len(partial["results"]) == 1
    assert "**Partial**: 1 more point(s)" in (out / "report.md").read_text()
    monkeypatch.setattr(sweep, "train_point", real)
    assert cli.sweep_main(["--resume", str(out), "--no-references", "--quiet"]) == 0
    done = json.loads((out / "sweep.json").read_text())
    assert done["pending"] == 0 and done["results"][0] == partial["results"][0]
    assert [(r["penalty"], r["weight"]) for r in done["results"]] == [("unpenalised", 0.0),
                                                                       ("mmd", 1.0)]
    assert "Partial" not in (out / "report.md").read_text()
