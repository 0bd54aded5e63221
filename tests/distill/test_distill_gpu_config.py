"""The code path of configs/gpt2_cf_distill.yaml, offline: a tiny 12-layer GPT-2 saved to disk
stands in for the hub teacher and a local text file for WikiText."""

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trustml import config as cfgmod
from trustml.runner import run_training

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_config_runs_offline_with_local_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=8, n_head=2, n_positions=32))
    teacher.save_pretrained(tmp_path / "teacher")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"The doctor said that he saw patient {i} today." for i in range(40)))
    config = cfgmod.load(ROOT / "configs" / "gpt2_cf_distill.yaml", [
        f"distill.teacher={tmp_path / 'teacher'}", "data.path=", f"data.text_path={text}",
        "run.device=cpu", "train.amp=none", "train.max_steps=2", "train.batch_size=4",
        "data.seq_len=16", "train.log_every=1",
    ])
    assert config.distill.cda and config.distill.perturbation == "logit_mean"
    result = run_training(config, tmp_path / "run", progress=False)
    student = result.model
    assert student.config.n_layer == 6 and student.config.vocab_size == 50257
    assert result.summary["steps"] == 2
    # embeddings started from the teacher's and moved only by two small steps
    drift = (student.transformer.wpe.weight - teacher.transformer.wpe.weight).abs().max()
    assert 0 < drift < 0.01
    assert (tmp_path / "run" / "model.safetensors").is_file()
