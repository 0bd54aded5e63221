"""A zoo of tiny random Hugging Face models and the per-sample reference the DP engine must match.

Every entry builds offline from a config (no hub access), small enough that the whole zoo runs in
seconds, in float64, in train mode with every dropout / drop-path probability set to 0 (DP training
runs in train mode; zero dropout makes the per-sample reference deterministic). Shared by
``tests/privacy/test_hf_zoo.py`` (exact or refused, never silently wrong) and
``scripts/zoo_table.py`` (the README table, with Opacus for comparison).

The reference is the definition of per-sample clipping: for each sample alone, forward, backward,
clip the whole gradient to norm C, and sum.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 96
HIDDEN = 32
FFN = 64
LAYERS = 2
HEADS = 2
POSITIONS = 64
IMAGE = 16
CHANNELS = 3
LABELS = 3
FIRST_TOKEN = 4  # token ids from here on: no pad / bos / eos / unk / decoder-start ids in the batch

Batch = dict[str, Tensor]
Loss = Callable[[nn.Module, Batch], Tensor]

# Every dropout-like probability a config of the zoo may read (unknown keys are kept as attributes).
NO_DROPOUT = {
    k: 0.0
    for k in (
        "dropout",
        "attention_dropout",
        "activation_dropout",
        "hidden_dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "classifier_dropout",
        "classifier_dropout_prob",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "summary_first_dropout",
        "embed_dropout",
        "resid_dropout",
        "attn_dropout",
        "dropout_rate",
        "drop_path_rate",
        "qa_dropout",
        "seq_classif_dropout",
        "layerdrop",
        "encoder_layerdrop",
        "decoder_layerdrop",
        "hidden_dropout_rate",
        "attention_dropout_rate",
    )
}


@dataclass(frozen=True)
class ZooModel:
    """One architecture: how to build it and what a per-sample loss on it is."""

    name: str
    family: str  # "decoder", "encoder", "encoder-decoder", "vision"
    model_type: str  # transformers' config model_type
    head: str  # "causal-lm", "seq-cls", "seq2seq-lm", "image-cls"
    config: dict[str, Any] = field(default_factory=dict)
    collide: int | None = None  # vision: a batch size equal to some token / window count

    def build(self, seed: int = 0) -> nn.Module:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageClassification,
            AutoModelForSeq2SeqLM,
            AutoModelForSequenceClassification,
        )

        auto = {
            "causal-lm": AutoModelForCausalLM,
            "seq-cls": AutoModelForSequenceClassification,
            "seq2seq-lm": AutoModelForSeq2SeqLM,
            "image-cls": AutoModelForImageClassification,
        }[self.head]
        extra: dict[str, Any] = {}
        if self.head in ("seq-cls", "image-cls"):
            extra["num_labels"] = LABELS
        config = AutoConfig.for_model(self.model_type, **{**NO_DROPOUT, **extra, **self.config})
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation="eager").to(torch.float64)
        for m in model.modules():  # hard-coded dropouts as well
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        model.train()
        return model

    def batch(self, batch: int, seq: int, seed: int = 1, pad: bool = True) -> Batch:
        """``batch`` samples of ``seq`` tokens (or images); sample 0 right-padded when ``pad``."""
        g = torch.Generator().manual_seed(seed)
        if self.head == "image-cls":
            return {
                "pixel_values": torch.randn(batch, CHANNELS, IMAGE, IMAGE, generator=g, dtype=torch.float64),
                "labels": torch.randint(0, LABELS, (batch,), generator=g),
            }
        ids = torch.randint(FIRST_TOKEN, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad and seq > 2:
            mask[0, -2:] = 0  # a padded sample, as in any real batch of texts
        out = {"input_ids": ids, "attention_mask": mask}
        if self.head == "seq-cls":
            out["labels"] = torch.randint(0, LABELS, (batch,), generator=g)
        if self.head == "seq2seq-lm":
            out["decoder_input_ids"] = torch.randint(FIRST_TOKEN, VOCAB, (batch, seq), generator=g)
            out["target"] = torch.randint(FIRST_TOKEN, VOCAB, (batch, seq), generator=g)
        return out

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """(B,) per-sample losses: mean token CE (LM, seq2seq), CE (classifiers)."""
        if self.head == "image-cls":
            logits = model(pixel_values=batch["pixel_values"]).logits
            return F.cross_entropy(logits, batch["labels"], reduction="none")
        if self.head == "seq-cls":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return F.cross_entropy(logits, batch["labels"], reduction="none")
        if self.head == "causal-lm":
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            keep = mask[:, 1:].to(ce.dtype)
            return (ce * keep).sum(1) / keep.sum(1)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
        ).logits
        return F.cross_entropy(logits.transpose(1, 2), batch["target"], reduction="none").mean(1)


def _lm(name: str, model_type: str, **config: Any) -> ZooModel:
    return ZooModel(name, "decoder", model_type, "causal-lm", {"vocab_size": VOCAB, **config})


def _enc(name: str, model_type: str, **config: Any) -> ZooModel:
    return ZooModel(name, "encoder", model_type, "seq-cls", {"vocab_size": VOCAB, **config})


def _s2s(name: str, model_type: str, **config: Any) -> ZooModel:
    return ZooModel(name, "encoder-decoder", model_type, "seq2seq-lm", {"vocab_size": VOCAB, **config})


def _vis(name: str, model_type: str, collide: int, **config: Any) -> ZooModel:
    return ZooModel(name, "vision", model_type, "image-cls", {"num_channels": CHANNELS, **config}, collide)


# Llama-style configs (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, ...).
_STD = dict(
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    max_position_embeddings=POSITIONS,
)
_BART = dict(
    d_model=HIDDEN,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS,
    encoder_ffn_dim=FFN,
    decoder_ffn_dim=FFN,
    max_position_embeddings=POSITIONS,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)
_VIT = dict(image_size=IMAGE, patch_size=8, **_STD)  # 4 patches (+ CLS)

ZOO: list[ZooModel] = [
    _lm("gpt2", "gpt2", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS),
    _lm("llama", "llama", num_key_value_heads=1, **_STD),
    _enc("bert", "bert", **_STD),
    _s2s("t5", "t5", d_model=HIDDEN, d_kv=16, d_ff=FFN, num_layers=1, num_decoder_layers=1, num_heads=HEADS,
         relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0),
    _vis("vit", "vit", collide=5, **_VIT),
]


# ---------------------------------------------------------------------------------------------------
# The reference and the verdict


@dataclass
class Verdict:
    """``exact``, ``refused`` (clear error naming a module), ``wrong`` (silently) or ``crash``
    (an error that names no module: the user cannot act on it)."""

    kind: str
    detail: str = ""
    max_err: float = 0.0


def per_sample_grads(
    model: nn.Module, loss: Loss, batch: Batch
) -> tuple[Tensor, list[list[Tensor]], Tensor]:
    """Per-sample losses, gradients (one autograd call per sample) and gradient norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = next(iter(batch.values())).shape[0]
    losses, grads = [], []
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        li = loss(model, one).sum()
        gi = torch.autograd.grad(li, params, allow_unused=True)
        losses.append(li.detach())
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gi)])
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gi)) for gi in grads])
    return torch.stack(losses), grads, norms


def clip_norm_for(norms: Tensor) -> float:
    """A C that clips most samples but (for B >= 2) not all: between the two smallest norms."""
    s = norms.sort().values
    return float(s[0] / 2 if len(s) == 1 else (s[0] + s[1]) / 2)


def clipped_sum(grads: list[list[Tensor]], norms: Tensor, c: float) -> list[Tensor]:
    total = [torch.zeros_like(g) for g in grads[0]]
    for gi, ni in zip(grads, norms):
        factor = min(1.0, c / float(ni))
        for t, g in zip(total, gi):
            t += factor * g
    return total


def module_names(model: nn.Module) -> set[str]:
    """Qualified names and class names: an error that names a module contains one of these."""
    names = {n for n, _ in model.named_modules() if n}
    return names | {type(m).__name__ for m in model.modules()}


def names_a_module(message: str, model: nn.Module) -> bool:
    words = {w.rstrip(".") for w in re.findall(r"[A-Za-z_][\w.]*", message)}
    return bool(words & module_names(model)) or "<model>" in message


def max_rel_err(got: Tensor, ref: Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def compare_grads(
    named: list[tuple[str, nn.Parameter]], got: list[Tensor | None], ref: list[Tensor], rtol: float, atol: float
) -> Verdict:
    worst, bad = 0.0, []
    for (name, _), g, r in zip(named, got, ref):
        if g is None:
            if r.abs().max() > atol:
                bad.append(f"{name}: no gradient")
                worst = max(worst, 1.0)
            continue
        if not torch.allclose(g, r, rtol=rtol, atol=atol):
            err = max_rel_err(g, r)
            worst = max(worst, err)
            bad.append(f"{name}: rel err {err:.2g}")
    if bad:
        return Verdict("wrong", f"{len(bad)}/{len(named)} params wrong, e.g. " + "; ".join(bad[:3]), worst)
    return Verdict("exact")


def check_trustml(spec: ZooModel, batch_size: int, seq: int, rtol: float = 1e-6, atol: float = 1e-6) -> Verdict:
    """Run ``PerSampleClipper`` on a fresh model and judge it against the naive loop."""
    from trustml.privacy import PerSampleClipper

    model = spec.build()
    batch = spec.batch(batch_size, seq)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref_losses, grads, norms = per_sample_grads(model, spec.loss, batch)
    # The test is only meaningful if a sample's loss does not depend on the rest of the batch.
    with torch.no_grad():
        together = spec.loss(model, batch)
    torch.testing.assert_close(together, ref_losses, rtol=1e-9, atol=1e-9)
    c = clip_norm_for(norms)
    ref = clipped_sum(grads, norms, c)
    model.zero_grad(set_to_none=True)
    clipper = None
    try:
        clipper = PerSampleClipper(model, max_grad_norm=c)
        clipper.backward(spec.loss(model, batch))
    except Exception as e:  # noqa: BLE001 - any refusal is judged by its message
        message = f"{type(e).__name__}: {e}"
        kind = "refused" if names_a_module(str(e), model) else "crash"
        return Verdict(kind, message.splitlines()[0][:300])
    finally:
        if clipper is not None:
            clipper.remove()
    return compare_grads(named, [p.grad for _, p in named], ref, rtol, atol)
