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
    name: str = Field("run", description="run name; the run directory is <output_dir>/<name>-<time>")
    seed: int = Field(0, description="seeds torch, numpy, python and every sampler")
    seeds: list[int] | None = Field(
        None, description="drivers that report a spread over seeds (fair_transfer) run once per "
        "seed (null: run.seed alone)")
    output_dir: str = Field("runs", description="parent folder of run directories")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    experiment: str = Field("train", description="'train' or a driver in trustml.cli.EXPERIMENTS")


class DataConfig(Section):
    dataset: Literal["adult", "german", "text", "professions"] = Field(
        "adult", description="adult | german (tabular), text (data.text_path) | professions "
        "(generated corpus)")
    sensitive: str = Field("sex", description="adult: sex, race, race_binary, age; german: sex, age")
    target: str = Field("income", description="adult: income (>50K) or hours (>40 h/week)")
    path: str | None = Field(None, description="folder with the UCI files (default: shipped copy) "
                             "or hf:<hub dataset>")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="validation share of train")
    subset: int | None = Field(None, ge=1, description="use only the first N training rows")
    exclude_sensitive: bool = Field(
        False, description="drop the sensitive column from the features, so the model cannot use "
        "it at prediction (fairness configs set it)")
    # language data
    tokenizer: str = Field("gpt2", description="gpt2 (offline BPE), a local folder or hub name")
    seq_len: int = Field(64, ge=2, description="tokens per language-model sample")
    text_path: str | None = Field(None, description="local UTF-8 text file for dataset: text")


class ModelConfig(Section):
    kind: Literal["mlp", "gpt2"] = Field("mlp", description="mlp (tabular) or gpt2 (language)")
    hidden: list[int] = Field(default_factory=lambda: [64, 32],
                              description="MLP encoder widths; the last is the representation")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    activation: Literal["relu", "gelu", "tanh"] = Field("relu", description="MLP activation")
    norm: Literal["none", "layer", "group"] = Field(
        "none", description="MLP normalisation (BatchNorm is not offered: it breaks DP)")
    name: str | None = Field(None, description="GPT-2: hub name or local folder to load")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="GPT-2: GPT2Config fields to train from scratch")


class TrainConfig(Section):
    epochs: int = Field(5, ge=0, description="passes over the training data")
    batch_size: int = Field(256, ge=1, description="(expected, with DP) logical batch size")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="optimizer")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    momentum: float = Field(0.0, ge=0, description="SGD momentum")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps in total")
    log_every: int = Field(50, ge=1, description="steps between metrics.jsonl records")
    amp: Literal["none", "bf16", "fp16"] = Field(
        "none", description="mixed-precision autocast (pays on CUDA)")


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
    penalty: Literal["none", "mmd", "sinkhorn"] = Field(
        "none", description="distance between groups added to the loss (refused with privacy)")
    weight: float = Field(1.0, ge=0, description="lambda multiplying the penalty")
    notion: Literal["dp", "eo"] = Field(
        "dp", description="dp: all samples; eo: positives (y = 1) only")
    acts_on: Literal["representation", "scores"] = Field(
        "representation", description="compare groups' representations z or scores P(y=1)")
    bandwidth: float | list[float] | Literal["median"] = Field(
        "median", description="MMD Gaussian sigma, a list (kernels summed) or median heuristic")
    frequencies: int | None = Field(
        None, ge=1, description="MMD: random Fourier frequencies for an O(B d F) unbiased estimate "
        "(null: the exact O(B^2 d) kernel matrix)")
    blur: float = Field(0.05, gt=0, description="Sinkhorn blur (entropic eps = blur^2)")
    scaling: float = Field(0.5, gt=0, lt=1,
                           description="Sinkhorn eps-scaling ratio (nearer 1: more iterations)")
    balanced_batches: bool = Field(
        True, description="stratify batches by group (and label for eo) when a penalty is on")
    target: float | None = Field(
        None, gt=0, lt=1, description="gap to reach on validation (DPD for dp, EOD for eo): the "
        "multiplier is adapted by dual ascent, starting from weight (null: fixed weight)")
    update_every: int = Field(10, ge=1, description="steps between dual updates (with target)")
    dual_lr: float = Field(0.5, gt=0, description="dual ascent step on log(lambda) (with target)")

    @model_validator(mode="after")
    def _frequencies_need_mmd(self) -> "FairnessConfig":
        if self.frequencies is not None and self.penalty != "mmd":
            raise ValueError(f"frequencies is an MMD setting; penalty is {self.penalty!r}")
        if self.target is not None and self.penalty == "none":
            raise ValueError("target needs a penalty to adapt (penalty: mmd or sinkhorn)")
        return self


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
    # offline benchmark (run.experiment: distill_offline); its students use the perturbation above
    corpus_size: int = Field(20000, ge=10, description="sentences of the generated corpus")
    corpus_skew: float = Field(0.9, ge=0.5, le=1.0, description="P(stereotyped pronoun)")
    neutral_fraction: float = Field(0.5, ge=0.0, lt=1.0, description="share of ungendered text")
    teacher_epochs: int | None = Field(None, ge=1, description="teacher epochs (train.epochs)")
    generations: int = Field(5, ge=1, description="sampled continuations per bias prompt")


class AttackConfig(Section):
    attacks: list[str] = Field(default_factory=list, description="e.g. loss, lira, rmia (tabular); "
                               "loss, zlib, min_k, min_k_pp, reference (LM)")
    n_reference: int = Field(16, ge=1, description="reference (shadow) models")
    n_population: int = Field(1000, ge=1, description="RMIA population samples z")
    fpr: list[float] = Field(default_factory=lambda: [0.01, 0.001, 0.0001])
    n_targets: int | None = Field(2000, ge=1, description="members scored (as many non-members)")
    online: bool = Field(True, description="LiRA/RMIA with IN reference models (else offline)")
    rmia_gamma: float = Field(1.0, gt=0)
    rmia_a: float = Field(0.3, ge=0, le=1, description="offline RMIA Pr(x) scaling")
    min_k: float = Field(0.2, gt=0, le=1, description="fraction of tokens for Min-K%(++)")
    reference_run: str | None = Field(None, description="run dir of a reference LM")
    audit_epsilons: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0, float("inf")],
        description="accountant epsilons of the audit driver (inf = non-private)")
    canaries: int = Field(10, ge=0, description="canaries inserted by the lm_canaries driver")
    canary_repeats: list[int] = Field(default_factory=lambda: [1, 10, 100],
                                      description="insertion counts, cycled over the canaries")
    canary_candidates: int = Field(2000, ge=10, description="non-inserted secrets to rank against")
    canary_corpus: int = Field(4000, ge=10, description="generated sentences the canaries hide in")


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


def reference_markdown() -> str:
    """The config reference table of README.md (a test keeps the two in step)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            text = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | `{default!r}` | {text} |")

    walk(Config, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
