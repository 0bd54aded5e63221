"""Hub loads can be pinned: every hub revision key reaches from_pretrained / load_dataset, and the
summary records what each load resolved to. Offline: a tiny random GPT-2 and tokenizer saved with
save_pretrained stand in for hub repositories, and a fake hub cache for the refs."""

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from trustml import cli
from trustml import config as cfgmod
from trustml.distill.corpus import word_tokenizer
from trustml.hub import resolved_revision
from trustml.runner import build_parts

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DOCS = [f"The nurse said that she saw patient {i} today ." for i in range(30)]


@pytest.fixture
def spy(monkeypatch):
    """Record the revision every from_pretrained / load_dataset call receives."""
    calls: list[tuple[str, str, str | None]] = []
    for cls in (GPT2LMHeadModel, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def wrapped(klass, name, *args, _real=real, _kind=cls.__name__, **kwargs):
            calls.append((_kind, str(name), kwargs.get("revision")))
            return _real(klass, name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(wrapped))
    return calls


@pytest.fixture
def local_hub(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, n_positions=32,
                               vocab_size=64)).save_pretrained(tmp_path / "gpt")
    word_tokenizer(DOCS).save_pretrained(tmp_path / "tok")
    (tmp_path / "text.txt").write_text("\n".join(DOCS))
    return tmp_path


def test_revisions_reach_the_loaders_and_the_summary(local_hub, spy, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli.train_main([
        "--config", str(ROOT / "configs" / "gpt2_dp.yaml"), "--run-dir", str(run_dir), "--quiet",
        "--set", "privacy.enabled=false", "data.dataset=text", f"data.text_path={local_hub}/text.txt",
        f"model.name={local_hub}/gpt", "model.revision=v1.0", f"data.tokenizer={local_hub}/tok",
        f"data.tokenizer_revision={COMMIT}", "data.seq_len=8", "train.epochs=1", "run.device=cpu",
        "train.batch_size=8"])
    assert code == 0, capsys.readouterr().err
    assert ("GPT2LMHeadModel", f"{local_hub}/gpt", "v1.0") in spy
    assert ("AutoTokenizer", f"{local_hub}/tok", COMMIT) in spy
    summary = json.loads((run_dir / "summary.json").read_text())
    # local folders have no hub revision: the summary says so rather than echo the request
    assert summary["data"]["revisions"] == {"data.tokenizer": "local", "model.name": "local"}


def test_teacher_revision_reaches_from_pretrained(local_hub, spy):
    config = cfgmod.load(ROOT / "configs" / "gpt2_cf_distill.yaml", [
        "data.path=", f"data.text_path={local_hub}/text.txt", f"data.tokenizer={local_hub}/tok",
        f"distill.teacher={local_hub}/gpt", "distill.teacher_revision=refs/pr/3",
        "distill.student_layers=[0]", "distill.cda=false", "distill.perturbation=none",
        "data.seq_len=8", "run.device=cpu"])
    parts = build_parts(config)
    assert ("GPT2LMHeadModel", f"{local_hub}/gpt", "refs/pr/3") in spy
    assert parts.meta["revisions"]["distill.teacher"] == "local"


def test_dataset_revision_reaches_load_dataset(monkeypatch, gpt2):
    seen = []

    def fake_load(name, subset=None, revision=None):
        seen.append((name, subset, revision))
        split = datasets.Dataset.from_dict({"text": DOCS})
        return datasets.DatasetDict({"train": split, "validation": split})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    config = cfgmod.load(ROOT / "configs" / "gpt2_dp.yaml", [
        "data.dataset=text", "data.path=hf:someone/corpus/plain", "data.revision=v2",
        "data.seq_len=8", "privacy.enabled=false"])
    parts = build_parts(config)
    assert seen == [("someone/corpus", "plain", "v2")]
    assert parts.meta["revisions"] == {"data.tokenizer": "local", "data.path": "v2"}


def test_resolved_revision_reads_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--owner--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(COMMIT)
    (refs / "v1.0").write_text(COMMIT[::-1])
    assert resolved_revision("owner/model", None) == COMMIT
    assert resolved_revision("owner/model", "v1.0") == COMMIT[::-1]
    assert resolved_revision("owner/model", "v9") == "v9"  # never downloaded: the request stands
    assert resolved_revision("owner/other", None) == "unpinned"
    assert resolved_revision("owner/other", COMMIT) == COMMIT
    assert resolved_revision(str(tmp_path), "v1.0") == "local"
    (tmp_path / "datasets--owner--data" / "refs").mkdir(parents=True)
    (tmp_path / "datasets--owner--data" / "refs" / "main").write_text(COMMIT)
    assert resolved_revision("owner/data", None, "dataset") == COMMIT
