"""README.md's results table names commands that exist and parse (scripts/readme_results.py runs
them and checks the figures; too long for the suite)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from trustml import cli
from trustml import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts/readme_results.py")
readme_results = importlib.util.module_from_spec(spec)
sys.modules["readme_results"] = readme_results  # dataclasses look their module up
spec.loader.exec_module(readme_results)
ROWS = readme_results.rows()


def test_the_table_has_rows():
    assert len(ROWS) >= 10


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"row{r.number}")
def test_row_command_parses_and_states_its_seeds(row):
    assert row.seeds.split()[0].isdigit(), f"row {row.number}: seeds must start with the count"
    assert row.figures, f"row {row.number}: no headline figure to check"
    first, *rest = row.parts
    assert first[:2] == ["python", "train.py"], f"row {row.number}: starts with train.py"
    args = cli._train_parser().parse_args(first[2:])
    assert (ROOT / args.config).is_file()
    cfgmod.load(ROOT / args.config, args.set)  # every key and value of the row is valid
    for part in rest:
        assert part == ["python", "evaluate.py", "--run", "RUN"], f"row {row.number}: {part}"


def test_figures_match_at_the_printed_precision():
    assert readme_results.reproduced("0.856", [0.85649, 3.0])
    assert not readme_results.reproduced("0.856", [0.8566])
    assert readme_results.reproduced("1.2%", [0.0124])
    assert readme_results.reproduced("16.0", [15.96])
    assert readme_results.Row(1, "x", "1", "a 0.1 (b 0.2) c 0.30").figures == ["0.1", "0.30"]


def test_a_malformed_row_is_refused():
    text = f"{readme_results.START}\n| a | b | c |\n|---|---|---|\n| no backticks | 1 | 0.5 |\n" \
           f"{readme_results.END}"
    with pytest.raises(ValueError, match="row 1"):
        readme_results.rows(text)
