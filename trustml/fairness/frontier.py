"""Side-by-side accuracy-fairness frontier: trustml's constrained training against Fairlearn.

``trustml-sweep --config configs/adult_fair_mmd.yaml --targets 0.01,0.02,0.03,0.05 --seeds 0,1,2``
trains, for every seed, the unconstrained MLP and one MMD / Sinkhorn run per ``fairness.target``,
and fits Fairlearn's ExponentiatedGradient and ThresholdOptimizer at the same targets on
LogReg / HistGB / the same MLP (:mod:`trustml.fairness.baselines`). Every figure is on the test
split; the targets are met (or not) on validation by trustml and on train by Fairlearn. The report
gives mean and spread over seeds, how many seeds met each target on test, and flags near-constant
predictors. Finished points are saved under ``points/`` so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trustml import config as cfgmod  # noqa: E402
from trustml.config import Config  # noqa: E402
from trustml.evaluation.context import markdown_table  # noqa: E402
from trustml.fairness.metrics import (  # noqa: E402
    demographic_parity_difference,
    equal_opportunity_difference,
)
from trustml.fairness.penalty import with_penalty  # noqa: E402

GAP = {"dp": ("demographic parity difference", demographic_parity_difference),
       "eo": ("equal opportunity difference", equal_opportunity_difference)}
CONSTANT = 0.01  # a selection rate within 1% of 0 or 1 is a (near-)constant predictor
REFERENCE = "Fairlearn ThresholdOptimizer + MLP"


def gap_interval(y: np.ndarray, pred: np.ndarray, s: np.ndarray, notion: str,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the test gap (max - min over groups), from cell counts.

    Resampling the n test rows with replacement draws the counts of the (group, label,
    prediction) cells from Multinomial(n, their shares); drawing those counts directly is the
    same bootstrap as :func:`trustml.fairness.bootstrap.bootstrap_interval` at a fraction of the
    cost (there, 10 s for one 5-group DPD over 16k rows, at some 30 points per seed). A group
    absent from a draw, or without positives for eo, has no rate and is left out, as in
    :mod:`trustml.fairness.metrics`."""
    groups, g = np.unique(np.asarray(s), return_inverse=True)
    cells = (g * 2 + np.asarray(y, dtype=np.int64)) * 2 + np.asarray(pred, dtype=np.int64)
    shares = np.bincount(cells, minlength=4 * len(groups)) / len(cells)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(cells), shares, size=n_boot).reshape(n_boot, len(groups), 2, 2)
    if notion == "dp":  # [draw, group, label, prediction]
        hits, total = draws[..., 1].sum(2), draws.sum((2, 3))
    else:  # eo: true positive rate
        hits, total = draws[:, :, 1, 1], draws[:, :, 1].sum(2)
    rate = np.where(total > 0, hits / np.maximum(total, 1), np.nan)
    defined = (~np.isnan(rate)).any(1)
    gaps = np.nanmax(rate[defined], 1) - np.nanmin(rate[defined], 1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(gaps, tail)), float(np.percentile(gaps, 100 - tail))


def point_metrics(y: np.ndarray, pred: np.ndarray, s: np.ndarray, notion: str,
                  names: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Test accuracy, gap with its 95% bootstrap interval, selection rate, group sizes."""
    rate = float(pred.mean())
    values, counts = np.unique(s, return_counts=True)
    return {"accuracy": float((pred == y).mean()), "gap": float(GAP[notion][1](y, pred, s)),
            "gap_ci95": gap_interval(y, pred, s, notion, seed=seed),
            "selection_rate": rate, "constant": rate < CONSTANT or rate > 1 - CONSTANT,
            "group_sizes": {(names[int(v)] if names else str(v)): int(c)
                            for v, c in zip(values, counts)}}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _trustml_points(config: Config, seed: int, targets: list[float], penalties: list[str],
                    run_dir: Path, progress: bool) -> tuple[list[dict[str, Any]], Any]:
    """trustml's unconstrained and constrained runs of one seed (and the unconstrained model)."""
    from trustml.data.tabular import load_tabular
    from trustml.evaluation.tabular import predict_scores
    from trustml.runner import run_training

    base = config.model_copy(deep=True)
    base.run.seed = seed
    data = load_tabular(base.data, seed=seed)
    test = data.test
    jobs = [("MLP (unconstrained)", None, with_penalty(base, "none", 0.0))]
    for penalty in penalties:
        for target in targets:
            cfg = with_penalty(base, penalty, base.fairness.weight)
            cfg.fairness.target = target
            jobs.append((f"trustml {penalty} on {cfg.fairness.acts_on}", target, cfg))
    rows, plain_model = [], None
    for method, target, cfg in jobs:
        result = run_training(cfg, run_dir / f"{_slug(method)}-t{target}-s{seed}", progress=progress)
        pred = (predict_scores(result.model, test) >= 0.5).astype(np.int64)
        s = result.summary
        rows.append({"method": method, "target": target, "seed": seed,
                     **point_metrics(test.y.numpy(), pred, test.s.numpy(), config.fairness.notion,
                                     data.group_names, seed),
                     **{k: s[k] for k in ("test_gap_ci95", "test_accuracy_ci95",
                                          "fairness_target_met_on_val",
                                          "fairness_selected_threshold") if k in s}})
        if target is None:
            plain_model = result.model
    return rows, (data, plain_model)


def _baseline_points(config: Config, seed: int, targets: list[float], data: Any,
                     plain_model: Any, reductions_on: tuple[str, ...],
                     estimators_on: tuple[str, ...] | None = None,
                     keep: str = "Fairlearn") -> list[dict[str, Any]]:
    """Fairlearn's points of one seed whose method starts with ``keep`` (and the unconstrained
    LogReg / HistGB), on ``estimators_on`` (None: all)."""
    from trustml.evaluation.tabular import predict_scores
    from trustml.fairness.baselines import fairlearn_predictions

    def split(part: Any) -> tuple[np.ndarray, ...]:
        return part.x.double().numpy(), part.y.numpy(), part.s.numpy()

    def mlp(x: np.ndarray) -> np.ndarray:
        import torch

        return predict_scores(plain_model, torch.as_tensor(x, dtype=torch.float32))

    test = split(data.test)
    rows = fairlearn_predictions(split(data.train), test, targets, config.fairness.notion, seed,
                                 mlp=mlp, reductions_on=reductions_on,
                                 estimators_on=estimators_on)
    return [{"method": r["method"], "target": r["target"], "seed": seed,
             **point_metrics(test[1], r["pred"], test[2], config.fairness.notion,
                             data.group_names, seed)}
            for r in rows if r["method"] != "MLP (unconstrained)"
            and (r["method"].startswith(keep) or r["target"] is None and keep == "Fairlearn")]


def _cached(path: Path, compute, targets: list[float]) -> list[dict[str, Any]]:
    """The rows saved at ``path`` (computed and saved when missing); rows saved for other
    targets are refused rather than mixed in."""
    if path.is_file():
        rows = json.loads(path.read_text())
        found = sorted({r["target"] for r in rows if r["target"] is not None})
        if found and found != sorted(targets):
            raise cfgmod.ConfigError(
                f"--run-dir: {str(path)!r} holds points for targets {found}, not {sorted(targets)}; "
                "choose a new directory")
        return rows
    rows = compute()
    path.write_text(json.dumps(rows, indent=2))
    return rows


def _certified(row: dict[str, Any], target: float) -> bool:
    """The test gap's 95% bootstrap interval lies at or under the target."""
    ci = row.get("gap_ci95")
    return ci is not None and ci[1] <= target


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (method, target); seeds meeting the target on
    test (``met``) and, of those, seeds whose gap's bootstrap interval is under it
    (``certified``)."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    out = []
    for (method, target), rs in groups.items():
        acc, gap = np.array([r["accuracy"] for r in rs]), np.array([r["gap"] for r in rs])
        ddof = 1 if len(rs) > 1 else 0  # one seed: a spread of 0, not NaN
        out.append({"method": method, "target": target, "seeds": len(rs),
                    "seed_list": sorted(r["seed"] for r in rs),
                    "accuracy": float(acc.mean()), "accuracy_sd": float(acc.std(ddof=ddof)),
                    "gap": float(gap.mean()), "gap_sd": float(gap.std(ddof=ddof)),
                    "met": int(sum(g <= target for g in gap)) if target is not None else None,
                    "certified": (int(sum(_certified(r, target) for r in rs))
                                  if target is not None and any("gap_ci95" in r for r in rs)
                                  else None),
                    "constant": int(sum(r["constant"] for r in rs))})
    return out


def table(summary: list[dict[str, Any]], targets: list[float]) -> str:
    """Methods as rows, targets as columns: 'accuracy +- sd (gap; seeds meeting it on test,
    seeds whose gap's 95% bootstrap interval is under it)'."""
    rows: dict[str, dict[str, Any]] = {}
    for a in summary:
        cell = f"{a['accuracy']:.3f} ± {a['accuracy_sd']:.3f} (gap {a['gap']:.3f}"
        if a["target"] is not None:
            cell += f"; {a['met']}/{a['seeds']}"
            if a.get("certified") is not None:
                cell += f", {a['certified']} sure"
        cell += ")"
        if a["constant"]:
            cell += f" {a['constant']} constant"
        row = rows.setdefault(a["method"], {"method": a["method"]})
        row["unconstrained" if a["target"] is None else f"target {a['target']:g}"] = cell
    columns = ["method", *(f"target {t:g}" for t in targets)]
    if any("unconstrained" in r for r in rows.values()):
        columns.insert(1, "unconstrained")
    return markdown_table(sorted(rows.values(), key=lambda r: r["method"]), columns)


def plot(summary: list[dict[str, Any]], notion: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8.5, 5))
    methods = sorted({a["method"] for a in summary if a["target"] is not None})
    for method in methods:
        pts = sorted((a for a in summary if a["method"] == method), key=lambda a: a["gap"])
        gap, acc = np.array([p["gap"] for p in pts]), np.array([p["accuracy"] for p in pts])
        sd = np.array([p["accuracy_sd"] for p in pts])
        line = ax.errorbar(gap, acc, xerr=[p["gap_sd"] for p in pts], yerr=sd, marker="o",
                           ms=4, capsize=2, lw=1.2, label=method)
        ax.fill_between(gap, acc - sd, acc + sd, alpha=0.12, color=line[0].get_color())
    for a in summary:
        if a["target"] is None:
            ax.plot(a["gap"], a["accuracy"], "k*", ms=9)
            ax.annotate(a["method"], (a["gap"], a["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(-4, -10), ha="right")
    ax.set_xlabel(f"{GAP[notion][0]} (test, mean ± sd over seeds)")
    ax.set_ylabel("accuracy (test, mean ± sd over seeds)")
    ax.set_title("Accuracy-fairness fronts, bands ± sd over seeds (stars: unconstrained)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdicts(summary: list[dict[str, Any]], targets: list[float],
             rows: list[dict[str, Any]] | None = None, reference: str = REFERENCE) -> list[str]:
    """Per target: trustml's most accurate method (mean over seeds) against ``reference``, the
    seeds meeting the target on test (and surely, by the gap's bootstrap interval) for both,
    and, given the per-seed ``rows``, the accuracy difference paired by seed with its 95%
    t-interval."""
    from trustml.fairness.seeds import paired_difference

    def sure(a: dict[str, Any]) -> str:
        text = "" if a.get("certified") is None else f", {a['certified']} sure"
        # a (near-)constant predictor meets any gap: say so where the verdict is read
        return text + (f"; {a['constant']} near-constant" if a.get("constant") else "")

    def accuracy(method: str, target: float) -> dict[int, float]:
        return {r["seed"]: r["accuracy"] for r in rows or []
                if r["method"] == method and r["target"] == target}

    lines = []
    for target in targets:
        here = [a for a in summary if a["target"] == target]
        ours = [a for a in here if a["method"].startswith("trustml")]
        ref = next((a for a in here if a["method"] == reference), None)
        if not ours:
            continue
        best = max(ours, key=lambda a: a["accuracy"])
        line = (f"- target {target:g}: best trustml is {best['method']} at accuracy "
                f"{best['accuracy']:.3f} ± {best['accuracy_sd']:.3f}, test gap {best['gap']:.3f} "
                f"(met on test by {best['met']}/{best['seeds']} seeds{sure(best)})")
        if ref is None:
            lines.append(f"{line}; {reference} did not run")
            continue
        won = best["accuracy"] >= ref["accuracy"]
        line += (f"; {reference}: {ref['accuracy']:.3f} ± {ref['accuracy_sd']:.3f} at gap "
                 f"{ref['gap']:.3f} ({ref['met']}/{ref['seeds']}{sure(ref)}): accuracy target "
                 f"**{'met' if won else 'not met'}** ({best['accuracy'] - ref['accuracy']:+.3f})")
        mine, theirs = accuracy(best["method"], target), accuracy(reference, target)
        common = sorted(set(mine) & set(theirs))
        if len(common) > 1:
            diff, lo, hi = paired_difference([mine[s] for s in common],
                                             [theirs[s] for s in common])
            side = "higher" if lo > 0 else "lower" if hi < 0 else "no difference shown"
            line += (f"; paired by seed {common}: {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] (95% "
                     f"t-interval), {side}")
        lines.append(line)
    return lines


def noise_lines(rows: list[dict[str, Any]], targets: list[float]) -> list[str]:
    """What the test set can certify: its groups' sizes, and per target how many (method, seed)
    points have a gap whose 95% bootstrap interval lies under the target. A point under the
    target whose interval is not is met, not certified: the smallest group's sampling noise
    could carry it over."""
    sized = [r for r in rows if r.get("group_sizes")]
    if not sized:
        return []
    by_seed = {r["seed"]: r["group_sizes"] for r in sized}
    sizes = sorted({json.dumps(v, sort_keys=True) for v in by_seed.values()})
    shown = "; ".join(
        f"seeds {sorted(s for s, v in by_seed.items() if json.dumps(v, sort_keys=True) == key)}: "
        + ", ".join(f"{g} {n}" for g, n in json.loads(key).items()) for key in sizes)
    smallest = min((n, g) for v in by_seed.values() for g, n in v.items())
    lines = [f"Test group sizes ({shown}); the smallest group, {smallest[1]} with "
             f"{smallest[0]} rows, sets the noise of the gap. 'k sure': seeds whose gap's 95% "
             "bootstrap interval over the test rows lies under the target.", ""]
    for target in targets:
        at = [r for r in rows if r["target"] == target and r.get("gap_ci95")]
        if not at:
            continue
        widths = np.array([(r["gap_ci95"][1] - r["gap_ci95"][0]) / 2 for r in at])
        met = [r for r in at if r["gap"] <= target]
        sure = [r for r in met if _certified(r, target)]
        line = (f"- target {target:g}: {len(met)} of {len(at)} (method, seed) points meet it on "
                f"test, {len(sure)} surely; the gap's interval is ± {np.median(widths):.3f} "
                "(median half-width)")
        if not sure:
            line += (f": **too noisy to certify {target:g}** on this test set, whatever the "
                     "method (a larger test split or a coarser group would)")
        lines.append(line)
    return lines


def run_frontier(config: Config, targets: list[float], seeds: list[int], penalties: list[str],
                 run_dir: Path, references: bool = True, progress: bool = True,
                 reductions_on: tuple[str, ...] = ("LogReg",)) -> dict[str, Any]:
    """Train and fit every point into ``run_dir``; write frontier.json, report.md, frontier.png.

    ``reductions_on``: base estimators of Fairlearn's ExponentiatedGradient (LogReg, HistGB;
    HistGB is minutes per target, so it is opt-in). Each (seed, estimator) of ExpGrad is saved on
    its own, so a directory whose seeds were fitted without it gains it on the next call."""
    import time
    from tqdm.auto import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    points = run_dir / "points"
    points.mkdir(exist_ok=True)
    cfgmod.save(config, run_dir / "config.yaml")
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in tqdm(seeds, desc="seeds", disable=not progress):
        state: dict[str, Any] = {}

        def train(seed: int = seed, state: dict[str, Any] = state) -> list[dict[str, Any]]:
            found, state["parts"] = _trustml_points(config, seed, targets, penalties, run_dir,
                                                    progress)
            return found

        def parts(seed: int = seed, state: dict[str, Any] = state) -> tuple[Any, Any]:
            if "parts" not in state:  # resumed: rebuild the unconstrained MLP of this seed
                state["parts"] = _reload_plain(config, seed, run_dir)
            return state["parts"]

        rows += _cached(points / f"trustml-s{seed}.json", train, targets)
        if not references:
            continue
        # ExpGrad rows of an older layout are dropped here: they come from their own files
        rows += [r for r in _cached(
            points / f"fairlearn-s{seed}.json",
            lambda seed=seed, parts=parts: _baseline_points(config, seed, targets, *parts(), ()),
            targets) if not r["method"].startswith("Fairlearn ExpGrad")]
        for name in reductions_on:
            rows += _cached(
                points / f"expgrad-{_slug(name)}-s{seed}.json",
                lambda seed=seed, parts=parts, name=name: _baseline_points(
                    config, seed, targets, *parts(), (name,), (name,), "Fairlearn ExpGrad"),
                targets)
    summary = aggregate(rows)
    plot(summary, config.fairness.notion, run_dir / "frontier.png")
    result = {"targets": targets, "seeds": seeds, "notion": config.fairness.notion,
              "rows": rows, "summary": summary, "verdicts": verdicts(summary, targets, rows),
              "noise": noise_lines(rows, targets),
              "seconds_this_call": time.perf_counter() - started}
    (run_dir / "frontier.json").write_text(json.dumps(result, indent=2))
    f, d = config.fairness, config.data
    lines = [
        f"# Accuracy at a fairness target: {d.dataset}, sensitive = {d.sensitive}", "",
        f"{GAP[f.notion][0].capitalize()} (max over group pairs) and accuracy on the test split, "
        f"mean ± sd over seeds {seeds}; 'k/n' = seeds whose test gap met the target. trustml "
        f"meets the target on validation by dual ascent on the penalty multiplier (penalty on the "
        f"{f.acts_on}, {config.train.epochs} epochs); the sensitive attribute is "
        f"{'not ' if d.exclude_sensitive else ''}a model input. Fairlearn's ThresholdOptimizer "
        "needs the sensitive attribute at prediction time; a fair representation does not.", "",
        table(summary, targets), "", *result["noise"], "",
        f"Verdict per target (trustml's best against {REFERENCE}):", "", *result["verdicts"], "",
        "![frontier](frontier.png)"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return result


def _reload_plain(config: Config, seed: int, run_dir: Path) -> tuple[Any, Any]:
    from trustml.data.tabular import load_tabular
    from trustml.evaluation.report import load_run

    ctx = load_run(run_dir / f"{_slug('MLP (unconstrained)')}-tNone-s{seed}", device="cpu")
    return load_tabular(ctx.config.data, seed=seed), ctx.model
