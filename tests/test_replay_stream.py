"""replay: the examples the trainer ACTUALLY draws follow the configured mix.

The contract test reads the mix the run prints (plan.json); these count, per source, the examples
of every batch that reaches the model during a tiny run. The seam is the family's `collate`, the
one place the training loop turns the stream's (task index, example index) pairs into a batch;
the pairs are read back from the batch's `task_ids` / `example_ids`, i.e. what the loss sees.
Task `a` is stage 1 (task index 1), task `b` stage 2 (task index 2); each has 48 training
examples (tiny_task_files: 2 classes × 24).
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

import continual_lora.runner as runner_module
from continual_lora.config import load_run_config
from continual_lora.runner import run

N_TRAIN = 48  # training examples of each tiny task
BUFFER = 4  # strategy.options.buffer_size: examples of task a kept for replay


def record_drawn(monkeypatch):
    """Patch the runner's train_task so that, while a task trains, every batch its loop collates
    is recorded as (task index, example index) pairs. Returns (drawn by task name, strategies)."""
    drawn: dict[str, list[tuple[int, int]]] = {}
    strategies = []
    real_train = runner_module.train_task

    def spy_train(family, strategy, task, *args, **kwargs):
        rows = drawn.setdefault(task.name, [])
        strategies.append(strategy)
        real_collate = family.collate

        def collate(examples, by_index):
            batch = real_collate(examples, by_index)
            rows.extend(zip(batch["task_ids"].tolist(), batch["example_ids"].tolist(),
                            strict=True))
            return batch

        family.collate = collate  # instance attribute: this family, this task only
        try:
            return real_train(family, strategy, task, *args, **kwargs)
        finally:
            del family.collate

    monkeypatch.setattr(runner_module, "train_task", spy_train)
    return drawn, strategies


def replay_config(tiny_run_config, epochs: float, **per_task) -> dict:
    """tiny_run_config("replay") for whole epochs (no step cap), buffer of BUFFER examples;
    `per_task` = {"a": {"repeats": 2}, ...} sets each task's mix knobs."""
    data = tiny_run_config("replay")
    data["strategy"]["options"] = {"buffer_size": BUFFER}
    data["train"]["epochs"] = epochs
    data["train"].pop("max_steps")
    for task in data["tasks"]:
        task.update(per_task.get(task["name"], {}))
    return data


def plan_shares(result, stage: int) -> dict[str, float]:
    plan = json.loads((result.run_dir / "plan.json").read_text())
    return {row["source"]: row["share"] for row in plan[stage - 1]["mix"]}


def test_repeats_give_exact_counts_in_the_drawn_batches(tiny_run_config, monkeypatch):
    """a repeats 2, b repeats 2, 1 epoch, batch 8.
    Task a alone: 48 × 2 = 96 draws = 12 steps, each example of a exactly twice.
    Task b: replay 4 × 2 = 8 + new 48 × 2 = 96 -> 104 draws = 13 steps (no partial epoch):
    each buffered example of a exactly twice, no other example of a, each example of b exactly
    twice; so the replay share is 8 / 104, which is also what the printed mix claims."""
    drawn, strategies = record_drawn(monkeypatch)
    data = replay_config(tiny_run_config, epochs=1, a={"repeats": 2}, b={"repeats": 2})
    result = run(load_run_config(None, data=data), echo=lambda _: None)

    stage1 = Counter(drawn["a"])
    assert len(drawn["a"]) == 96
    assert stage1 == {(1, i): 2 for i in range(N_TRAIN)}

    buffer = strategies[-1].buffers[1].tolist()
    assert len(buffer) == BUFFER and len(set(buffer)) == BUFFER
    stage2 = Counter(drawn["b"])
    assert len(drawn["b"]) == 104
    assert stage2 == {**{(1, i): 2 for i in buffer}, **{(2, i): 2 for i in range(N_TRAIN)}}

    per_source = Counter(t for t, _ in drawn["b"])
    assert per_source == {1: 8, 2: 96}
    shares = plan_shares(result, 2)
    assert shares["a"] == pytest.approx(per_source[1] / 104)
    assert shares["b"] == pytest.approx(per_source[2] / 104)


def test_weights_set_the_share_of_drawn_examples(tiny_run_config, monkeypatch):
    """a weight 3, b weight 1, 4 epochs, batch 8. Task b's stream: an epoch is 4 + 48 = 52
    draws, so 208 draws (26 steps); each picks the replay source with p = 3 / (3 + 1) = 0.75.
    The replay count is Binomial(208, 0.75): mean 156, sd √(208 · 0.75 · 0.25) ≈ 6.24; we allow
    4 sd (±25). Plausible bugs land far outside: the replayed source's weight dropped (weight 1
    each, p = 0.5: 104), or weights ignored for the repeats share (4 / 52: 16). The stream is
    seeded, so this is deterministic; the tolerance says what the test promises. Every replayed
    example is one of the buffer's, each drawn (uniform within a source: about 39 each)."""
    drawn, strategies = record_drawn(monkeypatch)
    data = replay_config(tiny_run_config, epochs=4, a={"weight": 3.0}, b={"weight": 1.0})
    result = run(load_run_config(None, data=data), echo=lambda _: None)

    assert len(drawn["a"]) == 4 * N_TRAIN and {t for t, _ in drawn["a"]} == {1}

    n, p = 208, 0.75
    assert len(drawn["b"]) == n
    replayed = [i for t, i in drawn["b"] if t == 1]
    new = [i for t, i in drawn["b"] if t == 2]
    assert len(replayed) + len(new) == n
    tolerance = 4 * math.sqrt(n * p * (1 - p))
    assert abs(len(replayed) - n * p) <= tolerance, (len(replayed), n * p, tolerance)
    buffer = set(strategies[-1].buffers[1].tolist())
    assert set(replayed) == buffer and len(buffer) == BUFFER
    assert set(new) <= set(range(N_TRAIN))
    assert plan_shares(result, 2)["a"] == pytest.approx(p)
