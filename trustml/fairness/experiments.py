"""Experiment drivers ``(config, run_dir) -> summary`` registered in ``trustml.cli.EXPERIMENTS``.

- ``transfer`` (fair_transfer): does a fair income representation stay fair for another task?
- ``wasserstein`` (fair_postprocess): Wasserstein-barycenter post-processing of a regressor and of
  classifier scores.
- ``ferm`` (fair_ferm): linear FERM preprocessing for a linear SVM / logistic regression.

Each writes ``report.md`` and ``summary.json`` (the CLI prints the summary) into ``run_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from trustml.config import Config, ConfigError
from trustml.fairness.metrics import classification_report
from trustml.fairness.penalty import with_penalty
from trustml.fairness.postprocess import WassersteinBarycenterFair, ks_distance

HOURS = "hours-per-week"


def _write(run_dir: Path, title: str, lines: list[str], summary: dict[str, Any]) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.md").write_text("\n".join([f"# {title}", "", *lines]) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _masked(x: Any, feature_names: list[str], column: str) -> np.ndarray:
    """Features with ``column`` set to its training mean (0 after standardisation): no label leak."""
    x = np.array(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float32)  # a copy
    x[:, feature_names.index(column)] = 0.0
    return x


def _load(config: Config):
    from trustml.data.tabular import load_tabular

    if config.data.dataset != "adult":
        raise ConfigError(
            f"data.dataset: this experiment needs 'adult', got {config.data.dataset!r}"
        )
    return load_tabular(config.data, seed=config.run.seed)


# ---------------------------------------------------------------- transfer


def _encode(model, x: np.ndarray) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [
                model.represent(chunk.to(device)).float().cpu()
                for chunk in torch.as_tensor(x).split(8192)
            ]
        ).numpy()


def _transfer_seed(config: Config, seed: int, run_dir: Path) -> dict[str, Any]:
    """One seed of the transfer experiment: both encoders, their income and hours>40 reports, and
    the paired difference fair - plain of the hours>40 DPD with a bootstrap interval (the same
    resampled test rows for both encoders)."""
    from trustml.evaluation.tabular import predict_scores
    from trustml.fairness.bootstrap import bootstrap_interval
    from trustml.fairness.linear import fit_linear
    from trustml.runner import run_training

    config = config.model_copy(deep=True)
    config.run.seed = seed
    data = _load(config)
    if config.data.target != "income" or HOURS not in data.feature_names:
        raise ConfigError(
            "fair_transfer: expects data.target=income (the second task is hours-per-week > 40)"
        )
    splits = {name: getattr(data, name) for name in ("train", "val", "test")}
    labels = {n: (split.raw[HOURS] > 40).astype(np.int64) for n, split in splits.items()}
    y_test, s_test = labels["test"], splits["test"].s.numpy()
    results: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    scores_by: dict[str, np.ndarray] = {}
    for name, cfg in (("fair", config), ("plain", with_penalty(config, "none", 0.0))):
        trained = run_training(cfg, run_dir / f"encoder_{name}_seed{seed}", progress=False)
        z = {
            n: _encode(trained.model, _masked(split.x, data.feature_names, HOURS))
            for n, split in splits.items()
        }
        mean, std = z["train"].mean(0), z["train"].std(0) + 1e-6
        head = fit_linear((z["train"] - mean) / std, labels["train"], "logistic", c=1.0)
        scores = head.predict_scores((z["test"] - mean) / std)
        second = classification_report(y_test, scores, s_test, group_names=data.group_names)
        income = classification_report(
            splits["test"].y.numpy(), predict_scores(trained.model, splits["test"]), s_test,
            group_names=data.group_names,
        )
        preds[name] = (scores >= 0.5).astype(np.int64)
        scores_by[name] = scores
        results[name] = {
            "income_test": {k: v for k, v in income.items() if k != "groups"},
            "hours_test": {k: v for k, v in second.items() if k != "groups"},
            "hours_groups": second["groups"],
            "hours_dp_ci95": bootstrap_interval(_dpd, y_test, preds[name], s_test, seed=seed),
            "hours_accuracy_ci95": bootstrap_interval(_accuracy, y_test, preds[name], s_test,
                                                      seed=seed),
            "hours_selection_rate": float(preds[name].mean()),
        }
    both = np.stack([preds["fair"], preds["plain"]], axis=1)
    results["dp_difference"] = _dpd_difference(y_test, both, s_test)
    results["dp_difference_ci95"] = bootstrap_interval(_dpd_difference, y_test, both, s_test,
                                                       seed=seed)
    # a head that says yes less often has a smaller DPD by that alone: the plain head at the fair
    # head's selection rate separates what the representation removed from what the rate did
    matched = (scores_by["plain"] >= np.quantile(scores_by["plain"], 1 - preds["fair"].mean()))
    results["plain_at_fair_rate"] = {"selection_rate": float(matched.mean()),
                                     "dp": _dpd(y_test, matched.astype(np.int64), s_test)}
    results["hours_majority_accuracy"] = float(max(y_test.mean(), 1 - y_test.mean()))
    results["hours_test_group_sizes"] = {
        name: int((s_test == g).sum()) for g, name in enumerate(data.group_names)}
    return results


def _dpd(y: np.ndarray, pred: np.ndarray, s: np.ndarray) -> float:
    from trustml.fairness.metrics import demographic_parity_difference

    return demographic_parity_difference(y, pred, s)


def _accuracy(y: np.ndarray, pred: np.ndarray, _: np.ndarray) -> float:
    return float((y == pred).mean())


def _dpd_difference(y: np.ndarray, both: np.ndarray, s: np.ndarray) -> float:
    """DPD of the first column's predictions minus that of the second's (rows resampled together)."""
    return _dpd(y, both[:, 0], s) - _dpd(y, both[:, 1], s)


ENCODERS = {"fair": "fair encoder", "plain": "plain encoder"}


def _over_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95% t-interval over seeds of each encoder's hours>40 DPD and accuracy, its income
    accuracy, and the paired difference fair - plain of the DPD and of the accuracy."""
    from trustml.fairness.seeds import finite_or_none, paired_difference, t_interval

    def column(encoder: str, task: str, key: str) -> list[float]:
        return [r[encoder][task][key] for r in per_seed.values()]

    out: dict[str, Any] = {}

    def put(name: str, stat: tuple[float, float, float]) -> None:
        out[name] = stat[0]
        out[f"{name}_ci95"] = [finite_or_none(stat[1]), finite_or_none(stat[2])]

    dp, acc = "demographic_parity_difference", "accuracy"
    for enc in ENCODERS:
        values = column(enc, "hours_test", dp)
        put(f"transfer_dp_{enc}", t_interval(values))
        out[f"transfer_dp_{enc}_sd"] = float(np.std(values, ddof=1 if len(values) > 1 else 0))
        put(f"transfer_accuracy_{enc}", t_interval(column(enc, "hours_test", acc)))
        put(f"income_accuracy_{enc}", t_interval(column(enc, "income_test", acc)))
    matched = [r["plain_at_fair_rate"]["dp"] for r in per_seed.values()]
    put("transfer_dp_plain_at_fair_rate", t_interval(matched))
    put("transfer_dp_difference_at_fair_rate",
        paired_difference(column("fair", "hours_test", dp), matched))
    for enc in ENCODERS:
        put(f"transfer_auc_{enc}", t_interval(column(enc, "hours_test", "auc")))
    put("transfer_dp_difference", paired_difference(column("fair", "hours_test", dp),
                                                    column("plain", "hours_test", dp)))
    put("transfer_accuracy_difference", paired_difference(column("fair", "hours_test", acc),
                                                          column("plain", "hours_test", acc)))
    out["transfer_fair_lower_on_seeds"] = int(sum(
        f < p for f, p in zip(column("fair", "hours_test", dp), column("plain", "hours_test", dp))))
    out["transfer_difference_excludes_zero_on_seeds"] = int(sum(
        r["dp_difference_ci95"][1] < 0 for r in per_seed.values()))
    out["hours_majority_accuracy"] = float(np.mean(
        [r["hours_majority_accuracy"] for r in per_seed.values()]))
    return out


def _interval(value: float, bounds: Any, digits: int = 3) -> str:
    lo, hi = bounds
    if lo is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _stat(summary: dict[str, Any], key: str) -> str:
    """``summary[key]`` with its interval ``summary[key + '_ci95']``."""
    return _interval(summary[key], summary[f"{key}_ci95"])


def _transfer_lines(config: Config, per_seed: dict[int, dict[str, Any]],
                    agg: dict[str, Any]) -> list[str]:
    seeds = list(per_seed)
    label = f"{config.fairness.penalty} (weight {config.fairness.weight:g})"
    rows = ["| seed | encoder | income acc | income DP diff | hours>40 acc [95% CI] | hours>40 AUC "
            "| hours>40 selection rate | hours>40 DP diff [95% CI] | hours>40 EO diff |",
            "|---|---|---|---|---|---|---|---|---|"]
    dp = "demographic_parity_difference"
    for seed, res in per_seed.items():
        for enc, name in (("plain", "plain (unpenalised)"), ("fair", f"fair: {label}")):
            r = res[enc]
            rows.append(
                f"| {seed} | {name} | {_fmt(r['income_test']['accuracy'])} | "
                f"{_fmt(r['income_test'][dp])} | "
                f"{_interval(r['hours_test']['accuracy'], r['hours_accuracy_ci95'])} | "
                f"{_fmt(r['hours_test']['auc'])} | {r['hours_selection_rate']:.3f} | "
                f"{_interval(r['hours_test'][dp], r['hours_dp_ci95'])} | "
                f"{_fmt(r['hours_test']['equal_opportunity_difference'])} |")
    diffs = ["| seed | hours>40 DP diff, fair - plain [95% paired bootstrap CI] | test group sizes |",
             "|---|---|---|"]
    for seed, res in per_seed.items():
        sizes = ", ".join(f"{k} {v}" for k, v in res["hours_test_group_sizes"].items())
        diffs.append(f"| {seed} | {_interval(res['dp_difference'], res['dp_difference_ci95'])} "
                     f"| {sizes} |")
    a = agg
    n = len(seeds)
    lo, hi = a["transfer_dp_difference_ci95"]
    if lo is None:
        verdict = "one seed: no interval over seeds (set run.seeds to at least two seeds)"
    elif hi < 0:
        verdict = "the fair encoder's advantage holds: the interval of the mean difference is below 0"
    elif lo > 0:
        verdict = "the fair encoder is worse: the interval of the mean difference is above 0"
    else:
        verdict = "no advantage shown: the interval of the mean difference contains 0"
    return [
        (f"Encoder trained on income (sensitive = {config.data.sensitive}), frozen; a fresh "
         "logistic-regression head predicts hours-per-week > 40 (hours input masked). Test split; "
         f"seeds {seeds}. Per seed, brackets are 95% percentile bootstrap intervals over the test "
         "rows; over seeds, the mean and its 95% t-interval."), "",
        *rows, "", *diffs, "",
        f"Over {n} seed(s), mean [95% t-interval]:", "",
        f"- hours>40 demographic parity difference: fair encoder "
        f"{_stat(a, 'transfer_dp_fair')}, plain encoder "
        f"{_stat(a, 'transfer_dp_plain')}; paired difference "
        f"fair - plain {_stat(a, 'transfer_dp_difference')}"
        f"; the fair encoder is lower on {a['transfer_fair_lower_on_seeds']} of {n} seeds "
        f"(bootstrap interval of the difference below 0 on "
        f"{a['transfer_difference_excludes_zero_on_seeds']}): **{verdict}**.",
        f"- at the same selection rate (the plain head's threshold moved so that it says yes as "
        f"often as the fair head): plain encoder DPD "
        f"{_stat(a, 'transfer_dp_plain_at_fair_rate')}"
        f", paired difference fair - plain "
        f"{_stat(a, 'transfer_dp_difference_at_fair_rate')}"
        " (a smaller selection rate alone shrinks the gap).",
        f"- hours>40 AUC (threshold-free): fair encoder "
        f"{_stat(a, 'transfer_auc_fair')}, plain "
        f"{_stat(a, 'transfer_auc_plain')}.",
        f"- hours>40 accuracy: fair encoder "
        f"{_stat(a, 'transfer_accuracy_fair')}, plain "
        f"{_stat(a, 'transfer_accuracy_plain')} "
        f"(paired difference "
        f"{_stat(a, 'transfer_accuracy_difference')}; "
        f"majority class {a['hours_majority_accuracy']:.3f}: an accuracy near it would be a "
        "collapsed head, whose low gap is no advantage).",
        f"- income accuracy (the encoders' own task): fair "
        f"{_stat(a, 'income_accuracy_fair')}, plain "
        f"{_stat(a, 'income_accuracy_plain')}.",
        "", "![transfer](transfer.png)",
    ]


def _plot_transfer(per_seed: dict[int, dict[str, Any]], agg: dict[str, Any], path: Path) -> None:
    """Per seed, each encoder's hours>40 DPD and accuracy with bootstrap error bars; the mean over
    seeds as a line and its t-interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(per_seed)
    x = np.arange(len(seeds), dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    panels = (("demographic_parity_difference", "hours_dp_ci95", "transfer_dp",
               "hours>40 demographic parity difference (test)"),
              ("accuracy", "hours_accuracy_ci95", "transfer_accuracy", "hours>40 accuracy (test)"))
    for ax, (key, ci, agg_key, ylabel) in zip(axes, panels):
        for k, (enc, name) in enumerate(ENCODERS.items()):
            xs = x + (k - 0.5) * 0.2
            values = np.array([r[enc]["hours_test"][key] for r in per_seed.values()])
            bounds = np.array([r[enc][ci] for r in per_seed.values()])
            bars = ax.errorbar(xs, values, yerr=[values - bounds[:, 0], bounds[:, 1] - values],
                               fmt="o", capsize=3, label=f"{name}, per seed (bootstrap 95% CI)")
            color = bars[0].get_color()
            mean, (lo, hi) = agg[f"{agg_key}_{enc}"], agg[f"{agg_key}_{enc}_ci95"]
            ax.axhline(mean, color=color, lw=1, ls="--", label=f"{name}, mean over seeds")
            if lo is not None:
                ax.axhspan(lo, hi, color=color, alpha=0.12)
        if key == "accuracy":
            ax.axhline(agg["hours_majority_accuracy"], color="grey", lw=1, ls=":",
                       label="majority class")
        ax.set_xticks(x, [str(s) for s in seeds])
        ax.set_xlabel("seed")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.suptitle("Transfer to hours-per-week > 40: bands are the 95% t-interval of the mean")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transfer(config: Config, run_dir: Path) -> dict[str, Any]:
    """Train penalised and unpenalised income encoders, freeze them, fit a hours>40 head on each,
    once per seed of ``run.seeds`` (default: ``run.seed`` alone).

    The encoders see all features; for the second task the hours-per-week input is masked to its
    training mean (standardised 0, about 40 h) so its label cannot leak. The head is a logistic
    regression on the frozen representation. The report gives, per seed, the second task's
    demographic parity difference and accuracy with 95% bootstrap intervals and the paired
    difference fair - plain; over seeds, their means with 95% t-intervals; and transfer.png.
    """
    if config.fairness.penalty == "none":
        raise ConfigError(
            "fair_transfer: set fairness.penalty (mmd or sinkhorn) for the fair encoder"
        )
    run_dir = Path(run_dir)
    seeds = config.run.seeds or [config.run.seed]
    per_seed = {seed: _transfer_seed(config, seed, run_dir) for seed in seeds}
    agg = _over_seeds(per_seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    _plot_transfer(per_seed, agg, run_dir / "transfer.png")
    summary = {"seeds": seeds, "per_seed": {str(k): v for k, v in per_seed.items()}, **agg}
    return _write(run_dir, "Fair representation transfer: income -> hours-per-week > 40",
                  _transfer_lines(config, per_seed, agg), summary)


# ---------------------------------------------------------------- post-processing


def _ridge(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> np.ndarray:
    xb = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    reg = l2 * np.eye(xb.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(xb.T @ xb + reg, xb.T @ y)


def _predict_ridge(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1))]).astype(np.float64) @ coef


def wasserstein(config: Config, run_dir: Path) -> dict[str, Any]:
    """Post-process (1) a ridge regressor of hours-per-week and (2) the MLP's income scores.

    Calibration = validation split, evaluation = test split. Reports the KS distance between group
    output distributions and the error (MAE/RMSE, accuracy) before and after.
    """
    from trustml.evaluation.tabular import predict_scores
    from trustml.runner import run_training

    run_dir = Path(run_dir)
    data = _load(config)
    post_seed = config.run.seed
    s = {n: getattr(data, n).s.numpy() for n in ("train", "val", "test")}
    # (1) regression target: hours per week from every other feature
    x = {n: _masked(getattr(data, n).x, data.feature_names, HOURS) for n in s}
    t = {n: getattr(data, n).raw[HOURS] for n in s}
    coef = _ridge(x["train"], t["train"])
    pred = {n: _predict_ridge(coef, x[n]) for n in ("val", "test")}
    fair = (
        WassersteinBarycenterFair(jitter=1e-4, seed=post_seed)
        .fit(pred["val"], s["val"])
        .transform(pred["test"], s["test"])
    )
    regression = {
        "target": HOURS,
        "ks_before": ks_distance(pred["test"], s["test"]),
        "ks_after": ks_distance(fair, s["test"]),
        "mae_before": float(np.abs(pred["test"] - t["test"]).mean()),
        "mae_after": float(np.abs(fair - t["test"]).mean()),
        "rmse_before": float(np.sqrt(((pred["test"] - t["test"]) ** 2).mean())),
        "rmse_after": float(np.sqrt(((fair - t["test"]) ** 2).mean())),
    }
    # (2) classifier scores of the configured (usually unpenalised) MLP
    trained = run_training(config, run_dir / "classifier", progress=False)
    scores = {n: predict_scores(trained.model, getattr(data, n)) for n in ("val", "test")}
    fair_scores = (
        WassersteinBarycenterFair(jitter=1e-5, seed=post_seed)
        .fit(scores["val"], s["val"])
        .transform(scores["test"], s["test"])
    )
    y_test = data.test.y.numpy()
    before = classification_report(y_test, scores["test"], s["test"], group_names=data.group_names)
    after = classification_report(y_test, fair_scores, s["test"], group_names=data.group_names)
    keys = ("accuracy", "auc", "demographic_parity_difference", "equal_opportunity_difference")
    classification = {
        "ks_before": ks_distance(scores["test"], s["test"]),
        "ks_after": ks_distance(fair_scores, s["test"]),
        **{f"{k}_before": before[k] for k in keys},
        **{f"{k}_after": after[k] for k in keys},
    }
    _plot_postprocess(
        pred["test"],
        fair,
        scores["test"],
        fair_scores,
        s["test"],
        data.group_names,
        run_dir / "postprocess.png",
    )
    r, c = regression, classification
    lines = [
        (
            "Fitted on the validation split (calibration), evaluated on the test split. Unfairness = the "
            "Kolmogorov-Smirnov distance between the groups' output distributions."
        ),
        "",
        "| output | KS before | KS after | error before | error after |",
        "|---|---|---|---|---|",
        (
            f"| ridge regression of {HOURS} | {r['ks_before']:.4f} | {r['ks_after']:.4f} | "
            f"MAE {r['mae_before']:.3f}, RMSE {r['rmse_before']:.3f} | "
            f"MAE {r['mae_after']:.3f}, RMSE {r['rmse_after']:.3f} |"
        ),
        (
            f"| MLP income scores | {c['ks_before']:.4f} | {c['ks_after']:.4f} | "
            f"acc {c['accuracy_before']:.4f}, AUC {c['auc_before']:.4f}, DP diff "
            f"{c['demographic_parity_difference_before']:.4f} | acc {c['accuracy_after']:.4f}, AUC "
            f"{c['auc_after']:.4f}, DP diff {c['demographic_parity_difference_after']:.4f} |"
        ),
        "",
        "![output distributions](postprocess.png)",
    ]
    summary = {
        "regression": regression,
        "classification": classification,
        "regression_ks_after": regression["ks_after"],
        "classification_ks_after": c["ks_after"],
    }
    return _write(
        run_dir, "Wasserstein-barycenter fair post-processing (Chzhen et al. 2020)", lines, summary
    )


def _plot_postprocess(reg_before, reg_after, sc_before, sc_after, s, names, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8), sharey=True)
    panels = [
        (reg_before, "regression, before", "predicted hours per week (h)"),
        (reg_after, "regression, after", "post-processed hours per week (h)"),
        (sc_before, "scores, before", "score P(income > 50K)"),
        (sc_after, "scores, after", "post-processed score P(income > 50K)"),
    ]
    for ax, (values, title, xlabel) in zip(axes, panels):
        for g, name in enumerate(names):
            v = np.sort(values[s == g])
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=name)
        ax.set_title(f"{title} (KS {ks_distance(values, s):.3f})", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=9)
    axes[0].set_ylabel("cumulative share of the group (test)")
    # CDFs rise from bottom left to top right: the top-left corner is empty
    axes[-1].legend(fontsize=8, title="group", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- FERM

REFERENCE_FERM = {
    "linear SVM": {"accuracy": 0.808, "deo": 0.109},
    "linear FERM": {"accuracy": 0.796, "deo": 0.033},
}


def ferm(config: Config, run_dir: Path) -> dict[str, Any]:
    """Linear SVM and logistic regression with and without FERM preprocessing on Adult (test split).

    DEO = |TPR_a - TPR_b| (equal opportunity difference), as in Donini et al. (2018).
    """
    from trustml.fairness.ferm import LinearFERM
    from trustml.fairness.linear import fit_linear
    from trustml.fairness.metrics import equal_opportunity_difference

    run_dir = Path(run_dir)
    data = _load(config)
    x, y, s = data.train.x.numpy(), data.train.y.numpy(), data.train.s.numpy()
    xt, yt, st = data.test.x.numpy(), data.test.y.numpy(), data.test.s.numpy()
    projection = LinearFERM().fit(x, y, s)
    results = {}
    for loss, label in (("squared_hinge", "linear SVM"), ("logistic", "logistic regression")):
        for fair in (False, True):
            model = fit_linear(projection.transform(x) if fair else x, y, loss, c=1.0)
            pred = model.predict(projection.transform(xt) if fair else xt)
            name = f"{label} + FERM" if fair else label
            results[name] = {
                "accuracy": float((pred == yt).mean()),
                "deo": equal_opportunity_difference(yt, pred, st),
                "dp_difference": classification_report(yt, pred.astype(float), st)[
                    "demographic_parity_difference"
                ],
            }
    rows = ["| model | accuracy | DEO | DP diff |", "|---|---|---|---|"]
    rows += [
        f"| {n} | {r['accuracy']:.4f} | {r['deo']:.4f} | {r['dp_difference']:.4f} |"
        for n, r in results.items()
    ]
    rows += [
        f"| reference: {n} (Donini et al. README) | {r['accuracy']:.3f} | {r['deo']:.3f} | - |"
        for n, r in REFERENCE_FERM.items()
    ]
    lines = [
        (
            f"Adult, sensitive = {config.data.sensitive}; features one-hot + standardised (ours), "
            "L2-SVM / logistic regression with C = 1 (L-BFGS); test split."
        ),
        "",
        *rows,
    ]
    summary = {
        "results": results,
        "reference": REFERENCE_FERM,
        "svm_deo": results["linear SVM"]["deo"],
        "ferm_deo": results["linear SVM + FERM"]["deo"],
        "svm_accuracy": results["linear SVM"]["accuracy"],
        "ferm_accuracy": results["linear SVM + FERM"]["accuracy"],
    }
    return _write(run_dir, "Linear FERM (Donini et al. 2018) on Adult", lines, summary)
