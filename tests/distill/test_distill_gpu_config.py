"""The code path of configs/gpt2_cf_distill.yaml, offline: a tiny 12-layer GPT-2 saved to disk
stands in for the hub teacher and a local text file for WikiText."""

from trustml.runner import run_training


def test_gpu_config_runs_offline_with_local_teacher(tmp_path, local_teacher, gpu_config):
    config = gpu_config([
        "run.device=cpu", "train.amp=none", "train.max_steps=2", "train.batch_size=4",
        "data.seq_len=16", "train.log_every=1",
    ], sentence="The doctor said that he saw patient {i} today.")
    assert config.distill.cda and config.distill.perturbation == "logit_mean"
    result = run_training(config, tmp_path / "run", progress=False)
    student = result.model
    assert student.config.n_layer == 6 and student.config.vocab_size == 50257
    assert result.summary["steps"] == 2
    # embeddings started from the teacher's and moved only by two small steps
    drift = (student.transformer.wpe.weight - local_teacher.transformer.wpe.weight).abs().max()
    assert 0 < drift < 0.01
    assert (tmp_path / "run" / "model.safetensors").is_file()
