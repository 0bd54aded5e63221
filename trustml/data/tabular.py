"""UCI Adult and German credit as tensors with a sensitive attribute for every sample.

The original UCI files ship gzipped inside the package (``trustml/data/files``), so default runs
need no network; ``data.path`` points at a user's own copy (folder with the same file names,
gzipped or not) and ``data.path: hf:<dataset>`` loads a Hugging Face copy of Adult where the
network exists. One-hot encoding and standardisation are fitted on the training rows only; Adult's missing
values ('?') are kept as a category of their own, so the row counts match the UCI files.
"""

from __future__ import annotations

import csv
import gzip
import io
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


def _open(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        text = handle.read()
    delimiter = "," if "," in text[:1000] else " "
    rows = []
    for row in csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True):
        if row and not row[0].startswith("|"):
            rows.append([v.strip() for v in row])
    return rows


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"data.path: expected {stem} or {stem}.gz in {str(folder)!r}")


def _check_rows(rows: list[list[str]], width: int, path: Path) -> list[list[str]]:
    for number, row in enumerate(rows, 1):
        if len(row) != width:
            raise ConfigError(f"data file {str(path)!r} line {number}: expected {width} fields, "
                              f"got {len(row)}")
    return rows


def _adult_from_hub(name: str) -> tuple[list[list[str]], list[list[str]] | None]:
    """Rows in UCI column order from a Hugging Face copy of Adult (needs the network)."""
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except (OSError, ValueError, ConnectionError) as err:  # offline, unknown name
        raise ConfigError(f"data.path: could not load {name!r} from the Hugging Face hub "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None

    def rows(split) -> list[list[str]]:
        names = {c.replace(".", "-").replace("_", "-").lower(): c for c in split.column_names}
        missing = [c for c in ADULT_COLUMNS if c not in names]
        if missing:
            raise ConfigError(f"data.path: hub dataset {name!r} lacks Adult columns {missing}")
        return [[str(r[names[c]]).strip() for c in ADULT_COLUMNS] for r in split]

    train = rows(loaded["train"])
    return train, rows(loaded["test"]) if "test" in loaded else None


def _read_raw(cfg: DataConfig) -> tuple[list[list[str]], list[list[str]] | None]:
    if cfg.path and cfg.path.startswith("hf:"):
        if cfg.dataset != "adult":
            raise ConfigError("data.path: the hf: route is available for dataset 'adult' only")
        return _adult_from_hub(cfg.path[3:])
    folder = Path(cfg.path) if cfg.path else FILES
    if not folder.is_dir():
        raise ConfigError(f"data.path: {str(folder)!r} is not a folder")
    if cfg.dataset == "adult":
        train_path, test_path = _find(folder, "adult.data"), _find(folder, "adult.test")
        return (_check_rows(_open(train_path), len(ADULT_COLUMNS), train_path),
                _check_rows(_open(test_path), len(ADULT_COLUMNS), test_path))
    path = _find(folder, "german.data")
    return _check_rows(_open(path), len(GERMAN_COLUMNS), path), None


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
    train_rows, test_rows = _read_raw(cfg)
    rng = np.random.default_rng(seed)
    if test_rows is None:  # German credit has no official test split: hold out 30%
        order = rng.permutation(len(train_rows))
        cut = int(0.7 * len(train_rows))
        test_rows = [train_rows[i] for i in order[cut:]]
        train_rows = [train_rows[i] for i in order[:cut]]

    label_col, to_label = TARGETS[cfg.dataset][target]
    sens_col, to_group = SENSITIVE[cfg.dataset][cfg.sensitive]
    label_i, sens_i = columns.index(label_col), columns.index(sens_col)
    dropped = {"income", "credit", label_col} | ({sens_col} if cfg.exclude_sensitive else set())
    feature_cols = [c for c in columns if c not in dropped]
    feature_i = [columns.index(c) for c in feature_cols]
    group_names = sorted({to_group(r[sens_i]) for r in train_rows})
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
                             "rows_test_file": len(test_rows)})
