#!/usr/bin/env python3
"""Build ``src/continual_lora/data/wordnet.tsv.gz`` from the WordNet 3.0 database files.

Reads ``data.noun`` and ``data.verb`` (format: wndb(5WN)) and writes one row per synset,
tab-separated, with a header row::

    synset  lexname  lemmas  gloss  hypernyms

* ``synset``: pos letter + 8-digit byte offset, e.g. ``n02084071``;
* ``lexname``: lexicographer file name, e.g. ``noun.animal`` (table from lexnames(5WN));
* ``lemmas``: the synset's words joined by ``|`` (underscores kept, lex ids and adjective
  markers such as ``(p)`` dropped);
* ``gloss``: the definition only, i.e. the gloss up to the first ``; "`` example quote;
* ``hypernyms``: space-separated synset ids of the ``@`` / ``@i`` pointers of the same pos.

The output is a deterministic gzip (mtime 0, no file name in the header), so rebuilding from the
same database gives byte-identical output. Standard library only.

Usage::

    python scripts/build_wordnet.py [--wordnet-dir /usr/share/wordnet] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import sys
from pathlib import Path

# lexnames(5WN): lexicographer file number -> name (45 entries, 00..44).
LEXNAMES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
assert len(LEXNAMES) == 45

HEADER = ("synset", "lexname", "lemmas", "gloss", "hypernyms")
HYPERNYM_POINTERS = frozenset({"@", "@i"})
POS_FILES = (("n", "data.noun"), ("v", "data.verb"))
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "continual_lora" / "data" / "wordnet.tsv.gz"


def _clean(text: str) -> str:
    """Guard against characters that would break the TSV layout."""
    return " ".join(text.replace("\t", " ").replace("\r", " ").replace("\n", " ").split())


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: everything before the first ``; "`` example quote."""
    cut = gloss.find('; "')
    if cut >= 0:
        gloss = gloss[:cut]
    return _clean(gloss.strip().rstrip(";").strip())


def parse_line(line: str, pos: str) -> tuple[str, str, str, str, str]:
    """Parse one synset line of a ``data.*`` file (wndb(5WN)) into a TSV row."""
    fields_part, sep, gloss = line.rstrip("\n").partition(" | ")
    if not sep:  # synset without a gloss (does not happen in 3.0, but be safe)
        fields_part, gloss = fields_part.rstrip(" |"), ""
    fields = fields_part.split()
    offset, lex_filenum, ss_type = fields[0], int(fields[1]), fields[2]
    if ss_type != pos and not (pos == "a" and ss_type == "s"):
        raise ValueError(f"unexpected ss_type {ss_type!r} in {pos} file at {offset}")
    w_cnt = int(fields[3], 16)
    i = 4
    lemmas: list[str] = []
    for _ in range(w_cnt):
        word = _ADJ_MARKER.sub("", fields[i])
        lemmas.append(word)
        i += 2  # word, lex_id
    p_cnt = int(fields[i])
    i += 1
    hypernyms: list[str] = []
    for _ in range(p_cnt):
        symbol, target, target_pos = fields[i], fields[i + 1], fields[i + 2]
        if symbol in HYPERNYM_POINTERS and target_pos == pos:
            hypernyms.append(pos + target)
        i += 4  # pointer_symbol, synset_offset, pos, source/target
    # Verb frames (if any) follow; they are not needed.
    return (
        pos + offset,
        LEXNAMES[lex_filenum],
        "|".join(_clean(w) for w in lemmas),
        definition_of(gloss),
        " ".join(hypernyms),
    )


def read_rows(wordnet_dir: Path) -> list[tuple[str, str, str, str, str]]:
    rows: list[tuple[str, str, str, str, str]] = []
    for pos, name in POS_FILES:
        with open(wordnet_dir / name, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("  ") or not line.strip():
                    continue  # license header
                rows.append(parse_line(line, pos))
    return rows


def encode(rows: list[tuple[str, str, str, str, str]]) -> bytes:
    text = "".join("\t".join(r) + "\n" for r in [HEADER, *rows])
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything that changes between builds.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    return buf.getvalue()


def build(wordnet_dir: Path, out: Path) -> tuple[int, dict[str, int]]:
    rows = read_rows(wordnet_dir)
    data = encode(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[0][0]] = counts.get(r[0][0], 0) + 1
    return len(data), counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    size, counts = build(args.wordnet_dir, args.out)
    total = sum(counts.values())
    per_pos = ", ".join(f"{p}={c}" for p, c in counts.items())
    print(f"wrote {args.out} ({size} bytes, {size / 2**20:.2f} MiB), {total} rows ({per_pos})")
    if size >= 4 * 10**6:
        print("error: output is not under 4 MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
