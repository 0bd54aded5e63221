"""A text classifier for generations: regard, sentiment or toxicity, whichever model is named.

Any Hugging Face sequence-classification model works (``bias.classifier``: a hub name such as
``sasha/regardv3``, ``cardiffnlp/twitter-roberta-base-sentiment-latest`` or
``unitary/toxic-bert``, or a local folder). Probabilities are a softmax over labels, or a
sigmoid per label for multi-label models (toxicity), as the model's config declares.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trustml.config import ConfigError


class TextClassifier:
    def __init__(self, name_or_path: str, device: torch.device | str = "cpu",
                 batch_size: int = 32) -> None:
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, use_safetensors=True).to(device).eval()
        except (OSError, ValueError) as err:
            raise ConfigError(f"bias.classifier {name_or_path!r}: could not load a sequence "
                              f"classifier ({str(err).splitlines()[0][:200]})") from None
        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.multi_label = config.problem_type == "multi_label_classification"
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(len(texts), len(labels)) label probabilities."""
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], padding=True,
                                   truncation=True, return_tensors="pt").to(self.device)
            logits = self.model(**batch).logits.float()
            rows.append((logits.sigmoid() if self.multi_label else logits.softmax(-1)).cpu())
        return torch.cat(rows).numpy() if rows else np.zeros((0, len(self.labels)))
