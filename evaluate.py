"""Evaluate a run directory: ``python evaluate.py --run runs/<name>-<time> [--attacks loss,lira]``."""

from trustml.cli import evaluate_main, run

if __name__ == "__main__":
    run(evaluate_main)
