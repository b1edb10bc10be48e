"""merge_reinit (Merge & Init): merge ΔW into the base after each task, start a fresh adapter."""

from pathlib import Path

from continual_lora.adapters import LoraFactors
from continual_lora.registry import register_strategy
from continual_lora.strategies.base import (
    Strategy,
    TaskContext,
    export_concatenated,
    merge_into_base,
)


@register_strategy
class MergeReinitStrategy(Strategy):
    """After task t: W0 ← W0 + ΔW_t (added in float32 whatever the base's dtype), then a new adapter
    with the standard init (A random, B = 0). Heads are kept per task.

    The exported adapter of task t is the exact sum Σ_{s≤t} ΔW_s as one PEFT adapter of rank
    Σ r_s (factors concatenated, scalings folded into B): loaded on the original base it
    reproduces the merged model up to float32 rounding of the sum order.
    """

    name = "merge_reinit"
    summary = "merge each task's adapter into the base, then start a fresh one"
    new_adapter_per_task = True

    def __init__(self, options=None):
        super().__init__(options)
        self.history: list[dict[str, LoraFactors]] = []
        self.masters: dict = {}  # float32 copies of a low-precision base's merged weights

    def after_task(self, ctx: TaskContext) -> None:
        merge_into_base(ctx, self.history, self.masters)

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        return {**export_concatenated(ctx, self.history, out_dir),
                "tasks_merged": len(self.history)}
