"""WordNet facts as question/answer rounds, and the general text the embedded LM learns from."""

from __future__ import annotations

import json
import re

import pytest

from continual_lora.data.facts import RELATIONS, Fact, fact_rounds, write_fact_files
from continual_lora.data.general_text import general_text
from continual_lora.data.wordnet import index_by_id, load_wordnet

SUBJECT = {
    "hypernym": re.compile(r"^What is an? (.+) a kind of\?$"),
    "synonym": re.compile(r"^What is another word for (.+)\?$"),
    "category": re.compile(r"^What kind of thing is an? (.+)\?$"),
}


@pytest.fixture(scope="module")
def rounds():
    return fact_rounds(rounds=4, per_round=100, seed=0)


def _subject(fact: Fact) -> str:
    match = SUBJECT[fact.relation].match(fact.question)
    assert match, fact.question
    return match.group(1)


def test_rounds_are_deterministic_and_seeded(rounds):
    assert fact_rounds(rounds=4, per_round=100, seed=0) == rounds
    other = fact_rounds(rounds=4, per_round=100, seed=1)
    assert [f.synset for f in other[0].facts] != [f.synset for f in rounds[0].facts]
    # Fewer rounds are a prefix of more rounds with the same seed.
    assert fact_rounds(rounds=2, per_round=100, seed=0) == rounds[:2]


def test_rounds_cycle_relations_with_names(rounds):
    assert [r.name for r in rounds] == ["r1-hypernym", "r2-synonym", "r3-category", "r4-hypernym"]
    for i, rnd in enumerate(rounds):
        assert rnd.relation == RELATIONS[i % 3]
        assert len(rnd.facts) == 100
        assert {f.relation for f in rnd.facts} == {rnd.relation}


def test_subjects_are_disjoint_across_rounds(rounds):
    synsets = [f.synset for r in rounds for f in r.facts]
    words = [_subject(f).lower() for r in rounds for f in r.facts]
    assert len(set(synsets)) == len(synsets)
    assert len(set(words)) == len(words)


def test_answers_are_short_and_match_wordnet(rounds):
    by_id = index_by_id(load_wordnet())
    for rnd in rounds:
        for fact in rnd.facts:
            assert fact.answer.strip() == fact.answer and 1 <= len(fact.answer.split()) <= 3
            synset = by_id[fact.synset]
            assert _subject(fact) == synset.word
            assert not set(fact.answer.lower().split()) & set(_subject(fact).lower().split())
            if fact.relation == "hypernym":
                assert fact.answer == by_id[synset.hypernyms[0]].word
            elif fact.relation == "synonym":
                assert fact.answer.replace(" ", "_") in synset.lemmas[1:]
            else:
                assert synset.lexname == f"noun.{fact.answer}"


def test_category_rounds_are_balanced(rounds):
    answers = [f.answer for f in rounds[2].facts]
    assert len(set(answers)) >= 20  # round-robin over the categories, not mostly "artifact"
    assert max(answers.count(a) for a in set(answers)) <= 5


def test_subjects_occur_in_the_pretraining_text(rounds):
    text = " ".join(general_text("pretrain")).lower()
    for fact in rounds[0].facts[:20] + rounds[1].facts[:20]:
        assert f"{_subject(fact).lower()}: " in text or f"{_subject(fact).lower()} means " in text


def test_write_fact_files(tmp_path, rounds):
    paths = write_fact_files(tmp_path / "facts", rounds=4, per_round=100, seed=0)
    assert [p.name for p in paths] == [f"{r.name}.jsonl" for r in rounds]
    for path, rnd in zip(paths, rounds, strict=True):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(set(row) == {"question", "answer"} for row in rows)
        assert rows == [{"question": f.question, "answer": f.answer} for f in rnd.facts]


def test_too_many_rounds_is_a_clear_error():
    with pytest.raises(ValueError, match="not enough 'synonym' facts"):
        fact_rounds(rounds=2, per_round=5000)


def test_general_text_splits():
    pretrain, heldout = general_text("pretrain"), general_text("heldout")
    assert len(pretrain) > 80_000 and 500 <= len(heldout) <= 1000
    assert not set(pretrain) & set(heldout)
    assert all(doc and doc.endswith(".") for doc in pretrain[:1000] + heldout)
    assert general_text("heldout") == heldout  # deterministic
    assert "dog: a member of the genus Canis" in " ".join(pretrain + heldout) or any(
        doc.startswith("Dog means a member of the genus Canis") for doc in pretrain + heldout
    )
    with pytest.raises(ValueError, match="unknown split"):
        general_text("train")
