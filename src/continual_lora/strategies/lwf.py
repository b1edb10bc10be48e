"""lwf (Learning without Forgetting): distil the model as it was before the task into itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from continual_lora.families.base import ForwardOutput
from continual_lora.registry import register_strategy
from continual_lora.strategies.base import Strategy, TaskContext, ensure_adapter


class LwfOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    alpha: float = Field(1.0, ge=0)
    """Weight α of the distillation term (the incremental-LoRA study used 5)."""
    temperature: float = Field(2.0, gt=0)
    """Softmax temperature T of teacher and student; the term is scaled by T²."""


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], alpha: float,
                      temperature: float) -> torch.Tensor:
    """α · T² · Σ_heads KL(softmax(z_teacher / T) ‖ softmax(z_student / T)).

    One (batch × classes) logits pair per old head. Each head's KL is summed over its classes
    and averaged over the batch; the heads' KLs are summed (not averaged), so every old head
    weighs as much as it would alone.
    """
    total = student[0].new_zeros(())
    for z_student, z_teacher in zip(student, teacher, strict=True):
        log_p_student = F.log_softmax(z_student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(z_teacher.to(z_student.dtype) / temperature, dim=-1)
        total = total + F.kl_div(log_p_student, log_p_teacher, reduction="batchmean",
                                 log_target=True)
    return alpha * temperature**2 * total


@dataclass
class OldOutput:
    """One old output the student is distilled on: a head, and which of its columns."""

    head: str
    columns: torch.Tensor | None  # None: all of the head's columns (a per-task head)


@register_strategy
class LwfStrategy(Strategy):
    """One adapter trained sequentially (as `naive`), plus a distillation term on each batch of
    task t: `α · T² · KL(softmax(z_teacher/T) ‖ softmax(z_student/T))` over the old outputs.

    Old outputs: with per-task heads, the heads of tasks < t (one KL per head, each averaged
    over the batch, summed over heads); with the shared class-incremental head, its columns of
    the classes of tasks < t (one KL). Task 1 has no old outputs and no term.

    The teacher is the model as it stands before task t's first step: the same network (no
    second copy), since the one adapter carries over from task t-1 and nothing has trained
    yet. Its outputs do not change during the task, so `before_task` computes them once per
    training example of task t (one no-grad, eval-mode pass, length-sorted batches) and keeps
    them in memory, indexed by example index: `n_examples × n_old_classes` floats (600 × 12
    for the demo, 29 KB). They would have to go to disk (a memory-mapped array indexed the same
    way) only at sizes like 10^6 examples × 10^3 classes (4 GB), or for a causal LM's vocabulary
    per token. Each step then costs a few head matmuls on the student's pooled features plus
    the KL. Computing in `before_task` is exact because `begin_task` only adds task t's own head
    (or rows) and leaves the old ones as they are.

    The stream holds only task t's examples (the default `sources`), so every batch row's
    `example_ids` indexes task t's training split, and the cache.
    """

    name = "lwf"
    Options = LwfOptions
    summary = "distil the previous model's old-head outputs on the new data"

    def __init__(self, options=None):
        super().__init__(options)
        self.old_outputs: list[OldOutput] = []
        self.teacher: list[torch.Tensor] = []  # per old output: (n_train, n_columns) logits
        self._module = None  # the family's module (backbone + heads), whose heads we read

    def before_task(self, ctx: TaskContext) -> None:
        ensure_adapter(ctx)
        self._module = ctx.family.module
        self.old_outputs = self._old_outputs(ctx)
        self.teacher = self._teacher_logits(ctx) if self.old_outputs else []

    def extra_loss(self, batch, outputs: ForwardOutput) -> torch.Tensor | None:
        if not self.old_outputs:
            return None
        ids = batch["example_ids"]
        student = [self._logits(outputs.features, old) for old in self.old_outputs]
        teacher = [cached[ids] for cached in self.teacher]
        return distillation_loss(student, teacher, self.options.alpha, self.options.temperature)

    def after_task(self, ctx: TaskContext) -> None:
        # The next task's teacher is the model as it now stands: drop this one's outputs.
        self.old_outputs, self.teacher = [], []

    # -- helpers -------------------------------------------------------------------------------

    def _old_outputs(self, ctx: TaskContext) -> list[OldOutput]:
        module = ctx.family.module
        if ctx.family.cfg.head == "per_task":
            return [OldOutput(module.head_key(old.index), None) for old in ctx.previous]
        columns = [torch.arange(module.offsets[old.index],
                                module.offsets[old.index] + len(old.classes))
                   for old in ctx.previous]
        if not columns:
            return []
        return [OldOutput("shared", torch.cat(columns).to(ctx.family.device))]

    def _logits(self, features: torch.Tensor, old: OldOutput) -> torch.Tensor:
        logits = self._module.head_logits(old.head, features)
        return logits if old.columns is None else logits[:, old.columns]

    @torch.no_grad()
    def _teacher_logits(self, ctx: TaskContext) -> list[torch.Tensor]:
        family = ctx.family
        features = family.encode_split(ctx.task, "train", ctx.run.train.eval_batch_size)
        features = features.to(family.device)
        return [self._logits(features, old).float() for old in self.old_outputs]
