"""Classifier quality and fairness on the test split, overall and per sensitive group."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from trustml.evaluation.context import EvalContext, ReportSection, markdown_table  # noqa: E402
from trustml.fairness.metrics import classification_report  # noqa: E402


@torch.no_grad()
def predict_scores(model: nn.Module, data, device: torch.device | str = "cpu",
                   batch_size: int = 8192) -> np.ndarray:
    """P(y = 1) for a feature tensor or a dataset with ``.x``, in eval mode."""
    x = data if isinstance(data, torch.Tensor) else data.x
    was_training = model.training
    model.eval()
    out = [torch.softmax(model(chunk.to(device)).float(), -1)[:, 1].cpu()
           for chunk in x.split(batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


def _score_plot(scores: np.ndarray, y: np.ndarray, s: np.ndarray, names: list[str], path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    bins = np.linspace(0, 1, 41)
    for ax, label in zip(axes, (0, 1)):
        for g, name in enumerate(names):
            m = (s == g) & (y == label)
            if m.any():
                ax.hist(scores[m], bins=bins, density=True, histtype="step", lw=1.8, label=name)
        ax.set_title(f"true label {label}")
        ax.set_xlabel("score P(y=1)")
    axes[0].set_ylabel("density")
    axes[1].legend(title="group", loc="best")
    fig.suptitle("Score distributions per sensitive group (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rates_plot(report: dict, path) -> None:
    groups = report["groups"]
    names = list(groups)
    keys = ["selection_rate", "tpr", "fpr", "accuracy"]
    x = np.arange(len(keys))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, name in enumerate(names):
        ax.bar(x + i * width, [groups[name][k] or 0.0 for k in keys], width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, keys)
    ax.set_xlabel("rate (test split)")
    ax.set_ylabel("value (0-1)")
    ax.set_ylim(0, 1)
    ax.legend(title="group", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("Per-group rates (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_tabular(ctx: EvalContext) -> ReportSection:
    data = ctx.parts.data
    scores = predict_scores(ctx.model, data.test, ctx.device)
    y, s = data.test.y.numpy(), data.test.s.numpy()
    report = classification_report(y, scores, s, group_names=data.group_names)
    plots = [ctx.out_dir / "scores_by_group.png", ctx.out_dir / "rates_by_group.png"]
    _score_plot(scores, y, s, data.group_names, plots[0])
    _rates_plot(report, plots[1])
    overall = ["accuracy", "balanced_accuracy", "auc", "demographic_parity_difference",
               "demographic_parity_ratio", "equal_opportunity_difference",
               "equalized_odds_difference"]
    rows = [{"group": name, **values} for name, values in report["groups"].items()]
    md = (f"Test split of {data.meta['dataset']} ({report['n']} rows), target "
          f"`{data.meta['target']}`, sensitive attribute `{data.meta['sensitive']}`, "
          f"threshold {report['threshold']}.\n\n"
          + markdown_table([{"metric": k, "value": report[k]} for k in overall],
                           ["metric", "value"])
          + "\n\nPer group:\n\n"
          + markdown_table(rows, ["group", "count", "accuracy", "selection_rate", "tpr", "fpr",
                                  "auc"]))
    return ReportSection("classification", report, md, plots)
