"""README.md's results table against the commands it names.

    python scripts/readme_results.py                 # list every row: command, seeds, figures
    python scripts/readme_results.py --run [--row N] [--keep DIR]
                                                     # run the commands and check the figures

Each row of the table between ``<!-- results:start -->`` and ``<!-- results:end -->`` holds a
command (parts joined by ``&&``; ``RUN`` is the run directory the first part writes), its seeds
and the result text.

Seeds cell: the seed count, then the seeds in parentheses, ``(seed 0)`` or ``(seeds 0-2)``; its
first such phrase names the seeds that are run. ``in one run`` says the command runs them all
itself (the config's own seed list); otherwise the command runs once per seed with
``--set run.seed=K``. ``not bit-reproducible`` marks a row whose training draws its DP noise from
the OS (``privacy.secure_rng: true``, the default), so a re-run is a new draw.

Result cell: the headline figures are its decimal numbers outside parentheses (parenthesised text
is context). A figure followed by a bracketed pair, ``0.856 [0.853, 0.859]``, is, in a row run once
per seed, the mean over the seeds and its 95% t-interval (mean +- t(0.975, n-1) sd / sqrt(n)); in
a row run once, each of the three numbers is the run's own output (a driver's bootstrap interval).
A figure without brackets in a per-seed row is the same for every seed (an epsilon spent).

The check (``--run``; exit code 1 when a figure is not reproduced), against every number of the
run's top-level ``*.json`` and ``eval/*.json`` files (a percentage may also match a fraction),
compared at the figure's printed precision:

* bit-reproducible rows: some output equals each figure (for a mean and interval: some output's
  mean and both interval ends over the seeds, the same output for every seed);
* ``not bit-reproducible`` rows: figures without brackets as above; for a mean and interval, the
  re-run's 95% interval of the output whose re-run mean is closest to the stated mean must overlap
  the stated interval (two 95% intervals that do not overlap differ at well under the 5% level, so
  a non-overlap is evidence against the table, not noise).

``--keep DIR`` keeps the run directories (``DIR/row<N>/seed<K>`` or ``DIR/row<N>/run``) and reuses
those a previous check completed, so an interrupted check resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
DONE = "readme_results.done"  # written into a run directory when its command succeeded
NOISY = "not bit-reproducible"
ONE_RUN = "in one run"
NUMBER = r"\d+\.\d+%?"


@dataclass(frozen=True)
class Figure:
    value: str
    interval: tuple[str, str] | None = None

    def __str__(self) -> str:
        return self.value + (f" [{self.interval[0]}, {self.interval[1]}]" if self.interval else "")


@dataclass
class Row:
    number: int
    command: str
    seeds_cell: str
    result: str

    @property
    def parts(self) -> list[list[str]]:
        """The command's parts, each as argv (``python train.py ...``)."""
        return [shlex.split(part) for part in self.command.split("&&")]

    @property
    def count(self) -> int:
        """The stated seed count (the cell's first number)."""
        return int(self.seeds_cell.split()[0])

    @property
    def seeds(self) -> list[int]:
        """The seeds that are run: the cell's first ``seed K`` or ``seeds A-B``."""
        found = re.search(r"\bseeds? (\d+)(?:-(\d+))?", self.seeds_cell)
        if not found:
            raise ValueError(f"results row {self.number}: seeds cell names no 'seed K' or "
                             f"'seeds A-B': {self.seeds_cell!r}")
        first = int(found[1])
        return list(range(first, int(found[2] or first) + 1))

    @property
    def one_run(self) -> bool:
        return len(self.seeds) == 1 or ONE_RUN in self.seeds_cell

    @property
    def noisy(self) -> bool:
        return NOISY in self.seeds_cell

    @property
    def figures(self) -> list[Figure]:
        """The headline figures: decimal numbers outside parentheses, each with its interval."""
        headline = re.sub(r"\([^)]*\)", "", self.result)
        return [Figure(v, (lo, hi) if lo else None) for v, lo, hi in
                re.findall(rf"({NUMBER})(?:\s*\[(-?{NUMBER}),\s*(-?{NUMBER})\])?", headline)]

    def argv(self, part: list[str], run_dir: Path, seed: int | None) -> list[str]:
        """One part of the command as run: ``RUN`` replaced, the seed set, quiet."""
        argv = [sys.executable if a == "python" else str(run_dir) if a == "RUN" else a
                for a in part]
        if argv[1] == "train.py":
            if seed is not None:
                at = argv.index("--set") + 1 if "--set" in argv else len(argv)
                argv[at:at] = ([] if "--set" in argv else ["--set"]) + [f"run.seed={seed}"]
            argv += ["--run-dir", str(run_dir)]
        return [*argv, "--quiet"]


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


def _flatten(value, path: str, out: dict[str, float]) -> dict[str, float]:
    if isinstance(value, bool):
        return out
    if isinstance(value, (int, float)):
        out[path] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(v, f"{path}[{i}]", out)
    return out


def outputs(run_dir: Path) -> dict[str, float]:
    """Every finite number of the run's top-level and ``eval/`` JSON files, by file and key."""
    out: dict[str, float] = {}
    for name in sorted([*run_dir.glob("*.json"), *run_dir.glob("eval/*.json")]):
        _flatten(json.loads(name.read_text()), str(name.relative_to(run_dir)), out)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def matches(figure: str, value: float) -> bool:
    """``value`` printed at ``figure``'s precision is ``figure`` (a percentage: also 100x; an
    unsigned figure matches either sign, as tables print magnitudes of signed gaps)."""
    percent = figure.endswith("%")
    x = float(figure.rstrip("%"))
    tolerance = 0.5 * 10.0 ** -len(figure.rstrip("%").split(".")[1]) + 1e-12
    return any(abs((v if x < 0 else abs(v)) - x) <= tolerance
               for v in [value, *([100 * value] if percent else [])])


def reproduced(figure: str, values: list[float]) -> bool:
    return any(matches(figure, v) for v in values)


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of the mean of ``values`` (n >= 2)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def check(row: Row, runs: list[dict[str, float]]) -> list[str]:
    """The figures of ``row`` that ``runs`` (one output dict per seed, or one) do not reproduce,
    each with the closest output."""
    if row.one_run:
        (values,) = runs
        missing = []
        for f in row.figures:
            for figure in [f.value, *(f.interval or ())]:
                if not reproduced(figure, list(values.values())):
                    x = float(figure.rstrip("%"))
                    near = min(values.values(), key=lambda v: abs(abs(v) - x), default=math.nan)
                    missing.append(f"{figure} (closest output {near:.4g})")
        return missing
    keys = set.intersection(*(set(r) for r in runs))
    per_key = {k: [r[k] for r in runs] for k in sorted(keys)}
    stats_by_key = {k: interval(v) for k, v in per_key.items()}
    missing = []
    for f in row.figures:
        x = float(f.value.rstrip("%"))
        if f.interval is None:
            ok = any(all(matches(f.value, v) for v in vs) for vs in per_key.values())
            if not ok:
                missing.append(f"{f} (not the same output for every seed)")
            continue
        lo, hi = (float(e.rstrip("%")) for e in f.interval)
        scale = 100.0 if f.value.endswith("%") else 1.0
        if row.noisy:
            key = min(stats_by_key, key=lambda k: abs(abs(scale * stats_by_key[k][0]) - x),
                      default=None)
            if key is None:
                ok = False
            else:
                _, rlo, rhi = (scale * s for s in stats_by_key[key])
                ok = rlo <= hi and lo <= rhi
        else:
            key = next((k for k, (m, a, b) in stats_by_key.items()
                        if all(matches(fig, s) for fig, s in zip((f.value, *f.interval), (m, a, b))
                               )), None)
            ok = key is not None
            if not ok:
                key = min(stats_by_key, key=lambda k: abs(abs(scale * stats_by_key[k][0]) - x),
                          default=None)
        if not ok:
            near = ("no output" if key is None else
                    "closest output {}: {:.4g} [{:.4g}, {:.4g}]".format(
                        key, *(scale * s for s in stats_by_key[key])))
            missing.append(f"{f} ({near})")
    return missing


def run_row(row: Row, keep: Path) -> tuple[list[str], float]:
    """Run ``row``'s command (once, or once per seed) under ``keep``, reusing completed runs;
    return the figures not reproduced and the seconds spent."""
    began = time.perf_counter()
    plan = [(keep / f"row{row.number}" / "run", None)] if row.one_run else \
        [(keep / f"row{row.number}" / f"seed{s}", s) for s in row.seeds]
    for run_dir, seed in plan:
        if (run_dir / DONE).is_file():
            continue
        for part in row.parts:
            # the drivers' summaries go to stdout; errors (stderr) still show
            subprocess.run(row.argv(part, run_dir, seed), cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
        (run_dir / DONE).write_text(row.command + "\n")
    missing = check(row, [outputs(run_dir) for run_dir, _ in plan])
    return missing, time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the commands and compare")
    parser.add_argument("--row", type=int, action="append", help="only these rows (1-based)")
    parser.add_argument("--keep", type=Path, help="keep (and reuse) the run directories here")
    args = parser.parse_args()
    chosen = [r for r in rows() if not args.row or r.number in args.row]
    if not args.run:
        for r in chosen:
            how = "run once" if r.one_run else f"run once per seed of {r.seeds}"
            print(f"{r.number:>2}. {r.command}\n    seeds: {r.seeds_cell} -> {how}; figures: "
                  f"{', '.join(map(str, r.figures))}")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in chosen:
            missing, seconds = run_row(r, args.keep or Path(tmp))
            failed += bool(missing)
            verdict = f"NOT REPRODUCED: {', '.join(missing)}" if missing else "ok"
            print(f"{r.number:>2}. {verdict} ({seconds:.0f} s): {r.command}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
