"""Fairness as a constraint (``fairness.target``), not a weight to hunt for.

A fixed penalty weight gives a different gap on every seed: the weight that meets DPD <= 0.02 on
one seed collapses another to a constant predictor. :class:`ConstrainedStep` instead adapts the
penalty's multiplier lambda by dual ascent on the constraint *as it is reported*: every
``update_every`` steps it measures the gap (demographic parity or equal opportunity difference of
the thresholded predictions, max over group pairs) on the held-out validation split and moves
``log lambda`` by ``dual_lr * clip((gap - target) / target, -1, 1)``. The update is on the log scale
because useful multipliers span decades (0.1 to 100); clipping the relative violation keeps one
noisy validation reading from blowing lambda up.

Dual ascent oscillates around the boundary, so the run also keeps the iterate with the best
validation accuracy among those that met the target on validation (constrained model selection)
and restores it at the end (:meth:`ConstrainedStep.finish`). With ``select_threshold`` each
iterate is judged at its most accurate feasible decision threshold (one threshold for all groups,
:mod:`trustml.fairness.threshold`), which is folded into the head's bias at the end. Selection
uses ``target * (1 - margin)``: the winner of many noisy validation readings tends to have a true
gap above its reading, and the margin leaves room for that. A constant predictor meets any target,
but it is only kept if nothing more accurate did. The test split is never looked at.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from trustml.evaluation.tabular import predict_scores
from trustml.fairness.bootstrap import bootstrap_interval
from trustml.fairness.metrics import demographic_parity_difference, equal_opportunity_difference
from trustml.fairness.penalty import FairnessPenalty
from trustml.fairness.threshold import best_threshold, fold_threshold
from trustml.training.step import PlainStep

GAPS = {"dp": demographic_parity_difference, "eo": equal_opportunity_difference}
NEAR_CONSTANT = 0.01  # a selection rate within 1% of 0 or 1
LAMBDA_RANGE = (1e-3, 1e4)


def foldable(model: nn.Module) -> bool:
    """Whether a decision threshold can be folded into the model (a two-logit linear head)."""
    head = getattr(model, "head", None)
    return isinstance(head, nn.Linear) and head.out_features == 2 and head.bias is not None


def test_report(gap: Any, scores: np.ndarray, test: Any) -> dict[str, Any]:
    """The constrained ``gap`` (a metric ``(y, pred, s)``) and the accuracy of ``scores >= 0.5`` on
    the test split, with 95% bootstrap intervals."""
    y, s = test.y.numpy(), test.s.numpy()
    pred = (scores >= 0.5).astype(np.int64)
    report: dict[str, Any] = {"test_gap": float(gap(y, pred, s))}
    report["test_gap_ci95"] = bootstrap_interval(gap, y, pred, s)
    report["test_accuracy_ci95"] = bootstrap_interval(
        lambda t, p, _: float((t == p).mean()), y, pred, s)
    return report


def near_constant_note(target: float, rate: float, chosen: str, advice: str) -> str | None:
    """The summary's warning when the most accurate feasible ``chosen`` (iterate, decision) hardly
    ever, or almost always, predicts 1; None otherwise."""
    if NEAR_CONSTANT < rate < 1 - NEAR_CONSTANT:
        return None
    return (f"the most accurate {chosen} meeting fairness.target={target} on validation is a "
            f"near-constant predictor (selection rate {rate:.3f}): {advice}")


class ConstrainedStep:
    """A ``PlainStep`` with one fairness penalty whose multiplier meets ``target`` on validation.

    ``val`` is the validation split (tensors ``x``, ``y``, ``s``); ``notion`` picks the gap (dp or
    eo). Logs ``lambda``, and at each update ``val_gap`` and ``val_accuracy`` (at threshold 0.5,
    what the dual step steers by) and, with ``select_threshold``, ``val_selected_accuracy``.
    """

    def __init__(self, step: PlainStep, penalty: FairnessPenalty, val: Any, *, target: float,
                 notion: str, update_every: int = 10, dual_lr: float = 0.5, margin: float = 0.0,
                 select_threshold: bool = True) -> None:
        if not 0 < target < 1:
            raise ValueError(f"fairness.target: expected a gap in (0, 1), got {target!r}")
        if not 0 <= margin < 1:
            raise ValueError(f"fairness.margin: expected a fraction in [0, 1), got {margin!r}")
        if penalty not in step.penalties:
            raise ValueError("ConstrainedStep: the penalty must be one of the step's penalties")
        self.inner, self.penalty, self.target = step, penalty, float(target)
        self.gap, self.update_every, self.dual_lr = GAPS[notion], int(update_every), float(dual_lr)
        self.notion, self.bound = notion, self.target * (1 - margin)
        self.select_threshold = select_threshold
        self.x, self.y, self.s = val.x, val.y.numpy(), val.s.numpy()
        self.steps = 0
        self.best: dict[str, torch.Tensor] | None = None
        self.best_record: dict[str, float] = {}
        self.last_record: dict[str, float] = {}

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Validation gap and accuracy at 0.5, and the best threshold meeting the bound."""
        scores = predict_scores(model, self.x, next(model.parameters()).device)
        pred = (scores >= 0.5).astype(np.int64)
        record = {"val_gap": float(self.gap(self.y, pred, self.s)),
                  "val_accuracy": float((pred == self.y).mean()),
                  "val_selection_rate": float(pred.mean())}
        if self.select_threshold and foldable(getattr(model, "module", model)):
            chosen = best_threshold(scores, self.y, self.s, self.bound, self.notion)
            if chosen is not None:
                record.update(zip(("threshold", "val_selected_accuracy", "val_selected_gap"),
                                  chosen))
                record["val_selected_selection_rate"] = float((scores >= chosen[0]).mean())
        elif record["val_gap"] <= self.bound:
            record.update(threshold=0.5, val_selected_accuracy=record["val_accuracy"],
                          val_selected_gap=record["val_gap"],
                          val_selected_selection_rate=record["val_selection_rate"])
        return record

    def step(self, model: nn.Module, objective, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        metrics = self.inner.step(model, objective, batch)
        self.steps += 1
        if self.steps % self.update_every == 0:
            metrics.update(self.update(model))
        metrics["lambda"] = self.penalty.weight
        return metrics

    def update(self, model: nn.Module) -> dict[str, float]:
        """Measure the constraint on validation, keep the iterate if it is the best feasible one,
        and take one dual step on lambda."""
        record = self.measure(model)
        gap = record["val_gap"]
        if math.isnan(gap):  # a group without positives on validation: nothing to steer by
            return record
        if record.get("val_selected_accuracy", -1.0) > self.best_record.get(
                "val_selected_accuracy", -1.0):
            core = getattr(model, "module", model)
            self.best = {k: v.detach().clone() for k, v in core.state_dict().items()}
            self.best_record = {**record, "step": float(self.steps), "lambda": self.penalty.weight}
        violation = max(-1.0, min(1.0, (gap - self.target) / self.target))
        weight = self.penalty.weight * math.exp(self.dual_lr * violation)
        self.penalty.weight = min(max(weight, LAMBDA_RANGE[0]), LAMBDA_RANGE[1])
        self.last_record = record
        return record

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """Restore the best validation-feasible iterate; say what was chosen (or that none was)."""
        final = self.update(model)  # the last iterate is a candidate too
        summary: dict[str, Any] = {"fairness_target": self.target,
                                   "fairness_lambda_final": self.penalty.weight,
                                   "fairness_target_met_on_val": self.best is not None}
        if self.best is None:
            summary["fairness_note"] = (
                f"no iterate met fairness.target={self.target} on the validation split (last gap "
                f"{final.get('val_gap', float('nan')):.4f}); the last iterate is kept: train longer "
                f"(train.epochs), raise fairness.dual_lr or relax the target")
            return summary
        core = getattr(model, "module", model)
        core.load_state_dict(self.best)
        if self.best_record["threshold"] != 0.5:
            fold_threshold(core.head, self.best_record["threshold"])
        summary.update({f"fairness_selected_{k}": v for k, v in self.best_record.items()})
        note = near_constant_note(self.target, self.best_record["val_selected_selection_rate"],
                                  "iterate", "nothing better met it; relax the target, train "
                                  "longer or lower fairness.margin")
        if note:
            summary["fairness_note"] = note
        return summary

    def test_report(self, scores: np.ndarray, test: Any) -> dict[str, Any]:
        return test_report(self.gap, scores, test)

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.penalty.weight, "steps": self.steps,
                "best": self.best or {}, "best_record": dict(self.best_record)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.penalty.weight, self.steps = float(state["lambda"]), int(state["steps"])
        self.best = dict(state["best"]) or None
        self.best_record = {k: float(v) for k, v in state["best_record"].items()}
