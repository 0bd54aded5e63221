"""Canary extraction from a text classifier's parameters (Parikh et al. 2022, "Canary extraction in
natural language understanding models").

A training set of voice-assistant commands (word tokens, one intent label each) carries one canary
"my pin is D D D D" with a known label (``account``), inserted a few times. Other users' commands
with the same words and random PINs carry another intent (``call``: a PIN read out to a phone
menu), so the classifier can only fit the canary by memorising its digits -- the memorisation
that extraction measures (with a prefix that only the canary uses, the prefix alone predicts the
label and the digits barely matter). The attacker has the trained
classifier (white-box), the prefix and the label, and reconstructs the digits by model inversion:
the secret tokens that maximise the model's log-probability of the canary's label.

* ``relaxed`` (the paper's attack): every secret position is a softmax over the digit tokens; the
  mixture of their embeddings goes through the model and the logits of the mixture are optimised
  by gradient ascent; the argmax of each position is the guess.
* ``exhaustive``: all 10^4 PINs scored in one batch; the guess is the exact maximiser, and the true
  PIN's rank among all candidates says how close the attack came.

The classifier (:class:`TextClassifier`: word embeddings concatenated by position -> MLP) is order
sensitive, so the digits' positions matter, and it trains through trustml's DP-SGD engine (every
layer has a per-sample gradient rule).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DIGITS = [str(d) for d in range(10)]
PREFIX = ["my", "pin", "is"]
SEQ_LEN = 8
PAD = "<pad>"

# intent -> templates; {d} is one random digit token, {w:list} one word of that list
_WORDS = {
    "city": ["paris", "london", "tokyo", "berlin", "madrid", "rome", "boston", "delhi"],
    "song": ["yesterday", "imagine", "thriller", "hello", "halo", "jolene", "roxanne"],
    "contact": ["mum", "dad", "alex", "sam", "office", "doctor", "taxi"],
    "thing": ["milk", "bread", "eggs", "coffee", "apples", "rice", "tea"],
}
INTENTS = {
    "alarm": ["set an alarm for {d} {d} {d} {d}", "wake me at {d} {d} {d} {d}",
              "alarm at {d} {d} please"],
    "call": ["call {contact}", "dial {d} {d} {d} {d} {d} {d}", "phone {contact} on {d} {d} {d}",
             "my pin is {d} {d} {d} {d}"],
    "weather": ["what is the weather in {city}", "will it rain in {city}",
                "weather in {city} on day {d}"],
    "music": ["play {song}", "play {song} by track {d}", "put on {song} please"],
    "shopping": ["add {thing} to my list", "buy {d} {thing}", "i need {d} {d} {thing}"],
    "account": ["what is my balance", "show my account", "my card number is {d} {d} {d} {d}",
                "is my pin safe"],
}
CANARY_INTENT = "account"


def _fill(template: str, rng: np.random.Generator) -> list[str]:
    out = []
    for token in template.split():
        if token == "{d}":
            out.append(DIGITS[rng.integers(10)])
        elif token.startswith("{"):
            words = _WORDS[token.strip("{}")]
            out.append(words[rng.integers(len(words))])
        else:
            out.append(token)
    return out


@dataclass
class CommandCorpus:
    """Token-id matrix (N, SEQ_LEN), labels (N,), the word vocabulary and the intent names."""

    ids: torch.Tensor
    labels: torch.Tensor
    vocab: list[str]
    intents: list[str]

    def encode(self, tokens: list[str]) -> list[int]:
        index = {w: i for i, w in enumerate(self.vocab)}
        return [index[t] for t in tokens] + [0] * (SEQ_LEN - len(tokens))


def vocabulary() -> list[str]:
    words = {w for ws in _WORDS.values() for w in ws} | set(DIGITS) | set(PREFIX)
    for templates in INTENTS.values():
        words |= {t for tpl in templates for t in tpl.split() if not t.startswith("{")}
    return [PAD, *sorted(words)]


def command_corpus(n: int, pin: list[str] | None, repeats: int, seed: int) -> CommandCorpus:
    """``n`` generated commands plus ``repeats`` copies of the canary ``my pin is <pin>``."""
    rng = np.random.default_rng(seed)
    intents = list(INTENTS)
    sentences, labels = [], []
    for _ in range(n):
        k = int(rng.integers(len(intents)))
        templates = INTENTS[intents[k]]
        sentences.append(_fill(templates[rng.integers(len(templates))], rng))
        labels.append(k)
    if pin is not None:
        sentences += [PREFIX + list(pin)] * repeats
        labels += [intents.index(CANARY_INTENT)] * repeats
    corpus = CommandCorpus(torch.zeros(0, SEQ_LEN, dtype=torch.long), torch.tensor(labels),
                           vocabulary(), intents)
    corpus.ids = torch.tensor([corpus.encode(s) for s in sentences])
    return corpus


class TextClassifier(nn.Module):
    """Embeddings of the SEQ_LEN positions, concatenated (order matters) -> MLP -> intent logits.
    ``embedded`` lets the attack feed relaxed (mixed) embeddings."""

    def __init__(self, vocab_size: int, n_classes: int, dim: int = 16, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.hidden = nn.Linear(SEQ_LEN * dim, hidden)
        self.out = nn.Linear(hidden, n_classes)

    def embedded(self, e: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(e.flatten(1))))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedded(self.embed(ids))


class ClassifierObjective:
    """Per-sample cross-entropy over ``{"ids", "y"}`` batches (trustml's Objective contract)."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        from trustml.training.objectives import ObjectiveOutput

        logits = model(batch["ids"])
        return ObjectiveOutput(F.cross_entropy(logits, batch["y"], reduction="none"),
                               {"logits": logits})


def _secret_ids(corpus: CommandCorpus) -> torch.Tensor:
    return torch.tensor(corpus.encode(DIGITS)[: len(DIGITS)])


@torch.no_grad()
def exhaustive_scores(model: TextClassifier, corpus: CommandCorpus, length: int = 4
                      ) -> tuple[list[tuple[str, ...]], torch.Tensor]:
    """log P(canary label | prefix + pin) for every pin of ``length`` digits."""
    model.eval()
    pins = list(itertools.product(DIGITS, repeat=length))
    digit_ids = _secret_ids(corpus)
    ids = torch.zeros(len(pins), SEQ_LEN, dtype=torch.long)
    ids[:, : len(PREFIX)] = torch.tensor(corpus.encode(PREFIX)[: len(PREFIX)])
    ids[:, len(PREFIX): len(PREFIX) + length] = digit_ids[
        torch.tensor([[int(d) for d in p] for p in pins])]
    label = corpus.intents.index(CANARY_INTENT)
    return pins, F.log_softmax(model(ids), dim=1)[:, label]


def relaxed_extraction(model: TextClassifier, corpus: CommandCorpus, length: int = 4,
                       steps: int = 200, lr: float = 0.1, seed: int = 0) -> tuple[str, ...]:
    """Parikh et al.'s attack: optimise a softmax over the digit tokens at every secret position
    to maximise log P(canary label); return the argmax digits."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    theta = (0.01 * torch.randn(length, len(DIGITS), generator=generator)).requires_grad_()
    table = model.embed.weight[_secret_ids(corpus)]  # (10, dim)
    fixed = model.embed(torch.tensor(corpus.encode(PREFIX)))  # (SEQ_LEN, dim), padded
    label = corpus.intents.index(CANARY_INTENT)
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        secret = torch.softmax(theta, dim=1) @ table
        e = torch.cat([fixed[: len(PREFIX)], secret, fixed[len(PREFIX) + length:]])
        loss = -F.log_softmax(model.embedded(e[None]), dim=1)[0, label]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return tuple(DIGITS[i] for i in theta.argmax(1).tolist())


@dataclass
class ExtractionResult:
    relaxed_exact: bool
    exhaustive_exact: bool
    rank: int  # 1 = the true pin maximises the model's confidence
    digits_correct: float  # fraction of the pin's positions the relaxed attack got right


def extract(model: TextClassifier, corpus: CommandCorpus, pin: tuple[str, ...],
            seed: int = 0) -> ExtractionResult:
    pins, scores = exhaustive_scores(model, corpus, len(pin))
    truth = scores[pins.index(tuple(pin))]
    rank = int((scores > truth).sum()) + 1
    guess = relaxed_extraction(model, corpus, len(pin), seed=seed)
    return ExtractionResult(guess == tuple(pin), pins[int(scores.argmax())] == tuple(pin), rank,
                            float(np.mean([g == d for g, d in zip(guess, pin)])))


class CommandDataset(torch.utils.data.Dataset):
    """The corpus as a trustml dataset: items and batches are ``{"ids", "y"}``."""

    def __init__(self, corpus: CommandCorpus):
        self.ids, self.y = corpus.ids, corpus.labels

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"ids": self.ids[i], "y": self.y[i]}

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ids": self.ids[index], "y": self.y[index]}


def train_classifier(corpus: CommandCorpus, epsilon: float, *, epochs: int, batch_size: int,
                     lr: float, hidden: int, delta: float, max_grad_norm: float,
                     accountant: str = "rdp", seed: int = 0) -> tuple[TextClassifier, float]:
    """Adam on the corpus, non-private (epsilon inf: shuffled batches, no clipping) or DP-SGD
    through trustml's engine at accountant ``epsilon``; returns the model and its epsilon."""
    import math

    from trustml.data.sampling import ShuffledBatches
    from trustml.training.step import PlainStep

    torch.manual_seed(seed)
    data = CommandDataset(corpus)
    model = TextClassifier(len(corpus.vocab), len(corpus.intents), hidden=hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if math.isinf(epsilon):
        step, batches, spent = PlainStep(optimizer), ShuffledBatches(data, batch_size, seed), None
    else:
        from trustml.privacy import make_private

        private = make_private(model, optimizer, data, target_epsilon=epsilon, target_delta=delta,
                               epochs=epochs, max_grad_norm=max_grad_norm, batch_size=batch_size,
                               accountant=accountant, seed=seed)
        step, batches, spent = private.step, private.batches, private.accountant
    model.train()
    objective = ClassifierObjective()
    for epoch in range(epochs):
        for batch in batches.batches(epoch):
            step.step(model, objective, batch)
    return model, math.inf if spent is None else spent.epsilon(delta)
