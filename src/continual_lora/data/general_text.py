"""General English text for pretraining the embedded causal LM: one short definition per synset.

The text is derived from the packaged WordNet 3.0 nouns and verbs (see :mod:`.wordnet` and
``WORDNET_LICENSE`` next to this module): each synset gives one document made of its first
lemma and its gloss, in one of a few fixed phrasings chosen by a stable hash of the synset id::

    disaster: an act that has disastrous consequences.
    Disaster means an act that has disastrous consequences.
    to sprint: run very fast, usually for a short distance.
    To sprint means to run very fast, usually for a short distance.

The documents never state a synset's synonyms, hypernym or lexicographer category outright,
so the WordNet facts of :mod:`.facts` are new knowledge to a model pretrained on this text
(a gloss sometimes paraphrases its hypernym, as definitions do).

Splits are fixed and deterministic: a synset is held out when the SHA-256 of its id falls in the
lowest ~3% (``HELDOUT_PER_MILLE``); the held-out split keeps the first ``HELDOUT_MAX`` of those in
file order, and a held-out document whose text also occurs in ``pretrain`` is dropped, so the two
splits never share a document. Nothing is read at import time; results are cached.
"""

from __future__ import annotations

import functools
import hashlib

from .wordnet import Synset, load_wordnet

__all__ = ["HELDOUT_MAX", "HELDOUT_PER_MILLE", "SPLITS", "document", "general_text", "is_heldout"]

SPLITS = ("pretrain", "heldout")
HELDOUT_PER_MILLE = 30
HELDOUT_MAX = 1000


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_heldout(synset_id: str) -> bool:
    """Whether a synset's document belongs to the held-out split (before the size cap)."""
    return _stable_hash(synset_id) % 1000 < HELDOUT_PER_MILLE


def document(synset: Synset) -> str:
    """The one-line document for a synset (phrasing picked by a stable hash of its id)."""
    word, gloss = synset.word, synset.gloss.strip().rstrip(".;:, ")
    plain = (_stable_hash("form:" + synset.synset) >> 8) % 2 == 0
    if synset.pos == "v":
        if plain:
            return f"to {word}: {gloss}."
        return f"To {word} means to {gloss.removeprefix('to ')}."
    return f"{word}: {gloss}." if plain else f"{word[:1].upper()}{word[1:]} means {gloss}."


@functools.lru_cache(maxsize=1)
def _splits() -> tuple[tuple[str, ...], tuple[str, ...]]:
    pretrain: list[str] = []
    heldout: list[str] = []
    for s in load_wordnet():
        if not s.gloss.strip():
            continue
        (heldout if is_heldout(s.synset) else pretrain).append(document(s))
    seen = set(pretrain)
    heldout = [d for d in heldout if d not in seen][:HELDOUT_MAX]
    return tuple(pretrain), tuple(heldout)


def general_text(split: str) -> list[str]:
    """The documents of ``split`` (``"pretrain"`` or ``"heldout"``), in WordNet file order.

    Returns a fresh list each call (the underlying data is cached).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    pretrain, heldout = _splits()
    return list(pretrain if split == "pretrain" else heldout)
