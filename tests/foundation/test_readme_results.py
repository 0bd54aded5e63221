"""README.md's results table names commands that exist and parse, and scripts/readme_results.py's
check (run it with --run; too long for the suite) catches a figure the runs do not reproduce."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from trustml import cli
from trustml import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts/readme_results.py")
rr = importlib.util.module_from_spec(spec)
sys.modules["readme_results"] = rr  # dataclasses look their module up
spec.loader.exec_module(rr)
ROWS = rr.rows()


def test_the_table_has_rows():
    assert len(ROWS) >= 10


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"row{r.number}")
def test_row_command_parses_and_states_its_seeds(row):
    assert row.seeds_cell.split()[0].isdigit(), f"row {row.number}: seeds must start with the count"
    assert row.count >= len(row.seeds), f"row {row.number}: runs more seeds than it states"
    if not row.one_run or rr.ONE_RUN in row.seeds_cell:
        assert row.count == len(row.seeds), f"row {row.number}: count and seeds disagree"
    assert row.figures, f"row {row.number}: no headline figure to check"
    if not row.one_run:  # a mean over seeds needs its interval; a bare figure is the same for all
        assert any(f.interval for f in row.figures), f"row {row.number}: no mean [interval]"
    for f in row.figures:
        if f.interval:
            lo, hi = (float(e.rstrip("%")) for e in f.interval)
            assert lo <= float(f.value.rstrip("%")) <= hi, f"row {row.number}: {f} is not inside"
    first, *rest = row.parts
    assert first[:2] == ["python", "train.py"], f"row {row.number}: starts with train.py"
    args = cli._train_parser().parse_args(row.argv(first, Path("RUN"), row.seeds[-1])[2:])
    assert (ROOT / args.config).is_file()
    config = cfgmod.load(ROOT / args.config, args.set)  # every key and value of the row is valid
    if not row.one_run:
        assert config.run.seed == row.seeds[-1] and config.run.seeds is None
    for part in rest:
        assert part == ["python", "evaluate.py", "--run", "RUN"], f"row {row.number}: {part}"


def test_seeds_cell_and_figures_parse():
    row = rr.Row(1, "python train.py --config c.yaml --set a=1 && python evaluate.py --run RUN",
                 f"3 (seeds 0-2; DP noise from the OS, {rr.NOISY})",
                 "accuracy 0.856 [0.853, 0.859], epsilon 2.995 (seed 2: 0.1) 1.2%")
    assert (row.count, row.seeds, row.one_run, row.noisy) == (3, [0, 1, 2], False, True)
    assert [str(f) for f in row.figures] == ["0.856 [0.853, 0.859]", "2.995", "1.2%"]
    argv = row.argv(row.parts[0], Path("/r"), 2)
    assert argv[2:] == ["--config", "c.yaml", "--set", "run.seed=2", "a=1", "--run-dir", "/r",
                        "--quiet"]  # one --set: a second one would replace the first
    assert row.argv(row.parts[1], Path("/r"), 2)[2:] == ["--run", "/r", "--quiet"]
    old = rr.Row(2, "x", "4 (seed 0; seeds 1-3 in brackets)", "0.5")
    assert (old.seeds, old.one_run) == ([0], True)
    assert rr.Row(3, "x", f"3 (seeds 0-2, {rr.ONE_RUN})", "0.5").one_run
    with pytest.raises(ValueError, match="row 4"):
        _ = rr.Row(4, "x", "3 (three of them)", "0.5").seeds


def test_figures_match_at_the_printed_precision():
    assert rr.reproduced("0.856", [0.85649, 3.0])
    assert not rr.reproduced("0.856", [0.8566])
    assert rr.reproduced("1.2%", [0.0124])
    assert rr.reproduced("16.0", [15.96])


def test_the_interval_is_the_95_percent_t_interval():
    mean, lo, hi = rr.interval([0.85, 0.86, 0.87])  # sd 0.01, t(0.975, 2) = 4.3027
    assert mean == pytest.approx(0.86) and hi - mean == pytest.approx(4.302653 * 0.01 / 3 ** 0.5)
    assert lo == pytest.approx(2 * mean - hi)


def _fake_runs(tmp_path: Path, accuracies: list[float], epsilon: float) -> Path:
    """Run directories as the check finds them: completed (marker), summary + eval JSON."""
    for seed, acc in enumerate(accuracies):
        d = tmp_path / "row1" / f"seed{seed}"
        (d / "eval").mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"test_accuracy": acc, "epsilon": epsilon,
                                                    "history": [{"loss": 0.3 + seed}]}))
        (d / "eval" / "metrics.json").write_text(json.dumps({"classification": {"auc": 0.95}}))
        (d / rr.DONE).write_text("done\n")
    return tmp_path


def _row(seeds: str, result: str) -> rr.Row:
    return rr.Row(1, "python train.py --config c.yaml && python evaluate.py --run RUN", seeds,
                  result)


def test_a_reproducible_row_must_match_mean_and_interval(tmp_path):
    keep = _fake_runs(tmp_path, [0.85, 0.86, 0.87], 2.995)  # 0.860 [0.835, 0.885]
    good = _row("3 (seeds 0-2)", "accuracy 0.860 [0.835, 0.885], epsilon 2.995, AUC 0.950")
    assert rr.run_row(good, keep)[0] == []
    off = _row("3 (seeds 0-2)", "accuracy 0.861 [0.835, 0.885], epsilon 2.996, AUC 0.95")
    missing = rr.run_row(off, keep)[0]
    assert len(missing) == 2 and "0.861" in missing[0] and "test_accuracy" in missing[0]
    assert missing[1].startswith("2.996")
    seed_0_only = _row("3 (seeds 0-2)", "accuracy 0.860 [0.835, 0.885], loss 0.300")
    assert rr.run_row(seed_0_only, keep)[0] == ["0.300 (not the same output for every seed)"]


def test_a_noisy_row_needs_overlapping_intervals(tmp_path):
    keep = _fake_runs(tmp_path, [0.85, 0.86, 0.87], 2.995)  # re-run: 0.860 [0.835, 0.885]
    noisy = f"3 (seeds 0-2; {rr.NOISY})"
    assert rr.run_row(_row(noisy, "accuracy 0.880 [0.870, 0.890], 2.995"), keep)[0] == []
    assert rr.run_row(_row("3 (seeds 0-2)", "accuracy 0.880 [0.870, 0.890]"), keep)[0]
    apart = rr.run_row(_row(noisy, "accuracy 0.900 [0.890, 0.910], 2.995"), keep)[0]
    assert len(apart) == 1 and "0.900 [0.890, 0.910]" in apart[0]


def test_a_single_run_row_matches_each_number(tmp_path):
    d = tmp_path / "row1" / "run"
    d.mkdir(parents=True)
    (d / "report.json").write_text(json.dumps({"gap": 0.61, "ci": [0.05, 1.64], "bad": "x"}))
    (d / rr.DONE).write_text("done\n")
    row = _row("3 (seeds 0-2, in one run)", "teacher 0.61 [0.05, 1.64] (context 9.99)")
    assert rr.run_row(row, tmp_path)[0] == []
    assert rr.run_row(_row("1 (seed 0)", "teacher 0.61 [0.05, 1.65]"), tmp_path)[0] == [
        "1.65 (closest output 1.64)"]


def test_a_malformed_row_is_refused():
    text = f"{rr.START}\n| a | b | c |\n|---|---|---|\n| no backticks | 1 | 0.5 |\n{rr.END}"
    with pytest.raises(ValueError, match="row 1"):
        rr.rows(text)
