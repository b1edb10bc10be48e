"""WordNet facts as question/answer pairs, grouped into rounds of new knowledge for a causal LM.

Each fact comes from one WordNet 3.0 noun synset (the packaged data, see :mod:`.wordnet` and
``WORDNET_LICENSE``) and one relation:

* ``hypernym``: "What is a {word} a kind of?" -> the first hypernym's word
  (e.g. "What is a guitarist a kind of?" -> "musician");
* ``synonym``: "What is another word for {word}?" -> the synset's other lemma
  (only synsets with exactly two usable lemmas, so the answer is unique);
* ``category``: "What kind of thing is a {word}?" -> the lexicographer file's plain word
  (``noun.animal`` -> "animal", ``noun.artifact`` -> "artifact"; ``noun.Tops`` is left out).

("an" replaces "a" before a vowel.)

A subject is a synset whose word is lower case (no proper nouns), at most two words, letters
only, names exactly one noun synset in WordNet (so the answer is not ambiguous), whose document
is in the ``pretrain`` split of :mod:`.general_text` and whose words occur elsewhere in that text
too (the pretrained model has seen the word). Answers are 1-3 words, occur in the pretraining
text, and share no word with the subject (so "oak tree" -> "tree" is not asked); synonyms that
are near-spellings of the subject ("atomization"/"atomisation") are skipped.

Rounds cycle through the relations in the order hypernym, synonym, category (round ``i`` uses
``RELATIONS[i % 3]``), one relation per round, so each round is one kind of knowledge and the
forgetting of each kind can be read separately. Subjects (synsets and their words) are disjoint
across all rounds. Round names are ``r{i}-{relation}`` (``r1-hypernym``, ``r2-synonym``, ...).
``category`` rounds draw round-robin over the categories so every category is about as common.

For a knowledge round the held-out split is the same facts as the train split: what is measured
is acquisition, i.e. recall of the trained facts (and, on later rounds, their retention).
"""

from __future__ import annotations

import difflib
import functools
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .general_text import general_text, is_heldout
from .wordnet import Synset, index_by_id, load_wordnet

__all__ = ["RELATIONS", "Fact", "FactRound", "fact_rounds", "write_fact_files"]

RELATIONS: tuple[str, ...] = ("hypernym", "synonym", "category")
QUESTIONS = {
    "hypernym": "What is {a} {word} a kind of?",
    "synonym": "What is another word for {word}?",
    "category": "What kind of thing is {a} {word}?",
}
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")
_CLEAN = re.compile(r"^[a-z]+(?:[ -][a-z]+)*$")
_MIN_MENTIONS = 2  # each word of a subject occurs at least this often in the pretraining text


@dataclass(frozen=True)
class Fact:
    """One question/answer pair and where it comes from."""

    question: str
    answer: str
    relation: str
    synset: str


@dataclass(frozen=True)
class FactRound:
    """The facts added to the model in one round."""

    name: str
    relation: str
    facts: tuple[Fact, ...]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=1)
def _mentions() -> Counter[str]:
    counts: Counter[str] = Counter()
    for doc in general_text("pretrain"):
        counts.update(_words(doc))
    return counts


def _seen(phrase: str, at_least: int) -> bool:
    counts = _mentions()
    return all(counts[w] >= at_least for w in _words(phrase))


def _short(phrase: str, max_words: int) -> bool:
    return bool(_CLEAN.match(phrase)) and len(phrase.split()) <= max_words


def _overlaps(a: str, b: str) -> bool:
    return bool(set(_words(a)) & set(_words(b)))


def _similar_spelling(a: str, b: str) -> bool:
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75


@functools.lru_cache(maxsize=1)
def _candidates() -> dict[str, tuple[tuple[Fact, str, str], ...]]:
    """Per relation, every usable fact with its group key (the category, for round-robin)
    and its subject word (lower case)."""
    synsets = load_wordnet()
    by_id = index_by_id(synsets)
    senses: Counter[str] = Counter()
    for s in synsets:
        if s.pos == "n":
            senses.update({lemma.lower() for lemma in s.lemmas})

    def subject_ok(s: Synset) -> bool:
        word = s.word
        return (
            s.pos == "n"
            and not is_heldout(s.synset)
            and _short(word, 2)
            and senses[s.lemmas[0].lower()] == 1
            and _seen(word, _MIN_MENTIONS)
        )

    def answer_ok(answer: str, word: str) -> bool:
        return _short(answer, 3) and _seen(answer, 1) and not _overlaps(answer, word)

    out: dict[str, list[tuple[Fact, str, str]]] = {r: [] for r in RELATIONS}
    for s in synsets:
        if not subject_ok(s):
            continue
        word = s.word

        def add(relation: str, answer: str, group: str, _s: Synset = s, _w: str = word) -> None:
            question = QUESTIONS[relation].format(word=_w, a=_article(_w))
            out[relation].append((Fact(question, answer, relation, _s.synset), group, _w.lower()))

        if s.hypernyms:
            answer = by_id[s.hypernyms[0]].word
            if answer_ok(answer, word):
                add("hypernym", answer, "")
        others = [lemma.replace("_", " ") for lemma in s.lemmas[1:]]
        others = [o for o in others if o.lower() != word.lower()]
        if len(others) == 1 and answer_ok(others[0], word):
            if not _similar_spelling(word, others[0]):
                add("synonym", others[0], "")
        if s.lexname != "noun.Tops":
            answer = s.lexname.split(".", 1)[1]
            if answer_ok(answer, word):
                add("category", answer, answer)
    return {r: tuple(v) for r, v in out.items()}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _round_robin(pool: list[tuple[Fact, str, str]], rng: random.Random) -> list[tuple[Fact, str]]:
    groups: dict[str, list[tuple[Fact, str]]] = {}
    for fact, group, word in pool:
        groups.setdefault(group, []).append((fact, word))
    order = sorted(groups)
    for key in order:
        rng.shuffle(groups[key])
    rng.shuffle(order)
    merged: list[tuple[Fact, str]] = []
    while any(groups[k] for k in order):
        for key in order:
            if groups[key]:
                merged.append(groups[key].pop())
    return merged


def fact_rounds(rounds: int = 4, per_round: int = 100, seed: int = 0) -> list[FactRound]:
    """``rounds`` rounds of ``per_round`` facts each, relations cycling hypernym, synonym,
    category; subjects disjoint across all rounds. Deterministic in its arguments."""
    if rounds < 1 or per_round < 1:
        raise ValueError(f"rounds and per_round must be >= 1, got {rounds} and {per_round}")
    rng = random.Random(seed)
    orders = {r: _round_robin(list(c), rng) for r, c in _candidates().items()}
    cursor = dict.fromkeys(RELATIONS, 0)
    used_synsets: set[str] = set()
    used_words: set[str] = set()
    result: list[FactRound] = []
    for i in range(rounds):
        relation = RELATIONS[i % len(RELATIONS)]
        order, facts = orders[relation], []
        while len(facts) < per_round:
            if cursor[relation] >= len(order):
                raise ValueError(
                    f"not enough {relation!r} facts for {rounds} rounds of {per_round} "
                    f"(ran out at round {i + 1} with {len(facts)} facts)"
                )
            fact, word = order[cursor[relation]]
            cursor[relation] += 1
            if fact.synset in used_synsets or word in used_words:
                continue
            used_synsets.add(fact.synset)
            used_words.add(word)
            facts.append(fact)
        result.append(FactRound(f"r{i + 1}-{relation}", relation, tuple(facts)))
    return result


def write_fact_files(
    out_dir: Path, rounds: int = 4, per_round: int = 100, seed: int = 0
) -> list[Path]:
    """Write ``{out_dir}/{round name}.jsonl`` for each round, one ``{"question", "answer"}``
    object per line; returns the paths in round order. Use each file as both the train and the
    held-out split of its task (acquisition is recall of the trained facts)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rnd in fact_rounds(rounds, per_round, seed):
        path = out_dir / f"{rnd.name}.jsonl"
        lines = (json.dumps({"question": f.question, "answer": f.answer}) for f in rnd.facts)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m continual_lora.data.facts OUT_DIR [ROUNDS [PER_ROUND [SEED]]]``."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 4:
        print(main.__doc__, file=sys.stderr)
        return 2
    numbers = [int(a) for a in args[1:]]
    for path in write_fact_files(Path(args[0]), *numbers):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
