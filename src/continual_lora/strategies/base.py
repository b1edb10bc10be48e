"""What a strategy is: a few optional hooks that plug into the one training loop.

Like Avalanche's small plugins, and not its 25-hook base class. The runner calls, per task:

    before_task(ctx)             set up the adapter (attach, reset, load) for this task
    heads(ctx)                   which per-task parts train, and which are re-initialised
    sources(ctx)                 what data the task trains on (new data, replay, the union)
    learning_rate(ctx)           the peak LR of this task
    extra_loss(batch, outputs)   added to the task loss at every step (LwF, O-LoRA, ...)
    after_task(ctx)              merge, record task vectors, fill buffers
    export_adapter(ctx, dir)     write the PEFT adapter that reproduces the model after the task

and, around evaluation (they are not part of the training sequence above):

    scoring(ctx, task)           a context manager entered around the scoring of each task
                                 (`task` is None for the upstream probe; `ctx` is None for row 0,
                                 before training) so a strategy may change how the model computes
                                 features while it is scored (moe routes inputs to adapters);
                                 default: nothing changes
    stage_report(ctx)            strategy-specific numbers of the stage just scored (moe's routing
                                 accuracy), a JSON-able dict or None; the runner stores it in
                                 results.json, metrics.json and strategy_report.json

and, for `continual-lora update`, which trains one new stage on an adapter trained earlier
(by this tool or any other):

    adopt(ctx)                   the adapter on the backbone was trained on `ctx.task` before this
                                 process began: take it into the strategy's state as if the
                                 strategy had trained it (default: run `after_task(ctx)`, which
                                 fills replay buffers, merges the adapter for Merge & Init, ...)

Strategies subclass `Strategy` directly (no deeper implementation inheritance) and register with
`@register_strategy`; the key is the file name and the class is `<CamelKey>Strategy`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from peft import LoraConfig, PeftModel
from pydantic import BaseModel, ConfigDict

from continual_lora.adapters import (
    attach_lora,
    concatenate_factors,
    load_adapter,
    lora_factors,
    merge_in_float32,
    save_factors_as_adapter,
)
from continual_lora.config import RunConfig
from continual_lora.families.base import ForwardOutput, ModelFamily
from continual_lora.sequence import Source, TaskData


class NoOptions(BaseModel):
    """This strategy takes no options."""

    model_config = ConfigDict(extra="forbid")


class AdapterError(RuntimeError):
    """An adapter that must not be saved (empty, all zero, non-finite)."""


@dataclass
class TaskContext:
    """Everything a hook may need about the task at hand."""

    task: TaskData
    tasks: list[TaskData]
    family: ModelFamily
    run: RunConfig
    lora_config: LoraConfig | None
    seed: int
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def t(self) -> int:
        """1-based index of the current task."""
        return self.task.index

    @property
    def seen(self) -> list[TaskData]:
        """Tasks 1..t."""
        return [x for x in self.tasks if x.index <= self.t]

    @property
    def previous(self) -> list[TaskData]:
        """Tasks 1..t-1."""
        return [x for x in self.tasks if x.index < self.t]


class Strategy:
    """Base of strategies: defaults are those of plain sequential LoRA training."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    uses_lora: ClassVar[bool] = True
    needs_old_data: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    #: True when each task trains a new adapter beside the earlier ones (so an update may give
    #: it another rank/alpha/targets than the old adapter's); False when it continues one.
    new_adapter_per_task: ClassVar[bool] = False
    #: Why `continual-lora update` cannot use this strategy, or "" when it can.
    not_for_update: ClassVar[str] = ""
    #: Why this strategy cannot train in several processes (DDP), or "" when it can.
    not_multiprocess: ClassVar[str] = ""

    def __init__(self, options: BaseModel | None = None):
        self.options = options if options is not None else self.Options()

    # -- hooks, all optional -------------------------------------------------------------------

    def before_task(self, ctx: TaskContext) -> None:
        ensure_adapter(ctx)

    def heads(self, ctx: TaskContext) -> tuple[list[int], list[int]]:
        """(task indices whose heads train, task indices whose heads are re-initialised)."""
        return [ctx.t], []

    def sources(self, ctx: TaskContext) -> list[Source]:
        return [new_data(ctx.task)]

    def learning_rate(self, ctx: TaskContext) -> float:
        return ctx.run.train.lr

    def extra_loss(self, batch: Any, outputs: ForwardOutput) -> torch.Tensor | None:
        return None

    def after_task(self, ctx: TaskContext) -> None:
        return None

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        """Save the backbone's adapter as it stands; returns facts for the lineage."""
        backbone = ctx.family.backbone
        if not isinstance(backbone, PeftModel):
            raise AdapterError("no adapter is attached: nothing to export")
        check_adapter_tensors(backbone)
        backbone.save_pretrained(str(out_dir))
        return {"kind": "peft_lora", "rank": ctx.lora_config.r if ctx.lora_config else None}

    def adopt(self, ctx: TaskContext) -> None:
        """The adapter now on the backbone was trained on `ctx.task` earlier (an update's old
        adapter): take it into the strategy's state as if this strategy had just trained it."""
        self.after_task(ctx)

    def scoring(self, ctx: TaskContext | None, task: TaskData | None) -> AbstractContextManager:
        """Entered around the scoring of `task` (None: the upstream probe; `ctx` None: row 0)."""
        return nullcontext()

    def stage_report(self, ctx: TaskContext) -> dict | None:
        """Strategy-specific numbers of the stage just scored (JSON-able), or None."""
        return None


# -- helpers shared by strategies (functions, not base-class behaviour) ---------------------------


def new_data(task: TaskData) -> Source:
    """All of a task's training data, as the new source of a stream."""
    return Source(task, np.arange(len(task.train)), task.repeats, task.weight, "new")


def ensure_adapter(ctx: TaskContext) -> None:
    """Attach a fresh LoRA adapter unless one is attached (the runner loads a user's
    `lora.init_adapter` before row 0, so it is found here on task 1)."""
    family = ctx.family
    if not isinstance(family.backbone, PeftModel):
        family.set_backbone(fresh_adapter(ctx, family.backbone))


def fresh_adapter(ctx: TaskContext, backbone: torch.nn.Module,
                  from_user_adapter: bool = False) -> PeftModel:
    """`backbone` with a new adapter: the user's `lora.init_adapter` when asked and given (the
    run's starting point), else the standard init (A random, B = 0) seeded by the task."""
    if from_user_adapter and ctx.run.lora.init_adapter:
        return load_adapter(backbone, ctx.run.resolve_path(ctx.run.lora.init_adapter))
    return attach_lora(backbone, ctx.lora_config, seed=ctx.seed)


def merge_into_base(ctx: TaskContext, history: list, masters: dict[str, torch.Tensor]) -> None:
    """Merge the attached adapter into the base weights after recording its factors in
    `history`, so `export_concatenated` can write Σ ΔW later. The sum is taken in float32
    whatever the base's dtype (`adapters.merge_in_float32`; `masters` holds the float32 copies of
    a low-precision base's adapted weights, kept by the strategy from one merge to the next)."""
    peft_model = ctx.family.backbone
    check_adapter_tensors(peft_model)
    history.append(lora_factors(peft_model))
    ctx.family.set_backbone(merge_in_float32(peft_model, masters))


def export_concatenated(ctx: TaskContext, history: list, out_dir: Path) -> dict:
    """Write Σ_s ΔW_s of the adapters in `history` (factor dicts, oldest first) as one PEFT
    adapter of rank Σ r_s, exact (factors concatenated); returns the export facts."""
    if not history:
        raise AdapterError("no adapter has been trained yet: nothing to export")
    factors = concatenate_factors(history)
    save_factors_as_adapter(factors, ctx.family.fresh_backbone(), out_dir,
                            ctx.run.model.name_or_path)
    rank = next(iter(factors.values())).A.shape[0]
    return {"kind": "peft_lora_concatenated", "rank": rank}


def check_adapter_tensors(model: PeftModel) -> None:
    """Refuse to save an adapter with no LoRA weights, non-finite values, or B all zero: the
    tests every command makes when it reads an adapter (`adapter_check`), made before writing."""
    from continual_lora.adapter_check import non_finite, up_factors, zero_update_note

    lora = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    if not lora:
        raise AdapterError("the adapter has no LoRA weights: refusing to save an empty adapter")
    bad = non_finite(lora)
    if bad:
        raise AdapterError(f"non-finite values in {bad[:3]}: refusing to save a broken adapter")
    note = zero_update_note(up_factors(lora))
    if note:
        raise AdapterError(f"{note} (did training change nothing?): refusing to save it")
