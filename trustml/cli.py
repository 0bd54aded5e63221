"""Command-line entry points: ``train.py`` / ``trustml-train``, ``evaluate.py`` /
``trustml-evaluate`` and ``trustml-sweep``. User errors end as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from trustml import config as cfgmod
from trustml.config import Config, ConfigError
from trustml.progress import set_quiet
from trustml.training import distributed
from trustml.training.checkpoint import CheckpointError

# run.experiment -> "module:function" taking (config, run_dir) and returning a summary dict.
EXPERIMENTS: dict[str, str] = {
    "train": "trustml.training.run:run_training",
    "distill_offline": "trustml.distill.benchmark:run",
    "audit": "trustml.attacks.experiment:audit",
    "lm_canaries": "trustml.attacks.experiment:lm_canaries",
    "fair_transfer": "trustml.fairness.experiments:transfer",
    "fair_postprocess": "trustml.fairness.experiments:wasserstein",
    "fair_ferm": "trustml.fairness.experiments:ferm",
}


def _resolve(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn the user's mistakes (config, data, checkpoint) into one line and exit code 2."""

    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (ConfigError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: resume with --resume <run dir>", file=sys.stderr)
            return 130

    wrapper.__doc__ = main.__doc__
    return wrapper


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trustml-train", description="Train from a YAML config.")
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.epochs=3 privacy.enabled=true")
    parser.add_argument("--run-dir", help="write the run here instead of runs/<name>-<time>")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or per-epoch lines (the final summary still prints)")
    return parser


@_guarded
def train_main(argv: list[str] | None = None) -> int:
    """Train (or run the experiment named by ``run.experiment``) and print the summary."""
    args = _train_parser().parse_args(argv)
    set_quiet(args.quiet)
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {str(run_dir)!r} has no config.yaml")
        config = cfgmod.load(saved, args.set)
    else:
        config = cfgmod.load(args.config, args.set)
        run_dir = None
    if config.run.experiment not in EXPERIMENTS:
        raise ConfigError(f"config key 'run.experiment': expected one of {sorted(EXPERIMENTS)}, "
                          f"got {config.run.experiment!r}")
    cfgmod.use_threads(config)
    if config.run.experiment == "train":
        from trustml.training.run import run_training

        result = run_training(config, args.run_dir or run_dir, resume=bool(args.resume))
        run_dir, summary = result.run_dir, result.summary
    else:
        from trustml.training.run import make_run_dir

        if distributed.launched_world_size() > 1:
            raise ConfigError(f"run.experiment={config.run.experiment!r} is a single-process "
                              "driver; launch it without torchrun (run.experiment=train scales)")
        run_dir = Path(args.run_dir) if args.run_dir else make_run_dir(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfgmod.save(config, run_dir / "config.yaml")
        summary = _resolve(EXPERIMENTS[config.run.experiment])(config, run_dir)
    if distributed.current().is_main:  # under torchrun, rank 0 speaks for all
        shown = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
        print(json.dumps(shown, indent=2, default=str))
        print(f"run directory: {run_dir}")
    return 0


@_guarded
def evaluate_main(argv: list[str] | None = None) -> int:
    """Evaluate a run directory into <run>/eval/ (metrics.json, report.md, plots)."""
    parser = argparse.ArgumentParser(prog="trustml-evaluate", description=evaluate_main.__doc__)
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help="run directory written by train.py (spell it --run-dir after "
                        "torchrun, whose parser takes --run as an abbreviation of --run-path)")
    parser.add_argument("--attacks", help="comma-separated membership-inference attacks, e.g. "
                        "loss,lira,rmia (default: attack.attacks of the run's config)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    from trustml.evaluation.report import evaluate_run, find_runs, headline

    runs = find_runs(args.run)
    saved = runs[0] / "config.yaml"
    cfgmod.use_threads(cfgmod.load(saved) if saved.is_file() else Config())
    main = distributed.current().is_main  # under torchrun, rank 0 speaks for all
    if main and runs != [Path(args.run)]:
        print(f"{args.run} holds {len(runs)} runs; evaluating each: "
              + ", ".join(str(r.relative_to(args.run)) for r in runs), file=sys.stderr)
    attacks = None if args.attacks is None else [a for a in args.attacks.split(",") if a]
    for run_dir in runs:
        report = evaluate_run(run_dir, attacks=attacks, device=args.device)
        if main:
            print(f"{run_dir}: {headline(report.parent / 'metrics.json')}")
            print(f"report: {report}")
    return 0


@_guarded
def sweep_main(argv: list[str] | None = None) -> int:
    """Fairness trade-off sweep over penalty weights (see trustml.fairness.sweep)."""
    from trustml.fairness.sweep import sweep_main as fairness_sweep

    return fairness_sweep(argv)


def run(main: Callable[[list[str] | None], int]) -> None:
    sys.exit(main(None))
