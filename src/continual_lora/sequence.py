"""Tasks, their data, and how several data sources are mixed into one training stream.

A task is a name, a train split, a held-out split and a scorer (classification accuracy here).
Data comes from the user's files (CSV, JSON lines, JSON, Parquet, read through `datasets`) or from
the built-in WordNet glosses. Sources are mixed per epoch by `repeats` (kohya's `num_repeats`) or,
when any source has a `weight`, by weighted sampling; `describe_mix` prints the effective mix.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from continual_lora.config import ConfigError, RunConfig, TaskConfig

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
                ".parquet": "parquet"}
UPSTREAM_SEED = 20240917  # fixed so every run of every strategy is scored on the same probe


@dataclass
class Split:
    """Texts with integer labels (indices into the task's `classes`). A causal LM's split also
    holds its raw examples in `records` (`{"text"}`, `{"prompt", "completion"}`,
    `{"messages"}` or `{"question", "answer"}`); its `texts` are their display form and its
    labels all 0."""

    texts: list[str]
    labels: np.ndarray
    records: list[dict] | None = None
    #: image classifier: one image per example (uint8 array, file path or PIL image); `texts`
    #: then hold display names
    images: list | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    """One task of the sequence, loaded. `index` is 1-based, as in the accuracy matrix."""

    index: int
    name: str
    classes: list[str]
    train: Split
    eval: Split
    repeats: int = 1
    weight: float | None = None
    manifest: dict = field(default_factory=dict)
    scorer: str = "accuracy"  # "accuracy", "exact_match", "perplexity" or an image similarity
    #: diffusion: the images samples are compared with (`image_data.ImageRecord`s)
    references: list | None = None
    #: diffusion: prior preservation ({"class_prompt", "images", "weight"}) when asked for
    prior: dict | None = None


@dataclass
class RetrievalProbe:
    """Upstream probe: each query's right key is the key at the same position."""

    name: str
    queries: list[str]
    keys: list[str]
    manifest: dict = field(default_factory=dict)


@dataclass
class ClassProbe:
    """Upstream probe of an image classifier: held-out images of the classes its own
    (pretrained, frozen) head predicts; `labels` index `classes`."""

    name: str
    images: list
    labels: np.ndarray
    classes: list[str]
    manifest: dict = field(default_factory=dict)


@dataclass
class TextProbe:
    """Upstream probe of a causal LM: general text whose perplexity the base model is good at."""

    name: str
    texts: list[str]
    manifest: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Loading


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _texts_hash(texts: list[str], labels: list[str]) -> str:
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        digest.update(json.dumps([text, label]).encode())
    return digest.hexdigest()


def load_table(path: Path, what: str):
    """A data file (CSV, TSV, JSON lines, JSON or Parquet) as a `datasets` table with at least
    one row; a missing, unsupported, empty or malformed file is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"{what}: data file not found: {path}")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"{what}: {path.name}: unsupported file type {path.suffix!r}; "
            f"use one of {', '.join(sorted(FILE_FORMATS))}"
        )
    if fmt in ("csv", "json"):  # datasets' own message for an empty file is cryptic
        with path.open("rb") as fh:
            lines = sum(1 for line in fh if line.strip())
        if lines <= (1 if fmt == "csv" else 0):
            raise ConfigError(f"{what}: {path} holds no examples")
    from datasets import load_dataset

    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        table = load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for malformed files
        raise ConfigError(f"{what}: could not read {path}: {exc}") from None
    if len(table) == 0:
        raise ConfigError(f"{what}: {path} holds no examples")
    return table


def read_table(path: Path, text_column: str, label_column: str, what: str,
               table=None) -> tuple[list, list]:
    """Read (texts, raw labels) from a data file through `datasets` (or from its `table`,
    already loaded); errors name file and column."""
    table = load_table(path, what) if table is None else table
    for column in (text_column, label_column):
        if column not in table.column_names:
            raise ConfigError(
                f"{what}: {path.name} has no column {column!r}; its columns are "
                f"{table.column_names}. Set `text_column`/`label_column` in the task."
            )
    texts = [str(t) if t is not None else "" for t in table[text_column]]
    labels = table[label_column]
    if any(label is None for label in labels):
        raise ConfigError(f"{what}: {path.name}: column {label_column!r} has empty labels")
    return texts, [str(label) for label in labels]


def inside_data_dir(run: RunConfig, path: Path, what: str) -> Path:
    """`path`, checked to lie inside `run.data_dir` (when set) once `..` and links are
    resolved."""
    if run.data_dir is None:
        return path
    root = run.resolve_path(run.data_dir).resolve()
    if not path.resolve().is_relative_to(root):
        raise ConfigError(f"{what}: {path} leads outside data_dir {root} (resolved: "
                          f"{path.resolve()}); keep the data inside data_dir, or change "
                          "data_dir if this config is yours")
    return path


def _sample(n: int, k: int | None, rng: random.Random) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted(rng.sample(range(n), k))


def load_file_task(cfg: TaskConfig, index: int, run: RunConfig, train_table=None) -> TaskData:
    """A task from the user's train and held-out files (`train_table`: the train file, when
    already loaded)."""
    what = f"tasks.{index - 1} ({cfg.name})"
    train_path = inside_data_dir(run, run.resolve_path(cfg.train or ""), f"{what}.train")
    eval_path = inside_data_dir(run, run.resolve_path(cfg.eval or ""), f"{what}.eval")
    train_texts, train_raw = read_table(train_path, cfg.text_column, cfg.label_column, what,
                                        train_table)
    eval_texts, eval_raw = read_table(eval_path, cfg.text_column, cfg.label_column, what)
    classes = sorted(set(train_raw))
    if len(classes) < 2:
        raise ConfigError(f"{what}: {train_path.name} has a single class {classes}; need ≥ 2")
    unknown = sorted(set(eval_raw) - set(classes))
    if unknown:
        raise ConfigError(
            f"{what}: the held-out file {eval_path.name} has labels the train file does not: "
            f"{unknown[:10]}. Every held-out label must occur in training."
        )
    keep = _sample(len(train_texts), cfg.max_train_examples, random.Random(run.seed))
    position = {c: i for i, c in enumerate(classes)}
    train = Split([train_texts[i] for i in keep],
                  np.array([position[train_raw[i]] for i in keep], dtype=np.int64))
    held_out = Split(eval_texts, np.array([position[c] for c in eval_raw], dtype=np.int64))
    manifest = {
        "source": "files",
        "train": {"path": str(train_path), "sha256": _sha256(train_path), "rows": len(train_raw),
                  "used": len(keep)},
        "eval": {"path": str(eval_path), "sha256": _sha256(eval_path), "rows": len(eval_raw)},
    }
    return TaskData(index, cfg.name, classes, train, held_out, cfg.repeats, cfg.weight, manifest)


def wordnet_upstream(size: int) -> tuple[RetrievalProbe, set[str]]:
    """Gloss → word retrieval over `size` noun synsets with distinct words (fixed sample)."""
    from continual_lora.data.wordnet import load_wordnet

    rng = random.Random(UPSTREAM_SEED)
    nouns = [s for s in load_wordnet() if s.synset.startswith("n")]
    rng.shuffle(nouns)
    chosen, words = [], set()
    for syn in nouns:
        word = syn.word.lower()
        if word in words:
            continue
        words.add(word)
        chosen.append(syn)
        if len(chosen) == size:
            break
    probe = RetrievalProbe(
        name="upstream:wordnet_retrieval",
        queries=[s.gloss for s in chosen],
        keys=[s.word for s in chosen],
        manifest={"source": "wordnet", "size": len(chosen), "seed": UPSTREAM_SEED,
                  "sha256": _texts_hash([s.gloss for s in chosen], [s.word for s in chosen])},
    )
    return probe, {s.synset for s in chosen}


def load_wordnet_task(cfg: TaskConfig, index: int, run: RunConfig,
                      exclude: set[str]) -> TaskData:
    """A task of WordNet glosses labelled by lexicographer category (one class per category)."""
    from continual_lora.data.wordnet import by_lexname, load_wordnet

    groups = by_lexname(load_wordnet())
    what = f"tasks.{index - 1} ({cfg.name})"
    unknown = [c for entry in cfg.wordnet or [] for c in entry.split("+") if c not in groups]
    if unknown:
        raise ConfigError(f"{what}.wordnet: unknown categories {unknown}; known: {sorted(groups)}")
    rng = random.Random(f"{run.seed}:{cfg.name}")
    need = cfg.train_per_class + cfg.eval_per_class
    train_texts, train_labels, eval_texts, eval_labels = [], [], [], []
    classes = list(cfg.wordnet or [])
    for label, entry in enumerate(classes):
        # A class of several categories draws from their union, so none of them dominates
        # by size alone: each contributes about equally.
        parts = entry.split("+")
        per_part = -(-need // len(parts))
        pool = []
        for part in parts:
            available = [x for x in groups[part] if x.synset not in exclude]
            pool += rng.sample(available, min(len(available), per_part))
        if len(pool) < need:
            raise ConfigError(
                f"{what}.wordnet: {entry} has {len(pool)} glosses, fewer than "
                f"train_per_class + eval_per_class = {need}; lower them"
            )
        picked = rng.sample(pool, need)
        train_texts += [s.gloss for s in picked[: cfg.train_per_class]]
        eval_texts += [s.gloss for s in picked[cfg.train_per_class:]]
        train_labels += [label] * cfg.train_per_class
        eval_labels += [label] * cfg.eval_per_class
    order = list(range(len(train_texts)))
    rng.shuffle(order)
    train = Split([train_texts[i] for i in order],
                  np.array([train_labels[i] for i in order], dtype=np.int64))
    held_out = Split(eval_texts, np.array(eval_labels, dtype=np.int64))
    manifest = {"source": "wordnet", "categories": classes,
                "train_sha256": _texts_hash(train.texts, [str(x) for x in train.labels]),
                "eval_sha256": _texts_hash(held_out.texts, [str(x) for x in held_out.labels])}
    return TaskData(index, cfg.name, classes, train, held_out, cfg.repeats, cfg.weight, manifest)


def load_sequence(run: RunConfig) -> tuple[list[TaskData],
                                           RetrievalProbe | ClassProbe | TextProbe | None]:
    """Load every task of the run, and the upstream probe (held apart from the tasks' data)."""
    if run.model.family == "causal_lm":
        from continual_lora.lm_data import load_lm_sequence

        return load_lm_sequence(run)
    if run.model.family == "diffusion":
        from continual_lora.diffusion_data import load_diffusion_sequence

        return load_diffusion_sequence(run)
    from continual_lora import image_tasks

    probe, exclude = None, set()
    if run.upstream.kind == "wordnet_retrieval":
        probe, exclude = wordnet_upstream(run.upstream.size)
    elif run.upstream.kind == "classes":
        probe = image_tasks.load_class_probe(run)
    tasks = []
    for i, task_cfg in enumerate(run.tasks, start=1):
        if task_cfg.wordnet:
            tasks.append(load_wordnet_task(task_cfg, i, run, exclude))
        elif task_cfg.image_classes:
            tasks.append(image_tasks.load_image_classes_task(task_cfg, i, run))
        else:
            holds_images, train_table = image_tasks.file_task_table(run, task_cfg, i)
            if holds_images:
                tasks.append(image_tasks.load_image_file_task(task_cfg, i, run))
            else:
                tasks.append(load_file_task(task_cfg, i, run, train_table))
        if len(tasks[-1].eval) == 0:
            raise ConfigError(f"tasks.{i - 1} ({task_cfg.name}): the held-out split is empty")
    kinds = {t.train.images is not None for t in tasks}
    if len(kinds) > 1:
        raise ConfigError("tasks: some tasks hold images and some hold text; one classifier "
                          "reads one kind of input")
    return tasks, probe


# ---------------------------------------------------------------------------------------------
# Mixing sources into one stream


@dataclass
class Source:
    """Part of a task's training data in a stream: which examples, how often, at what weight."""

    task: TaskData
    indices: np.ndarray
    repeats: int = 1
    weight: float | None = None
    role: str = "new"  # "new", "replay" or "joint": shown in the mix table and the logs

    @property
    def per_epoch(self) -> int:
        return len(self.indices) * self.repeats


@dataclass
class Stream:
    """The ordered (task index, example index) pairs of one task's training, batched."""

    order: list[tuple[int, int]]
    batch_size: int
    steps: int

    def batches(self, start_step: int = 0):
        for step in range(start_step, self.steps):
            yield step, self.order[step * self.batch_size:(step + 1) * self.batch_size]


def build_stream(sources: list[Source], batch_size: int, epochs: float, max_steps: int | None,
                 seed: int) -> Stream:
    """Order the examples of `sources` for `epochs` passes (or `max_steps` steps).

    Repeats mode (no source has a weight): every epoch holds each source's examples `repeats`
    times, shuffled together. Weight mode: each position draws a source with probability
    ∝ weight (sources without one get weight 1), then an example uniformly from it; an "epoch"
    is then the same number of draws as in repeats mode.
    """
    sources = [s for s in sources if len(s.indices) > 0]
    if not sources:
        raise ConfigError("the training stream is empty: no source has any example")
    per_epoch = sum(s.per_epoch for s in sources)
    steps = max(1, math.ceil(epochs * per_epoch / batch_size))
    if max_steps is not None:
        steps = min(steps, max_steps)
    needed = steps * batch_size
    rng = np.random.default_rng(seed)
    order: list[tuple[int, int]] = []
    if any(s.weight is not None for s in sources):
        weights = np.array([s.weight if s.weight is not None else 1.0 for s in sources])
        picks = rng.choice(len(sources), size=needed, p=weights / weights.sum())
        for k in picks:
            src = sources[k]
            order.append((src.task.index, int(src.indices[rng.integers(len(src.indices))])))
    else:
        while len(order) < needed:
            epoch = [(s.task.index, int(i)) for s in sources for _ in range(s.repeats)
                     for i in s.indices]
            perm = rng.permutation(len(epoch))
            order.extend(epoch[j] for j in perm)
    return Stream(order[:needed], batch_size, steps)


def describe_mix(sources: list[Source]) -> tuple[list[dict], list[str]]:
    """Rows (source, role, examples, repeats/weight, share) and warnings for the printed plan."""
    rows, warnings = [], []
    weighted = any(s.weight is not None for s in sources)
    if weighted:
        w = np.array([s.weight if s.weight is not None else 1.0 for s in sources])
        shares = w / w.sum()
    else:
        total = sum(s.per_epoch for s in sources)
        shares = np.array([s.per_epoch / total for s in sources])
    for src, share in zip(sources, shares, strict=True):
        rows.append({"source": src.task.name, "role": src.role, "examples": len(src.indices),
                     "repeats": src.repeats, "weight": src.weight, "share": float(share)})
    if len(sources) > 1 and shares.max() >= 0.9:
        top = sources[int(shares.argmax())].task.name
        warnings.append(f"source {top!r} makes {shares.max():.0%} of the stream; the others "
                        "barely count (raise their repeats or weight)")
    return rows, warnings


def format_mix(rows: list[dict]) -> str:
    lines = [f"  {'source':<20} {'role':<7} {'examples':>8} {'repeats':>7} {'weight':>7} "
             f"{'share':>6}"]
    for r in rows:
        weight = "-" if r["weight"] is None else f"{r['weight']:g}"
        lines.append(f"  {r['source']:<20} {r['role']:<7} {r['examples']:>8} {r['repeats']:>7} "
                     f"{weight:>7} {r['share']:>6.1%}")
    return "\n".join(lines)


def reservoir_sample(n: int, k: int, seed: int) -> np.ndarray:
    """Indices of a uniform sample of size k from a stream of n (Vitter's algorithm R), sorted."""
    rng = random.Random(seed)
    reservoir = list(range(min(n, k)))
    for i in range(k, n):
        j = rng.randint(0, i)
        if j < k:
            reservoir[j] = i
    return np.array(sorted(reservoir), dtype=np.int64)


def class_balanced_sample(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of a sample of size ≤ k with classes as equal as the data allows, sorted."""
    rng = np.random.default_rng(seed)
    by_class = {c: rng.permutation(np.flatnonzero(labels == c)).tolist()
                for c in np.unique(labels)}
    picked: list[int] = []
    while len(picked) < k and any(by_class.values()):
        for c in sorted(by_class):
            if by_class[c] and len(picked) < k:
                picked.append(by_class[c].pop())
    return np.array(sorted(picked), dtype=np.int64)

