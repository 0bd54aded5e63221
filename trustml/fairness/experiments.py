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
    """One seed of the transfer experiment: both encoders, their income and hours>40 reports."""
    from trustml.evaluation.tabular import predict_scores
    from trustml.fairness.bootstrap import bootstrap_interval
    from trustml.fairness.linear import fit_linear
    from trustml.fairness.metrics import demographic_parity_difference
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
    s_test = splits["test"].s.numpy()
    results: dict[str, Any] = {}
    for name, cfg in (("fair", config), ("plain", with_penalty(config, "none", 0.0))):
        trained = run_training(cfg, run_dir / f"encoder_{name}_seed{seed}", progress=False)
        z = {
            n: _encode(trained.model, _masked(split.x, data.feature_names, HOURS))
            for n, split in splits.items()
        }
        mean, std = z["train"].mean(0), z["train"].std(0) + 1e-6
        head = fit_linear((z["train"] - mean) / std, labels["train"], "logistic", c=1.0)
        scores = head.predict_scores((z["test"] - mean) / std)
        second = classification_report(labels["test"], scores, s_test, group_names=data.group_names)
        income = classification_report(
            splits["test"].y.numpy(), predict_scores(trained.model, splits["test"]), s_test,
            group_names=data.group_names,
        )
        pred = (scores >= 0.5).astype(np.int64)
        results[name] = {
            "income_test": {k: v for k, v in income.items() if k != "groups"},
            "hours_test": {k: v for k, v in second.items() if k != "groups"},
            "hours_groups": second["groups"],
            "hours_dp_ci95": bootstrap_interval(demographic_parity_difference, labels["test"],
                                                pred, s_test, seed=seed),
        }
    return results


def transfer(config: Config, run_dir: Path) -> dict[str, Any]:
    """Train penalised and unpenalised income encoders, freeze them, fit a hours>40 head on each,
    once per seed of ``run.seeds`` (default: ``run.seed`` alone).

    The encoders see all features; for the second task the hours-per-week input is masked to its
    training mean (standardised 0, about 40 h) so its label cannot leak. The head is a logistic
    regression on the frozen representation; the report compares the second task's demographic
    parity difference (with a 95% bootstrap interval per seed, and mean +- sd over seeds).
    """
    if config.fairness.penalty == "none":
        raise ConfigError(
            "fair_transfer: set fairness.penalty (mmd or sinkhorn) for the fair encoder"
        )
    run_dir = Path(run_dir)
    seeds = config.run.seeds or [config.run.seed]
    per_seed = {seed: _transfer_seed(config, seed, run_dir) for seed in seeds}
    dp_key = "demographic_parity_difference"
    rows = ["| seed | encoder | income acc | income DP diff | hours>40 acc | hours>40 AUC "
            "| hours>40 DP diff [95% CI] | hours>40 EO diff |", "|---|---|---|---|---|---|---|---|"]
    label = f"{config.fairness.penalty} (weight {config.fairness.weight:g})"
    for seed, res in per_seed.items():
        for name, r in (("unpenalised", res["plain"]), (label, res["fair"])):
            lo, hi = r["hours_dp_ci95"]
            rows.append(
                f"| {seed} | {name} | {_fmt(r['income_test']['accuracy'])} | "
                f"{_fmt(r['income_test'][dp_key])} | {_fmt(r['hours_test']['accuracy'])} | "
                f"{_fmt(r['hours_test']['auc'])} | {_fmt(r['hours_test'][dp_key])} "
                f"[{lo:.3f}, {hi:.3f}] | {_fmt(r['hours_test']['equal_opportunity_difference'])} |"
            )
    fair = np.array([r["fair"]["hours_test"][dp_key] for r in per_seed.values()])
    plain = np.array([r["plain"]["hours_test"][dp_key] for r in per_seed.values()])
    wins = int((fair < plain).sum())
    ddof = 1 if len(seeds) > 1 else 0
    lines = [
        (
            f"Encoder trained on income (sensitive = {config.data.sensitive}), frozen; a fresh logistic-"
            "regression head predicts hours-per-week > 40 (hours input masked). Test split; "
            f"seeds {seeds}."
        ),
        "",
        *rows,
        "",
        (
            f"Second-task demographic parity difference, mean ± sd over {len(seeds)} seed(s): "
            f"penalised {fair.mean():.4f} ± {fair.std(ddof=ddof):.4f}, unpenalised "
            f"{plain.mean():.4f} ± {plain.std(ddof=ddof):.4f}; the penalised encoder is lower on "
            f"{wins} of {len(seeds)} seeds."
        ),
    ]
    first = per_seed[seeds[0]]
    summary = {
        "seeds": seeds,
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "fair": first["fair"],
        "plain": first["plain"],
        "transfer_dp_fair": float(fair.mean()),
        "transfer_dp_plain": float(plain.mean()),
        "transfer_dp_fair_sd": float(fair.std(ddof=ddof)),
        "transfer_dp_plain_sd": float(plain.std(ddof=ddof)),
        "transfer_fair_lower_on_seeds": wins,
        "transfer_accuracy_fair": float(np.mean([r["fair"]["hours_test"]["accuracy"]
                                                  for r in per_seed.values()])),
        "transfer_accuracy_plain": float(np.mean([r["plain"]["hours_test"]["accuracy"]
                                                   for r in per_seed.values()])),
    }
    return _write(run_dir, "Fair representation transfer: income -> hours-per-week > 40", lines,
                  summary)


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
