"""Typed run configuration: a YAML file plus dotted ``--set a.b=c`` overrides.

Every section is a pydantic model with unknown keys forbidden, so a typo is an error naming the key
rather than a silently ignored setting (a mistyped ``privacy.noise_multiplier`` must never train a
non-private model).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("run", description="run name; the run directory is <output_dir>/<name>-<time>")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds torch, numpy, python and every sampler "
                      "(0 <= seed < 2**32, the range numpy and scikit-learn accept)")
    seeds: list[int] | None = Field(
        None, description="drivers that report a spread over seeds (fair_transfer) run once per "
        "seed (null: run.seed alone)")
    output_dir: str = Field("runs", description="parent folder of run directories")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    experiment: str = Field("train", description="'train' or a driver in trustml.cli.EXPERIMENTS")
    dist_timeout_s: float = Field(
        600.0, gt=0, description="torchrun: seconds a rank waits for a silent peer before every rank "
        "stops with an error (env TRUSTML_DIST_TIMEOUT_S overrides)")
    threads: int | None = Field(
        None, ge=0, description="torch CPU threads (null: 1, see BENCHMARKS.md; 0: torch's default, "
        "one per core); the environment variable TRUSTML_THREADS overrides it")


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
    text_errors: Literal["strict", "replace"] = Field(
        "strict", description="text_path bytes that are not UTF-8: strict (error naming the byte "
        "offset) or replace (U+FFFD, count reported in summary.json)")
    drop_bad_rows: bool = Field(
        False, description="tabular rows with missing/NaN/inf/non-numeric cells or unknown labels: "
        "false = error naming file, line and column; true = drop them (count in summary.json)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of "
                                 "data.path hf:...; written to summary.json")
    tokenizer_revision: str | None = Field(
        None, description="hub revision of data.tokenizer; the resolved one is in summary.json")


class ModelConfig(Section):
    kind: Literal["mlp", "gpt2"] = Field("mlp", description="mlp (tabular) or gpt2 (language)")
    hidden: list[int] = Field(default_factory=lambda: [64, 32],
                              description="MLP encoder widths; the last is the representation")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after each hidden layer")
    activation: Literal["relu", "gelu", "tanh"] = Field("relu", description="MLP activation")
    norm: Literal["none", "layer", "group"] = Field(
        "none", description="MLP normalisation (BatchNorm is not offered: it breaks DP)")
    name: str | None = Field(None, description="GPT-2: hub name or local folder to load")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of "
                                 "model.name; the resolved one is written to summary.json")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="GPT-2: GPT2Config fields to train from scratch")


    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, hidden: list[int]) -> list[int]:
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError("expected a non-empty list of layer widths >= 1")
        return hidden


class TrainConfig(Section):
    epochs: int = Field(5, ge=0, description="passes over the training data")
    batch_size: int = Field(256, ge=1, description="(expected, with DP) logical batch size")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="optimizer")
    lr: float = Field(1e-3, gt=0, le=3.4e38, description="learning rate (at most the float32 "
                      "maximum; a diverging run stops with an error naming the step)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    momentum: float = Field(0.0, ge=0, description="SGD momentum")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps in total")
    log_every: int = Field(50, ge=1, description="steps between metrics.jsonl records")
    amp: Literal["none", "bf16", "fp16"] = Field(
        "none", description="mixed-precision autocast (pays on CUDA)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="decay after warmup, to 0 at the last step (max_steps, else epochs)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup from 0")
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm (plain "
                                    "training; DP clips per sample with privacy.max_grad_norm)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (batch_size "
                            "is split into this many; same update, less memory)")
    checkpoint_steps: int | None = Field(None, ge=1, description="also checkpoint every N steps "
                                         "(resumes mid-epoch)")
    eval_every_steps: int | None = Field(None, ge=1, description="also validate every N steps")


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
    secure_rng: bool = Field(
        True, description="noise and batch sampling from the OS CSPRNG, never from run.seed nor "
        "saved; false: seeded from run.seed for bit-reproducible runs (anyone with the seed can "
        "remove the noise)")
    verify: bool = Field(
        True, description="self-check the first batch's clipped gradient against the naive "
        "per-sample loop (float64 copy of the model); refuse the run on a mismatch")

    @model_validator(mode="after")
    def _one_noise_source(self) -> "PrivacyConfig":
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier and target_epsilon")
        return self


class FairnessConfig(Section):
    penalty: Literal["none", "mmd", "sinkhorn", "rate"] = Field(
        "none", description="distance between groups added to the loss (refused with privacy); "
        "rate: gap between the groups' mean P(y=1), the soft selection rate (acts_on: scores)")
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
    margin: float = Field(
        0.0, ge=0, lt=1, description="with target: iterates and thresholds are selected at a "
        "validation gap <= target * (1 - margin), room for the noise of the validation reading")
    select_threshold: bool = Field(
        True, description="with target: pick the most accurate decision threshold meeting the "
        "constraint on validation (one for all groups, folded into the head's bias)")
    method: Literal["penalty", "group_posterior"] = Field(
        "penalty", description="how target is met: penalty (dual ascent on the penalty's "
        "multiplier) or group_posterior (Menon & Williamson 2018, dp only: a second head learns "
        "P(group | x) with the sensitive attribute as a training label; the decision l_y - c . "
        "l_group >= t, (c, t) chosen on validation, is folded into the head; needs penalty: none)")
    group_weight: float = Field(
        1.0, gt=0, description="group_posterior: weight of the group head's cross-entropy")

    @model_validator(mode="after")
    def _frequencies_need_mmd(self) -> "FairnessConfig":
        if self.frequencies is not None and self.penalty != "mmd":
            raise ValueError(f"frequencies is an MMD setting; penalty is {self.penalty!r}")
        if self.penalty == "rate" and self.acts_on != "scores":
            raise ValueError("penalty 'rate' compares the groups' mean P(y=1): set acts_on: scores")
        if self.method == "group_posterior":
            if self.target is None or self.penalty != "none" or self.notion != "dp":
                raise ValueError("method group_posterior needs a target, penalty: none (it "
                                 "replaces the penalty) and notion: dp")
        elif self.target is not None and self.penalty == "none":
            raise ValueError("target needs a penalty to adapt (penalty: mmd, sinkhorn or rate) "
                             "or method: group_posterior")
        return self


class DistillConfig(Section):
    enabled: bool = Field(False, description="distil distill.teacher into the student")
    teacher: str | None = Field(None, description="teacher: hub name or local folder")
    teacher_revision: str | None = Field(
        None, description="hub revision of distill.teacher; the resolved one is in summary.json")
    student_layers: list[int] | None = Field(
        None, description="teacher blocks the student starts from (DistilGPT-2: 0,2,4,7,9,11); "
        "null: a fresh model.config student")
    alpha_kd: float = Field(1.0, ge=0, description="weight of the KL to the teacher's target")
    alpha_lm: float = Field(0.0, ge=0, description="weight of the student's own LM loss")
    alpha_cos: float = Field(0.0, ge=0, description="weight of 1 - cos of last hidden states")
    temperature: float = Field(2.0, gt=0, description="KD temperature tau")
    cda: bool = Field(False, description="also train on the counterfactual sigma(x)")
    perturbation: Literal["none", "logit_mean", "prob_mean", "prob_max"] = Field(
        "none", description="role reversal: combine the teacher on x and on sigma(x)")
    perturb_only_gendered: bool = Field(
        False, description="perturb only the gendered tokens' probabilities (the rest stays the "
        "teacher's on x)")
    # offline benchmark (run.experiment: distill_offline); its students use the perturbation above
    corpus_size: int = Field(20000, ge=10, description="sentences of the generated corpus")
    corpus_skew: float = Field(0.9, ge=0.5, le=1.0, description="P(stereotyped pronoun)")
    neutral_fraction: float = Field(0.5, ge=0.0, lt=1.0, description="share of ungendered text")
    teacher_epochs: int | None = Field(None, ge=1, description="teacher epochs (train.epochs)")
    generations: int = Field(5, ge=1, description="sampled continuations per bias prompt")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="offline benchmark: one corpus, teacher and students per "
                             "seed; intervals are over seeds and prompts")


class BiasConfig(Section):
    professions: list[str] | None = Field(
        None, description="professions of the template probe (null: the shipped list)")
    templates: list[str] | None = Field(
        None, description="probe templates with {p} (null: the shipped probe templates)")
    bold: str | None = Field(None, description="BOLD prompts: hf:AlexaAI/bold or a local JSON")
    bold_domains: list[str] = Field(default_factory=lambda: ["gender", "profession"],
                                    description="BOLD domains to prompt with")
    bold_prompts: int | None = Field(200, ge=1, description="BOLD prompts used per domain")
    classifier: str | None = Field(
        None, description="text classifier of generations (regard / sentiment / toxicity): hub "
        "name or local folder")
    crows_pairs: str | None = Field(None, description="CrowS-Pairs CSV to score the LM on")
    paired: str | None = Field(
        None, description="StereoSet/WinoBias-style JSON(L) of {stereotype, anti_stereotype} pairs")

    @model_validator(mode="after")
    def _templates_name_the_profession(self) -> "BiasConfig":
        bad = [t for t in self.templates or [] if "{p}" not in t]
        if bad:
            raise ValueError(f"templates {bad} lack the {{p}} placeholder")
        return self


class AttackConfig(Section):
    attacks: list[str] = Field(default_factory=list, description="e.g. loss, lira, rmia (tabular); "
                               "loss, zlib, min_k, min_k_pp, reference (LM)")
    n_reference: int = Field(16, ge=1, description="reference (shadow) models")
    seed: int | None = Field(None, description="seeds the reference models' training halves and "
                             "initialisation (null: run.seed); printed in the report")
    n_population: int = Field(1000, ge=1, description="RMIA population samples z")
    fpr: list[float] = Field(default_factory=lambda: [0.01, 0.001, 0.0001],
                             description="false-positive rates of the TPR@FPR table, each in (0, 1)")
    n_targets: int | None = Field(2000, ge=1, description="members scored (as many non-members)")
    online: bool = Field(True, description="LiRA/RMIA with IN reference models (else offline)")
    rmia_gamma: float = Field(1.0, gt=0)
    rmia_a: float = Field(0.3, ge=0, le=1, description="offline RMIA Pr(x) scaling")
    min_k: float = Field(0.2, gt=0, le=1, description="fraction of tokens for Min-K%(++)")
    reference_run: str | None = Field(None, description="run dir of a reference LM")
    audit_epsilons: list[float] = Field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0, float("inf")],
        description="accountant epsilons of the audit driver (inf = non-private)")
    audit_input_canaries: int = Field(
        500, ge=2, description="audit: mislabelled held-out rows, each trained on by a coin flip "
        "(black-box canaries)")
    audit_gradient_canaries: int = Field(
        200000, ge=2, description="audit: Dirac gradient canaries, each inserted by a coin flip "
        "(white-box canaries)")
    audit_seed: int | None = Field(
        0, description="audit: seed of the canary coins (null: secret, drawn from the OS)")
    audit_confidence: float = Field(0.95, gt=0, lt=1,
                                    description="audit: confidence of the epsilon lower bounds")
    extraction_epsilons: list[float] = Field(
        default_factory=lambda: [float("inf"), 8.0, 4.0, 1.0],
        description="canary_extraction: accountant epsilons of the classifiers (inf = non-private)")
    extraction_trials: int = Field(10, ge=1, description="canary_extraction: classifiers (one "
                                   "random PIN canary each) per epsilon")
    extraction_repeats: int = Field(20, ge=1, description="canary_extraction: copies of the "
                                    "canary in the training set")
    canaries: int = Field(10, ge=0, description="canaries inserted by the lm_canaries driver")
    canary_repeats: list[int] = Field(default_factory=lambda: [1, 10, 100],
                                      description="insertion counts, cycled over the canaries")
    canary_candidates: int = Field(2000, ge=10, description="non-inserted secrets to rank against")
    canary_corpus: int = Field(4000, ge=10, description="generated sentences the canaries hide in")


    @field_validator("fpr")
    @classmethod
    def _rates(cls, fpr: list[float]) -> list[float]:
        if any(not 0.0 < f < 1.0 for f in fpr):
            raise ValueError("expected false-positive rates strictly between 0 and 1")
        return fpr


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    fairness: FairnessConfig = Field(default_factory=FairnessConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    bias: BiasConfig = Field(default_factory=BiasConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)

    @model_validator(mode="after")
    def _dp_trains(self) -> "Config":
        if self.privacy.enabled and self.train.epochs == 0:
            raise ValueError("train.epochs=0 with privacy.enabled would save an untrained model "
                             "as a DP result; set train.epochs >= 1")
        return self

    @model_validator(mode="after")
    def _no_penalty_under_dp(self) -> "Config":
        # Refused here, before any data loads: a penalty couples samples, so per-sample clipping
        # cannot bound its sensitivity (trustml.privacy.ensure_decomposable says the same at run
        # time for penalties built in code).
        if self.privacy.enabled and self.fairness.penalty != "none":
            raise ValueError(
                f"fairness.penalty={self.fairness.penalty!r} with privacy.enabled=true: the penalty "
                "couples samples, so DP-SGD cannot bound its sensitivity; set fairness.penalty=none "
                "or privacy.enabled=false")
        if self.privacy.enabled and self.fairness.method == "group_posterior":
            raise ValueError("fairness.method=group_posterior with privacy.enabled=true: its group "
                             "head trains outside the private model; use fairness.method=penalty "
                             "without a target, or privacy.enabled=false")
        return self

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
        try:
            node[leaf] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            where = str(err.problem) if hasattr(err, "problem") else type(err).__name__
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({where}); quote "
                              "strings that contain ':', '[' or '{'") from None
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included (``train``, ``train.epochs``, ...)."""
    out = []
    for name, field in (model or Config).model_fields.items():
        out.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _keys(field.annotation, f"{prefix}{name}.")
    return out


def suggest(key: str) -> str | None:
    """The valid key closest to a mistyped ``key``: the same name in another section
    (``run.epochs`` -> ``train.epochs``), else a close sibling (``train.epoch`` -> ``train.epochs``),
    else a close name in any section."""
    keys = [k for k in _keys() if k.count(".") == key.count(".")]
    parent, _, leaf = key.rpartition(".")
    leaves: dict[str, list[str]] = {}
    for k in keys:
        leaves.setdefault(k.rpartition(".")[2], []).append(k)
    if leaf in leaves:
        return leaves[leaf][0]
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if close:
        return siblings[close[0]]
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)
    return leaves[close[0]][0] if close else None


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        guess = suggest(key)
        return f"config key {key!r} is unknown" + (f"; did you mean {guess}?" if guess else "")
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:  # a check across sections names its keys itself
        return f"config: {message}"
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"config key {key!r}: {message}{shown}"


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
        if path.is_dir():
            yamls = sorted(p.name for p in path.glob("*.yaml"))[:5]
            raise ConfigError(f"config file {str(path)!r} is a directory"
                              + (f"; pick a file in it, e.g. {', '.join(yamls)}" if yamls else ""))
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {str(path)!r} {what}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections")
    return from_dict(_merge(raw, parse_overrides(overrides or [])))


# What may change when a run is resumed (only through --set): how long it runs, its privacy budgets,
# and settings that change neither the math nor the privacy (logging, checkpoint cadence, device,
# memory-sized physical batches). Everything else would make the checkpoint describe another run.
RESUMABLE = ("train.epochs", "train.max_steps", "privacy.target_epsilon", "privacy.epsilon_budget",
             "train.log_every", "run.checkpoint_every", "run.device", "run.threads",
             "privacy.physical_batch_size")


def differences(first: dict[str, Any], second: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys: list[str] = []
    for key in sorted(set(first) | set(second)):
        a, b = first.get(key), second.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _lookup(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def describe_differences(keys: list[str], first: dict[str, Any], second: dict[str, Any],
                         names: tuple[str, str]) -> str:
    return ", ".join(f"{k} ({names[0]} {_lookup(first, k)!r}, {names[1]} {_lookup(second, k)!r})"
                     for k in keys)


def check_resume_overrides(overrides: list[str]) -> None:
    """Refuse a ``--set`` on resume of any key outside :data:`RESUMABLE`, naming it."""
    for item in overrides:
        key = item.partition("=")[0]
        if key not in RESUMABLE:
            raise ConfigError(f"--resume: {key!r} cannot change on resume (only "
                              f"{', '.join(RESUMABLE)} can, through --set)")


class ConfigRecord:
    """The run's config as a checkpoint entry. Restoring it refuses a run whose config changed since
    the checkpoint in anything but :data:`RESUMABLE` (an edited config.yaml, privacy turned off)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if not isinstance(saved, dict):
            raise ValueError("checkpoint field config: expected a mapping")
        now = self.config.to_dict()
        changed = [k for k in differences(saved, now) if k not in RESUMABLE]
        if changed:
            raise ConfigError(
                "the run's config differs from its checkpoint's in "
                f"{describe_differences(changed, saved, now, ('checkpoint', 'now'))}; only "
                f"{', '.join(RESUMABLE)} can change on resume, through --set")


def threads(config: Config) -> int:
    """The torch CPU thread count to use: ``TRUSTML_THREADS`` if set, else ``run.threads``
    (null: 1; 0: torch's default). One thread is the default because trustml's models are small:
    on a busy machine a second thread waits on a contended core at every op (BENCHMARKS.md)."""
    raw = os.environ.get("TRUSTML_THREADS", "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            raise ConfigError(f"environment variable TRUSTML_THREADS: expected an integer >= 0 "
                              f"(0: torch's default), got {raw!r}")
        return value
    return 1 if config.run.threads is None else config.run.threads


def use_threads(config: Config) -> None:
    """Set torch's CPU threads to ``threads(config)``; the entry points call it before any torch
    work (library calls such as ``run_training`` leave the process's setting alone)."""
    n = threads(config)
    if n == 0:  # torch's own default: one thread per physical core
        return
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # settable once, before any inter-op work: a later entry call in-process
        pass


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
