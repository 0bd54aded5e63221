"""Membership-inference metrics from per-example scores (higher score = "member").

Everything is computed from the full ROC (one point per distinct score), so the low-FPR numbers that
matter for privacy (TPR at 0.1% FPR) are read off the curve rather than from a fixed threshold grid.
NumPy arrays or tensors in, floats out.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def as_numpy(values) -> np.ndarray:
    """Tensor / list / array -> 1-D float64 array (scores are compared, never trained on)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _checked(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    scores, member = as_numpy(scores), as_numpy(is_member).astype(bool)
    if scores.shape != member.shape:
        raise ValueError(f"scores has {scores.size} entries but is_member has {member.size}")
    if member.all() or not member.any():
        raise ValueError("is_member must contain both members (True) and non-members (False)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, member


def roc_curve(scores, is_member) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for the rule "member iff score >= threshold", thresholds descending.

    Starts at (0, 0) with threshold +inf and has one point per distinct score; tied scores move
    the curve diagonally, as in scikit-learn's ``roc_curve(drop_intermediate=False)``.
    """
    scores, member = _checked(scores, is_member)
    order = np.argsort(-scores, kind="mergesort")
    s, m = scores[order], member[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(m)[last_of_tie]
    fp = np.cumsum(~m)[last_of_tie]
    tpr = np.r_[0.0, tp / m.sum()]
    fpr = np.r_[0.0, fp / (~m).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def auc(scores, is_member) -> float:
    """Area under the ROC = P(member score > non-member score) + 0.5 P(tie)."""
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(scores, is_member, fpr: float, interpolate: bool = False) -> float:
    """TPR an attacker reaches with a false-positive budget ``fpr``.

    Default (conservative, the standard in the MIA literature): the largest TPR over real
    thresholds "member iff score >= t" whose FPR is <= ``fpr``. Tied scores are never split, since
    splitting a tie is randomised tie-breaking, which no deterministic threshold achieves.

    ``interpolate=True``: linear interpolation on the ROC instead (what a randomised threshold
    reaches); it can read higher than any real threshold where many scores tie, so it is opt-in.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    fprs, tprs, _ = roc_curve(scores, is_member)
    after = int(np.searchsorted(fprs, fpr, side="right"))
    if not interpolate or after == fprs.size:
        return float(tprs[after - 1])  # fprs[after - 1] <= fpr; tprs rise along the curve
    before = after - 1  # fprs[before] <= fpr < fprs[after]
    w = (fpr - fprs[before]) / (fprs[after] - fprs[before])
    return float(tprs[before] + w * (tprs[after] - tprs[before]))


def best_balanced_accuracy(scores, is_member) -> float:
    """max over thresholds of (TPR + TNR) / 2."""
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(np.max((tpr + 1.0 - fpr) / 2.0))


def advantage(scores, is_member) -> float:
    """Membership advantage max |TPR - FPR| (Yeom et al. 2018)."""
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(np.max(np.abs(tpr - fpr)))


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    scores,
    is_member,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric``, resampling members and non-members separately
    (stratified, so every resample keeps both classes)."""
    scores, member = _checked(scores, is_member)
    rng = np.random.default_rng(seed)
    idx_in, idx_out = np.nonzero(member)[0], np.nonzero(~member)[0]
    values = []
    for _ in range(n_boot):
        pick = np.r_[rng.choice(idx_in, idx_in.size), rng.choice(idx_out, idx_out.size)]
        values.append(metric(scores[pick], member[pick]))
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def summary(scores, is_member, fprs=(0.01, 0.001, 0.0001), n_boot: int = 200) -> dict[str, float]:
    """All headline metrics of one attack, with a bootstrap 95% interval on AUC and TPR@FPR."""
    out: dict[str, float] = {
        "auc": auc(scores, is_member),
        "balanced_accuracy": best_balanced_accuracy(scores, is_member),
        "advantage": advantage(scores, is_member),
    }
    out["auc_ci_low"], out["auc_ci_high"] = bootstrap_ci(auc, scores, is_member, n_boot)
    for f in fprs:
        key = f"tpr@{f:g}fpr"
        out[key] = tpr_at_fpr(scores, is_member, f)
        lo, hi = bootstrap_ci(lambda s, m, f=f: tpr_at_fpr(s, m, f), scores, is_member, n_boot)
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = lo, hi
    return out
