"""Typed run configuration: a YAML file plus dotted ``--set a.b=c`` overrides.

Every section is a pydantic model with unknown keys forbidden, so a typo is an error naming the key
rather than a silently ignored setting (a mistyped ``privacy.noise_multiplier`` must never train a
non-private model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    experiment: str = Field("train", description="'train' or a driver in trustml.cli.EXPERIMENTS")


class DataConfig(Section):
    dataset: Literal["adult", "german", "text", "professions"] = "adult"
    sensitive: str = "sex"
    target: str = "income"
    path: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    subset: int | None = Field(None, ge=1, description="use only the first N training rows")
    # language data
    tokenizer: str = "gpt2"
    seq_len: int = Field(64, ge=2)
    text_path: str | None = None


class ModelConfig(Section):
    kind: Literal["mlp", "gpt2"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64, 32])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    norm: Literal["none", "layer", "group"] = "none"
    # GPT-2: a hub name or local path (name), or a small config trained from scratch (config)
    name: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Section):
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(256, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps in total")
    log_every: int = Field(50, ge=1)
    amp: Literal["none", "bf16", "fp16"] = "none"


class PrivacyConfig(Section):
    enabled: bool = False
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    poisson: bool = True
    physical_batch_size: int | None = Field(None, ge=1)
    epsilon_budget: float | None = Field(None, gt=0, description="stop before exceeding this")

    @model_validator(mode="after")
    def _one_noise_source(self) -> "PrivacyConfig":
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier and target_epsilon")
        return self


class FairnessConfig(Section):
    penalty: Literal["none", "mmd", "sinkhorn"] = "none"
    weight: float = Field(1.0, ge=0)
    notion: Literal["dp", "eo"] = "dp"
    on: Literal["representation", "scores"] = "representation"
    bandwidth: float | list[float] | Literal["median"] = "median"
    blur: float = Field(0.05, gt=0)
    scaling: float = Field(0.5, gt=0, lt=1, description="Sinkhorn eps-scaling ratio (nearer 1: more iterations)")
    balanced_batches: bool = True


class DistillConfig(Section):
    enabled: bool = False
    teacher: str | None = None
    student_layers: list[int] | None = None
    alpha_kd: float = Field(1.0, ge=0)
    alpha_lm: float = Field(0.0, ge=0)
    alpha_cos: float = Field(0.0, ge=0)
    temperature: float = Field(2.0, gt=0)
    cda: bool = False
    perturbation: Literal["none", "logit_mean", "logit_max", "prob_mean"] = "none"


class AttackConfig(Section):
    attacks: list[str] = Field(default_factory=list)
    n_reference: int = Field(16, ge=1)
    n_population: int = Field(1000, ge=1)
    fpr: list[float] = Field(default_factory=lambda: [0.01, 0.001, 0.0001])


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    fairness: FairnessConfig = Field(default_factory=FairnessConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "privacy.enabled=true"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set to a value and a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else None
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"config key {key!r} is unknown"
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"config key {key!r}: {first['msg']}{shown}"


def from_dict(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections")
    return from_dict(_merge(raw, parse_overrides(overrides or [])))


def save(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
