"""The packaged WordNet 3.0 data (src/continual_lora/data/wordnet.tsv.gz) and its loader."""

from __future__ import annotations

import gzip
import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from continual_lora.data.wordnet import (
    LEXNAMES,
    ROOT_NOUN,
    Synset,
    by_lexname,
    hypernym_paths,
    index_by_id,
    load_wordnet,
    wu_palmer,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_wordnet.py"
PACKAGED = REPO_ROOT / "src" / "continual_lora" / "data" / "wordnet.tsv.gz"
WORDNET_DIR = Path("/usr/share/wordnet")

DOG, CAT, CAR = "n02084071", "n02121620", "n02958343"
CANINE, FELINE, CARNIVORE = "n02083346", "n02120997", "n02075296"


@pytest.fixture(scope="module")
def synsets() -> list[Synset]:
    return load_wordnet()


@pytest.fixture(scope="module")
def by_id(synsets: list[Synset]) -> dict[str, Synset]:
    return index_by_id(synsets)


def test_loads_and_is_cached(synsets: list[Synset]) -> None:
    assert synsets and all(isinstance(s, Synset) for s in synsets)
    assert load_wordnet() is synsets
    assert load_wordnet(PACKAGED) is synsets  # same resolved path, same cache entry
    assert len({s.synset for s in synsets}) == len(synsets)


def test_counts_per_pos(synsets: list[Synset]) -> None:
    counts = Counter(s.synset[0] for s in synsets)
    assert set(counts) == {"n", "v"}
    assert counts["n"] > 80_000
    assert counts["v"] > 13_000


def test_lexnames(synsets: list[Synset]) -> None:
    assert len(LEXNAMES) == 45
    groups = by_lexname(synsets)
    assert set(groups) <= set(LEXNAMES)
    assert sum(len(v) for v in groups.values()) == len(synsets)
    assert len([n for n in groups if n.startswith("noun.")]) >= 25
    assert len([n for n in groups if n.startswith("verb.")]) >= 15
    for name, members in groups.items():
        assert all(s.lexname == name for s in members)
        assert all(s.synset[0] == name[0] for s in members)  # noun.* <-> n, verb.* <-> v


def test_known_synset(by_id: dict[str, Synset]) -> None:
    dog = by_id[DOG]
    assert dog.lemmas[0] == "dog"
    assert dog.word == "dog"
    assert dog.lemmas == ("dog", "domestic_dog", "Canis_familiaris")
    assert dog.lexname == "noun.animal"
    assert CANINE in dog.hypernyms
    assert by_id[CANINE].lemmas[0] == "canine"
    assert dog.gloss.startswith("a member of the genus Canis")
    assert '"' not in dog.gloss  # the example "the dog barked all night" was cut off
    assert by_id[ROOT_NOUN].lemmas == ("entity",)
    assert by_id[ROOT_NOUN].hypernyms == ()


def test_fields_are_clean(synsets: list[Synset], by_id: dict[str, Synset]) -> None:
    for s in synsets:
        assert s.gloss and s.gloss == s.gloss.strip(), s
        assert not s.gloss.startswith('"'), s
        assert '; "' not in s.gloss, s
        assert all(s.lemmas) and not any("(" in w and w.endswith(")") for w in s.lemmas), s
        assert all(h[0] == s.synset[0] and h in by_id for h in s.hypernyms), s


def test_every_noun_leads_to_entity(synsets: list[Synset], by_id: dict[str, Synset]) -> None:
    roots = [s.synset for s in synsets if s.synset[0] == "n" and not s.hypernyms]
    assert roots == [ROOT_NOUN]
    paths = hypernym_paths(DOG, by_id)
    assert all(p[0] == ROOT_NOUN and p[-1] == DOG for p in paths)


def test_wu_palmer_dog_cat_from_the_paths(by_id: dict[str, Synset]) -> None:
    def words(path: list[str]) -> list[str]:
        return [by_id[x].lemmas[0] for x in path]

    mammal_chain = [
        "entity", "physical_entity", "object", "whole", "living_thing", "organism", "animal",
        "chordate", "vertebrate", "mammal", "placental", "carnivore",
    ]  # fmt: skip
    dog_paths = sorted(map(words, hypernym_paths(DOG, by_id)), key=len)
    assert dog_paths == [
        mammal_chain[:7] + ["domestic_animal", "dog"],
        mammal_chain + ["canine", "dog"],
    ]
    assert list(map(words, hypernym_paths(CAT, by_id))) == [mammal_chain + ["feline", "cat"]]
    assert by_id[CARNIVORE].lemmas[0] == "carnivore"
    # The lowest common subsumer is carnivore, 12 nodes deep; dog and cat both hang 2 below it
    # (dog's other chain, via domestic_animal, meets cat's only at animal, 7 deep).
    expected = 2 * 12 / ((12 + 2) + (12 + 2))  # = 6/7 = 0.857..., NLTK's dog/cat value
    assert wu_palmer(DOG, CAT, by_id) == pytest.approx(expected, abs=1e-9)
    assert wu_palmer(CAT, DOG, by_id) == pytest.approx(expected, abs=1e-9)
    assert wu_palmer(DOG, CAT, by_id, use_min_depth=True) == pytest.approx(expected, abs=1e-9)


def test_wu_palmer_identity_symmetry_and_range(by_id: dict[str, Synset]) -> None:
    for x in (DOG, CAT, CAR, ROOT_NOUN):
        assert wu_palmer(x, x, by_id) == 1.0
    # dog/car: lcs whole.n.02 (4 deep); dog->whole 5 edges (via domestic_animal),
    # car->whole 7 edges (via container): 2*4 / (9 + 11) = 0.4, as NLTK gives.
    assert wu_palmer(DOG, CAR, by_id) == pytest.approx(0.4, abs=1e-9)
    assert wu_palmer(CAR, DOG, by_id) == pytest.approx(0.4, abs=1e-9)
    assert wu_palmer(DOG, CAR, by_id) < wu_palmer(DOG, CAT, by_id) < 1.0
    # NLTK's own choice of lcs (by shortest depth) picks canine over dog itself: 2*13/(14+14).
    assert wu_palmer(DOG, DOG, by_id, use_min_depth=True) == pytest.approx(13 / 14, abs=1e-9)
    nouns = [s for s in by_id if s[0] == "n"][::5000]
    for x in nouns:
        for y in nouns:
            v = wu_palmer(x, y, by_id)
            assert 0.0 < v <= 1.0
            assert v == pytest.approx(wu_palmer(y, x, by_id), abs=1e-12)


def test_wu_palmer_verbs_and_mixed_pos(by_id: dict[str, Synset]) -> None:
    verbs = [s for s in by_id if s[0] == "v"][::3000]
    for x in verbs:
        assert wu_palmer(x, x, by_id) == 1.0
        for y in verbs:
            assert 0.0 < wu_palmer(x, y, by_id) <= 1.0
    with pytest.raises(ValueError):
        wu_palmer(DOG, verbs[0], by_id)


def test_load_rejects_a_bad_header(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv.gz"
    bad.write_bytes(gzip.compress(b"a\tb\n"))
    with pytest.raises(ValueError, match="header"):
        load_wordnet(bad)


@pytest.mark.skipif(
    not (WORDNET_DIR / "data.noun").is_file(),
    reason="WordNet 3.0 database not installed at /usr/share/wordnet (Debian: wordnet-base)",
)
def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("build_wordnet", BUILD_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "wordnet.tsv.gz"
    assert module.main(["--wordnet-dir", str(WORDNET_DIR), "--out", str(out)]) == 0
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(PACKAGED.read_bytes()), (
        "packaged wordnet.tsv.gz is stale: rerun scripts/build_wordnet.py"
    )
    assert out.read_bytes() == PACKAGED.read_bytes()
    assert PACKAGED.stat().st_size < 4_000_000
