"""GPT-2 builder and DistilGPT-2-style student initialisation."""

import pytest
import torch
from transformers import GPT2LMHeadModel

from trustml.config import ConfigError, ModelConfig
from trustml.models.lm import build_lm, student_from_teacher

TINY = {"n_layer": 4, "n_embd": 32, "n_head": 2, "n_positions": 32}


def _teacher(vocab: int = 97) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return build_lm(ModelConfig(kind="gpt2", config=TINY, dropout=0.1), vocab)


def test_build_from_config_and_from_folder(tmp_path):
    model = _teacher()
    assert model.config.n_layer == 4 and model.config.vocab_size == 97
    assert model.config.resid_pdrop == model.config.attn_pdrop == 0.1
    model.save_pretrained(tmp_path)
    loaded = build_lm(ModelConfig(kind="gpt2", name=str(tmp_path)), 97)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert loaded.config.resid_pdrop == 0.0  # model.dropout applies to loaded models too
    with pytest.raises(ConfigError, match="token embeddings"):
        build_lm(ModelConfig(kind="gpt2", name=str(tmp_path)), 200)
    with pytest.raises(ConfigError, match="model.config"):
        build_lm(ModelConfig(kind="gpt2", config={"n_layers": 2}), 97)


def test_student_copies_chosen_blocks():
    teacher = _teacher()
    student = student_from_teacher(teacher, [0, 3], dropout=0.0)
    assert student.config.n_layer == 2 and student.config.resid_pdrop == 0.0
    assert teacher.config.n_layer == 4  # the teacher's config is untouched
    s, t = student.state_dict(), teacher.state_dict()
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"):
        assert torch.equal(s[name], t[name])
    for i, j in enumerate([0, 3]):
        block = f"transformer.h.{i}."
        for key in [k for k in s if k.startswith(block)]:
            assert torch.equal(s[key], t[key.replace(block, f"transformer.h.{j}.")]), key
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()
    assert student.transformer.wte.weight.data_ptr() != teacher.transformer.wte.weight.data_ptr()


def test_student_with_all_layers_equals_teacher():
    teacher = _teacher().eval()
    student = student_from_teacher(teacher, [0, 1, 2, 3]).eval()
    ids = torch.randint(0, 97, (2, 10))
    assert torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-6)


def test_student_rejects_bad_layers():
    with pytest.raises(ConfigError, match="student_layers"):
        student_from_teacher(_teacher(), [0, 4])
    with pytest.raises(ConfigError, match="student_layers"):
        student_from_teacher(_teacher(), [])
