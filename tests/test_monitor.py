"""Live monitoring's pieces: which tracker scalars an event gives, and the progress display
(a bar on a terminal, plain lines with ETA when output is redirected)."""

from __future__ import annotations

import io
import math
import re

from continual_lora.monitor import scalars


def test_a_step_event_gives_loss_per_task_and_per_source():
    event = {"event": "step", "task": "b", "step": 3, "global_step": 13, "loss": 0.75,
             "task_loss": 0.5, "extra_loss": 0.25, "lr": 1e-3,
             "loss_by_source": {"a": 0.25, "b": 0.625}}
    assert scalars(event, ["a", "b"]) == {
        "loss/b": 0.75, "task_loss/b": 0.5, "extra_loss/b": 0.25, "lr/b": 1e-3,
        "source_loss/b/a": 0.25, "source_loss/b/b": 0.625}


def test_an_eval_event_names_each_task_and_skips_what_is_not_a_number():
    event = {"event": "eval", "stage": 1, "scores": [0.9, 0.5], "upstream": math.nan}
    assert scalars(event, ["a", "b"]) == {"eval/a": 0.9, "eval/b": 0.5}
    step = {"event": "step", "task": "a", "global_step": 0, "loss": 1.0, "extra_loss": None,
            "lr": 0.1}
    assert "extra_loss/a" not in scalars(step, ["a"])
    moe = {"event": "eval", "stage": 2, "scores": [0.5, 0.25], "upstream": 0.125,
           "strategy_report": {"router": "prototype",
                               "routing_accuracy": {"a": 1.0, "b": 0.5, "mean": 0.75}}}
    assert scalars(moe, ["a", "b"]) == {
        "eval/a": 0.5, "eval/b": 0.25, "eval/upstream": 0.125,
        "strategy/routing_accuracy/a": 1.0, "strategy/routing_accuracy/b": 0.5,
        "strategy/routing_accuracy/mean": 0.75}


def test_other_events_give_their_numbers_one_level_deep():
    event = {"event": "budget", "step": 20, "old": {"a": 0.8, "b": 0.7}, "old_mean": 0.75,
             "drop": 0.05, "within": True, "new": 0.9}
    assert scalars(event, ["a", "b", "c"]) == {
        "budget/old/a": 0.8, "budget/old/b": 0.7, "budget/old_mean": 0.75, "budget/drop": 0.05,
        "budget/new": 0.9}  # `within` is a bool, not a number to plot


class _Accel:
    is_main_process = True


def test_redirected_output_gets_plain_progress_lines_with_eta(monkeypatch):
    from continual_lora import trainer

    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(trainer.sys, "stderr", err)
    progress = trainer._progress(20, "task 1 a", _Accel())
    for _ in range(20):
        progress.update(0.5)
    progress.close()
    lines = err.getvalue().splitlines()
    assert len(lines) == 10  # one line per 10% of the steps
    assert re.fullmatch(r"  task 1 a: step 2/20 loss 0\.5000 \(\d+s, eta \d+s\)", lines[0])
    assert lines[-1].startswith("  task 1 a: step 20/20") and lines[-1].endswith("eta 0s)")


def test_a_terminal_gets_a_progress_bar(monkeypatch):
    from continual_lora import trainer

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(trainer.sys, "stderr", err)
    progress = trainer._progress(4, "task 1 a", _Accel())
    assert progress.bar is not None
    for _ in range(4):
        progress.update(0.25)
    progress.close()
    assert "task 1 a" in err.getvalue() and "loss=0.2500" in err.getvalue()
