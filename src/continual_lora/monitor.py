"""Live monitoring: every event goes to `log.jsonl` (always) and its numbers to the trackers the
config chose (`train.trackers`: tensorboard by default, wandb, mlflow), through accelerate's
tracker classes, so what a user watches during training is what the run folder keeps.

Scalars, all against the run's global optimizer step (so a task's held-out scores line up with
the loss that produced them):

    loss/<task>                  the optimised loss (task loss plus the strategy's term)
    task_loss/<task>             the task loss alone; extra_loss/<task> the strategy's term
    source_loss/<task>/<source>  the loss on each data source in the batch (replay: old tasks)
    lr/<task>                    the backbone's learning rate
    eval/<task>                  each task's held-out score when a stage is scored;
                                 eval/upstream the upstream probe's; strategy/<field> the
                                 numbers a strategy reports per stage (moe: routing accuracy)
    <event>/<field>              the numbers of any other event (update: budget/drop, ...)
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

from continual_lora.config import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The package each tracker needs, and how a user gets it.
_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
             "wandb": ("wandb", "pip install wandb"),
             "mlflow": ("mlflow", "pip install mlflow")}
TENSORBOARD_DIR = "tensorboard"


def check_trackers(names: list[str]) -> None:
    """Refuse, before anything is loaded or written, a tracker whose package is missing."""
    for name in names:
        if name not in _PACKAGES:
            raise ConfigError(f"train.trackers: unknown tracker {name!r}; choose from "
                              f"{', '.join(TRACKERS)} (or [] for log.jsonl only)")
        module, install = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.trackers: {name} is chosen but the {module!r} package is "
                              f"not installed: {install}, or leave {name} out of "
                              "train.trackers")


def _make_tracker(name: str, run_name: str, folder: Path):
    from accelerate import tracking

    if name == "tensorboard":
        return tracking.TensorBoardTracker(TENSORBOARD_DIR, folder)
    if name == "wandb":
        return tracking.WandBTracker(run_name)
    return tracking.MLflowTracker(experiment_name=run_name, logging_dir=str(folder / "mlruns"))


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def scalars(event: dict, task_names: list[str]) -> dict[str, float]:
    """The tracker scalars of one log event (see the module docstring)."""
    kind = event.get("event")
    out: dict[str, float] = {}
    if kind == "step":
        task = event["task"]
        for key in ("loss", "task_loss", "extra_loss", "lr"):
            if _finite_number(event.get(key)):
                out[f"{key}/{task}"] = float(event[key])
        for source, value in (event.get("loss_by_source") or {}).items():
            if _finite_number(value):
                out[f"source_loss/{task}/{source}"] = float(value)
        return out
    if kind == "eval":
        for name, score in zip(task_names, event.get("scores") or [], strict=False):
            if _finite_number(score):
                out[f"eval/{name}"] = float(score)
        if _finite_number(event.get("upstream")):
            out["eval/upstream"] = float(event["upstream"])
        out.update(_numbers(event.get("strategy_report") or {}, "strategy"))  # moe's routing
        return out
    rest = {k: v for k, v in event.items() if k not in ("event", "time", "step")}
    return _numbers(rest, str(kind))


def _numbers(values: dict, prefix: str) -> dict[str, float]:
    """The finite numbers of a mapping, and of the mappings in it (one level), as
    `prefix/key` and `prefix/key/subkey`."""
    out = {}
    for key, value in values.items():
        if _finite_number(value):
            out[f"{prefix}/{key}"] = float(value)
        elif isinstance(value, dict):
            out.update({f"{prefix}/{key}/{k}": float(v) for k, v in value.items()
                        if _finite_number(v)})
    return out


class RunLog:
    """The run's event log: `log.jsonl` in `folder` and the chosen trackers. Call it with an
    event dict; `close()` at the end. Only the main process makes one (`enabled`)."""

    def __init__(self, folder: Path, trackers: list[str], run_name: str, config: dict,
                 task_names: list[str], enabled: bool = True):
        self.task_names = list(task_names)
        self.enabled = enabled
        self.step = 0  # the last global step seen: evaluations are drawn there
        self.file = None
        self.trackers = []
        if not enabled:
            return
        self.file = (Path(folder) / "log.jsonl").open("a", encoding="utf-8")
        for name in trackers:
            tracker = _make_tracker(name, run_name, Path(folder))
            tracker.start()
            tracker.store_init_configuration(_flat_config(config))
            self.trackers.append(tracker)

    def __call__(self, event: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")
        self.file.flush()
        if event.get("event") == "step" and "global_step" in event:
            self.step = int(event["global_step"])
        elif event.get("event") == "budget" and "step" in event:
            self.step = int(event["step"])
        values = scalars(event, self.task_names)
        if values:
            for tracker in self.trackers:
                tracker.log(values, step=self.step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _flat_config(config: dict, prefix: str = "") -> dict:
    """The config as the flat str/number/bool mapping trackers take as hyperparameters."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is not None:
            flat[name] = json.dumps(value)
    return flat
