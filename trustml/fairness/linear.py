"""Full-batch linear classifiers (logistic regression, L2-SVM) in torch, for FERM and baselines.

scikit-learn is not a runtime dependency; these are small convex problems that L-BFGS solves to
high precision in a few dozen iterations on Adult.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch


@dataclass
class LinearModel:
    weight: np.ndarray
    bias: float
    loss: str

    def decision_function(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.weight + self.bias

    def predict(self, x: Any) -> np.ndarray:
        return (self.decision_function(x) > 0).astype(np.int64)

    def predict_scores(self, x: Any) -> np.ndarray:
        """P(y=1) for logistic regression; the sigmoid of the margin for the SVM (a ranking score)."""
        return 1.0 / (1.0 + np.exp(-self.decision_function(x)))


def fit_linear(
    x: Any,
    y: Any,
    loss: Literal["logistic", "squared_hinge"] = "logistic",
    c: float = 1.0,
    max_iter: int = 500,
) -> LinearModel:
    """Minimise 0.5 |w|^2 + C * sum_i loss_i (the scikit-learn parametrisation; bias unpenalised)."""
    if loss not in ("logistic", "squared_hinge"):
        raise ValueError(f"loss: expected 'logistic' or 'squared_hinge', got {loss!r}")
    if c <= 0:
        raise ValueError(f"c: expected > 0, got {c}")
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    sign = torch.as_tensor(np.asarray(y), dtype=torch.float64) * 2 - 1
    w = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        margin = sign * (xt @ w + b)
        per = (
            torch.nn.functional.softplus(-margin)
            if loss == "logistic"
            else (1 - margin).clamp_min(0) ** 2
        )
        objective = (0.5 * (w * w).sum() + c * per.sum()) / len(xt)
        objective.backward()
        return objective

    opt.step(closure)
    return LinearModel(w.detach().numpy().copy(), float(b.detach()), loss)
