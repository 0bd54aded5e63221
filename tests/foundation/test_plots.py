"""Every figure the package writes passes a look: each axes with data has x and y labels, a figure
with several labelled series has a legend naming them, and no legend covers a data point.

The figures are built by the package's own plotting functions on synthetic data shaped like the
real runs'; ``Figure.savefig`` is wrapped to inspect each figure as it is written."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Polygon, Rectangle

from trustml.attacks import plots
from trustml.evaluation import bias, tabular
from trustml.fairness import experiments, sweep
from trustml.fairness.metrics import classification_report

matplotlib.use("Agg")
RNG = np.random.default_rng(0)


def _data_points(ax, renderer) -> list[tuple[str, object]]:
    """(series label, display-space points or box) of every labelled data artist of ``ax``."""
    out = []
    for line in ax.get_lines():
        if line.get_label().startswith("_"):
            continue  # unlabelled guides (diagonals, zero lines)
        xy = np.asarray(line.get_xydata(), float)
        xy = xy[np.isfinite(xy).all(1)]
        pts = ax.transData.transform(xy)
        if len(pts) > 1 and line.get_linestyle() not in ("None", ""):  # the segments too
            t = np.linspace(0, 1, 20)[:, None, None]
            pts = (pts[:-1] * (1 - t) + pts[1:] * t).reshape(-1, 2)
        out.append((line.get_label(), pts))
    for patch in ax.patches:
        if isinstance(patch, Rectangle):
            box = patch.get_window_extent(renderer)
            if box.width > 1 and box.height > 1:
                out.append(("bar", box))
        elif isinstance(patch, Polygon):  # step histograms
            out.append(("hist", patch.get_transform().transform(patch.get_path().vertices)))
    return out


def look(fig: Figure) -> list[str]:
    """Problems a reader would see in ``fig`` (empty: it passes)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems = []
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    legend_texts = {t.get_text() for leg in legends for t in leg.get_texts()}
    for i, ax in enumerate(a for a in fig.axes if a.has_data()):
        if not ax.get_xlabel():
            problems.append(f"axes {i} ({ax.get_title()!r}): no x label")
        if not any(a.get_ylabel() for a in ax.get_shared_y_axes().get_siblings(ax)):
            problems.append(f"axes {i} ({ax.get_title()!r}): no y label")
        labels = {lab for lab in ax.get_legend_handles_labels()[1]}
        if len(labels) > 1 and not labels <= legend_texts:
            problems.append(f"axes {i}: series {sorted(labels - legend_texts)} not in a legend")
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for label, points in _data_points(ax, renderer):
                if hasattr(points, "overlaps"):
                    covered = points.overlaps(box)
                else:
                    x, y = points[:, 0], points[:, 1]
                    covered = bool(((x > box.x0) & (x < box.x1) & (y > box.y0)
                                    & (y < box.y1)).any())
                if covered:
                    problems.append(f"axes {i}: the legend covers data of {label!r}")
    return problems


@pytest.fixture
def written(monkeypatch):
    """Path name -> problems of every figure saved during the test."""
    seen: dict[str, list[str]] = {}
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        seen[Path(fname).name] = look(self)
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


def _members(n=2000, shift=0.4):
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    return RNG.normal(0, 1, 2 * n) + shift * member, member


def test_attack_figures(tmp_path, written):
    scores, member = _members()
    loss = -np.abs(RNG.standard_cauchy(len(member))) * 0.1 + 0.05 * member  # heavy-tailed losses
    plots.plot_roc({"loss": (loss, member), "lira": (scores, member)}, tmp_path / "attack_roc.png")
    plots.plot_histogram(scores, member, tmp_path / "attack_hist_lira.png", "lira scores")
    plots.plot_histogram(loss, member, tmp_path / "attack_hist_loss.png", "loss scores")
    eps = [0.5, 1.0, 2.0, 4.0, 8.0, float("inf")]
    bounds = {f"{a} {b}": [0.0, 0.0, 0.0, 0.0, 0.1, 0.6 + k] for k, a in enumerate(["loss", "lira"])
              for b in ("clopper_pearson", "gdp")}
    plots.plot_theory_vs_practice(eps, bounds, {"loss": [0.5, 0.5, 0.51, 0.52, 0.53, 0.57],
                                                "lira": [0.5, 0.5, 0.5, 0.52, 0.55, 0.66]},
                                  tmp_path / "theory_vs_practice.png")
    repeats = [1, 4, 16, 64]
    plots.plot_exposure(repeats, {"non_private (rank)": [2.0, 6.0, 10.0, 10.97],
                                  "non_private (skewnorm)": [2.1, 7.0, 12.5, 16.0],
                                  "private (rank)": [0.8, 1.5, 3.0, 6.0],
                                  "private (skewnorm)": [0.9, 1.6, 3.5, 8.1]},
                        tmp_path / "exposure.png", rank_ceiling=10.97)
    assert set(written) == {"attack_roc.png", "attack_hist_lira.png", "attack_hist_loss.png",
                            "theory_vs_practice.png", "exposure.png"}
    assert {k: v for k, v in written.items() if v} == {}


def test_evaluation_and_fairness_figures(tmp_path, written):
    n = 3000
    s, y = RNG.integers(0, 2, n), RNG.integers(0, 2, n)
    scores = np.clip(0.3 * y + 0.15 * s + RNG.normal(0.25, 0.15, n), 0, 1)
    tabular._score_plot(scores, y, s, ["Female", "Male"], tmp_path / "scores_by_group.png")
    report = classification_report(y, scores, s, group_names=["Female", "Male"])
    tabular._rates_plot(report, tmp_path / "rates_by_group.png")
    professions = [f"profession{i}" for i in range(40)]
    gaps = {m: {p: float(RNG.normal(scale)) for p in professions}
            for m, scale in (("teacher", 1.4), ("plain_kd", 1.4), ("cda+perturbation", 0.05))}
    bias.plot_gaps(gaps, tmp_path / "gender_gap.png")
    hours = RNG.normal(40, 12, n) + 5 * s
    experiments._plot_postprocess(hours, hours - 5 * s, scores, scores - 0.15 * s, s,
                                  ["Female", "Male"], tmp_path / "postprocess.png")
    curve = [{"weight": w, "accuracy": 0.855 - 0.006 * k, "demographic_parity_difference":
              0.2 / (1 + 3 * k), "equal_opportunity_difference": 0.1 / (1 + 2 * k)}
             for k, w in enumerate([0, 0.1, 1, 3, 10])]
    refs = {"fairlearn ExpGrad(DP) + LogReg": {"accuracy": 0.82,
                                               "demographic_parity_difference": 0.01,
                                               "equal_opportunity_difference": 0.15},
            "fairlearn ThresholdOptimizer(DP) + LogReg": {
                "accuracy": 0.83, "demographic_parity_difference": 0.02,
                "equal_opportunity_difference": 0.12}}
    sweep.plot({"mmd": curve, "sinkhorn": curve[:3]}, refs, tmp_path / "tradeoff.png")
    assert set(written) == {"scores_by_group.png", "rates_by_group.png", "gender_gap.png",
                            "postprocess.png", "tradeoff.png"}
    assert {k: v for k, v in written.items() if v} == {}


def test_frontier_figure(tmp_path, written):
    from trustml.fairness import frontier

    summary = [{"method": m, "target": t, "accuracy": a - 2 * t, "accuracy_sd": 0.004,
                "gap": 0.8 * t, "gap_sd": 0.003}
               for m, a in (("trustml mmd (target)", 0.85), ("Fairlearn ExpGrad + LogReg", 0.84))
               for t in (0.01, 0.02, 0.05)]
    summary.append({"method": "MLP (unconstrained)", "target": None, "accuracy": 0.856,
                    "accuracy_sd": 0.0, "gap": 0.19, "gap_sd": 0.0})
    frontier.plot(summary, "dp", tmp_path / "frontier.png")
    assert set(written) == {"frontier.png"}
    assert {k: v for k, v in written.items() if v} == {}


def test_transfer_figure(tmp_path, written):
    def encoder(dp, acc):
        return {"hours_test": {"demographic_parity_difference": dp, "accuracy": acc, "auc": 0.7},
                "income_test": {"accuracy": 0.84}, "hours_dp_ci95": [dp - 0.01, dp + 0.012],
                "hours_accuracy_ci95": [acc - 0.007, acc + 0.007]}

    per_seed = {s: {"fair": encoder(0.03 + 0.01 * s, 0.70), "plain": encoder(0.15, 0.72),
                    "dp_difference_ci95": [-0.14, -0.1], "hours_majority_accuracy": 0.6,
                    "plain_at_fair_rate": {"dp": 0.08, "selection_rate": 0.07}}
                for s in range(3)}
    experiments._plot_transfer(per_seed, experiments._over_seeds(per_seed),
                               tmp_path / "transfer.png")
    assert set(written) == {"transfer.png"}
    assert {k: v for k, v in written.items() if v} == {}
    assert (tmp_path / "transfer.png").stat().st_size > 0


def test_the_look_fails_a_bad_figure(written, tmp_path):
    """The checker itself: an unlabelled axis and a legend over the data are reported."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    x = np.linspace(0, 1, 50)
    ax.plot(x, x, label="a")
    ax.plot(x, 1 - x, label="b")
    ax.legend(loc="center")
    fig.savefig(tmp_path / "bad.png")
    plt.close(fig)
    problems = written["bad.png"]
    assert any("no x label" in p for p in problems) and any("covers" in p for p in problems)


def test_every_plotting_module_is_covered():
    """A new ``savefig`` in the package needs a figure in the tests above."""
    root = Path(__file__).resolve().parents[2] / "trustml"
    writers = {str(p.relative_to(root)) for p in root.rglob("*.py")
               if re.search(r"\.savefig\(", p.read_text())}
    assert writers == {"attacks/plots.py", "evaluation/tabular.py", "evaluation/bias.py",
                       "fairness/experiments.py", "fairness/sweep.py", "fairness/frontier.py"}
