"""Data sources and mixing: repeats and weights give the shares they promise; bad files get
errors that name the file and the column."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from continual_lora.config import ConfigError, load_run_config
from continual_lora.sequence import (
    Source,
    Split,
    TaskData,
    build_stream,
    class_balanced_sample,
    describe_mix,
    load_sequence,
    reservoir_sample,
)


def _task(index: int, n: int, name: str | None = None) -> TaskData:
    split = Split([f"t{index}-{i}" for i in range(n)], np.arange(n) % 2)
    return TaskData(index, name or f"task{index}", ["x", "y"], split, split)


def test_repeats_multiply_a_source_per_epoch():
    old, new = _task(1, 20), _task(2, 10)
    sources = [Source(old, np.arange(20), repeats=1, role="replay"),
               Source(new, np.arange(10), repeats=2)]
    stream = build_stream(sources, batch_size=8, epochs=1, max_steps=None, seed=0)
    assert stream.steps == 5  # ceil(40 / 8)
    counts = Counter(t for t, _ in stream.order)
    assert counts == {1: 20, 2: 20}  # seed 000: "double only the new 10 images"
    assert Counter(stream.order)[(2, 3)] == 2
    rows, _ = describe_mix(sources)
    assert [r["share"] for r in rows] == [0.5, 0.5]


def test_weights_set_sampling_shares():
    a, b = _task(1, 50), _task(2, 50)
    sources = [Source(a, np.arange(50), weight=3.0), Source(b, np.arange(50), weight=1.0)]
    stream = build_stream(sources, batch_size=100, epochs=40, max_steps=None, seed=1)
    share = Counter(t for t, _ in stream.order)[1] / len(stream.order)
    assert share == pytest.approx(0.75, abs=0.02)
    rows, _ = describe_mix(sources)
    assert [r["share"] for r in rows] == [0.75, 0.25]


def test_stream_is_deterministic_and_capped():
    sources = [Source(_task(1, 30), np.arange(30))]
    first = build_stream(sources, 4, epochs=3, max_steps=5, seed=7)
    again = build_stream(sources, 4, epochs=3, max_steps=5, seed=7)
    assert first.steps == 5 and first.order == again.order and len(first.order) == 20


def test_dominant_source_is_warned_about():
    sources = [Source(_task(1, 1000), np.arange(1000)), Source(_task(2, 10), np.arange(10))]
    _, warnings = describe_mix(sources)
    assert warnings and "task1" in warnings[0]


def test_buffers():
    picked = reservoir_sample(100, 10, seed=3)
    assert len(set(picked.tolist())) == 10 and picked.max() < 100
    labels = np.array([0] * 90 + [1] * 10)
    balanced = class_balanced_sample(labels, 10, seed=3)
    assert Counter(labels[balanced].tolist()) == {0: 5, 1: 5}


def _cfg(tmp_path, train_text, eval_text, **task):
    (tmp_path / "train.csv").write_text(train_text)
    (tmp_path / "eval.csv").write_text(eval_text)
    return load_run_config(None, data={
        "upstream": {"kind": "none"}, "base_dir": str(tmp_path),
        "tasks": [{"name": "t", "train": "train.csv", "eval": "eval.csv", **task}]})


def test_file_task_loads_with_labels_from_train(tmp_path):
    cfg = _cfg(tmp_path, "text,label\na,cat\nb,dog\nc,cat\n", "text,label\nd,dog\n")
    (task,), probe = load_sequence(cfg)
    assert probe is None and task.classes == ["cat", "dog"]
    assert task.train.labels.tolist() == [0, 1, 0] and task.eval.labels.tolist() == [1]
    assert len(task.manifest["train"]["sha256"]) == 64


@pytest.mark.parametrize("train, held_out, extra, words", [
    ("text,label\na,cat\nb,dog\n", "text,label\nd,bird\n", {}, "labels the train file does not"),
    ("text,lbl\na,cat\nb,dog\n", "text,label\nd,dog\n", {}, "has no column 'label'"),
    ("text,label\na,cat\nb,cat\n", "text,label\nd,cat\n", {}, "single class"),
    ("text,label\n", "text,label\nd,cat\n", {}, "holds no examples"),
])
def test_bad_files_are_named(tmp_path, train, held_out, extra, words):
    cfg = _cfg(tmp_path, train, held_out, **extra)
    with pytest.raises(ConfigError, match=words) as info:
        load_sequence(cfg)
    assert "tasks.0 (t)" in str(info.value)


def test_missing_file_and_unknown_category(tmp_path):
    cfg = load_run_config(None, data={"upstream": {"kind": "none"}, "tasks": [
        {"name": "t", "train": str(tmp_path / "nope.csv"), "eval": str(tmp_path / "e.csv")}]})
    with pytest.raises(ConfigError, match="data file not found.*nope.csv"):
        load_sequence(cfg)
    cfg = load_run_config(None, data={"upstream": {"kind": "none"}, "tasks": [
        {"name": "t", "wordnet": ["noun.animal", "noun.dragons"]}]})
    with pytest.raises(ConfigError, match="unknown categories.*noun.dragons"):
        load_sequence(cfg)


def test_wordnet_tasks_and_upstream_are_disjoint_and_merged_classes_work():
    cfg = load_run_config(None, data={"upstream": {"size": 200}, "tasks": [
        {"name": "fine", "wordnet": ["noun.animal", "noun.plant"], "train_per_class": 30,
         "eval_per_class": 10},
        {"name": "coarse", "wordnet": ["noun.animal+noun.plant", "verb.motion+verb.contact"],
         "train_per_class": 30, "eval_per_class": 10}]})
    (fine, coarse), probe = load_sequence(cfg)
    assert len(probe.queries) == 200 and len(set(probe.keys)) == 200
    assert coarse.classes == ["noun.animal+noun.plant", "verb.motion+verb.contact"]
    assert Counter(coarse.train.labels.tolist()) == {0: 30, 1: 30}
    assert not set(probe.queries) & set(fine.train.texts + fine.eval.texts)
    assert not set(fine.train.texts) & set(fine.eval.texts)
