"""Command-line entry points: ``train.py`` / ``trustml-train``, ``evaluate.py`` /
``trustml-evaluate`` and ``trustml-sweep``. User errors end as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import errno
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from trustml import config as cfgmod
from trustml.config import Config, ConfigError
from trustml.progress import set_quiet
from trustml.training import distributed, rundir
from trustml.training.checkpoint import CheckpointError

# run.experiment -> "module:function" taking (config, run_dir) and returning a summary dict.
EXPERIMENTS: dict[str, str] = {
    "train": "trustml.runner:run_training",
    "distill_offline": "trustml.distill.benchmark:run",
    "audit": "trustml.attacks.experiment:audit",
    "lm_canaries": "trustml.attacks.experiment:lm_canaries",
    "canary_extraction": "trustml.attacks.experiment:canary_extraction",
    "fair_transfer": "trustml.fairness.experiments:transfer",
    "fair_postprocess": "trustml.fairness.experiments:wasserstein",
    "fair_ferm": "trustml.fairness.experiments:ferm",
}


# OSErrors that are the machine's state, not a bug: a full disk, a read-only or forbidden folder.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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
        except OSError as err:
            if err.errno not in DISK_ERRORS:
                raise
            where = f" {err.filename!r}" if err.filename else ""
            print(f"error: cannot write{where}: {err.strerror or err} (check the space and "
                  "permissions of run.output_dir / --run-dir)", file=sys.stderr)
            return 2
        except RuntimeError as err:
            timeout = distributed.peer_timeout(err)
            if timeout is None:
                raise
            print(f"error: {timeout}", file=sys.stderr, flush=True)
            # A process group with a silent peer cannot be torn down: the interpreter's normal
            # exit destroys it and the C++ runtime may abort (exit -6) after our message.
            sys.stdout.flush()
            os._exit(1)
        except KeyboardInterrupt:
            print("interrupted: resume with --resume <run dir>", file=sys.stderr)
            return 130

    wrapper.__doc__ = main.__doc__
    return wrapper


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trustml-train", description="Train from a YAML config.")
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); optional with "
                        "--resume, where it must equal the run's own config")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.epochs=3 privacy.enabled=true")
    parser.add_argument("--run-dir", help="write the run here instead of runs/<name>-<time>")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run from its last checkpoint; only "
                        f"{', '.join(cfgmod.RESUMABLE)} may change, through --set")
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
        if args.run_dir is not None and Path(args.run_dir) != run_dir:
            raise ConfigError("--resume RUN_DIR continues that run in place; drop --run-dir")
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {str(run_dir)!r} has no config.yaml")
        cfgmod.check_resume_overrides(args.set)
        config = cfgmod.load(saved, args.set)
        if args.config is not None:
            given = cfgmod.load(args.config, args.set).to_dict()
            changed = cfgmod.differences(config.to_dict(), given)
            if changed:
                shown = cfgmod.describe_differences(changed, config.to_dict(), given,
                                                    ("run", "--config"))
                raise ConfigError(f"--resume: --config {args.config} differs from the run's "
                                  f"config in {shown}; omit --config to resume the run as it "
                                  "was, and change what may change with --set")
    elif args.config is None:
        raise ConfigError("--config is required (or --resume RUN_DIR)")
    else:
        config = cfgmod.load(args.config, args.set)
        run_dir = None
    if config.run.experiment not in EXPERIMENTS:
        raise ConfigError(f"config key 'run.experiment': expected one of {sorted(EXPERIMENTS)}, "
                          f"got {config.run.experiment!r}")
    cfgmod.use_threads(config)
    if config.run.experiment == "train":
        from trustml.runner import run_training

        try:
            result = run_training(config, args.run_dir or run_dir, resume=bool(args.resume),
                                  progress=not args.quiet)
        except (TypeError, AttributeError, KeyError, IndexError) as err:
            if not args.resume:
                raise
            # the checkpoint's JSON feeds the loop (epoch, step, history): a field of the wrong
            # type surfaces here, wherever the loop first uses it
            raise CheckpointError(f"--resume: the checkpoint in {args.resume!r} holds a field of "
                                  f"the wrong type ({type(err).__name__}: {err}); it was edited "
                                  "or is damaged") from None
        run_dir, summary = result.run_dir, result.summary
    else:
        from trustml.runner import make_run_dir

        if args.resume:
            raise ConfigError(f"--resume: run.experiment={config.run.experiment!r} is a driver "
                              "that cannot resume; only run.experiment=train resumes")
        if distributed.launched_world_size() > 1:
            raise ConfigError(f"run.experiment={config.run.experiment!r} is a single-process "
                              "driver; launch it without torchrun (run.experiment=train scales)")
        run_dir = Path(args.run_dir) if args.run_dir else make_run_dir(config)
        rundir.claim(run_dir)
        cfgmod.save(config, run_dir / "config.yaml")
        summary = _resolve(EXPERIMENTS[config.run.experiment])(config, run_dir)
        rundir.release(run_dir)
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
    parser.add_argument("--set", nargs="*", default=[], metavar="bias.KEY=VALUE",
                        help="bias evaluations, e.g. bias.professions=[nurse,pilot] "
                        "bias.bold=hf:AlexaAI/bold bias.classifier=sasha/regardv3")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    from trustml.evaluation.report import evaluate_run, find_runs, headline

    runs = find_runs(args.run)
    saved = runs[0] / "config.yaml"
    cfgmod.use_threads(cfgmod.load(saved) if saved.is_file() else Config())
    # under torchrun, rank 0 speaks for all (readable before the process group exists)
    main = int(os.environ.get("RANK", "0")) == 0
    if main and runs != [Path(args.run)]:
        print(f"{args.run} holds {len(runs)} runs; evaluating each: "
              + ", ".join(str(r.relative_to(args.run)) for r in runs), file=sys.stderr)
    attacks = None if args.attacks is None else [a for a in args.attacks.split(",") if a]
    for run_dir in runs:
        report = evaluate_run(run_dir, attacks=attacks, device=args.device,
                              overrides=args.set)
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
