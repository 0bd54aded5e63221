"""README.md's results table against the commands it names.

    python scripts/readme_results.py                 # list every row: command, seeds, figures
    python scripts/readme_results.py --run [--row N] # run the commands and check the figures

Each row of the table between ``<!-- results:start -->`` and ``<!-- results:end -->`` holds a
command (parts joined by ``&&``; ``RUN`` is the run directory the first part writes), its seed count
and the result text. The headline figures are the decimal numbers of the result text outside
brackets (bracketed figures come from other seeds or are context); with ``--run`` each must equal,
at its printed precision, some number in the run's ``summary.json`` or ``eval/metrics.json`` (a
percentage may also match a fraction). Exit code 1 when a figure is not reproduced.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SCRIPTS = {"train.py", "evaluate.py"}


@dataclass
class Row:
    number: int
    command: str
    seeds: str
    result: str

    @property
    def parts(self) -> list[list[str]]:
        """The command's parts, each as argv (``python train.py ...``)."""
        return [shlex.split(part) for part in self.command.split("&&")]

    @property
    def figures(self) -> list[str]:
        """The headline figures: decimal numbers of the result outside brackets."""
        headline = re.sub(r"\([^)]*\)", "", self.result)
        return re.findall(r"\d+\.\d+%?", headline)


def rows(text: str | None = None) -> list[Row]:
    text = README.read_text() if text is None else text
    table = text[text.index(START) + len(START): text.index(END)].strip().splitlines()
    out = []
    for number, line in enumerate(table[2:], start=1):  # after the header and its rule
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not (cells[0].startswith("`") and cells[0].endswith("`")):
            raise ValueError(f"results row {number}: expected | `command` | seeds | result |")
        out.append(Row(number, cells[0].strip("`"), cells[1], cells[2]))
    return out


def _numbers(value, out: list[float]) -> list[float]:
    if isinstance(value, bool):
        return out
    if isinstance(value, (int, float)):
        out.append(float(value))
    elif isinstance(value, dict):
        for v in value.values():
            _numbers(v, out)
    elif isinstance(value, list):
        for v in value:
            _numbers(v, out)
    return out


def reproduced(figure: str, values: list[float]) -> bool:
    percent = figure.endswith("%")
    x = float(figure.rstrip("%"))
    tolerance = 0.5 * 10.0 ** -len(figure.rstrip("%").split(".")[1]) + 1e-12
    candidates = values + ([100 * v for v in values] if percent else [])
    return any(abs(abs(v) - x) <= tolerance for v in candidates)


def run_row(row: Row, run_dir: Path) -> tuple[list[str], float]:
    """Run ``row``'s command into ``run_dir``; return the figures not reproduced and seconds."""
    began = time.perf_counter()
    for argv in row.parts:
        argv = [sys.executable if a == "python" else a for a in argv]
        argv = [str(run_dir) if a == "RUN" else a for a in argv]
        if argv[1] == "train.py":
            argv += ["--run-dir", str(run_dir)]
        subprocess.run([*argv, "--quiet"], cwd=ROOT, check=True)
    values: list[float] = []
    for name in ("summary.json", "eval/metrics.json"):
        if (run_dir / name).is_file():
            _numbers(json.loads((run_dir / name).read_text()), values)
    missing = []
    for figure in row.figures:
        if not reproduced(figure, values):
            x = float(figure.rstrip("%"))
            near = min(values, key=lambda v: abs(abs(v) - x), default=float("nan"))
            missing.append(f"{figure} (closest output {near:.4g})")
    return missing, time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the commands and compare")
    parser.add_argument("--row", type=int, action="append", help="only these rows (1-based)")
    args = parser.parse_args()
    chosen = [r for r in rows() if not args.row or r.number in args.row]
    if not args.run:
        for r in chosen:
            print(f"{r.number:>2}. {r.command}\n    seeds: {r.seeds}; figures: "
                  f"{', '.join(r.figures)}")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in chosen:
            missing, seconds = run_row(r, Path(tmp) / f"row{r.number}")
            failed += bool(missing)
            verdict = f"NOT REPRODUCED: {', '.join(missing)}" if missing else "ok"
            print(f"{r.number:>2}. {verdict} ({seconds:.0f} s): {r.command}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
