"""Offline GPT-2 tokenizer and the LM datasets."""

import pytest
import torch

from trustml.config import ConfigError, DataConfig
from trustml.data.text import (
    TextDataset,
    _tokenize,
    lm_datasets,
    load_tokenizer,
    parse_hub_spec,
    read_text,
)
from trustml.distill.corpus import word_tokenizer



def test_gpt2_tokenizer_is_the_real_bpe(gpt2):
    # reference ids from the published GPT-2 vocabulary
    assert gpt2("Hello world")["input_ids"] == [15496, 995]
    assert gpt2(" he she")["input_ids"] == [339, 673]
    assert len(gpt2) == 50257
    assert gpt2.pad_token_id == gpt2.eos_token_id == 50256
    assert gpt2.decode([15496, 995]) == "Hello world"


def test_local_folder_goes_through_from_pretrained(tmp_path):
    tok = word_tokenizer(["The nurse said that she was tired ."])
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    text = "The nurse said that she was tired ."
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.pad_token_id == again.eos_token_id == 0


def test_read_text_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        read_text(tmp_path / "empty.txt")


def test_packed_blocks_are_the_eos_joined_stream(gpt2):
    texts = ["Hello world", "The nurse said that she was tired.", "A b c d e f g"]
    ds = TextDataset(texts, gpt2, seq_len=5)
    stream = [t for text in texts for t in [*gpt2(text)["input_ids"], gpt2.eos_token_id]]
    kept = torch.cat([ds[i]["input_ids"][ds[i]["attention_mask"].bool()] for i in range(len(ds))])
    assert kept.tolist() == stream
    assert len(ds) == -(-len(stream) // 5)
    last = ds[len(ds) - 1]["attention_mask"]
    assert last.sum().item() == len(stream) - 5 * (len(ds) - 1)
    assert all(ds[i]["attention_mask"].all() for i in range(len(ds) - 1))


def test_chunked_tokenization_equals_one_call(gpt2):
    texts = [f"Document {i} says {'a' * i}." for i in range(7)]
    assert list(_tokenize(texts, gpt2, chunk=2)) == gpt2(texts)["input_ids"]


def test_unpacked_items_start_with_eos_and_pad(gpt2):
    ds = TextDataset(["Hello world", "Hello world again and again"], gpt2, seq_len=4, pack=False)
    assert ds[0]["input_ids"].tolist() == [50256, 15496, 995, 50256]
    assert ds[0]["attention_mask"].tolist() == [1, 1, 1, 0]
    assert ds[1]["input_ids"].tolist() == [50256, 15496, 995, 757]  # truncated
    batch = ds.gather(torch.tensor([1, 0]))
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"][1].sum() == 3
    ids = TextDataset([[1, 2, 3, 4, 5, 6, 7]], gpt2, seq_len=4, pack=False)
    assert ids[0]["input_ids"].tolist() == [50256, 1, 2, 3]
    with pytest.raises(ValueError, match="not a mix"):
        TextDataset(["Hello", [1, 2]], gpt2, seq_len=4)


def test_lm_datasets_from_local_file(tmp_path, gpt2):
    lines = [f"line number {i} of the file." for i in range(50)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n\n")
    cfg = DataConfig(dataset="text", text_path=str(path), seq_len=16, val_fraction=0.2)
    train, val = lm_datasets(cfg, gpt2)
    def tokens(ds):
        return ds.attention_mask.sum().item()

    per_line = len(gpt2(lines[0])["input_ids"]) + 1
    assert tokens(val) == 10 * per_line and tokens(train) == 40 * per_line
    decoded = gpt2.decode(val.input_ids[val.attention_mask.bool()])
    train_text = gpt2.decode(train.input_ids[train.attention_mask.bool()])
    held = [ln for ln in lines if ln in decoded]
    assert len(held) == 10 and not any(f"{ln}<" in train_text for ln in held)


def test_lm_datasets_professions_and_errors(gpt2):
    """The runner passes the generated corpus in (data/ does not import distill/)."""
    from trustml.distill.corpus import generate_corpus

    docs = generate_corpus(2000)
    train, val = lm_datasets(DataConfig(dataset="professions", seq_len=24), gpt2, docs)
    assert len(train) == 1800 and len(val) == 200
    assert (train.input_ids[:, 0] == gpt2.eos_token_id).all()
    with pytest.raises(ConfigError, match="text_path"):
        lm_datasets(DataConfig(dataset="text"), gpt2)


def test_parse_hub_spec():
    assert parse_hub_spec("hf:AlexaAI/bold") == ("AlexaAI/bold", None)  # owner/name, no config
    assert parse_hub_spec("hf:wikitext:wikitext-103-raw-v1") == ("wikitext", "wikitext-103-raw-v1")
    assert parse_hub_spec("hf:Salesforce/wikitext:wikitext-2-raw-v1") == (
        "Salesforce/wikitext", "wikitext-2-raw-v1")
    assert parse_hub_spec("hf:Salesforce/wikitext/wikitext-2-raw-v1") == (
        "Salesforce/wikitext", "wikitext-2-raw-v1")
    assert parse_hub_spec("hf:ptb_text_only") == ("ptb_text_only", None)
    for bad in ("hf:a//b", "hf:a/b:", "hf:a/b/c:d"):
        with pytest.raises(ConfigError, match="hf:<name"):
            parse_hub_spec(bad)
