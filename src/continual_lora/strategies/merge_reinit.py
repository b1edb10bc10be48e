"""merge_reinit (Merge & Init): merge ΔW into the base after each task, start a fresh adapter."""

from pathlib import Path

from continual_lora.adapters import (
    LoraFactors,
    concatenate_factors,
    lora_factors,
    save_factors_as_adapter,
)
from continual_lora.registry import register_strategy
from continual_lora.strategies.base import (
    AdapterError,
    Strategy,
    TaskContext,
    check_adapter_tensors,
)


@register_strategy
class MergeReinitStrategy(Strategy):
    """After task t: W0 ← W0 + ΔW_t (PEFT's merge, in the weights' float32), then a new adapter
    with the standard init (A random, B = 0). Heads are kept per task.

    The exported adapter of task t is the exact sum Σ_{s≤t} ΔW_s as one PEFT adapter of rank
    Σ r_s (factors concatenated, scalings folded into B): loaded on the original base it
    reproduces the merged model up to float32 rounding of the sum order.
    """

    name = "merge_reinit"
    summary = "merge each task's adapter into the base, then start a fresh one"

    def __init__(self, options=None):
        super().__init__(options)
        self.history: list[dict[str, LoraFactors]] = []

    def after_task(self, ctx: TaskContext) -> None:
        peft_model = ctx.family.backbone
        check_adapter_tensors(peft_model)
        self.history.append(lora_factors(peft_model))
        ctx.family.set_backbone(peft_model.merge_and_unload())

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        if not self.history:
            raise AdapterError("no task has been merged yet: nothing to export")
        factors = concatenate_factors(self.history)
        save_factors_as_adapter(factors, ctx.family.fresh_backbone(), out_dir,
                                ctx.run.model.name_or_path)
        rank = next(iter(factors.values())).A.shape[0]
        return {"kind": "peft_lora_concatenated", "rank": rank, "tasks_merged": len(self.history)}
