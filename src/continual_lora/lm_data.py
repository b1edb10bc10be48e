"""Causal-LM tasks: the data formats users have, read into records the family tokenizes.

Formats (one example per row; JSON lines is the natural file, CSV/Parquet work for flat ones):

    text                {"text": "..."}                                  loss on every token
    prompt_completion   {"prompt": "...", "completion": "..."}           loss on the completion
    chat                {"messages": [{"role": "user", "content": ...},  loss on the assistant
                                      {"role": "assistant", ...}]}       turns (chat template)
    qa                  {"question": "...", "answer": "..."}             loss on the answer

`format: auto` picks the format whose columns the file has (in the order chat, prompt_completion,
qa, text). Built-in data: `facts: N` is round N of the WordNet fact rounds (`data/facts.py`).

A task's scorer (`scorer: auto`): exact match of greedy answers for `qa` tasks, perplexity of the
held-out tokens otherwise. Exact match also works for prompt/completion and chat tasks (the
completion, or the last assistant turn, is the answer).

The upstream probe of a causal LM is general text it should keep predicting well: the held-out
WordNet-derived general text shipped with the package (`general_text`), or a file of the user's.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from continual_lora.config import ConfigError, RunConfig, TaskConfig
from continual_lora.sequence import (
    Split,
    TaskData,
    TextProbe,
    _sample,
    _sha256,
    _texts_hash,
    inside_data_dir,
    load_table,
)

FORMAT_COLUMNS = {  # in the order `auto` tries them
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "qa": ("question", "answer"),
}
ROLES = ("system", "user", "assistant", "tool")


def read_rows(path: Path, what: str) -> list[dict]:
    """Rows of a data file as dicts (`sequence.load_table`); errors name the file."""
    return load_table(path, what).to_list()


def detect_format(columns: list[str], cfg: TaskConfig, path: Path, what: str) -> str:
    """The task's format: as configured (its columns checked), or the first whose columns the
    file has."""
    needed = dict(FORMAT_COLUMNS, text=(cfg.text_column,))
    if cfg.format != "auto":
        missing = [c for c in needed[cfg.format] if c not in columns]
        if missing:
            raise ConfigError(f"{what}: {path.name} has no column {missing[0]!r} that format "
                              f"{cfg.format!r} needs; its columns are {columns}")
        return cfg.format
    for fmt in ("chat", "prompt_completion", "qa", "text"):
        if all(c in columns for c in needed[fmt]):
            return fmt
    raise ConfigError(
        f"{what}: {path.name} has columns {columns}, which fit no causal-LM format: give "
        f"`{cfg.text_column}` (text), `prompt`+`completion`, `messages` (chat) or "
        "`question`+`answer`; or set the task's text_column")


def to_record(row: dict, fmt: str, cfg: TaskConfig, where: str) -> dict:
    """One row as a record of its format; empty or malformed fields name the row."""

    def text_field(key: str, column: str | None = None) -> str:
        value = row.get(column or key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ConfigError(f"{where}: `{column or key}` is empty")
        return str(value)

    if fmt == "text":
        return {"text": text_field("text", cfg.text_column)}
    if fmt == "prompt_completion":
        return {"prompt": text_field("prompt"), "completion": text_field("completion")}
    if fmt == "qa":
        return {"question": text_field("question"), "answer": text_field("answer")}
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: `messages` must be a non-empty list of "
                          "{role, content} objects")
    clean = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise ConfigError(f"{where}: messages[{k}] must be {{role, content}} with role one "
                              f"of {ROLES}; got {message!r}"[:300])
        clean.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise ConfigError(f"{where}: the conversation has no assistant turn to learn")
    return {"messages": clean}


def display_text(record: dict) -> str:
    """A short human-readable form of a record (logs, tables)."""
    if "text" in record:
        return record["text"]
    if "prompt" in record:
        return record["prompt"] + record["completion"]
    if "question" in record:
        return record["question"]
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")


def split_of(records: list[dict]) -> Split:
    return Split([display_text(r) for r in records], np.zeros(len(records), dtype=np.int64),
                 records)


def task_scorer(cfg: TaskConfig, fmt: str, what: str) -> str:
    if cfg.scorer == "auto":
        return "exact_match" if fmt == "qa" else "perplexity"
    if cfg.scorer == "exact_match" and fmt == "text":
        raise ConfigError(f"{what}.scorer: exact_match needs a prompt and an answer; a `text` "
                          "task is scored by perplexity")
    return cfg.scorer


def load_lm_file_task(cfg: TaskConfig, index: int, run: RunConfig) -> TaskData:
    """A causal-LM task from the user's train and held-out files."""
    what = f"tasks.{index - 1} ({cfg.name})"
    splits, formats, manifest = {}, {}, {"source": "files"}
    for split in ("train", "eval"):
        path = inside_data_dir(run, run.resolve_path(getattr(cfg, split) or ""),
                               f"{what}.{split}")
        rows = read_rows(path, what)
        fmt = detect_format(list(rows[0]), cfg, path, what)
        records = [to_record(row, fmt, cfg, f"{what}: {path.name} row {i + 1}")
                   for i, row in enumerate(rows)]
        if split == "train":
            keep = _sample(len(records), cfg.max_train_examples, random.Random(run.seed))
            records = [records[i] for i in keep]
        splits[split], formats[split] = records, fmt
        manifest[split] = {"path": str(path), "sha256": _sha256(path), "rows": len(rows),
                           "used": len(records), "format": fmt}
    if formats["train"] != formats["eval"]:
        raise ConfigError(f"{what}: the train file is in format {formats['train']!r} and the "
                          f"held-out file in {formats['eval']!r}; give both in one format")
    scorer = task_scorer(cfg, formats["train"], what)
    return TaskData(index, cfg.name, [], split_of(splits["train"]), split_of(splits["eval"]),
                    cfg.repeats, cfg.weight, manifest, scorer)


def load_fact_task(cfg: TaskConfig, index: int, run: RunConfig, rounds: int) -> TaskData:
    """Round `cfg.facts` of the built-in WordNet fact rounds: train and held-out are the same
    facts (knowledge acquisition is recall of what was taught)."""
    from continual_lora.data.facts import fact_rounds

    what = f"tasks.{index - 1} ({cfg.name})"
    round_ = fact_rounds(rounds=rounds, per_round=cfg.facts_per_round, seed=run.seed)[
        cfg.facts - 1]
    records = [{"question": f.question, "answer": f.answer} for f in round_.facts]
    keep = _sample(len(records), cfg.max_train_examples, random.Random(run.seed))
    train = [records[i] for i in keep]
    scorer = task_scorer(cfg, "qa", what)
    manifest = {"source": "wordnet_facts", "round": cfg.facts, "name": round_.name,
                "relation": round_.relation, "facts": len(records),
                "sha256": _texts_hash([r["question"] for r in records],
                                      [r["answer"] for r in records])}
    return TaskData(index, cfg.name, [], split_of(train), split_of(records), cfg.repeats,
                    cfg.weight, manifest, scorer)


def upstream_probe(run: RunConfig) -> TextProbe | None:
    """The causal LM's upstream probe: general text it should keep predicting well."""
    up = run.upstream
    if up.kind == "none":
        return None
    if up.kind == "general_text":
        from continual_lora.data.general_text import general_text

        texts = general_text("heldout")[: up.size]
        return TextProbe("upstream:general_text", texts,
                         {"source": "wordnet_general_text", "documents": len(texts),
                          "sha256": _texts_hash(texts, [""] * len(texts))})
    path = inside_data_dir(run, run.resolve_path(up.file or ""), "upstream.file")
    rows = read_rows(path, "upstream.file")
    if "text" not in rows[0]:
        raise ConfigError(f"upstream.file: {path.name} has no column 'text'; its columns are "
                          f"{list(rows[0])}")
    texts = [str(r["text"]) for r in rows if r.get("text")][: up.size]
    return TextProbe(f"upstream:{path.name}", texts,
                     {"source": "file", "path": str(path), "sha256": _sha256(path),
                      "documents": len(texts)})


def load_lm_sequence(run: RunConfig) -> tuple[list[TaskData], TextProbe | None]:
    """Every task of a causal-LM run, and its upstream probe."""
    rounds = max([t.facts for t in run.tasks if t.facts is not None], default=0)
    tasks = []
    for i, task_cfg in enumerate(run.tasks, start=1):
        if task_cfg.facts is not None:
            tasks.append(load_fact_task(task_cfg, i, run, rounds))
        else:
            tasks.append(load_lm_file_task(task_cfg, i, run))
    return tasks, upstream_probe(run)
