"""full_ft: full fine-tuning of every weight, the baseline LoRA is judged against."""

from pathlib import Path

import torch
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field

from continual_lora.adapters import merge_in_float32
from continual_lora.registry import register_strategy
from continual_lora.sequence import Source
from continual_lora.strategies.base import AdapterError, Strategy, TaskContext, new_data
from continual_lora.strategies.replay import buffer_indices, replayed_sources


class FullFtOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lr: float = Field(5e-5, gt=0, le=1.0)
    """Peak LR for full fine-tuning (full updates need a far smaller LR than LoRA's)."""
    save_weights: bool = False
    """Save the whole fine-tuned backbone after every task (large); off: heads only, and the
    backbone after the last task."""
    replay: bool = False
    """Mix a buffer of every earlier task's data into each new task, as `replay` does for
    LoRA (seed 004's fully-cooperative setting, full fine-tuning with old data)."""
    buffer_size: int | None = Field(None, ge=1)
    """With `replay`: examples kept per earlier task (a reservoir sample); null keeps all."""


@register_strategy
class FullFtStrategy(Strategy):
    """All backbone weights trainable, same data and schedule as the LoRA runs. A user's adapter
    (`lora.init_adapter`) is merged into the weights first, so it is the starting point."""

    name = "full_ft"
    Options = FullFtOptions
    uses_lora = False
    summary = "fine-tune every weight (no adapter)"
    not_for_update = "it writes full model weights, not an adapter; use `continual-lora run`"

    def before_task(self, ctx: TaskContext) -> None:
        backbone = ctx.family.backbone
        if isinstance(backbone, PeftModel):
            backbone = merge_in_float32(backbone, {})
        backbone.requires_grad_(True)
        ctx.family.set_backbone(backbone)

    def __init__(self, options=None):
        super().__init__(options)
        self.buffers: dict = {}  # with `replay`: task index → kept example indices

    def sources(self, ctx: TaskContext) -> list[Source]:
        if not self.options.replay:
            return [new_data(ctx.task)]
        return [new_data(ctx.task), *replayed_sources(ctx, self.buffers)]

    def after_task(self, ctx: TaskContext) -> None:
        if self.options.replay:
            self.buffers[ctx.t] = buffer_indices(ctx.task, self.options.buffer_size, "reservoir",
                                                 ctx.seed)

    def learning_rate(self, ctx: TaskContext) -> float:
        return self.options.lr

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        last = ctx.t == len(ctx.tasks)
        if not (self.options.save_weights or last):
            return {"kind": "none", "note": "full fine-tuning: weights saved after the last task"}
        backbone = ctx.family.backbone
        bad = [n for n, p in backbone.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise AdapterError(f"non-finite weights in {bad[:3]}: refusing to save them")
        backbone.save_pretrained(str(out_dir), safe_serialization=True)
        return {"kind": "full_weights"}
