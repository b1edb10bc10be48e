"""replay: train on the new data mixed with a buffer of each earlier task's data."""

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from continual_lora.registry import register_strategy
from continual_lora.sequence import Source, class_balanced_sample, reservoir_sample
from continual_lora.strategies.base import Strategy, TaskContext, new_data


class ReplayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    buffer_size: int | None = Field(None, ge=1)
    """Examples kept per earlier task; null keeps all of them."""
    selection: Literal["reservoir", "class_balanced"] = "reservoir"
    """How a buffer is drawn from a task's training data when it is larger than `buffer_size`."""


@register_strategy
class ReplayStrategy(Strategy):
    """One adapter trained sequentially; task t's stream is the new data plus a buffer of every
    task < t. Each source keeps its own `repeats`/`weight` from the task config."""

    name = "replay"
    Options = ReplayOptions
    needs_old_data = True
    summary = "mix a buffer of old data into each new task"

    def __init__(self, options=None):
        super().__init__(options)
        self.buffers: dict[int, np.ndarray] = {}

    def sources(self, ctx: TaskContext) -> list[Source]:
        return [new_data(ctx.task), *replayed_sources(ctx, self.buffers)]

    def adopt(self, ctx: TaskContext) -> None:
        """Every old task's data (what the user kept of it) becomes a buffer."""
        for task in ctx.seen:  # each with the seed the runner gives its stage
            self._fill(task, ctx.run.seed * 1000 + task.index)

    def after_task(self, ctx: TaskContext) -> None:
        self._fill(ctx.task, ctx.seed)

    def _fill(self, task, seed: int) -> None:
        self.buffers[task.index] = buffer_indices(task, self.options.buffer_size,
                                                  self.options.selection, seed)


def buffer_indices(task, size: int | None, selection: str, seed: int) -> np.ndarray:
    """The training examples of `task` kept for replay: all, or `size` of them drawn by
    `selection` (reservoir or class-balanced)."""
    n = len(task.train)
    if size is None or size >= n:
        return np.arange(n)
    if selection == "class_balanced":
        return class_balanced_sample(task.train.labels, size, seed)
    return reservoir_sample(n, size, seed)


def replayed_sources(ctx: TaskContext, buffers: dict[int, np.ndarray]) -> list[Source]:
    """The buffer of every task before the current one, as replay sources of its stream."""
    return [Source(old, buffers[old.index], old.repeats, old.weight, "replay")
            for old in ctx.previous]
