"""`continual-lora run --resume RUN_DIR`: what an interrupted run had finished, read back from its
folder, and how its unfinished task continues.

A run folder grows one stage at a time: after task t the runner writes `tasks/NN-name/`, then
`results.json`, `predictions.npz` and `plan.json` with t rows. Training checkpoints live in
`checkpoints/NN-name/step-NNNNNN/` (see `resume.py`): every `train.checkpoint_every` steps and
at the task's last step. The checkpoint at a task's last step holds the weights the task ended
training with; it is kept until the run finishes.

Resuming rebuilds the state of every finished task by running its hooks again without its
training: `before_task`, the heads, then the weights of its last checkpoint (and the RNG state
they were saved with), then `after_task`. Every hook is deterministic given the weights, so
the strategies' state (merged bases, replay buffers, task vectors, O-LoRA's frozen A's, the
moe router) is what it was, without per-strategy serialisation. The unfinished task then
continues from its newest good checkpoint. The finished rows of the accuracy matrix are read
from the folder, not scored again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from continual_lora.config import ConfigError
from continual_lora.lineage import child_chain, read_lineage
from continual_lora.resume import ResumeState, latest_checkpoint

CHECKPOINTS = "checkpoints"


def task_checkpoints(run_dir: Path, task_index: int, task_name: str) -> Path:
    return run_dir / CHECKPOINTS / f"{task_index:02d}-{task_name}"


@dataclass
class Progress:
    """What an interrupted run had finished: `stages_done` tasks, with their rows and records."""

    stages_done: int
    scores: list[list[float]]  # R rows 0..stages_done
    upstream: list[float]
    how: list[list[str]]
    correct: list[list[np.ndarray]]
    upstream_correct: list[np.ndarray | None]
    plan: list[dict]
    stats: list[dict]
    reports: list[dict | None]
    lineage_parent: dict | None = None
    lineage_chain: list[dict] = field(default_factory=list)
    details: list[list[dict | None]] = field(default_factory=list)  # per row, per task
    upstream_details: list[dict | None] = field(default_factory=list)


def check_same_config(run_dir: Path, config_text: str) -> None:
    """Refuse to resume a run folder with another configuration than the one it was started
    with (`overwrite` aside), naming the differing fields."""
    import yaml

    stored_file = run_dir / "config.yaml"
    if not stored_file.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there, so no run was started in "
                          "it; start one with `continual-lora run CONFIG`")
    stored = yaml.safe_load(stored_file.read_text())
    now = yaml.safe_load(config_text)
    stored.pop("overwrite", None)
    now.pop("overwrite", None)
    if stored != now:
        changed = sorted(config_diff(stored, now))
        raise ConfigError(
            f"--resume {run_dir}: the run was started with another configuration (changed: "
            f"{', '.join(changed[:8])}). --resume continues that same run exactly: give no "
            "config and no overrides. To train with the new settings, start a new run under "
            "another name (name=...).")


def config_diff(a, b, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two config mappings differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += config_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(top level)"]


def read_progress(run_dir: Path, task_names: list[str], has_upstream: bool) -> Progress:
    """The finished stages of `run_dir`: rows from results.json and predictions.npz, plan and
    stats, and the last stage's lineage (the next stage's parent)."""
    results_file = run_dir / "results.json"
    if not results_file.is_file():  # interrupted before task 1 finished: only row 0 is lost
        return Progress(0, [], [], [], [], [], [], [], [])
    results = json.loads(results_file.read_text())
    if results["tasks"] != task_names:
        raise ConfigError(f"--resume {run_dir}: its results.json is for tasks "
                          f"{results['tasks']}, the config has {task_names}")
    done = len(results["R"]) - 1
    stage_dirs = [run_dir / "tasks" / f"{i:02d}-{task_names[i - 1]}" for i in range(1, done + 1)]
    missing = [d.name for d in stage_dirs if not d.is_dir()]
    if missing:
        raise ConfigError(f"--resume {run_dir}: results.json has {done} stages but the stage "
                          f"folders {missing} are missing; the folder was changed by hand")
    with np.load(run_dir / "predictions.npz") as arrays:
        correct = [[arrays[f"correct/stage{t}/{name}"] for name in task_names]
                   for t in range(done + 1)]
        up_correct = [arrays[f"correct/stage{t}/upstream"] if has_upstream else None
                      for t in range(done + 1)]
    plan = json.loads((run_dir / "plan.json").read_text()) if done else []
    reports = (results.get("strategy_report") or [None] * (done + 1))[1:]
    progress = Progress(done, results["R"], results["U"], results["scored_with"], correct,
                        up_correct, plan[:done], results["training"][:done], reports,
                        details=results.get("details") or [[None] * len(task_names)] * (done + 1),
                        upstream_details=results.get("upstream_details") or [None] * (done + 1))
    for stage_dir in reversed(stage_dirs):  # full_ft writes no adapter before its last task
        for sub in ("adapter", "model"):
            record = read_lineage(stage_dir / sub) if (stage_dir / sub).is_dir() else None
            if record is not None:
                progress.lineage_parent = {"path": str(stage_dir / sub), **record["adapter"]}
                progress.lineage_chain = child_chain(record)
                return progress
    return progress


def finished_task_state(run_dir: Path, task_index: int, task_name: str, steps: int,
                        echo) -> ResumeState:
    """The weights a finished task ended its training with (its last checkpoint)."""
    state = latest_checkpoint(task_checkpoints(run_dir, task_index, task_name), echo)
    if state is None or state.steps_done != steps:
        raise ConfigError(
            f"cannot resume: the checkpoint of finished task {task_index} ({task_name}) at its "
            f"last step {steps} is missing or damaged in "
            f"{task_checkpoints(run_dir, task_index, task_name)}; its state cannot be rebuilt. "
            "Start the run again (overwrite=true).")
    return state
