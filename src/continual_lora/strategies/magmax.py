"""magmax (MagMax): task vectors merged by per-entry max magnitude, scored as W0 + λ · τ.

Two variants (`variant`): `sequential`, the MagMax paper's (one adapter trained on, cumulative task
vectors), and `merge_init`, the diffusion paper's `mag_max_light` (each task a fresh adapter on the
merged model, its own increment merged in)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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

Variant = Literal["sequential", "merge_init"]
#: λ when `lam` is not given: each variant's paper's value.
DEFAULT_LAM: dict[str, float] = {"sequential": 0.5, "merge_init": 1.0}


class MagmaxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    variant: Variant = "sequential"
    """sequential (the MagMax paper): one adapter trained task after task, τ_t its cumulative
    update, τ = magmax(τ_1..τ_t); merge_init (the diffusion paper's `mag_max_light`): each task
    trains a fresh adapter on the merged model W0 + λ·τ, and τ takes that task's own increment
    where it is at least as large in magnitude (ties to the current task)."""
    lam: float | None = Field(None, gt=0)
    """λ, the scale of the selected update: the model scored is W0 + λ·τ. Default (null): 0.5 for
    sequential (the MagMax paper, sequential fine-tuning), 1 for merge_init (the diffusion
    paper); a number given is used for either variant."""
    export_rank: int | None = Field(None, ge=1)
    """Rank of the exported adapter (truncated SVD of λ·τ); default t·r after task t, the rank
    the t task vectors together span (the selection itself is not low rank: see the recorded
    error)."""

    @property
    def scale(self) -> float:
        """λ in use: `lam` when given, else the variant's default."""
        return DEFAULT_LAM[self.variant] if self.lam is None else self.lam


def select_current_on_ties(merged: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """merge_init's rule: `τ_merged[p] ← τ_last[p]` where `|τ_last[p]| ≥ |τ_merged[p]|`, else
    `τ_merged[p]` (the diffusion paper's `mag_max_light`; a tie goes to the current task).
    `magmax` gives ties to its first argument, hence the order."""
    return magmax([last, merged])


def select_earliest_on_ties(selected: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """sequential's rule: `magmax(τ_1..τ_t)` in running form, ties to the earliest τ."""
    return magmax([selected, tau])


@register_strategy
class MagmaxStrategy(Strategy):
    """MagMax, in two variants (`variant`). Both operate on dense per-module updates ΔW (float32,
    a convolution's flattened), score `W0 + λ · τ` (written by `set_weights`: W0 stored at the
    first `after_task`, the sum taken in float32 and cast once), and export λτ per stage.

    `sequential` (Marczak et al. 2024, λ = 0.5 by default): one adapter trained sequentially, as
    `naive` does (a user's `lora.init_adapter` is the starting point). After task t the task
    vector `τ_t = ΔW_total` (the cumulative update since W0) is recorded and
    `τ[p] = τ_k[p]`, `k = argmax_{i≤t} |τ_i[p]|`. Training of task t+1 continues from the
    sequential adapter, not from the merged model: the same PeftModel stays the backbone; for
    scoring its adapter layers are disabled and its base weights hold W0 + λτ, and
    `before_task` puts W0 back and re-enables the adapter. Only the running selection is kept,
    not every τ_i: `magmax` is associative with ties going to the earliest task vector, so
    `magmax(magmax(τ_1..τ_{t-1}), τ_t) = magmax(τ_1..τ_t)`.

    `merge_init` (the diffusion paper's `mag_max_light`, λ = 1 by default): each task starts
    from the merged model `W0 + λ·τ` with a fresh adapter (standard init seeded by the task, as
    `merge_reinit`; task 1 from a user's `lora.init_adapter` when given). After the task its own
    increment `τ_last = ΔW` is merged: `τ[p] ← τ_last[p]` where `|τ_last[p]| ≥ |τ[p]|`, else
    τ[p] is kept (`τ = τ_1` after task 1); the adapter is then removed and the base weights
    hold `W0 + λ·τ`. This running rule is not a selection over cumulative task vectors: each
    increment is measured from the merged model, and ties go to the newest.

    Export per stage: λτ as a PEFT adapter by truncated SVD (`export_rank`), the relative
    reconstruction error recorded in stage.json and shown on the runner's line (`stage_report`).
    """

    name = "magmax"
    Options = MagmaxOptions
    summary = ("max-magnitude merge of task vectors: sequential training (default) or a fresh "
               "adapter per task on the merged model (variant merge_init)")

    def __init__(self, options=None):
        super().__init__(options)
        self.peft: PeftModel | None = None  # sequential: the one adapter trained on
        self.selected: dict[str, torch.Tensor] = {}  # τ, without λ
        self.base_weights: dict[str, torch.Tensor] = {}  # W0 of every adapted module
        self.transposed: dict[str, bool] = {}
        self.ranks: list[int] = []
        self.export: tuple[dict[str, LoraFactors], dict[str, float]] | None = None

    @property
    def merge_init(self) -> bool:
        return self.options.variant == "merge_init"

    def before_task(self, ctx: TaskContext) -> None:
        if self.merge_init:  # the base holds W0 + λτ (W0 on task 1, or the user's adapter)
            refuse_quantised(ctx.family.backbone)
            ensure_adapter(ctx)  # a fresh adapter seeded by the task
            return
        if self.peft is None:
            ensure_adapter(ctx)
            refuse_quantised(ctx.family.backbone)
            self.peft = ctx.family.backbone
            return
        set_weights(self.peft, self.base_weights, {}, self.transposed)  # W0 under the adapter
        self.peft.enable_adapter_layers()  # also makes its LoRA weights trainable again
        ctx.family.set_backbone(self.peft)

    def adopt(self, ctx: TaskContext) -> None:
        """The old adapter is τ_1 (trained from W0); sequential training then continues it,
        merge_init merges it and starts a fresh adapter, as after any task."""
        refuse_quantised(ctx.family.backbone)
        if not self.merge_init:
            self.peft = ctx.family.backbone
        self.after_task(ctx)

    def after_task(self, ctx: TaskContext) -> None:
        peft_model = ctx.family.backbone
        check_adapter_tensors(peft_model)
        factors = lora_factors(peft_model)
        tau = {key: f.delta() for key, f in factors.items()}  # τ_t, or merge_init's τ_last
        self.ranks.append(adapter_rank(factors))
        self.transposed.update(fan_in_fan_out(peft_model))
        if self.merge_init:
            model = peft_model.unload()  # the base it trained from, the adapter dropped
            rule = select_current_on_ties
        else:
            model = peft_model
            rule = select_earliest_on_ties
        snapshot_weights(model, self.base_weights, tau)  # first call: the weights are W0
        self.selected = {**self.selected, **{
            key: rule(self.selected[key], t) if key in self.selected else t
            for key, t in tau.items()}}
        lam = self.options.scale
        update = {key: lam * sel for key, sel in self.selected.items()}
        set_weights(model, self.base_weights, update, self.transposed)
        if self.merge_init:
            ctx.family.set_backbone(model)  # scored (and trained from next): W0 + λτ
        else:
            peft_model.disable_adapter_layers()  # scored: W0 + λτ alone
        rank = self.options.export_rank or sum(self.ranks)
        self.export = svd_factors(update.items(), cap_rank(rank, [factors]), like=factors)

    def stage_report(self, ctx: TaskContext) -> dict | None:
        """The export's reconstruction error, shown on the runner's line for the stage."""
        return None if self.export is None else export_error_report(self.export[1])

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        if self.export is None:
            raise AdapterError("no task vector has been recorded yet: nothing to export")
        factors, errors = self.export
        rank = write_adapter(factors, out_dir, ctx.run.model.name_or_path,
                             fan_in_fan_out=any(self.transposed.values()))
        info = {"kind": "peft_lora_svd", "method": "magmax", "variant": self.options.variant,
                "lam": self.options.scale, "rank": rank, "task_vectors": len(self.ranks),
                "relative_error": error_summary(errors)}
        return info
