"""Fault injection: every bad input, broken file, shared run directory, diverging run and stalled
rank ends in one clear stderr line and a nonzero exit (2 for the user's input), never a traceback,
a hang or a silently wrong result. Runs the real CLI entry points in-process on a 300-row Adult
copy, so the whole file stays fast on a CPU. The README's "Reliability" section counts these cases.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trustml import cli
from trustml.data.tabular import FILES

ROOT = Path(__file__).resolve().parents[2]
ADULT = str(ROOT / "configs" / "adult.yaml")


def _rows(name: str, n: int) -> list[str]:
    import gzip

    with gzip.open(FILES / f"{name}.gz", "rt") as handle:
        lines = [line.rstrip("\n") for line in handle if line.strip() and not line.startswith("|")]
    return lines[:n]


@pytest.fixture(scope="module")
def adult_rows() -> dict[str, list[str]]:
    return {"adult.data": _rows("adult.data", 300), "adult.test": _rows("adult.test", 150)}


@pytest.fixture
def adult_dir(tmp_path, adult_rows) -> Path:
    folder = tmp_path / "adult"
    folder.mkdir()
    for name, rows in adult_rows.items():
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder


def tiny(adult_dir: Path, *extra: str) -> list[str]:
    return ["--quiet", "--set", f"data.path={adult_dir}", "train.epochs=1", "train.batch_size=64",
            "run.device=cpu", "model.hidden=[8]", *extra]


def one_line_error(capsys, code: int, *needles: str, expected: int = 2) -> str:
    """The CLI's exit code and single stderr line (warnings aside), which names every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert code == expected, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- config values and --set overrides --------------------------------------------------------

CONFIG_CASES = {
    "set_not_yaml_list": (["train.epochs=[1"], "train.epochs=[1"),
    "set_not_yaml_map": (["model.config={n_layer: 2"], "model.config"),
    "set_not_yaml_quote": (["run.name='open"], "run.name"),
    "seed_negative": (["run.seed=-1"], "run.seed"),
    "seed_2_pow_70": ([f"run.seed={2**70}"], "run.seed"),
    "hidden_empty": (["model.hidden=[]"], "model.hidden"),
    "hidden_negative": (["model.hidden=[-1]"], "model.hidden"),
    "hidden_zero": (["model.hidden=[0]"], "model.hidden"),
    "hidden_zero_inside": (["model.hidden=[16, 0, 8]"], "model.hidden"),
    "fpr_zero": (["attack.fpr=[0.0]"], "attack.fpr"),
    "fpr_one": (["attack.fpr=[0.01, 1.0]"], "attack.fpr"),
    "fpr_negative": (["attack.fpr=[-0.1]"], "attack.fpr"),
    "fpr_above_one": (["attack.fpr=[1.5]"], "attack.fpr"),
    "dp_zero_epochs": (["privacy.enabled=true", "privacy.noise_multiplier=1.0", "train.epochs=0"],
                       "train.epochs=0"),
    "dist_timeout_zero": (["run.dist_timeout_s=0"], "run.dist_timeout_s"),
    "lr_beyond_float32": (["train.lr=1e200"], "train.lr"),
    "lr_zero": (["train.lr=0"], "train.lr"),
    "text_errors_unknown": (["data.text_errors=ignore"], "data.text_errors"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_value_is_one_line(case, tmp_path, capsys):
    overrides, needle = CONFIG_CASES[case]
    code = cli.train_main(["--config", ADULT, "--run-dir", str(tmp_path / "run"), "--quiet",
                           "--set", *overrides])
    one_line_error(capsys, code, needle)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_config_path_that_is_a_directory(tmp_path, capsys):
    one_line_error(capsys, cli.train_main(["--config", str(tmp_path)]), "is a directory")


# --- tabular data files -----------------------------------------------------------------------

def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.split(",")]


def _set_cell(rows: list[str], k: int, column: int, value: str) -> None:
    cells = _cells(rows[k])
    cells[column] = value
    rows[k] = ", ".join(cells)


def _edit(kind: str, rows: dict[str, list[str]]) -> None:
    """Break the copied Adult files the way ``kind`` says (row 5 = line 5 of the file)."""
    train, test = rows["adult.data"], rows["adult.test"]
    if kind == "nan_cell":
        _set_cell(train, 4, 0, "nan")
    elif kind == "inf_cell":
        _set_cell(train, 4, 2, "inf")
    elif kind == "minus_inf_cell":
        _set_cell(train, 4, 10, "-Infinity")
    elif kind == "non_numeric_cell":
        _set_cell(train, 4, 12, "forty")
    elif kind == "missing_numeric":
        _set_cell(train, 4, 0, "?")
    elif kind == "empty_cell":
        _set_cell(train, 4, 1, "")
    elif kind == "label_lowercase":
        _set_cell(train, 4, 14, ">50k")
    elif kind == "label_unknown_test":
        _set_cell(test, 4, 14, "maybe.")
    elif kind == "nan_test_row":
        _set_cell(test, 4, 0, "NaN")
    elif kind == "header_row":
        train.insert(0, "age, workclass, fnlwgt, education, education-num, marital-status, "
                        "occupation, relationship, race, sex, capital-gain, capital-loss, "
                        "hours-per-week, native-country, income")
    elif kind == "short_row":
        train[4] = ", ".join(_cells(train[4])[:10])
    elif kind == "empty_train":
        train.clear()
    elif kind == "empty_test":
        test.clear()
    elif kind == "unseen_group":
        _set_cell(test, 4, 9, "Nonbinary")
    else:
        raise AssertionError(kind)


DATA_CASES = {  # kind -> (file, line, column named in the error)
    "nan_cell": ("adult.data", "line 5", "'age'"),
    "inf_cell": ("adult.data", "line 5", "'fnlwgt'"),
    "minus_inf_cell": ("adult.data", "line 5", "'capital-gain'"),
    "non_numeric_cell": ("adult.data", "line 5", "'hours-per-week'"),
    "missing_numeric": ("adult.data", "line 5", "'age'"),
    "empty_cell": ("adult.data", "line 5", "'workclass'"),
    "label_lowercase": ("adult.data", "line 5", "'income'"),
    "label_unknown_test": ("adult.test", "line 5", "'income'"),
    "nan_test_row": ("adult.test", "line 5", "'age'"),
    "header_row": ("adult.data", "line 1", "header row"),
    "short_row": ("adult.data", "line 5", "expected 15 fields"),
    "empty_train": ("adult.data", "no data rows", ""),
    "empty_test": ("adult.test", "no data rows", ""),
    "unseen_group": ("adult.test", "line 5", "'Nonbinary' never appears in training"),
}


@pytest.mark.parametrize("kind", sorted(DATA_CASES))
def test_bad_data_file_is_one_line(kind, adult_dir, adult_rows, tmp_path, capsys):
    rows = {name: list(lines) for name, lines in adult_rows.items()}
    _edit(kind, rows)
    for name, lines in rows.items():
        (adult_dir / name).write_text("\n".join(lines) + ("\n" if lines else ""))
    code = cli.train_main(["--config", ADULT, "--run-dir", str(tmp_path / "run"),
                           *tiny(adult_dir)])
    name, *needles = DATA_CASES[kind]
    one_line_error(capsys, code, str(adult_dir / name), *needles)


def test_bad_rows_dropped_only_when_asked_and_counted(adult_dir, adult_rows, tmp_path, capsys):
    rows = {name: list(lines) for name, lines in adult_rows.items()}
    for kind in ("nan_cell", "label_unknown_test"):
        _edit(kind, rows)
    _set_cell(rows["adult.data"], 7, 2, "inf")
    _set_cell(rows["adult.test"], 9, 9, "Nonbinary")  # a group training never saw
    for name, lines in rows.items():
        (adult_dir / name).write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    assert cli.train_main(["--config", ADULT, "--run-dir", str(run_dir),
                           *tiny(adult_dir, "data.drop_bad_rows=true")]) == 0, capsys.readouterr()
    summary = json.loads((run_dir / "summary.json").read_text())
    dropped = summary["data"]["dropped_bad_rows"]
    assert dropped == {str(adult_dir / "adult.data"): 2, str(adult_dir / "adult.test"): 2}
    assert summary["data"]["rows_train_file"] == 298 and summary["data"]["rows_test_file"] == 148


@pytest.mark.parametrize("code", ["A99", ""])
def test_german_unknown_group_code(code, tmp_path, capsys):
    """German credit's sex comes from the personal-status code: an undefined code has no group."""
    import gzip

    with gzip.open(FILES / "german.data.gz", "rt") as handle:
        rows = handle.read().splitlines()[:100]
    cells = rows[6].split(" ")
    cells[8] = code or "?"
    rows[6] = " ".join(cells)
    (tmp_path / "german.data").write_text("\n".join(rows) + "\n")
    result = cli.train_main(["--config", str(ROOT / "configs" / "german.yaml"), "--run-dir",
                             str(tmp_path / "run"), "--quiet", "--set", f"data.path={tmp_path}",
                             "run.device=cpu"])
    one_line_error(capsys, result, str(tmp_path / "german.data"), "line 7", "'personal-status'")


def test_non_utf8_adult_file_names_the_byte(adult_dir, tmp_path, capsys):
    data = (adult_dir / "adult.data").read_bytes()
    cut = data.index(b"Private")
    (adult_dir / "adult.data").write_bytes(data[:cut] + b"\xff\xfe" + data[cut:])
    code = cli.train_main(["--config", ADULT, "--run-dir", str(tmp_path / "r"), *tiny(adult_dir)])
    one_line_error(capsys, code, "adult.data", f"byte {cut}")


def test_data_path_that_is_a_file(adult_dir, tmp_path, capsys):
    code = cli.train_main(["--config", ADULT, "--run-dir", str(tmp_path / "r"),
                           *tiny(adult_dir / "adult.data")])
    one_line_error(capsys, code, "data.path", "is a file, not a folder")


# --- text files -------------------------------------------------------------------------------

TEXT = ["--config", str(ROOT / "configs" / "gpt2_dp.yaml"), "--quiet", "--set",
        "privacy.enabled=false", "data.dataset=text", "run.device=cpu"]


@pytest.mark.parametrize("case", ["not_utf8", "directory", "empty", "missing"])
def test_bad_text_path_is_one_line(case, tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    if case == "not_utf8":
        raw = "The nurse said hello.\nThe café".encode("latin-1") + b"\n"
        path.write_bytes(raw)
        needles = (f"byte {raw.index(bytes([0xE9]))}", "data.text_errors=replace")
    elif case == "directory":
        path.mkdir()
        needles = ("is a directory",)
    elif case == "empty":
        path.write_text("\n  \n")
        needles = ("is empty",)
    else:
        needles = ("does not exist",)
    code = cli.train_main([*TEXT, f"data.text_path={path}", "--run-dir", str(tmp_path / "run")])
    one_line_error(capsys, code, "data.text_path", str(path), *needles)


def test_text_replace_counts_replacements(tmp_path, gpt2):
    from trustml.config import DataConfig
    from trustml.data.text import lm_datasets

    path = tmp_path / "corpus.txt"
    lines = [f"Line {i}: the nurse said that she was tired." for i in range(20)]
    raw = "\n".join(lines).encode("utf-8")
    raw = raw.replace(b"nurse", b"nur\xe9e", 3).replace("tired".encode(), "ti\u00e9red".encode())
    path.write_bytes(raw)
    cfg = DataConfig(dataset="text", text_path=str(path), text_errors="replace", seq_len=16)
    train, _ = lm_datasets(cfg, gpt2)
    assert train.meta["text_replacements"] == 3  # the 3 lone latin-1 bytes; valid UTF-8 é kept


# --- run directories: locks, read-only and full disks -------------------------------------------

HOLDER = ("import sys, time; from trustml.training import rundir; rundir.claim(sys.argv[1]); "
          "print('held', flush=True); time.sleep(120)")


def _hold(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("mode", ["run_dir", "resume", "evaluate"])
def test_second_run_into_live_run_dir_is_refused(mode, adult_dir, tmp_path, capsys):
    """Another process holds the run directory: training into it, resuming it or evaluating it
    (which writes eval/ and reads weights still being written) is refused."""
    run_dir = tmp_path / "run"
    if mode != "run_dir":  # a finished run, then a live process holding it
        assert cli.train_main(["--config", ADULT, "--run-dir", str(run_dir), *tiny(adult_dir)]) == 0
    holder = _hold(run_dir)
    try:
        before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}
        capsys.readouterr()
        if mode == "evaluate":
            code = cli.evaluate_main(["--run", str(run_dir), "--device", "cpu"])
        else:
            code = cli.train_main(["--resume", str(run_dir), "--quiet"]
                                  if mode == "resume" else
                                  ["--config", ADULT, "--run-dir", str(run_dir), *tiny(adult_dir)])
        one_line_error(capsys, code, "in use by a live run", f"PID {holder.pid}",
                       socket.gethostname())
        after = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}
        assert after == before  # no file written or touched
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_run_is_cleared(adult_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert cli.train_main(["--config", ADULT, "--run-dir", str(run_dir), *tiny(adult_dir)]) == 0
    err = capsys.readouterr().err
    assert f"cleared the stale lock of PID {holder.pid}" in err
    assert (run_dir / "run.lock").read_text() == ""  # released at the end


def test_lock_from_another_host_says_how_to_clear_it(adult_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lock").write_text(json.dumps({"pid": 4242, "host": "elsewhere.example",
                                                  "started": "2026-01-01T00:00:00+00:00"}))
    code = cli.train_main(["--config", ADULT, "--run-dir", str(run_dir), *tiny(adult_dir)])
    one_line_error(capsys, code, "PID 4242", "elsewhere.example", f"remove '{run_dir}/run.lock'")


def _read_only(folder: Path) -> bool:
    """Make ``folder`` unwritable even for root (chattr +i) where chmod is not enough."""
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return True
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("mode", ["new_run", "resume"])
def test_read_only_run_dir(mode, finished_run, adult_dir, tmp_path, capsys):
    """A new run under a read-only folder, or a resume of a run whose folder became read-only."""
    if mode == "new_run":
        folder = tmp_path / "ro"
        folder.mkdir()
        args = ["--config", ADULT, "--run-dir", str(folder / "run"), *tiny(adult_dir)]
        needles = ("not writable", str(folder / "run"))
    else:
        folder = _copy(finished_run, tmp_path)
        args = ["--resume", str(folder), "--quiet", "--set", "train.epochs=2"]
        needles = (str(folder),)
    if not _read_only(folder):
        pytest.skip("cannot make a read-only folder here")
    try:
        one_line_error(capsys, cli.train_main(args), *needles)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


@pytest.mark.parametrize("where", ["config", "checkpoint", "weights", "summary"])
def test_full_disk_is_one_line(where, adult_dir, tmp_path, capsys, monkeypatch):
    from trustml import runner as run
    from trustml.training import loop

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / where))

    if where == "config":
        monkeypatch.setattr(run.cfgmod, "save", full)
    elif where == "checkpoint":
        monkeypatch.setattr(loop, "save_state", full)
    elif where == "weights":
        monkeypatch.setattr(run, "save_model", full)
    else:
        monkeypatch.setattr(run, "finite_json", full)
    code = cli.train_main(["--config", ADULT, "--run-dir", str(tmp_path / "run"),
                           *tiny(adult_dir)])
    one_line_error(capsys, code, "No space left on device", str(tmp_path / "run" / where))


# --- degenerate settings ----------------------------------------------------------------------

@pytest.mark.parametrize("lr", ["1e30", "1e20"])
def test_diverging_run_stops_with_one_line(lr, adult_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli.train_main(["--config", ADULT, "--run-dir", str(run_dir),
                           *tiny(adult_dir, f"train.lr={lr}", "train.optimizer=sgd")])
    one_line_error(capsys, code, "training stopped at step", "train.lr")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "diverged"
    assert not (run_dir / "summary.json").exists()  # no result that looks finished


def test_val_fraction_zero_warns_and_writes_strict_json(adult_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.train_main(["--config", ADULT, "--run-dir", str(run_dir),
                           *tiny(adult_dir, "data.val_fraction=0")]) == 0

    def refuse(token):
        raise AssertionError(f"summary.json holds {token}")

    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=refuse)
    assert not any(k.startswith("val_") for k in summary)
    assert any("val_fraction=0" in w for w in summary["warnings"])
    assert cli.evaluate_main(["--run", str(run_dir), "--device", "cpu"]) == 0
    assert "val_fraction=0" in (run_dir / "eval" / "report.md").read_text()
    capsys.readouterr()
    code = cli.evaluate_main(["--run", str(run_dir), "--device", "cpu", "--attacks", "rmia"])
    one_line_error(capsys, code, "attack rmia", "data.val_fraction=0")


# --- evaluate and resume on broken run directories ----------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, adult_rows) -> Path:
    base = tmp_path_factory.mktemp("finished")
    folder = base / "adult"
    folder.mkdir()
    for name, rows in adult_rows.items():
        (folder / name).write_text("\n".join(rows) + "\n")
    run_dir = base / "run"
    assert cli.train_main(["--config", ADULT, "--run-dir", str(run_dir), *tiny(folder)]) == 0
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "copy")
    return tmp_path / "copy"


def _break_run(kind: str, run_dir: Path) -> tuple[str, ...]:
    if kind == "weights_other_shape":
        text = (run_dir / "config.yaml").read_text().replace("- 8\n", "- 12\n")
        (run_dir / "config.yaml").write_text(text)
        return "model.safetensors", "do not fit"
    if kind == "summary_not_json":
        (run_dir / "summary.json").write_text('{"steps": 5, "test_acc')
        return "summary.json", "not valid JSON"
    if kind == "summary_not_object":
        (run_dir / "summary.json").write_text("[1, 2]")
        return "summary.json", "expected a JSON object"
    if kind == "weights_not_safetensors":
        (run_dir / "model.safetensors").write_bytes(b"\x80\x04pickle")
        return "model.safetensors", "unreadable"
    if kind == "no_config":
        (run_dir / "config.yaml").unlink()
        return "not a run directory",
    if kind == "config_bad_value":
        text = (run_dir / "config.yaml").read_text().replace("seed: 0", "seed: -3")
        (run_dir / "config.yaml").write_text(text)
        return "run.seed",
    raise AssertionError(kind)


EVAL_CASES = ["weights_other_shape", "summary_not_json", "summary_not_object",
              "weights_not_safetensors", "no_config", "config_bad_value"]


@pytest.mark.parametrize("kind", EVAL_CASES)
def test_evaluate_broken_run_is_one_line(kind, finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    needles = _break_run(kind, run_dir)
    code = cli.evaluate_main(["--run", str(run_dir), "--device", "cpu"])
    one_line_error(capsys, code, *needles)


CHECKPOINT_CASES = {  # state.json edits -> what the error names
    "epoch_string": (lambda s: s["state"].update(epoch="one"), "checkpoint"),
    "step_list": (lambda s: s["state"].update(step=[3]), "checkpoint"),
    "history_number": (lambda s: s["state"].update(history=7), "checkpoint"),
    "state_not_dict": (lambda s: s.update(state=[1, 2]), "checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_CASES))
def test_resume_from_checkpoint_json_of_wrong_types(kind, finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    path = run_dir / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    edit, needle = CHECKPOINT_CASES[kind]
    edit(state)
    path.write_text(json.dumps(state))
    code = cli.train_main(["--resume", str(run_dir), "--quiet", "--set", "train.epochs=2"])
    one_line_error(capsys, code, needle)


# --- a stalled torchrun rank -----------------------------------------------------------------

def test_stopped_rank_ends_the_other_with_one_line(tmp_path):
    """2 gloo ranks all-reduce in a loop; rank 1 is SIGSTOPped. Rank 0 must end with the CLI's
    one line soon after the 3 s process-group timeout instead of waiting forever."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TRUSTML_DIST_TIMEOUT_S": "3"}
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "distributed" / "peer_stall.py"), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert procs[0].returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "a peer rank stopped answering" in lines[0], err
    assert "run.dist_timeout_s=3 s" in lines[0]
    assert 3 <= waited < 60
