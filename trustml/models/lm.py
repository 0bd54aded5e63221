"""GPT-2 language models: load or build one, and cut a smaller student out of a teacher."""

from __future__ import annotations

import copy

from transformers import GPT2Config, GPT2LMHeadModel

from trustml.config import ConfigError, ModelConfig

_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def load_pretrained(name_or_path: str, key: str, revision: str | None = None,
                    **overrides) -> GPT2LMHeadModel:
    """A GPT-2 from the hub (at ``revision``: branch, tag or commit; None = default branch) or a
    local folder, from safetensors only (a pickled ``.bin`` could run code when loaded); a missing
    model or network is one ConfigError naming ``key``."""
    try:
        return GPT2LMHeadModel.from_pretrained(name_or_path, use_safetensors=True,
                                               revision=revision, **overrides)
    except OSError as err:
        raise ConfigError(f"{key} {name_or_path!r}: could not load a GPT-2 with safetensors "
                          f"weights ({str(err).splitlines()[0][:200]})") from None


def build_lm(model_cfg: ModelConfig, vocab_size: int,
             eos_token_id: int | None = None) -> GPT2LMHeadModel:
    """``model_cfg.name`` (hub name or local folder) is loaded; otherwise a fresh model is built from
    ``GPT2Config(vocab_size=vocab_size, **model_cfg.config)``. ``model_cfg.dropout`` sets all three
    GPT-2 dropouts unless ``model_cfg.config`` names them. ``eos_token_id`` (the tokenizer's) is
    the fresh model's bos and eos: GPT2Config's default, GPT-2's 50256, lies outside a smaller
    vocabulary (the canaries' word tokenizer), where transformers warns and generation misbehaves."""
    dropouts = {key: model_cfg.dropout for key in _DROPOUTS}
    if model_cfg.name is not None:
        model = load_pretrained(model_cfg.name, "model.name", model_cfg.revision, **dropouts)
        if model.config.vocab_size < vocab_size:
            raise ConfigError(
                f"model.name {model_cfg.name!r} has {model.config.vocab_size} token embeddings but "
                f"the tokenizer has {vocab_size} tokens"
            )
        return model
    unknown = sorted(set(model_cfg.config) - set(GPT2Config().to_dict()))
    if unknown:  # GPT2Config would silently keep a mistyped key as an unused attribute
        raise ConfigError(f"model.config: {unknown} are not GPT2Config fields")
    if eos_token_id is None and vocab_size > GPT2Config().eos_token_id:
        eos_token_id = GPT2Config().eos_token_id
    special = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size,
                                      **{**dropouts, **special, **model_cfg.config}))


def student_from_teacher(
    teacher: GPT2LMHeadModel, layers: list[int], dropout: float | None = None
) -> GPT2LMHeadModel:
    """A ``len(layers)``-block GPT-2 initialised DistilGPT-2 style: the teacher's token and position
    embeddings, the chosen transformer blocks in order, and its final layer norm (head tied).
    ``dropout`` replaces the teacher's three dropout rates when given."""
    n = teacher.config.n_layer
    if not layers or any(not 0 <= i < n for i in layers):
        raise ConfigError(f"distill.student_layers {layers!r}: expected indices in [0, {n})")
    config = copy.deepcopy(teacher.config)
    config.n_layer = len(layers)
    if dropout is not None:
        for key in _DROPOUTS:
            setattr(config, key, dropout)
    student = GPT2LMHeadModel(config)
    src, dst = teacher.transformer, student.transformer
    dst.wte.load_state_dict(src.wte.state_dict())
    dst.wpe.load_state_dict(src.wpe.state_dict())
    dst.ln_f.load_state_dict(src.ln_f.state_dict())
    for i, j in enumerate(layers):
        dst.h[i].load_state_dict(src.h[j].state_dict())
    student.tie_weights()
    return student.to(next(teacher.parameters()).device)
