"""Accuracy-fairness trade-off: train one model per (penalty, weight), evaluate on the test split.

``trustml-sweep --config configs/adult_fair_mmd.yaml --weights 0,0.1,1,3 --penalties mmd,sinkhorn``
writes ``sweep.json``, ``report.md`` and ``tradeoff.png`` (accuracy vs demographic parity and vs
equal opportunity difference, one curve per penalty) into one run directory. Weight 0 is the
unpenalised MLP, trained once and shared by every curve. Two Fairlearn reference points on the same
split (ExponentiatedGradient + DemographicParity on logistic regression, ThresholdOptimizer) are
added when fairlearn and scikit-learn are installed (``pip install trustml[bench]``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from trustml import config as cfgmod
from trustml.config import Config, ConfigError
from trustml.evaluation.context import markdown_table
from trustml.fairness.metrics import classification_report
from trustml.fairness.penalty import with_penalty
from trustml.progress import bar, note, set_quiet

KEYS = (
    "accuracy",
    "balanced_accuracy",
    "auc",
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equal_opportunity_difference",
    "equalized_odds_difference",
)


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise ConfigError(f"--{name}: expected non-negative numbers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in ("mmd", "sinkhorn", "rate", "group_posterior")]
    if not names or bad:
        raise ConfigError(f"--penalties: expected a comma-separated subset of mmd,sinkhorn,rate,"
                          f"group_posterior (with --targets), got {text!r}")
    return names


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    return {k: report[k] for k in KEYS}


def train_point(config: Config, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train ``config`` into ``run_dir`` (continuing its checkpoint with ``resume``) and return
    its test-split report."""
    from trustml.data.tabular import load_tabular
    from trustml.evaluation.tabular import predict_scores
    from trustml.runner import run_training

    result = run_training(config, run_dir, resume=resume)
    data = load_tabular(config.data, seed=config.run.seed)
    device = next(result.model.parameters()).device
    scores = predict_scores(result.model, data.test, device)
    return classification_report(
        data.test.y.numpy(), scores, data.test.s.numpy(), group_names=data.group_names
    )


def fairlearn_points(config: Config) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Fairlearn reference points on the same split (ExponentiatedGradient and ThresholdOptimizer
    on logistic regression at a gap of 0.01, from :func:`trustml.fairness.baselines.
    fairlearn_predictions`), or a note saying why they are missing."""
    try:
        import fairlearn  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as err:
        return (
            {},
            f"Fairlearn reference points skipped ({err.name} not installed: pip install trustml[bench]).",
        )
    from trustml.data.tabular import load_tabular
    from trustml.fairness.baselines import fairlearn_predictions

    data = load_tabular(config.data, seed=config.run.seed)
    split = [(p.x.double().numpy(), p.y.numpy(), p.s.numpy()) for p in (data.train, data.test)]
    notion = config.fairness.notion
    rows = fairlearn_predictions(*split, [0.01], notion, config.run.seed,
                                 estimators_on=("LogReg",))
    _, yt, st = split[1]
    return {f"fairlearn {r['method'].removeprefix('Fairlearn ')} ({notion.upper()} <= 0.01)":
            classification_report(yt, r["pred"].astype(float), st, group_names=data.group_names)
            for r in rows if r["target"] is not None}, None


def plot(
    curves: dict[str, list[dict[str, Any]]], references: dict[str, dict[str, Any]], path: Path
) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in zip(
        axes,
        ("demographic_parity_difference", "equal_opportunity_difference"),
        ("demographic parity difference", "equal opportunity difference"),
    ):
        for name, points in curves.items():
            ax.plot([p[key] for p in points], [p["accuracy"] for p in points], "o-", label=name)
            for p in points:
                ax.annotate(
                    f"{p['weight']:g}",
                    (p[key], p["accuracy"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
        markers = iter("s^Dv")
        for name, point in references.items():
            ax.plot(point[key], point["accuracy"], next(markers), ms=8, label=name)
        xs = [p[key] for points in curves.values() for p in points]
        xs += [p[key] for p in references.values()]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 10:  # penalties take it down by decades
            ax.set_xscale("log")
            label += ", log scale"
        ax.set_xlabel(f"{label} (test)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (test)")
    # below both panels: points can sit anywhere, and one legend serves both
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.suptitle("Accuracy vs fairness; labels are penalty weights (0 = unpenalised MLP)")
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


TABLE_COLUMNS = {"accuracy": "accuracy", "demographic_parity_difference": "DP diff",
                 "demographic_parity_ratio": "DP ratio", "equal_opportunity_difference": "EO diff",
                 "equalized_odds_difference": "EOdds diff", "auc": "AUC"}


def _table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    named = [{"model": name, **{label: r[key] for key, label in TABLE_COLUMNS.items()}}
             for name, r in rows]
    return markdown_table(named, ["model", *TABLE_COLUMNS.values()])


def _report(config: Config, results: list[dict[str, Any]],
            references: dict[str, dict[str, Any]], note: str | None, pending: int) -> str:
    rows = [
        (f"{r['penalty']} (weight {r['weight']:g})" if r["weight"] else "unpenalised MLP", r)
        for r in results
    ] + list(references.items())
    f = config.fairness
    md = [
        f"# Fairness trade-off sweep: {config.data.dataset}, sensitive = {config.data.sensitive}",
        "",
        (
            f"Penalty on the {f.acts_on}, notion {f.notion}, {config.train.epochs} epochs, "
            f"batch {config.train.batch_size}, seed {config.run.seed}; all numbers on the test split."
        ),
        "",
    ]
    if pending:
        md += [f"**Partial**: {pending} more point(s) to train; run the same command again "
               "(or `trustml-sweep --resume <this directory>`) to finish.", ""]
    md += [_table(rows), "", "![trade-off](tradeoff.png)"]
    if note:
        md += ["", note]
    return "\n".join(md) + "\n"


def _write(config: Config, run_dir: Path, grid: dict[str, list], results: list[dict[str, Any]],
           references: dict[str, dict[str, Any]], note: str | None, pending: int
           ) -> dict[str, Any]:
    """sweep.json, report.md and tradeoff.png for the points finished so far."""
    curves = {p: [r for r in results if r["penalty"] in (p, "unpenalised")]
              for p in grid["penalties"]}
    plot(curves, references, run_dir / "tradeoff.png")
    summary = {"grid": grid, "pending": pending, "results": results,
               "references": {k: _summary(v) for k, v in references.items()}, "note": note,
               "config": config.to_dict()}
    (run_dir / "sweep.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "report.md").write_text(
        _report(config, results, summary["references"], note, pending))
    return summary


def run_sweep(
    config: Config,
    weights: list[float],
    penalties: list[str],
    run_dir: Path,
    references: bool = True,
) -> dict[str, Any]:
    """Train the grid into ``run_dir`` and write sweep.json, report.md and tradeoff.png.

    The report is rewritten after every point, so an interrupted sweep leaves a partial one. Run
    again into the same directory, it resumes: finished points (``point.json``) are read back, an
    interrupted point continues from its last epoch checkpoint, the rest are trained."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    if saved.is_file() and cfgmod.load(saved).to_dict() != config.to_dict():
        raise ConfigError(f"--run-dir: {str(run_dir)!r} holds a sweep of a different config; "
                          "choose a new directory (or resume it with --resume and no --set)")
    cfgmod.save(config, saved)
    grid = {"weights": weights, "penalties": penalties}
    jobs = [("unpenalised", 0.0, with_penalty(config, "none", 0.0))] if 0.0 in weights else []
    for penalty in penalties:
        for w in (w for w in weights if w > 0):
            jobs.append((penalty, w, with_penalty(config, penalty, w)))
    results: list[dict[str, Any]] = []
    for i, (name, weight, cfg) in enumerate(bar(jobs, desc="sweep", unit="model")):
        point_dir = run_dir / f"{name}-w{weight:g}"
        done = point_dir / "point.json"
        if done.is_file():
            result = json.loads(done.read_text())
            note(f"{name} w={weight:g}: finished before, read back from {done}")
        else:
            resume = (point_dir / "checkpoint").is_dir()
            report = train_point(cfg, point_dir, resume=resume)
            result = {"penalty": name, "weight": weight, **_summary(report),
                      "groups": report["groups"]}
            done.write_text(json.dumps(result, indent=2))
            note(f"{name} w={weight:g}: accuracy {result['accuracy']:.4f}, DP difference "
                 f"{result['demographic_parity_difference']:.4f}")
        results.append(result)
        _write(config, run_dir, grid, results, {}, None, len(jobs) - i - 1)
    refs, ref_note = (
        fairlearn_points(config) if references else ({}, "Fairlearn reference points disabled.")
    )
    return _write(config, run_dir, grid, results, refs, ref_note, 0)


def sweep_main(argv: list[str] | None = None) -> int:
    """Entry point of ``trustml-sweep`` (errors are ConfigError; the CLI wrapper prints them)."""
    parser = argparse.ArgumentParser(prog="trustml-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML run config (e.g. configs/adult_fair_mmd.yaml)")
    parser.add_argument("--weights", help="comma-separated penalty weights (default 0,0.1,1,3)")
    parser.add_argument("--penalties", help="comma-separated: mmd,sinkhorn (default both)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted config overrides"
    )
    parser.add_argument("--run-dir", help="write here instead of runs/<name>-sweep-<time> (an "
                        "existing sweep of the same config there is resumed)")
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="finish an interrupted sweep: its "
                        "config and grid are read from the directory")
    parser.add_argument("--no-references", action="store_true", help="skip the Fairlearn points")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--targets", help="comma-separated fairness.target values: a constrained "
                        "frontier beside Fairlearn instead of a weight sweep")
    parser.add_argument("--seeds", default="0,1,2", help="with --targets: comma-separated seeds")
    parser.add_argument("--reductions", default="LogReg", help="with --targets: base estimators "
                        "of Fairlearn's ExponentiatedGradient, a subset of LogReg,HistGB, or none "
                        "(HistGB takes minutes per target)")
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    grid: dict[str, Any] = {"weights": "0,0.1,1,3", "penalties": "mmd,sinkhorn"}
    if args.resume:
        if args.config or args.run_dir:
            raise ConfigError("--resume: the config and directory come from the sweep; "
                              "drop --config and --run-dir")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "sweep.json").is_file():
            raise ConfigError(f"--resume: {str(run_dir)!r} is not a sweep directory (needs "
                              "config.yaml and sweep.json)")
        config = cfgmod.load(run_dir / "config.yaml", args.set)
        saved = json.loads((run_dir / "sweep.json").read_text())["grid"]
        grid = {k: ",".join(f"{v:g}" if isinstance(v, float) else v for v in saved[k])
                for k in grid}
    elif args.config is None:
        raise ConfigError("trustml-sweep: give --config CONFIG (or --resume SWEEP_DIR)")
    else:
        config = cfgmod.load(args.config, args.set)
    if config.model.kind != "mlp":
        raise ConfigError("trustml-sweep: model.kind must be 'mlp' (tabular fairness sweep)")
    weights = _floats(args.weights or grid["weights"], "weights")
    penalties = _names(args.penalties or grid["penalties"])
    if "group_posterior" in penalties and not args.targets:
        raise ConfigError("--penalties group_posterior: has no weight to sweep; give --targets")
    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif not args.resume:
        from trustml.runner import make_run_dir

        named = config.model_copy(deep=True)
        named.run.name = f"{config.run.name}-sweep"
        run_dir = make_run_dir(named)
    cfgmod.use_threads(config)
    if args.targets:
        return _frontier_main(config, args, penalties, run_dir)
    summary = run_sweep(config, weights, penalties, run_dir, not args.no_references)
    for r in summary["results"]:
        print(
            f"{r['penalty']:>12} w={r['weight']:<6g} acc={r['accuracy']:.4f} "
            f"dp={r['demographic_parity_difference']:.4f} eo={r['equal_opportunity_difference']:.4f}"
        )
    print(f"sweep directory: {run_dir}")
    return 0


def _frontier_main(config: Config, args: argparse.Namespace, penalties: list[str],
                   run_dir: Path) -> int:
    from trustml.fairness.frontier import run_frontier

    targets = _floats(args.targets, "targets")
    if any(not 0 < t < 1 for t in targets):
        raise ConfigError(f"--targets: expected gaps in (0, 1), got {args.targets!r}")
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    reductions = tuple(v.strip() for v in args.reductions.split(",") if v.strip())
    if reductions == ("none",):
        reductions = ()
    if any(r not in ("LogReg", "HistGB") for r in reductions):
        raise ConfigError(f"--reductions: expected a subset of LogReg,HistGB or none, got "
                          f"{args.reductions!r}")
    result = run_frontier(config, targets, seeds, penalties, run_dir, not args.no_references,
                          not args.quiet, reductions)
    for a in result["summary"]:
        target = "-" if a["target"] is None else f"{a['target']:g}"
        print(f"{a['method']:>44} target={target:<5} acc={a['accuracy']:.4f}±{a['accuracy_sd']:.4f} "
              f"gap={a['gap']:.4f}±{a['gap_sd']:.4f}")
    for line in [*result["noise"][2:], *result["verdicts"]]:
        print(line.replace("**", ""))
    print(f"frontier directory: {run_dir} (report.md, frontier.png)")
    return 0
