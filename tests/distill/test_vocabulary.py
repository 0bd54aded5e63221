"""The professions corpus and the bias probe share a vocabulary split by construction: no corpus
holds a probe prompt, the student corpus holds no probe profession, and the layers stay acyclic."""

import re
import subprocess
import sys

from trustml.distill import vocabulary
from trustml.distill.benchmark import corpora, probe_sets
from trustml.distill.corpus import generate_corpus
from trustml.config import Config


def test_splits_are_disjoint_and_cover_every_stereotype():
    train, probe = set(vocabulary.professions("train")), set(vocabulary.professions("probe"))
    assert not train & probe and len(train | probe) == 60 and len(probe) == 18
    for group in ("female", "male", "neutral"):
        assert {p for p in probe if vocabulary.stereotype(p) == group}
    seen = {t for s in ("train", "probe", "novel") for t in vocabulary.templates(s)}
    assert len(seen) == sum(len(vocabulary.templates(s)) for s in ("train", "probe", "novel"))


def test_no_corpus_contains_a_probe_prompt_or_a_novel_word():
    config = Config.model_validate({"distill": {"corpus_size": 3000}})
    texts = corpora(config, seed=4)
    everything = "\n".join(texts["teacher"] + texts["students"])
    for probe in ("probe", "novel"):
        for template in vocabulary.templates(probe):
            pattern = re.escape(template).replace(re.escape("{p}"), r"\w+")
            assert not re.search(pattern, everything), template
    corpus_words = set(everything.split())
    for template in vocabulary.templates("novel"):
        novel = set(template.format(p="").split()) - {"The"}
        assert not novel & corpus_words, template
    student_words = set(" ".join(texts["students"]).split())
    assert not set(vocabulary.professions("probe")) & student_words
    assert set(vocabulary.professions("probe")) <= set(" ".join(texts["teacher"]).split())
    assert not set(texts["heldout"]) & (set(texts["teacher"]) | set(texts["students"]))
    assert len(texts["heldout"]) > 100


def test_probe_sets_use_only_held_out_prompts():
    sets = probe_sets()
    assert set(sets["heldout"][0]) == set(vocabulary.professions("probe"))
    assert sets["heldout"][1] == vocabulary.templates("probe")
    assert sets["novel"][1] == vocabulary.templates("novel")


def test_corpus_skew_follows_the_stereotype():
    corpus = generate_corpus(4000, skew=0.9, seed=0)
    nurse = [s for s in corpus if s.startswith("The nurse said that")]
    share = sum(" she " in s for s in nurse) / len(nurse)
    assert 0.75 < share <= 1.0


def test_layering_corpus_and_text_data_import_no_evaluation_or_distill():
    code = ("import sys, trustml.distill.corpus, trustml.data.text; "
            "bad = [m for m in sys.modules if m.startswith(('trustml.evaluation', "
            "'trustml.attacks', 'trustml.training'))]; "
            "import trustml.data.text as t; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys, trustml.data.text; "
            "bad = [m for m in sys.modules if m.startswith('trustml.distill')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
