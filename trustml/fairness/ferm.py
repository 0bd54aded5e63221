"""Linear FERM (Donini, Oneto, Ben-David, Shawe-Taylor, Pontil, NeurIPS 2018) as preprocessing.

For a linear model f(x) = <w, x> + b, equal opportunity up to first moments is the constraint
<w, u> = 0 with u = E[x | y=1, s=a] - E[x | y=1, s=b]: both groups' positives then get the same
mean score. Projecting the features onto the orthogonal complement of u enforces it for any linear
model trained afterwards. With more than two groups, every group's positive mean minus the pooled
positive mean is projected out.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _matrix(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x: expected a 2-D feature matrix, got shape {x.shape}")
    return x


class LinearFERM:
    """``fit(x, y, s)`` learns the directions to remove; ``transform(x)`` projects them out."""

    def __init__(self, tol: float = 1e-10) -> None:
        self.tol = tol
        self.basis_: np.ndarray | None = None

    def fit(self, x: Any, y: Any, s: Any) -> LinearFERM:
        x = _matrix(x)
        y, s = np.asarray(y).reshape(-1), np.asarray(s).reshape(-1)
        if not len(x) == len(y) == len(s):
            raise ValueError(f"x, y, s differ in length: {len(x)}, {len(y)}, {len(s)}")
        positives = y == 1
        groups = np.unique(s[positives])
        if len(groups) < 2:
            raise ValueError(
                "LinearFERM.fit: needs positive (y == 1) samples from >= 2 sensitive groups"
            )
        means = np.stack([x[positives & (s == g)].mean(0) for g in groups])
        diffs = means[1:] - means[0] if len(groups) == 2 else means - x[positives].mean(0)
        q, r = np.linalg.qr(diffs.T)
        self.basis_ = q[:, np.abs(np.diag(r)) > self.tol]  # (d, k) orthonormal
        self.u_ = diffs[0] if len(groups) == 2 else diffs
        return self

    def transform(self, x: Any) -> np.ndarray:
        if self.basis_ is None:
            raise ValueError("LinearFERM: call fit() before transform()")
        x = _matrix(x)
        return x - (x @ self.basis_) @ self.basis_.T

    def fit_transform(self, x: Any, y: Any, s: Any) -> np.ndarray:
        return self.fit(x, y, s).transform(x)
