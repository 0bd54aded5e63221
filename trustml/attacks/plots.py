"""Attack figures: ROC (linear and log-log), IN vs OUT score histograms, theory vs practice,
canary exposure vs insertions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from trustml.attacks.metrics import as_numpy, auc, roc_curve

LOG_FLOOR = 1e-5


def plot_roc(attacks: Mapping[str, tuple], path: Path, title: str = "") -> Path:
    """``attacks``: name -> (scores, is_member). Left: linear ROC; right: log-log down to 1e-5,
    where the low-FPR regime that decides privacy is visible."""
    fig, (lin, log) = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, (scores, member) in attacks.items():
        fpr, tpr, _ = roc_curve(scores, member)
        label = f"{name} (AUC {auc(scores, member):.3f})"
        lin.plot(fpr, tpr, label=label)
        log.plot(np.maximum(fpr, LOG_FLOOR), np.maximum(tpr, LOG_FLOOR), label=label)
    grid = np.logspace(np.log10(LOG_FLOOR), 0, 50)
    lin.plot([0, 1], [0, 1], "k--", lw=0.8)
    log.plot(grid, grid, "k--", lw=0.8)
    log.set(xscale="log", yscale="log", xlim=(LOG_FLOOR, 1), ylim=(LOG_FLOOR, 1))
    for ax in (lin, log):
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "membership inference ROC")
    return _save(fig, path)


def plot_histogram(scores, is_member, path: Path, title: str = "") -> Path:
    """Score distributions of members (IN) and non-members (OUT) on shared bins."""
    scores, member = as_numpy(scores), as_numpy(is_member).astype(bool)
    finite = scores[np.isfinite(scores)]
    bins = np.linspace(finite.min(), finite.max(), 60) if finite.size else 10
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(scores[member], bins=bins, alpha=0.55, density=True, label="IN (members)")
    ax.hist(scores[~member], bins=bins, alpha=0.55, density=True, label="OUT (non-members)")
    ax.set(xlabel="score", ylabel="density", title=title or "score histogram")
    ax.legend()
    return _save(fig, path)


def plot_theory_vs_practice(
    accountant_eps: Sequence[float],
    empirical_eps: Mapping[str, Sequence[float]],
    aucs: Mapping[str, Sequence[float]],
    path: Path,
) -> Path:
    """Left: empirical epsilon lower bounds vs the accountant's epsilon (must stay under y = x).
    Right: attack AUC vs epsilon. Non-private runs (eps = inf) sit at the right edge."""
    finite = [e for e in accountant_eps if np.isfinite(e)]
    right = 2 * max(finite) if finite else 1.0
    xs = np.array([e if np.isfinite(e) else right for e in accountant_eps], dtype=float)
    order = np.argsort(xs)
    fig, (left, ax_auc) = plt.subplots(1, 2, figsize=(11, 4.5))
    diagonal = np.geomspace(min(xs.min(), 0.1), max(finite) if finite else right, 50)
    left.plot(diagonal, diagonal, "k--", lw=0.8, label="empirical = accountant")
    for name, values in empirical_eps.items():
        left.plot(xs[order], np.asarray(values, float)[order], "o-", label=name)
    for name, values in aucs.items():
        ax_auc.plot(xs[order], np.asarray(values, float)[order], "o-", label=name)
    ax_auc.axhline(0.5, color="k", ls="--", lw=0.8)
    labels = [f"{e:.2g}" if np.isfinite(e) else "inf" for e in np.asarray(accountant_eps)[order]]
    for ax, ylabel in ((left, "empirical epsilon lower bound"), (ax_auc, "attack AUC")):
        ax.set(xscale="log", xlabel="accountant epsilon (log scale)", ylabel=ylabel)
        ax.set_xticks(xs[order], labels)
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.suptitle("theory vs practice")
    return _save(fig, path)


def plot_exposure(repeats: Sequence[int], curves: Mapping[str, Sequence[float]], path: Path,
                  rank_ceiling: float | None = None) -> Path:
    """Mean canary exposure (bits) against how often the canary was inserted, one line per model
    and estimator; ``rank_ceiling`` marks where the rank estimate saturates (log2 of candidates+1)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, values in curves.items():
        ax.plot(repeats, values, "o-", label=name)
    if rank_ceiling is not None:
        ax.axhline(rank_ceiling, color="k", ls=":", lw=0.8, label="rank estimate ceiling")
    ax.set(xscale="log", xlabel="canary insertions", ylabel="exposure (bits)",
           title="canary exposure: non-private vs DP")
    ax.set_xticks(list(repeats), [str(r) for r in repeats])
    ax.minorticks_off()
    # exposure rises with insertions up to the ceiling, so every corner can hold data: the legend
    # goes below the axes
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
