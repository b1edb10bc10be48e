"""WordNet 3.0 noun and verb synsets shipped inside the package.

The data file ``wordnet.tsv.gz`` (next to this module) is built from the WordNet 3.0 database by
``scripts/build_wordnet.py``; see ``WORDNET_LICENSE`` for the license. It holds one row per
synset: ``synset`` (pos letter + 8-digit offset, e.g. ``n02084071`` for dog.n.01), ``lexname``
(e.g. ``noun.animal``), ``lemmas`` (``|``-separated), ``gloss`` (the definition, without examples)
and ``hypernyms`` (space-separated ids of ``@`` and ``@i`` pointers).

Importing this module reads nothing; :func:`load_wordnet` reads (and caches) the file on first use.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "LEXNAMES",
    "ROOT_NOUN",
    "Synset",
    "by_lexname",
    "hypernym_paths",
    "index_by_id",
    "load_wordnet",
    "wu_palmer",
]

DATA_FILE = "wordnet.tsv.gz"
HEADER = ("synset", "lexname", "lemmas", "gloss", "hypernyms")
ROOT_NOUN = "n00001740"  # entity.n.01: every noun's hypernym chain ends here
_VERB_ROOT = "*ROOT*"  # virtual root above all verb hierarchies (verbs have many roots)

# lexnames(5WN): lexicographer file number -> name.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip


@dataclass(frozen=True)
class Synset:
    """One WordNet synset (noun or verb)."""

    synset: str
    lexname: str
    lemmas: tuple[str, ...]
    gloss: str
    hypernyms: tuple[str, ...]

    @property
    def word(self) -> str:
        """The first (most common) lemma, with underscores turned into spaces."""
        return self.lemmas[0].replace("_", " ")

    @property
    def pos(self) -> str:
        """``"n"`` or ``"v"``."""
        return self.synset[0]


def load_wordnet(path: str | os.PathLike[str] | None = None) -> list[Synset]:
    """All synsets of the packaged WordNet file (or of ``path``), in file order.

    The result is cached per resolved path; treat the returned list as read-only.
    """
    if path is None:
        with resources.as_file(resources.files(__package__) / DATA_FILE) as p:
            return _load_cached(str(Path(p).resolve()))
    return _load_cached(str(Path(path).resolve()))


@functools.lru_cache(maxsize=4)
def _load_cached(resolved_path: str) -> list[Synset]:
    with gzip.open(resolved_path, "rt", encoding="utf-8", newline="\n") as fh:
        header = tuple(fh.readline().rstrip("\n").split("\t"))
        if header != HEADER:
            raise ValueError(f"{resolved_path}: unexpected header {header!r}, want {HEADER!r}")
        synsets: list[Synset] = []
        for lineno, line in enumerate(fh, start=2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != len(HEADER):
                raise ValueError(f"{resolved_path}:{lineno}: expected 5 fields, got {len(fields)}")
            sid, lexname, lemmas, gloss, hypernyms = fields
            synsets.append(
                Synset(
                    synset=sid,
                    lexname=lexname,
                    lemmas=tuple(lemmas.split("|")),
                    gloss=gloss,
                    hypernyms=tuple(hypernyms.split()),
                )
            )
    return synsets


def index_by_id(synsets: Iterable[Synset]) -> dict[str, Synset]:
    """``{synset id: Synset}``, the ``synsets_by_id`` mapping the graph functions take."""
    return {s.synset: s for s in synsets}


def by_lexname(synsets: Iterable[Synset]) -> dict[str, list[Synset]]:
    """Group synsets by lexicographer file name, keeping their order within each group."""
    groups: dict[str, list[Synset]] = {}
    for s in synsets:
        groups.setdefault(s.lexname, []).append(s)
    return groups


# --------------------------------------------------------------------------- hypernym graph


def _parents(sid: str, synsets_by_id: Mapping[str, Synset]) -> tuple[str, ...]:
    try:
        return synsets_by_id[sid].hypernyms
    except KeyError:
        raise KeyError(f"unknown synset id {sid!r}") from None


def hypernym_paths(synset_id: str, synsets_by_id: Mapping[str, Synset]) -> list[list[str]]:
    """Every hypernym path from a root down to ``synset_id`` (root first, the synset last).

    Follows both ``@`` (hypernym) and ``@i`` (instance hypernym) pointers, like NLTK's
    ``Synset.hypernym_paths()``. For nouns every path starts at ``entity`` (``n00001740``).
    """
    parents = _parents(synset_id, synsets_by_id)
    if not parents:
        return [[synset_id]]
    return [
        path + [synset_id] for parent in parents for path in hypernym_paths(parent, synsets_by_id)
    ]


def _distances_up(
    sid: str, synsets_by_id: Mapping[str, Synset], simulate_root: bool
) -> dict[str, int]:
    """Shortest number of hypernym edges from ``sid`` to each of its ancestors (itself: 0)."""
    dist: dict[str, int] = {}
    queue = deque([(sid, 0)])
    while queue:
        node, d = queue.popleft()
        if node in dist:
            continue
        dist[node] = d
        queue.extend((p, d + 1) for p in _parents(node, synsets_by_id))
    if simulate_root:
        dist[_VERB_ROOT] = max(dist.values()) + 1
    return dist


def _min_max_depth(
    sid: str, synsets_by_id: Mapping[str, Synset], memo: dict[str, tuple[int, int]]
) -> tuple[int, int]:
    """(shortest, longest) number of edges from ``sid`` up to a root."""
    if sid == _VERB_ROOT:
        return (0, 0)
    if sid in memo:
        return memo[sid]
    parents = _parents(sid, synsets_by_id)
    if not parents:
        result = (0, 0)
    else:
        depths = [_min_max_depth(p, synsets_by_id, memo) for p in parents]
        result = (1 + min(d[0] for d in depths), 1 + max(d[1] for d in depths))
    memo[sid] = result
    return result


def wu_palmer(
    a: str,
    b: str,
    synsets_by_id: Mapping[str, Synset],
    *,
    use_min_depth: bool = False,
) -> float:
    """Wu-Palmer similarity of two synsets over the hypernym graph, NLTK-style.

    ``sim = 2 * depth(lcs) / (len(a, lcs) + len(b, lcs) + 2 * depth(lcs))``, where
    ``depth(lcs)`` counts nodes from the root (the longest hypernym path to the root plus one),
    ``len(x, lcs)`` is the shortest path length between ``x`` and ``lcs`` (NLTK's
    ``shortest_path_distance``), and ``lcs`` is the deepest common hypernym, a synset counting
    as its own hypernym. ``@`` and ``@i`` (instance) pointers are both followed. With a single
    hypernym chain this is the textbook ``2 * depth(lcs) / (depth(a) + depth(b))``.

    By default the lcs is the common hypernym of greatest (longest-path) depth, so
    ``wu_palmer(x, x) == 1``. ``use_min_depth=True`` reproduces NLTK's ``wup_similarity``,
    which picks the lcs by *shortest*-path depth (kept there for NLTK 2 compatibility): this
    can pick a hypernym over the synset itself, e.g. NLTK gives dog.n.01 with itself 13/14
    because dog also sits under domestic_animal. For most pairs the two agree.

    Nouns all lead to ``entity`` (``n00001740``). Verbs have many roots, so, as in NLTK, a
    virtual root is placed above them (distance: the synset's longest hypernym chain + 1) and
    unrelated verbs get a small positive similarity. Ties for the lcs are broken as in NLTK
    (``a`` itself first, then the virtual root), except that among real synsets NLTK takes the
    alphabetically first ``lemma.pos.nn`` name (not stored here) where this function takes the
    tie giving the highest similarity.
    """
    if a[:1] != b[:1]:
        raise ValueError(f"wu_palmer needs synsets of the same pos, got {a!r} and {b!r}")
    simulate_root = a.startswith("v")
    dist_a = _distances_up(a, synsets_by_id, simulate_root)
    dist_b = _distances_up(b, synsets_by_id, simulate_root)
    common = dist_a.keys() & dist_b.keys()
    memo: dict[str, tuple[int, int]] = {}
    which = 0 if use_min_depth else 1
    depth_of = {c: _min_max_depth(c, synsets_by_id, memo)[which] for c in common}
    deepest = max(depth_of.values())
    candidates = sorted(c for c in common if depth_of[c] == deepest)
    if a in candidates:
        candidates = [a]
    elif _VERB_ROOT in candidates:
        candidates = [_VERB_ROOT]

    def shortest_between(x_dist: dict[str, int], target: str) -> int:
        # NLTK's shortest_path_distance: shortest route between x and target through any
        # hypernym the two share (normally just the edges from x up to target).
        if target == _VERB_ROOT:
            t_dist = {_VERB_ROOT: 0}
        else:
            t_dist = _distances_up(target, synsets_by_id, simulate_root)
        return min(d + t_dist[n] for n, d in x_dist.items() if n in t_dist)

    best = 0.0
    for lcs in candidates:
        depth = _min_max_depth(lcs, synsets_by_id, memo)[1] + 1
        len_a = shortest_between(dist_a, lcs) + depth
        len_b = shortest_between(dist_b, lcs) + depth
        best = max(best, 2.0 * depth / (len_a + len_b))
    return best
