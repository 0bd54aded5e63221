"""Fairlearn reference methods at the same fairness targets, for the side-by-side frontier.

Reductions (ExponentiatedGradient, constraint slack ``eps = target``) and post-processing
(ThresholdOptimizer, relaxed to ``tol = target``) on logistic regression, gradient-boosted trees
and the very MLP trustml trained without a penalty (wrapped as a prefit estimator, so "same model
class" means the same weights). Both see the same feature matrix as trustml's MLP; note that
ThresholdOptimizer also needs the sensitive attribute *at prediction time*, which a fair
representation does not. Fairlearn and scikit-learn are the ``bench`` extra, never needed to train.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

REDUCTION_ITERATIONS = 20  # Fairlearn's default 50 refits cost 2 min per target on Adult (2 cores)
NOTION_NAMES = {"dp": ("DemographicParity", "demographic_parity"),
                "eo": ("TruePositiveRateParity", "true_positive_rate_parity")}


def prefit(score: Callable[[np.ndarray], np.ndarray]) -> Any:
    """A fitted scikit-learn classifier whose P(y=1) is ``score`` (for ``prefit=True``)."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class PrefitScores(ClassifierMixin, BaseEstimator):
        def __init__(self, score: Callable[[np.ndarray], np.ndarray] = score) -> None:
            self.score = score

        def __sklearn_is_fitted__(self) -> bool:
            return True

        @property
        def classes_(self) -> np.ndarray:
            return np.array([0, 1])

        def fit(self, x: np.ndarray, y: np.ndarray, **_: Any) -> PrefitScores:
            return self

        def predict_proba(self, x: np.ndarray) -> np.ndarray:
            p = np.asarray(self.score(x), dtype=np.float64)  # pandas in fairlearn refuses float32
            return np.stack([1 - p, p], axis=1)

        def predict(self, x: np.ndarray) -> np.ndarray:
            return (self.score(x) >= 0.5).astype(np.int64)

    return PrefitScores()


def estimators(seed: int, mlp: Callable[[np.ndarray], np.ndarray] | None) -> dict[str, Any]:
    """Fresh base estimators by name; ``mlp`` (P(y=1) of trustml's unpenalised MLP) is prefit."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    out: dict[str, Any] = {"LogReg": LogisticRegression(max_iter=1000),
                           "HistGB": HistGradientBoostingClassifier(random_state=seed)}
    if mlp is not None:
        out["MLP"] = prefit(mlp)
    return out


def fairlearn_predictions(train: tuple[np.ndarray, ...], test: tuple[np.ndarray, ...],
                          targets: list[float], notion: str, seed: int,
                          mlp: Callable[[np.ndarray], np.ndarray] | None = None,
                          reductions_on: tuple[str, ...] = ("LogReg",),
                          estimators_on: tuple[str, ...] | None = None,
                          ) -> list[dict[str, Any]]:
    """Test predictions of every (method, estimator, target): rows with ``method``, ``target`` and
    ``pred`` (hard 0/1 labels; both methods give randomised classifiers, drawn with ``seed``).

    ``train`` and ``test`` are ``(x, y, s)``. ExponentiatedGradient refits its estimator about 50
    times per target, so it runs only on ``reductions_on``: LogReg by default, since on HistGB it
    takes minutes per target (the prefit MLP cannot be refitted at all). ``estimators_on`` limits
    the base estimators (None: LogReg, HistGB and the MLP when given).
    """
    from fairlearn import reductions
    from fairlearn.postprocessing import ThresholdOptimizer

    (x, y, s), (xt, _, st) = train, test
    moment, constraint = NOTION_NAMES[notion]
    rows = []
    for name, base in estimators(seed, mlp).items():
        if estimators_on is not None and name not in estimators_on:
            continue
        fixed = name == "MLP"  # already trained by trustml: post-processing only
        if not fixed:
            base.fit(x, y)
        rows.append({"method": f"{name} (unconstrained)", "target": None,
                     "pred": base.predict(xt).astype(np.int64)})
        for target in targets:
            post = ThresholdOptimizer(estimator=base, constraints=constraint, prefit=True,
                                      predict_method="predict_proba", tol=target)
            post.fit(x, y, sensitive_features=s)
            rows.append({"method": f"Fairlearn ThresholdOptimizer + {name}", "target": target,
                         "pred": post.predict(xt, sensitive_features=st,
                                              random_state=seed).astype(np.int64)})
            if name in reductions_on and not fixed:
                red = reductions.ExponentiatedGradient(
                    estimators(seed, None)[name], getattr(reductions, moment)(), eps=target,
                    max_iter=REDUCTION_ITERATIONS)
                red.fit(x, y, sensitive_features=s)
                rows.append({"method": f"Fairlearn ExpGrad + {name}", "target": target,
                             "pred": red.predict(xt, random_state=seed).astype(np.int64)})
    return rows
