"""The data of an update as tasks of the engine: the new task, the old tasks (with their data
when the user kept it), and the no-old-data probe.

Task indices follow the old adapter's heads (1..k, as in the run that wrote them), then old data
that matches no saved head, then the new task last: the update is stage k'+1 of that sequence.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from continual_lora.config import ConfigError
from continual_lora.sequence import Split, TaskData, _sha256, _texts_hash, read_table
from continual_lora.update.config import UpdateConfig, UpdateData

EMPTY = Split([], np.zeros(0, dtype=np.int64))


def _holdout_indices(n: int, fraction: float, cap: int, seed: int) -> list[int]:
    """A seeded sample of ⌈fraction·n⌉ (at most `cap`) positions, sorted; at least 1 and at most
    n − 1 so that both parts keep examples."""
    if n < 2:
        raise ConfigError("a data file needs at least 2 examples to hold one out")
    k = min(cap, max(1, round(fraction * n)), n - 1)
    return sorted(random.Random(seed).sample(range(n), k))


def read_train(data: UpdateData, cfg: UpdateConfig, what: str) -> tuple[list[str], list[str]]:
    """(texts, raw labels) of a source's train file."""
    return read_table(cfg.resolve_path(data.train), data.text_column, data.label_column, what)


def read_source(data: UpdateData, cfg: UpdateConfig, what: str,
                classes: list[str] | None = None,
                table: tuple[list[str], list[str]] | None = None
                ) -> tuple[list[str], Split, Split, dict]:
    """(classes, train, held-out, manifest) of one source (`table`: its train file already
    read). `classes` fixes the label order (an old head's rows); labels outside it are an error
    naming them."""
    train_path = cfg.resolve_path(data.train)
    texts, raw = table or read_train(data, cfg, what)
    manifest = {"source": "files", "train": {"path": str(train_path),
                                             "sha256": _sha256(train_path), "rows": len(raw)}}
    if data.eval is not None:
        eval_path = cfg.resolve_path(data.eval)
        eval_texts, eval_raw = read_table(eval_path, data.text_column, data.label_column, what)
        manifest["eval"] = {"path": str(eval_path), "sha256": _sha256(eval_path),
                            "rows": len(eval_raw)}
        keep = list(range(len(texts)))
    else:
        held = _holdout_indices(len(texts), data.holdout, data.max_holdout, cfg.seed)
        held_set = set(held)
        keep = [i for i in range(len(texts)) if i not in held_set]
        eval_texts, eval_raw = [texts[i] for i in held], [raw[i] for i in held]
        manifest["eval"] = {"held_out_of_train": len(held), "fraction": data.holdout,
                            "seed": cfg.seed}
    if classes is None:
        classes = sorted(set(raw[i] for i in keep))
        if len(classes) < 2:
            raise ConfigError(f"{what}: {train_path.name} has a single class {classes}; need ≥ 2")
    position = {c: i for i, c in enumerate(classes)}
    unknown = sorted((set(raw) | set(eval_raw)) - set(classes))
    if unknown:
        raise ConfigError(f"{what}: labels {unknown[:10]} are not among the classes {classes}; "
                          "every label must be one the task knows")
    train = Split([texts[i] for i in keep],
                  np.array([position[raw[i]] for i in keep], dtype=np.int64))
    held_out = Split(eval_texts, np.array([position[c] for c in eval_raw], dtype=np.int64))
    manifest["train"]["used"] = len(keep)
    return classes, train, held_out, manifest


def match_old_sources(cfg: UpdateConfig, head_tasks: list[dict],
                      tables: list[tuple[list[str], list[str]]]) -> dict[int, int | None]:
    """For each entry of `cfg.old` (its train file read into `tables`), the index (into
    `head_tasks`) of the head it belongs to, or None for old data that no saved head covers:
    by `name` when given, else by the one head whose classes contain every label of the
    file."""
    matched: dict[int, int | None] = {}
    names = [t["name"] for t in head_tasks]
    for k, data in enumerate(cfg.old):
        what = f"old.{k}"
        if data.name is not None:
            matched[k] = names.index(data.name) if data.name in names else None
            continue
        labels = set(tables[k][1])
        fits = [i for i, t in enumerate(head_tasks) if labels <= set(t["classes"])]
        if len(fits) > 1:
            raise ConfigError(f"{what}: {data.train} fits the heads of several old tasks "
                              f"{[names[i] for i in fits]}; set `name` to the one it belongs to")
        matched[k] = fits[0] if fits else None
    used = [i for i in matched.values() if i is not None]
    if len(used) != len(set(used)):
        raise ConfigError("old: two old data sources belong to the same old task "
                          f"{sorted({names[i] for i in used if used.count(i) > 1})}; give one "
                          "file per old task (concatenate them)")
    return matched


def _stem(path: str) -> str:
    return Path(path).name.split(".")[0]


def load_tasks(cfg: UpdateConfig, head_tasks: list[dict]) -> tuple[list[TaskData], list[int]]:
    """The old tasks and the new task, in index order, and the indices of old tasks that have
    no data (their held-out split is filled in later by the probe). Data errors surface here,
    before anything is written."""
    tables = [read_train(data, cfg, f"old.{k}") for k, data in enumerate(cfg.old)]
    matched = match_old_sources(cfg, head_tasks, tables)
    by_head = {i: k for k, i in matched.items() if i is not None}
    tasks: list[TaskData] = []
    without_data: list[int] = []
    for i, head in enumerate(head_tasks):
        index = len(tasks) + 1
        if i in by_head:
            k = by_head[i]
            classes, train, held, manifest = read_source(cfg.old[k], cfg, f"old.{k}",
                                                         list(head["classes"]), tables[k])
            tasks.append(TaskData(index, head["name"], list(head["classes"]), train, held,
                                  manifest=manifest))
        else:
            without_data.append(index)
            tasks.append(TaskData(index, head["name"], list(head["classes"]), EMPTY, EMPTY,
                                  manifest={"source": "probe"}))
    for k, data in enumerate(cfg.old):
        if matched[k] is None:
            name = data.name or _stem(data.train)
            classes, train, held, manifest = read_source(data, cfg, f"old.{k}",
                                                         table=tables[k])
            tasks.append(TaskData(len(tasks) + 1, name, classes, train, held,
                                  manifest=manifest))
    new_name = cfg.new.name or _stem(cfg.new.train)
    if new_name in {t.name for t in tasks}:
        raise ConfigError(f"new.name: {new_name!r} is already the name of an old task; set "
                          "`new.name` (--new-name) to another")
    classes, train, held, manifest = read_source(cfg.new, cfg, "new")
    tasks.append(TaskData(len(tasks) + 1, new_name, classes, train, held, manifest=manifest))
    return tasks, without_data


def probe_split(new_task: TaskData, predictions: np.ndarray, size: int) -> Split:
    """The no-old-data probe of one old head: the new task's held-out inputs (the first `size`),
    labelled with the old model's own predictions on them."""
    n = min(size, len(new_task.eval))
    return Split(list(new_task.eval.texts[:n]), np.asarray(predictions[:n], dtype=np.int64))


def probe_manifest(new_task: TaskData, n: int) -> dict:
    texts = new_task.eval.texts[:n]
    return {"source": "probe", "inputs": f"held-out inputs of {new_task.name}", "size": n,
            "labels": "the old model's predictions", "sha256": _texts_hash(texts, [""] * n)}
