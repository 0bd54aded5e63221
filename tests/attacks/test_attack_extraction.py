"""Canary extraction (Parikh et al. 2022) on a tiny intent classifier."""

import math

import torch

from trustml.attacks import extraction as ex


def test_corpus_holds_the_canary_and_encodes_words():
    corpus = ex.command_corpus(50, ["4", "0", "7", "1"], repeats=3, seed=0)
    canary = torch.tensor(corpus.encode(["my", "pin", "is", "4", "0", "7", "1"]))
    copies = (corpus.ids == canary).all(1)
    assert int(copies.sum()) == 3
    assert (corpus.labels[copies] == corpus.intents.index(ex.CANARY_INTENT)).all()
    assert corpus.vocab[0] == ex.PAD and len(set(corpus.vocab)) == len(corpus.vocab)


def test_attacks_recover_a_pin_the_model_memorised():
    """A classifier that learned the canary's digits: both inversions read the PIN back, and the
    exhaustive scores agree with a direct forward pass."""
    pin = ("8", "3", "5", "2")
    corpus = ex.command_corpus(300, list(pin), repeats=30, seed=1)
    model, eps = ex.train_classifier(corpus, math.inf, epochs=30, batch_size=50, lr=0.01,
                                     hidden=32, delta=1e-5, max_grad_norm=1.0, seed=1)
    assert eps == math.inf
    result = ex.extract(model, corpus, pin)
    assert result.exhaustive_exact and result.rank == 1
    assert result.relaxed_exact and result.digits_correct == 1.0
    pins, scores = ex.exhaustive_scores(model, corpus)
    ids = torch.tensor([corpus.encode(["my", "pin", "is", *pins[1234]])])
    direct = torch.log_softmax(model(ids), 1)[0, corpus.intents.index(ex.CANARY_INTENT)]
    assert torch.isclose(scores[1234], direct, atol=1e-5)


def test_dp_classifier_trains_through_the_engine():
    corpus = ex.command_corpus(200, ["1", "2", "3", "4"], repeats=5, seed=2)
    _, eps = ex.train_classifier(corpus, 4.0, epochs=2, batch_size=50, lr=0.01, hidden=16,
                                 delta=1e-5, max_grad_norm=1.0, seed=2)
    assert 3.5 < eps <= 4.0 + 1e-6
