"""Group fairness and classification metrics of (y_true, y_pred or scores, sensitive).

Definitions follow Fairlearn (so numbers are comparable with the literature) but the functions
need only NumPy: Fairlearn and scikit-learn are optional. Inputs may be NumPy arrays, lists or
torch tensors; the sensitive attribute may take any number of values. Gaps are max - min over the
groups where the rate is defined (a group without positives has no TPR).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def as_vector(values: Any, name: str) -> np.ndarray:
    """A 1-D NumPy array from an array, list or tensor; ``name`` labels the error."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    return arr


def _binary(values: Any, name: str) -> np.ndarray:
    arr = as_vector(values, name)
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name}: expected binary labels in {{0, 1}}, got {np.unique(arr)[:5]}")
    return arr.astype(np.int64)


def _inputs(y_true: Any, y_pred: Any, sensitive: Any) -> tuple[np.ndarray, ...]:
    y_true = _binary(y_true, "y_true")
    y_pred = _binary(y_pred, "y_pred")
    sensitive = as_vector(sensitive, "sensitive")
    if not len(y_true) == len(y_pred) == len(sensitive):
        raise ValueError(
            f"y_true, y_pred and sensitive must have the same length, got "
            f"{len(y_true)}, {len(y_pred)}, {len(sensitive)}"
        )
    if len(y_true) == 0:
        raise ValueError("fairness metrics need at least one sample")
    return y_true, y_pred, sensitive


def _rate(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else float("nan")


def selection_rate(y_true: Any, y_pred: Any) -> float:
    """Fraction of positive predictions (``y_true`` is accepted for Fairlearn's signature)."""
    return _rate(_binary(y_pred, "y_pred"))


def true_positive_rate(y_true: Any, y_pred: Any) -> float:
    y_true, y_pred = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    return _rate(y_pred[y_true == 1])


def false_positive_rate(y_true: Any, y_pred: Any) -> float:
    y_true, y_pred = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    return _rate(y_pred[y_true == 0])


def group_metrics(y_true: Any, y_pred: Any, sensitive: Any) -> dict[Any, dict[str, float]]:
    """Per sensitive value: count, selection_rate, tpr, fpr, accuracy (NaN where undefined)."""
    y_true, y_pred, sensitive = _inputs(y_true, y_pred, sensitive)
    out: dict[Any, dict[str, float]] = {}
    for group in np.unique(sensitive):
        m = sensitive == group
        t, p = y_true[m], y_pred[m]
        out[group.item()] = {
            "count": int(m.sum()),
            "selection_rate": _rate(p),
            "tpr": _rate(p[t == 1]),
            "fpr": _rate(p[t == 0]),
            "accuracy": _rate(p == t),
        }
    return out


def _gap(groups: dict[Any, dict[str, float]], key: str) -> float:
    values = [g[key] for g in groups.values() if not np.isnan(g[key])]
    return float(max(values) - min(values)) if values else float("nan")


def demographic_parity_difference(y_true: Any, y_pred: Any, sensitive: Any) -> float:
    """max - min selection rate over groups."""
    return _gap(group_metrics(y_true, y_pred, sensitive), "selection_rate")


def demographic_parity_ratio(y_true: Any, y_pred: Any, sensitive: Any) -> float:
    """min / max selection rate over groups (1 when no group is ever selected)."""
    rates = [g["selection_rate"] for g in group_metrics(y_true, y_pred, sensitive).values()]
    return float(min(rates) / max(rates)) if max(rates) > 0 else 1.0


def equal_opportunity_difference(y_true: Any, y_pred: Any, sensitive: Any) -> float:
    """max - min true positive rate over groups that contain positives."""
    return _gap(group_metrics(y_true, y_pred, sensitive), "tpr")


def equalized_odds_difference(y_true: Any, y_pred: Any, sensitive: Any) -> float:
    """The larger of the TPR gap and the FPR gap (Fairlearn's ``agg="worst_case"``)."""
    groups = group_metrics(y_true, y_pred, sensitive)
    return float(max(_gap(groups, "tpr"), _gap(groups, "fpr")))


def roc_auc(y_true: Any, scores: Any) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic (average ranks for ties).

    NaN when only one class is present.
    """
    y_true = _binary(y_true, "y_true")
    scores = as_vector(scores, "scores").astype(np.float64)
    n_pos, n_neg = int(y_true.sum()), int((1 - y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    return float((ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _name(group: Any, group_names: Sequence[str] | Mapping[Any, str] | None) -> str:
    if group_names is None:
        return str(group)
    if isinstance(group_names, Mapping):
        return str(group_names.get(group, group))
    return str(group_names[group]) if 0 <= int(group) < len(group_names) else str(group)


def classification_report(
    y_true: Any,
    scores: Any,
    sensitive: Any,
    threshold: float = 0.5,
    group_names: Sequence[str] | Mapping[Any, str] | None = None,
) -> dict[str, Any]:
    """Overall and per-group accuracy, balanced accuracy, AUC and the four fairness gaps.

    ``scores`` are P(y=1); predictions are ``scores >= threshold``. Undefined values (e.g. the TPR
    of a group without positives) are ``None`` so the dict serialises to strict JSON.
    """
    scores = as_vector(scores, "scores").astype(np.float64)
    y_pred = (scores >= threshold).astype(np.int64)
    y_true, y_pred, sensitive = _inputs(y_true, y_pred, sensitive)
    tpr, fpr = true_positive_rate(y_true, y_pred), false_positive_rate(y_true, y_pred)
    groups = group_metrics(y_true, y_pred, sensitive)
    per_group: dict[str, dict[str, float | int | None]] = {}
    for group, values in groups.items():
        m = sensitive == group
        row: dict[str, float | int | None] = {"count": values["count"]}
        row.update({k: _json_float(v) for k, v in values.items() if k != "count"})
        row["auc"] = _json_float(roc_auc(y_true[m], scores[m]))
        per_group[_name(group, group_names)] = row
    overall = {
        "n": len(y_true),
        "threshold": float(threshold),
        "accuracy": float((y_pred == y_true).mean()),
        "balanced_accuracy": float(np.nanmean([tpr, 1.0 - fpr])),
        "auc": roc_auc(y_true, scores),
        "selection_rate": float(y_pred.mean()),
        "demographic_parity_difference": _gap(groups, "selection_rate"),
        "demographic_parity_ratio": demographic_parity_ratio(y_true, y_pred, sensitive),
        "equal_opportunity_difference": _gap(groups, "tpr"),
        "equalized_odds_difference": float(max(_gap(groups, "tpr"), _gap(groups, "fpr"))),
    }
    report: dict[str, Any] = {
        k: _json_float(v) if isinstance(v, float) else v for k, v in overall.items()
    }
    report["groups"] = per_group
    return report
