"""magmax (MagMax): sequential training, scored as W0 + λ · (max-magnitude selection of the task
vectors)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field

from continual_lora.adapter_files import (
    cap_rank,
    error_summary,
    export_error_report,
    svd_factors,
    write_adapter,
)
from continual_lora.adapters import LoraFactors, lora_factors
from continual_lora.merging import magmax
from continual_lora.registry import register_strategy
from continual_lora.strategies.base import (
    AdapterError,
    Strategy,
    TaskContext,
    check_adapter_tensors,
    ensure_adapter,
)
from continual_lora.strategies.merge import (
    adapter_rank,
    fan_in_fan_out,
    refuse_quantised,
    set_weights,
    snapshot_weights,
)


class MagmaxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lam: float = Field(0.5, gt=0)
    """λ, the scale of the selected update: the model scored is W0 + λ·τ (0.5: the MagMax paper,
    sequential fine-tuning; 1: the diffusion paper's variant)."""
    export_rank: int | None = Field(None, ge=1)
    """Rank of the exported adapter (truncated SVD of λ·τ); default t·r after task t, the rank
    the t task vectors together span (the selection itself is not low rank: see the recorded
    error)."""


@register_strategy
class MagmaxStrategy(Strategy):
    """MagMax (Marczak et al. 2024): one adapter trained sequentially, as `naive` does (a user's
    `lora.init_adapter` is the starting point). After task t the task vector
    `τ_t = ΔW_total` (the cumulative update since the base W0, dense, per module) is recorded and
    the model scored is `W0 + λ · τ`, `τ[p] = τ_k[p]`, `k = argmax_{i≤t} |τ_i[p]|`.

    Training of task t+1 continues from the sequential adapter, not from the merged model: the
    same PeftModel stays the backbone; for scoring its adapter layers are disabled and its base
    weights hold W0 + λτ, and `before_task` puts W0 back and re-enables the adapter. Only the
    running selection is kept, not every τ_i: `magmax` is associative with ties going to the
    earliest task vector, so `magmax(magmax(τ_1..τ_{t-1}), τ_t) = magmax(τ_1..τ_t)`.

    Export per stage: λτ as a PEFT adapter by truncated SVD (`export_rank`), the relative
    reconstruction error recorded in stage.json and shown on the runner's line (`stage_report`).
    """

    name = "magmax"
    Options = MagmaxOptions
    summary = "sequential training, scored with the max-magnitude merge of the task vectors"

    def __init__(self, options=None):
        super().__init__(options)
        self.peft: PeftModel | None = None
        self.selected: dict[str, torch.Tensor] = {}  # magmax(τ_1..τ_t), without λ
        self.base_weights: dict[str, torch.Tensor] = {}
        self.transposed: dict[str, bool] = {}
        self.ranks: list[int] = []
        self.export: tuple[dict[str, LoraFactors], dict[str, float]] | None = None

    def before_task(self, ctx: TaskContext) -> None:
        if self.peft is None:
            ensure_adapter(ctx)
            refuse_quantised(ctx.family.backbone)
            self.peft = ctx.family.backbone
            return
        set_weights(self.peft, self.base_weights, {}, self.transposed)  # W0 under the adapter
        self.peft.enable_adapter_layers()  # also makes its LoRA weights trainable again
        ctx.family.set_backbone(self.peft)

    def adopt(self, ctx: TaskContext) -> None:
        """The old adapter is τ_1; training then continues it, as after any task."""
        refuse_quantised(ctx.family.backbone)
        self.peft = ctx.family.backbone
        self.after_task(ctx)

    def after_task(self, ctx: TaskContext) -> None:
        peft_model = ctx.family.backbone
        check_adapter_tensors(peft_model)
        factors = lora_factors(peft_model)
        tau = {key: f.delta() for key, f in factors.items()}
        self.selected = tau if not self.selected else \
            {key: magmax([self.selected[key], tau[key]]) for key in tau}
        self.ranks.append(adapter_rank(factors))
        self.transposed = fan_in_fan_out(peft_model)
        snapshot_weights(peft_model, self.base_weights, tau)
        update = {key: self.options.lam * sel for key, sel in self.selected.items()}
        set_weights(peft_model, self.base_weights, update, self.transposed)
        peft_model.disable_adapter_layers()  # scored: W0 + λτ alone
        rank = self.options.export_rank or sum(self.ranks)
        self.export = svd_factors(update.items(), cap_rank(rank, [factors]))

    def stage_report(self, ctx: TaskContext) -> dict | None:
        """The export's reconstruction error, shown on the runner's line for the stage."""
        return None if self.export is None else export_error_report(self.export[1])

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        if self.export is None:
            raise AdapterError("no task vector has been recorded yet: nothing to export")
        factors, errors = self.export
        rank = write_adapter(factors, out_dir, ctx.run.model.name_or_path,
                             fan_in_fan_out=any(self.transposed.values()))
        info = {"kind": "peft_lora_svd", "method": "magmax", "lam": self.options.lam,
                "rank": rank, "task_vectors": len(self.ranks),
                "relative_error": error_summary(errors)}
        return info
