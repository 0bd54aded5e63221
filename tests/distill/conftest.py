"""A tiny 12-layer GPT-2 saved to disk: the offline stand-in for the hub teacher of
configs/gpt2_cf_distill.yaml (GPT-2 weights cannot be downloaded in tests)."""

from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trustml import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_teacher(tmp_path) -> GPT2LMHeadModel:
    """Saved under tmp_path/teacher; 12 layers so DistilGPT-2's layer list applies."""
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=8, n_head=2, n_positions=32))
    teacher.save_pretrained(tmp_path / "teacher")
    return teacher


@pytest.fixture
def gpu_config(tmp_path, local_teacher) -> Callable[..., cfgmod.Config]:
    """configs/gpt2_cf_distill.yaml on the local teacher; with ``sentence``, trained on 40
    numbered copies of it in a local text file instead of WikiText."""

    def load(overrides: list[str] = (), sentence: str | None = None) -> cfgmod.Config:
        data = []
        if sentence is not None:
            text = tmp_path / "text.txt"
            text.write_text("\n".join(sentence.format(i=i) for i in range(40)))
            data = ["data.path=", f"data.text_path={text}"]
        return cfgmod.load(ROOT / "configs" / "gpt2_cf_distill.yaml",
                           [f"distill.teacher={tmp_path / 'teacher'}", *data, *overrides])

    return load
