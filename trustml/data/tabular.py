"""UCI Adult and German credit as tensors with a sensitive attribute for every sample.

The original UCI files ship gzipped inside the package (``trustml/data/files``), so default runs
need no network; ``data.path`` points at a user's own copy (folder with the same file names,
gzipped or not) and ``data.path: hf:<dataset>`` loads a Hugging Face copy of Adult where the
network exists. One-hot encoding and standardisation are fitted on the training rows only; Adult's missing
values ('?') are kept as a category of their own, so the row counts match the UCI files.

Every cell is validated at load: a NaN, inf or non-numeric number, an empty cell, an unknown label, a
header row, an empty file or a test-time group that training never saw is one ConfigError naming the
file, line and column, because any of them would otherwise train (or score) silently wrong numbers.
``data.drop_bad_rows`` drops such rows instead and reports how many in the run's summary.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from trustml.config import ConfigError, DataConfig

FILES = Path(__file__).parent / "files"

ADULT_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week",
    "native-country", "income",
]
ADULT_NUMERIC = {"age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"}

GERMAN_COLUMNS = [
    "checking", "duration", "history", "purpose", "amount", "savings", "employment",
    "installment-rate", "personal-status", "debtors", "residence-since", "property", "age",
    "installment-plans", "housing", "existing-credits", "job", "liable", "telephone", "foreign",
    "credit",
]
GERMAN_NUMERIC = {"duration", "amount", "installment-rate", "residence-since", "age",
                  "existing-credits", "liable"}
GERMAN_SEX = {"A91": "male", "A92": "female", "A93": "male", "A94": "male", "A95": "female"}

# Targets: how a raw table gives the binary label, and which column it consumes (dropped from x).
TARGETS = {
    "adult": {
        "income": ("income", lambda v: v.rstrip(".") == ">50K"),
        "hours": ("hours-per-week", lambda v: float(v) > 40),
    },
    "german": {"credit": ("credit", lambda v: v == "1")},
}
# The values a label column may hold (anything else, e.g. '>50k' or 'maybe.', is a bad cell).
LABELS = {"income": {"<=50K", ">50K", "<=50K.", ">50K."}, "credit": {"1", "2"}}
SENSITIVE = {
    "adult": {
        "sex": ("sex", lambda v: v),
        "race": ("race", lambda v: v),
        "race_binary": ("race", lambda v: "White" if v == "White" else "non-White"),
        "age": ("age", lambda v: ">=40" if float(v) >= 40 else "<40"),
    },
    "german": {
        "sex": ("personal-status", lambda v: GERMAN_SEX[v]),
        "age": ("age", lambda v: ">25" if float(v) > 25 else "<=25"),
    },
}


class TabularSplit(Dataset):
    """Features ``x``, labels ``y``, sensitive groups ``s``; items are dicts of tensors."""

    def __init__(self, x: np.ndarray, y: np.ndarray, s: np.ndarray,
                 raw: dict[str, np.ndarray]) -> None:
        self.x = torch.as_tensor(x, dtype=torch.float32)
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.s = torch.as_tensor(s, dtype=torch.long)
        self.raw = raw  # the untransformed numeric columns, for derived targets

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "s": self.s[i]}

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """A whole batch in one indexing op per field (samplers prefer this to per-row items)."""
        return {"x": self.x[index], "y": self.y[index], "s": self.s[index]}

    def subset(self, index: np.ndarray | torch.Tensor) -> "TabularSplit":
        index = np.asarray(index)
        raw = {k: v[index] for k, v in self.raw.items()}
        return TabularSplit(self.x[index].numpy(), self.y[index].numpy(),
                            self.s[index].numpy(), raw)


@dataclass
class TabularData:
    train: TabularSplit
    val: TabularSplit
    test: TabularSplit
    feature_names: list[str]
    group_names: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return self.train.x.shape[1]


@dataclass
class Table:
    """Rows of one source with where each came from (file line, or hub row), for error messages."""

    source: str
    rows: list[list[str]]
    lines: list[int]

    def where(self, k: int) -> str:
        return f"data file {self.source!r} line {self.lines[k]}"

    def keep(self, index: list[int], dropped: dict[str, int] | None = None) -> "Table":
        """The rows ``index``; rows left out are counted in ``dropped`` (by source) when given."""
        if dropped is not None:
            dropped[self.source] = dropped.get(self.source, 0) + len(self.rows) - len(index)
        return Table(self.source, [self.rows[k] for k in index], [self.lines[k] for k in index])


def _open(path: Path) -> Table:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = " of the decompressed text" if path.suffix == ".gz" else ""
        raise ConfigError(f"data file {str(path)!r}: byte {err.start}{where} is not UTF-8 "
                          f"({data[err.start:err.start + 4]!r})") from None
    except (OSError, EOFError) as err:  # e.g. a truncated or fake .gz
        raise ConfigError(f"data file {str(path)!r} is unreadable: {err}") from None
    delimiter = "," if "," in text[:1000] else " "
    rows, lines = [], []
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True)
    for row in reader:
        if row and not row[0].startswith("|") and any(v.strip() for v in row):
            rows.append([v.strip() for v in row])
            lines.append(reader.line_num)
    if not rows:
        raise ConfigError(f"data file {str(path)!r} has no data rows (empty file)")
    return Table(str(path), rows, lines)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"data.path: expected {stem} or {stem}.gz in {str(folder)!r}")


def _cell_problem(value: str, column: str, numeric: set[str]) -> str | None:
    """Why ``value`` cannot be a cell of ``column``, or None when it can."""
    if value == "":
        return "expected a value, got an empty cell"
    if column in LABELS and value not in LABELS[column]:
        return f"expected a label in {sorted(LABELS[column])}, got {value!r}"
    if column in numeric:
        try:
            number = float(value)
        except ValueError:
            return f"expected a number, got {value!r}"
        if not math.isfinite(number):
            return f"expected a finite number, got {value!r}"
    return None


def _validate(table: Table, columns: list[str], numeric: set[str],
              dropped: dict[str, int] | None) -> Table:
    """Check field counts and every cell (see the module doc). Bad rows are an error, or, when
    ``dropped`` is given (``data.drop_bad_rows``), left out and counted there."""
    header = {c.lower() for c in columns}
    good = []
    for k, row in enumerate(table.rows):
        if sum(v.lower() in header for v in row[:3]) >= 2:  # 'age,workclass,...' or similar
            problem = "is a header row (the UCI files have none): remove it"
        elif len(row) != len(columns):
            problem = f"expected {len(columns)} fields, got {len(row)}"
        else:
            problem = next((f"column {c!r} ({i + 1}): {why}" for i, (c, v) in
                            enumerate(zip(columns, row))
                            if (why := _cell_problem(v, c, numeric)) is not None), None)
        if problem is None:
            good.append(k)
        elif dropped is None:
            raise ConfigError(f"{table.where(k)}: {problem} (data.drop_bad_rows=true drops such "
                              "rows)")
    return _kept(table, good, dropped)


def _kept(table: Table, good: list[int], dropped: dict[str, int] | None) -> Table:
    if not good:
        raise ConfigError(f"data file {table.source!r}: no valid data row left")
    return table.keep(good, dropped) if len(good) < len(table.rows) else table


def _groups(table: Table, column: str, index: int, to_group: Callable[[str], str],
            known: list[str] | None, dropped: dict[str, int] | None) -> tuple[Table, list[str]]:
    """Each row's sensitive group; a code with no group, or (``known`` given: at test time) a group
    that training never saw, is a bad row: no model output can be reported for it."""
    groups, good = [], []
    for k, row in enumerate(table.rows):
        try:
            group = to_group(row[index])
        except (KeyError, ValueError):
            problem = f"{row[index]!r} is no {column} code this dataset defines"
        else:
            problem = (None if known is None or group in known else
                       f"group {group!r} never appears in training (training groups: {known})")
        if problem is None:
            groups.append(group)
            good.append(k)
        elif dropped is None:
            raise ConfigError(f"{table.where(k)} column {column!r}: {problem} "
                              "(data.drop_bad_rows=true drops such rows)")
    return _kept(table, good, dropped), groups


def _adult_from_hub(name: str, revision: str | None) -> tuple[Table, Table | None]:
    """Rows in UCI column order from a Hugging Face copy of Adult (needs the network)."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, revision=revision)
    except (OSError, ValueError, ConnectionError) as err:  # offline, unknown name
        raise ConfigError(f"data.path: could not load {name!r} from the Hugging Face hub "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None

    def table(split: str) -> Table:
        data = loaded[split]
        names = {c.replace(".", "-").replace("_", "-").lower(): c for c in data.column_names}
        missing = [c for c in ADULT_COLUMNS if c not in names]
        if missing:
            raise ConfigError(f"data.path: hub dataset {name!r} lacks Adult columns {missing}")
        rows = [[str(r[names[c]]).strip() for c in ADULT_COLUMNS] for r in data]
        return Table(f"hf:{name}[{split}]", rows, list(range(1, len(rows) + 1)))

    return table("train"), table("test") if "test" in loaded else None


def _read_raw(cfg: DataConfig) -> tuple[Table, Table | None]:
    if cfg.path and cfg.path.startswith("hf:"):
        if cfg.dataset != "adult":
            raise ConfigError("data.path: the hf: route is available for dataset 'adult' only")
        return _adult_from_hub(cfg.path[3:], cfg.revision)
    folder = Path(cfg.path) if cfg.path else FILES
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file, not a folder"
        raise ConfigError(f"data.path: {str(folder)!r} {what} (expected the folder of the UCI files)")
    if cfg.dataset == "adult":
        return _open(_find(folder, "adult.data")), _open(_find(folder, "adult.test"))
    return _open(_find(folder, "german.data")), None


class _Encoder:
    """One-hot for categorical columns, z-score for numeric ones, fitted on training rows."""

    def __init__(self, columns: list[str], numeric: set[str], rows: list[list[str]]) -> None:
        self.columns, self.numeric = columns, numeric
        self.levels = {c: sorted({r[i] for r in rows}) for i, c in enumerate(columns)
                       if c not in numeric}
        num = self._numeric(rows)
        self.mean, self.std = num.mean(0), num.std(0) + 1e-8

    def _numeric(self, rows: list[list[str]]) -> np.ndarray:
        idx = [i for i, c in enumerate(self.columns) if c in self.numeric]
        return np.array([[float(r[i]) for i in idx] for r in rows], dtype=np.float64)

    @property
    def names(self) -> list[str]:
        num = [c for c in self.columns if c in self.numeric]
        cat = [f"{c}={v}" for c, levels in self.levels.items() for v in levels]
        return num + cat

    def __call__(self, rows: list[list[str]]) -> np.ndarray:
        parts = [(self._numeric(rows) - self.mean) / self.std]
        for c, levels in self.levels.items():
            i = self.columns.index(c)
            lookup = {v: k for k, v in enumerate(levels)}
            onehot = np.zeros((len(rows), len(levels)))
            for r, row in enumerate(rows):
                k = lookup.get(row[i])  # a level unseen in training encodes as all zeros
                if k is not None:
                    onehot[r, k] = 1.0
            parts.append(onehot)
        return np.concatenate(parts, axis=1).astype(np.float32)


def load_tabular(cfg: DataConfig, seed: int = 0) -> TabularData:
    """Load ``cfg.dataset`` with ``cfg.sensitive`` groups and ``cfg.target`` labels."""
    if cfg.dataset not in TARGETS:
        raise ConfigError(f"data.dataset: {cfg.dataset!r} is not tabular (adult or german)")
    columns = ADULT_COLUMNS if cfg.dataset == "adult" else GERMAN_COLUMNS
    numeric = ADULT_NUMERIC if cfg.dataset == "adult" else GERMAN_NUMERIC
    target = cfg.target if cfg.dataset == "adult" else "credit"
    if target not in TARGETS[cfg.dataset]:
        raise ConfigError(f"data.target: expected one of {sorted(TARGETS[cfg.dataset])}, "
                          f"got {cfg.target!r}")
    if cfg.sensitive not in SENSITIVE[cfg.dataset]:
        raise ConfigError(f"data.sensitive: expected one of {sorted(SENSITIVE[cfg.dataset])}, "
                          f"got {cfg.sensitive!r}")
    sens_col, to_group = SENSITIVE[cfg.dataset][cfg.sensitive]
    sens_i = columns.index(sens_col)
    train_table, test_table = _read_raw(cfg)
    dropped: dict[str, int] | None = {} if cfg.drop_bad_rows else None
    train_table = _validate(train_table, columns, numeric, dropped)
    rng = np.random.default_rng(seed)
    if test_table is None:  # German credit has no official test split: hold out 30%
        order = rng.permutation(len(train_table.rows))
        cut = int(0.7 * len(train_table.rows))
        train_table, test_table = train_table.keep(order[:cut]), train_table.keep(order[cut:])
    else:
        test_table = _validate(test_table, columns, numeric, dropped)
    train_table, train_groups = _groups(train_table, sens_col, sens_i, to_group, None, dropped)
    group_names = sorted(set(train_groups))
    test_table, _ = _groups(test_table, sens_col, sens_i, to_group, group_names, dropped)
    train_rows, test_rows = train_table.rows, test_table.rows

    label_col, to_label = TARGETS[cfg.dataset][target]
    label_i = columns.index(label_col)
    excluded = {"income", "credit", label_col} | ({sens_col} if cfg.exclude_sensitive else set())
    feature_cols = [c for c in columns if c not in excluded]
    feature_i = [columns.index(c) for c in feature_cols]
    raw_numeric = [c for c in columns if c in numeric]

    def arrays(rows: list[list[str]]) -> tuple[list[list[str]], np.ndarray, np.ndarray, dict]:
        feats = [[r[i] for i in feature_i] for r in rows]
        y = np.array([to_label(r[label_i]) for r in rows], dtype=np.int64)
        s = np.array([group_names.index(to_group(r[sens_i])) for r in rows], dtype=np.int64)
        raw = {c: np.array([float(r[columns.index(c)]) for r in rows]) for c in raw_numeric}
        return feats, y, s, raw

    train_feats, y_tr, s_tr, raw_tr = arrays(train_rows)
    test_feats, y_te, s_te, raw_te = arrays(test_rows)
    encoder = _Encoder(feature_cols, numeric, train_feats)
    full = TabularSplit(encoder(train_feats), y_tr, s_tr, raw_tr)
    test = TabularSplit(encoder(test_feats), y_te, s_te, raw_te)

    order = rng.permutation(len(full))
    n_val = int(round(cfg.val_fraction * len(full)))
    val, train = full.subset(order[:n_val]), full.subset(np.sort(order[n_val:]))
    if cfg.subset is not None:
        train = train.subset(np.arange(min(cfg.subset, len(train))))
    return TabularData(train, val, test, encoder.names, group_names,
                       meta={"dataset": cfg.dataset, "target": target,
                             "sensitive": cfg.sensitive, "rows_train_file": len(train_rows),
                             "rows_test_file": len(test_rows),
                             **({"dropped_bad_rows": dropped} if dropped is not None else {})})
