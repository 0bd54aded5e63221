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
SEQ = 5
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
    cls: str | None = None  # a transformers class, where the Auto class has no mapping
    load: dict[str, Any] = field(default_factory=dict)  # from_config options (e.g. MoE kernels)

    def hf_config(self) -> Any:
        from transformers import AutoConfig

        extra: dict[str, Any] = {}
        if self.head in ("seq-cls", "image-cls"):
            extra["num_labels"] = LABELS
        return AutoConfig.for_model(self.model_type, **{**NO_DROPOUT, **extra, **self.config})

    def build(self, seed: int = 0) -> nn.Module:
        import transformers
        from transformers import (
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
        if self.cls:
            auto = getattr(transformers, self.cls)
        torch.manual_seed(seed)
        build = auto._from_config if self.cls else auto.from_config
        model = build(self.hf_config(), attn_implementation="eager", **self.load).to(torch.float64)
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
        if pad and seq > 2:  # a right-padded sample, as in any real batch of texts
            mask[0, -2:] = 0
            pad_id = getattr(self.hf_config(), "pad_token_id", None)
            if isinstance(pad_id, int) and 0 <= pad_id < VOCAB:
                ids[0, -2:] = pad_id  # what a tokenizer puts there (embeddings with padding_idx)
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


def _vis(name: str, model_type: str, collide: int, cls: str | None = None, **config: Any) -> ZooModel:
    config = {"num_channels": CHANNELS, **config}
    return ZooModel(name, "vision", model_type, "image-cls", config, collide, cls)


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
_T5 = dict(
    d_model=HIDDEN,
    d_kv=16,
    d_ff=FFN,
    num_layers=1,
    num_decoder_layers=1,
    num_heads=HEADS,
    relative_attention_num_buckets=8,
    decoder_start_token_id=0,
    pad_token_id=0,
)
_SWIN = dict(image_size=IMAGE, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2)
SEGMENT = 4

ZOO: list[ZooModel] = [
    # decoder LMs
    _lm("gpt2", "gpt2", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS),
    _lm(
        "gpt-neo",
        "gpt_neo",
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=POSITIONS,
    ),
    _lm("gpt-j", "gptj", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=8, n_positions=POSITIONS),
    _lm("gpt-neox", "gpt_neox", rotary_pct=0.5, **_STD),
    _lm("gpt-bigcode", "gpt_bigcode", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS),
    _lm(
        "codegen",
        "codegen",
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        rotary_dim=8,
        n_positions=POSITIONS,
        n_ctx=POSITIONS,
    ),
    _lm(
        "opt",
        "opt",
        hidden_size=HIDDEN,
        ffn_dim=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=POSITIONS,
    ),
    _lm("bloom", "bloom", hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
    _lm("falcon", "falcon", hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS),
    _lm("llama", "llama", num_key_value_heads=1, **_STD),
    _lm("mistral", "mistral", num_key_value_heads=1, sliding_window=4, **_STD),
    ZooModel(
        "mixtral",
        "decoder",
        "mixtral",
        "causal-lm",
        dict(vocab_size=VOCAB, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1, **_STD),
        load={"experts_implementation": "eager"},
    ),
    _lm("qwen2", "qwen2", num_key_value_heads=1, **_STD),
    _lm("qwen3", "qwen3", num_key_value_heads=1, head_dim=16, **_STD),
    _lm("phi", "phi", partial_rotary_factor=0.5, **_STD),
    _lm("phi3", "phi3", pad_token_id=0, **_STD),
    _lm("gemma", "gemma", num_key_value_heads=1, head_dim=16, **_STD),
    _lm("gemma2", "gemma2", num_key_value_heads=1, head_dim=16, sliding_window=4, **_STD),
    _lm("stablelm", "stablelm", partial_rotary_factor=0.5, num_key_value_heads=HEADS, **_STD),
    _lm("olmo", "olmo", **_STD),
    _lm("starcoder2", "starcoder2", num_key_value_heads=1, sliding_window=4, **_STD),
    _lm("persimmon", "persimmon", **_STD),
    _lm("biogpt", "biogpt", **_STD),
    _lm(
        "mpt", "mpt", d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS, expansion_ratio=2, max_seq_len=POSITIONS
    ),
    _lm("ctrl", "ctrl", n_embd=HIDDEN, dff=FFN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS),
    # encoders (sequence classification)
    _enc("bert", "bert", **_STD),
    _enc("roberta", "roberta", **_STD),
    _enc("xlm-roberta", "xlm-roberta", **_STD),
    _enc("camembert", "camembert", **_STD),
    _enc(
        "distilbert",
        "distilbert",
        dim=HIDDEN,
        hidden_dim=FFN,
        n_layers=LAYERS,
        n_heads=HEADS,
        max_position_embeddings=POSITIONS,
    ),
    _enc("albert", "albert", embedding_size=16, **_STD),
    _enc("electra", "electra", embedding_size=16, **_STD),
    _enc("deberta", "deberta", **_STD),
    _enc("deberta-v2", "deberta-v2", **_STD),
    _enc("mpnet", "mpnet", **_STD),
    _enc("convbert", "convbert", embedding_size=HIDDEN, conv_kernel_size=3, **_STD),
    _enc("roformer", "roformer", embedding_size=HIDDEN, **_STD),
    _enc("ernie", "ernie", **_STD),
    _enc("megatron-bert", "megatron-bert", **_STD),
    _enc("data2vec-text", "data2vec-text", **_STD),
    _enc(
        "mobilebert",
        "mobilebert",
        embedding_size=16,
        intra_bottleneck_size=16,
        true_hidden_size=16,
        num_feedforward_networks=1,
        **_STD,
    ),
    _enc(
        "squeezebert",
        "squeezebert",
        embedding_size=HIDDEN,
        q_groups=1,
        k_groups=1,
        v_groups=1,
        post_attention_groups=1,
        intermediate_groups=1,
        output_groups=1,
        **_STD,
    ),
    _enc("nystromformer", "nystromformer", num_landmarks=4, segment_means_seq_len=SEGMENT, **_STD),
    _enc("funnel", "funnel", block_sizes=[1, 1], d_model=HIDDEN, n_head=HEADS, d_head=16, d_inner=FFN),
    # encoder-decoders (seq2seq LM)
    _s2s("t5", "t5", **_T5),
    _s2s("mt5", "mt5", **_T5),
    _s2s("umt5", "umt5", **_T5),
    _s2s("longt5", "longt5", local_radius=2, **_T5),
    _s2s("bart", "bart", **_BART),
    _s2s("mbart", "mbart", **_BART),
    _s2s("plbart", "plbart", **_BART),
    _s2s("marian", "marian", **_BART),
    _s2s("pegasus", "pegasus", **_BART),
    _s2s("blenderbot", "blenderbot", **_BART),
    _s2s("blenderbot-small", "blenderbot-small", **_BART),
    _s2s("m2m-100", "m2m_100", **_BART),
    # vision (image classification)
    _vis("vit", "vit", collide=5, **_VIT),
    _vis("deit", "deit", collide=6, cls="DeiTForImageClassification", **_VIT),
    _vis("beit", "beit", collide=5, use_relative_position_bias=True, **_VIT),
    _vis("data2vec-vision", "data2vec-vision", collide=5, use_relative_position_bias=True, **_VIT),
    _vis("dinov2", "dinov2", collide=5, **_VIT),
    _vis("swin", "swin", collide=4, **_SWIN),
    _vis("swinv2", "swinv2", collide=4, **_SWIN),
    _vis(
        "convnext", "convnext", collide=4, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=IMAGE
    ),
    _vis(
        "convnextv2",
        "convnextv2",
        collide=4,
        num_stages=2,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        image_size=IMAGE,
    ),
    _vis(
        "poolformer",
        "poolformer",
        collide=4,
        num_encoder_blocks=2,
        depths=[1, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[4, 2],
        strides=[4, 2],
        padding=[1, 0],
        pool_size=3,
        mlp_ratio=2.0,
        image_size=IMAGE,
    ),
    _vis(
        "resnet",
        "resnet",
        collide=4,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
    ),
    _vis(
        "mobilenet-v2",
        "mobilenet_v2",
        collide=4,
        depth_multiplier=0.25,
        finegrained_output=False,
        image_size=IMAGE,
    ),
    _vis(
        "regnet", "regnet", collide=4, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8
    ),
    _vis("bit", "bit", collide=4, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2),
    _vis(
        "mobilevit",
        "mobilevit",
        collide=4,
        image_size=IMAGE,
        patch_size=2,
        hidden_sizes=[16, 16, 16],
        neck_hidden_sizes=[8, 8, 8, 8, 8, 16, 16],
        num_attention_heads=HEADS,
    ),
    _vis(
        "segformer",
        "segformer",
        collide=4,
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
    ),
]


def shapes(spec: ZooModel) -> dict[str, tuple[int, int]]:
    """(batch, seq) per case: a plain batch (one sample padded), a batch size that collides with the
    sequence length (vision: with a token or window count), with the number of heads, one sample."""
    return {
        "plain": (3, SEQ),
        "b_eq_t": (spec.collide, SEQ) if spec.collide else (4, 4),
        "b_eq_heads": (HEADS, SEQ),  # == the number of heads (and of layers)
        "single": (1, SEQ),
    }


# ---------------------------------------------------------------------------------------------------
# The reference and the verdict


@dataclass
class Verdict:
    """``exact``, ``refused`` (clear error naming a module), ``wrong`` (silently) or ``crash``
    (an error that names no module: the user cannot act on it)."""

    kind: str
    detail: str = ""
    max_err: float = 0.0


def per_sample_grads(model: nn.Module, loss: Loss, batch: Batch) -> tuple[Tensor, list[list[Tensor]], Tensor]:
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


def clipped_sum(grads: list[list[Tensor]], norms: Tensor, c: float, eps: float = 0.0) -> list[Tensor]:
    """sum_i min(1, C / (||g_i|| + eps)) g_i (Opacus adds eps = 1e-6 to the norm)."""
    total = [torch.zeros_like(g) for g in grads[0]]
    for gi, ni in zip(grads, norms):
        factor = min(1.0, c / (float(ni) + eps))
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
    named: list[tuple[str, nn.Parameter]],
    got: list[Tensor | None],
    ref: list[Tensor],
    rtol: float,
    atol: float,
) -> Verdict:
    worst, bad = 0.0, []
    for (name, _), g, r in zip(named, got, ref):
        if g is None:
            if r.abs().max() > atol:
                bad.append(f"{name}: no gradient")
                worst = max(worst, 1.0)
            continue
        if g.shape != r.shape:
            bad.append(f"{name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}")
            worst = max(worst, 1.0)
        elif not torch.allclose(g, r, rtol=rtol, atol=atol):
            err = max_rel_err(g, r)
            worst = max(worst, err)
            bad.append(f"{name}: rel err {err:.2g}")
    if bad:
        return Verdict("wrong", f"{len(bad)}/{len(named)} params wrong, e.g. " + "; ".join(bad[:3]), worst)
    return Verdict("exact")


def reference(
    spec: ZooModel, model: nn.Module, batch: Batch, eps: float = 0.0
) -> tuple[list[Tensor], float] | None:
    """The clipped sum of the naive loop and its C, or None when a sample's loss depends on the rest
    of the batch (BatchNorm in train mode): then per-sample gradients are undefined. ``eps`` as in
    :func:`clipped_sum`."""
    try:
        losses, grads, norms = per_sample_grads(model, spec.loss, batch)
        with torch.no_grad():
            together = spec.loss(model, batch)
    except (RuntimeError, ValueError):  # e.g. BatchNorm on one sample
        return None
    if not torch.allclose(together, losses, rtol=1e-9, atol=1e-9):
        return None
    if not torch.isfinite(norms).all():
        raise AssertionError(f"{spec.name}: the reference gradients are not finite (a broken zoo entry)")
    c = clip_norm_for(norms)
    return clipped_sum(grads, norms, c, eps), c


def check_trustml(
    spec: ZooModel, batch_size: int, seq: int, rtol: float = 1e-6, atol: float = 1e-6,
    onto: bool = False,
) -> Verdict:
    """Run ``PerSampleClipper`` on a fresh model and judge it against the naive loop; ``onto``:
    the sums are added onto a ``.grad`` that ``start`` makes (as DPStep's noise), a known random
    tensor subtracted before judging."""
    from trustml.privacy import PerSampleClipper

    model = spec.build()
    batch = spec.batch(batch_size, seq)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = reference(spec, model, batch)
    model.zero_grad(set_to_none=True)
    clipper = None
    try:
        clipper = PerSampleClipper(model, max_grad_norm=1.0 if ref is None else ref[1])
        g = torch.Generator().manual_seed(2)
        base = {id(p): torch.randn(p.shape, dtype=p.dtype, generator=g) for _, p in named}
        clipper.backward(spec.loss(model, batch),
                         start=(lambda p: base[id(p)].clone()) if onto else None)
    except Exception as e:  # noqa: BLE001 - any refusal is judged by its message
        message = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        written = [n for n, p in named if p.grad is not None]
        if written:  # DPStep retries some refusals on split batches: a partial sum would count twice
            return Verdict("wrong", f"refused after writing .grad of {written[0]} ({message})", 1.0)
        return Verdict("refused" if names_a_module(str(e), model) else "crash", message)
    finally:
        if clipper is not None:
            clipper.remove()
    if ref is None:
        return Verdict(
            "wrong", "samples of a batch are coupled (per-sample gradients undefined): not refused"
        )
    got = [p.grad - base[id(p)] if onto and p.grad is not None else p.grad for _, p in named]
    return compare_grads(named, got, ref[0], rtol, atol)
