"""Train from a YAML config: ``python train.py --config configs/adult.yaml [--set k=v ...]``."""

from trustml.cli import run, train_main

if __name__ == "__main__":
    run(train_main)
