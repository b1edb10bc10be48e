"""merge: an independent adapter per task from the original base, merged by their dense updates."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from continual_lora.adapter_files import (
    DEFAULT_DROP_RATE,
    cap_rank,
    error_summary,
    export_error_report,
    merge_modules,
    svd_factors,
    weighted_concatenation,
    write_adapter,
)
from continual_lora.adapters import LoraFactors, attach_lora, delta_as_weight, lora_factors
from continual_lora.config import ConfigError
from continual_lora.registry import register_strategy
from continual_lora.strategies.base import (
    AdapterError,
    Strategy,
    TaskContext,
    check_adapter_tensors,
)

Method = Literal["task_arithmetic", "ties", "dare_linear", "dare_ties", "magmax", "cat"]


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    method: Method = "ties"
    """How the adapters' dense updates are merged: task_arithmetic (Σ w_i ΔW_i), ties, dare_linear,
    dare_ties, magmax, or cat (exact: the weighted sum, exported as the concatenation of the
    factors, rank Σ r_i). Default ties: see the strategy's docstring."""
    weights: float | list[float] = 1.0
    """Weight of each merged adapter (one number for all, or one per adapter: the user's
    `lora.init_adapter` first when there is one, then tasks 1..T). For ties and magmax one number
    is λ, the scale of the merged update."""
    density: float | None = Field(None, gt=0, le=1)
    """ties/dare_ties: fraction of each update's entries kept by magnitude (default 0.2 for ties,
    Yadav et al.; 1, no trim after the random drop, for dare_ties)."""
    drop_rate: float | None = Field(None, ge=0, lt=1)
    """dare_linear/dare_ties: probability of dropping an entry (default 0.5)."""
    export_rank: int | None = Field(None, ge=1)
    """Rank of the exported adapter (truncated SVD of the merged update); default Σ r_i of the
    merged adapters, the rank their weighted sum spans. Not for cat, which is exact."""

    @model_validator(mode="after")
    def _fits_method(self) -> MergeOptions:
        uses = {"density": self.method in ("ties", "dare_ties"),
                "drop_rate": self.method.startswith("dare"), "export_rank": self.method != "cat"}
        for name, used in uses.items():
            if getattr(self, name) is not None and not used:
                raise ValueError(f"`{name}` does not apply to method {self.method!r}")
        return self

    def merge_opts(self, n: int) -> dict:
        """Options for `merge_modules` when `n` adapters are merged."""
        weights = self.weights if isinstance(self.weights, float) else self.weights[:n]
        opts: dict = {"weights": weights}
        if self.method in ("ties", "dare_ties"):
            opts["density"] = self.density
        if self.method.startswith("dare"):
            opts["drop_rate"] = DEFAULT_DROP_RATE if self.drop_rate is None else self.drop_rate
        return opts


@register_strategy
class MergeStrategy(Strategy):
    """Seed 004's "model merging": each task trains an independent fresh adapter from the original
    base on its own data and head; after task t the model scored is
    `W0 + merge(ΔW_1, ..., ΔW_t)`, merged on the dense updates `ΔW_i = s_i B_i A_i` in float32
    (`merging.py`), with the per-task heads. A user's `lora.init_adapter` is the first adapter
    merged (the update of the practitioner's earlier data), and new tasks start from the base.

    Default method `ties` (Yadav et al. 2023), density 0.2, λ = 1: independent adapters from one
    base is the setting TIES was made for; trimming and sign election remove the interference of
    small and conflicting entries, and its disjoint mean keeps the merged update at the scale of
    one task's update, whereas the task-arithmetic sum grows with the number of tasks (an
    unweighted sum of T updates moves the model T times as far). Not tuned on LoRA updates here.

    Export per stage: the merged update as one PEFT adapter, by truncated SVD (rank
    `export_rank`) with the relative reconstruction error recorded in stage.json and shown on the
    runner's line for the stage (`stage_report`), or for `cat` the exact concatenation. Merging
    into a quantised base is refused.
    """

    name = "merge"
    Options = MergeOptions
    summary = "independent adapter per task, merged (TIES / task arithmetic / DARE / MagMax)"

    def __init__(self, options=None):
        super().__init__(options)
        self.adapters: list[dict[str, LoraFactors]] = []
        self.base_weights: dict[str, torch.Tensor] = {}  # W0 of every adapted module
        self.fan_in_fan_out: dict[str, bool] = {}
        self.merged: dict[str, torch.Tensor] = {}
        self.export: tuple[dict[str, LoraFactors], dict[str, float]] | None = None

    def before_task(self, ctx: TaskContext) -> None:
        backbone = ctx.family.backbone
        if isinstance(backbone, PeftModel):  # task 1, the user's adapter: merged first
            refuse_quantised(backbone)
            self.fan_in_fan_out.update(fan_in_fan_out(backbone))
            self.adapters.append(lora_factors(backbone))
            backbone = backbone.unload()
        refuse_quantised(backbone)
        if ctx.t == 1:
            self._check_weights(ctx)
        set_weights(backbone, self.base_weights, {}, self.fan_in_fan_out)  # back to W0
        ctx.family.set_backbone(attach_lora(backbone, ctx.lora_config, seed=ctx.seed))

    def _check_weights(self, ctx: TaskContext) -> None:
        weights = self.options.weights
        n = len(ctx.tasks) + len(self.adapters)
        if isinstance(weights, list) and len(weights) != n:
            user = " (the user's adapter first)" if self.adapters else ""
            raise ConfigError(f"strategy.options.weights: {len(weights)} weights for {n} "
                              f"adapters to merge{user}; give one number or {n}")

    def after_task(self, ctx: TaskContext) -> None:
        peft_model = ctx.family.backbone
        check_adapter_tensors(peft_model)
        self.fan_in_fan_out.update(fan_in_fan_out(peft_model))
        self.adapters.append(lora_factors(peft_model))
        base = peft_model.unload()
        snapshot_weights(base, self.base_weights, set().union(*self.adapters))
        opts = self.options.merge_opts(len(self.adapters))
        self.merged = merge_modules(self.options.method, self.adapters, seed=ctx.seed, **opts)
        set_weights(base, self.base_weights, self.merged, self.fan_in_fan_out)
        ctx.family.set_backbone(base)
        self.export = self._export_factors(opts["weights"])

    def _export_factors(self, weights) -> tuple[dict[str, LoraFactors], dict[str, float]]:
        if self.options.method == "cat":
            factors = weighted_concatenation(self.adapters, weights)
            return factors, dict.fromkeys(factors, 0.0)
        rank = self.options.export_rank or sum(adapter_rank(a) for a in self.adapters)
        return svd_factors(self.merged.items(), cap_rank(rank, self.adapters),
                           like={k: f for a in self.adapters for k, f in a.items()})

    def stage_report(self, ctx: TaskContext) -> dict | None:
        """The export's reconstruction error, shown on the runner's line for the stage."""
        return None if self.export is None else export_error_report(self.export[1])

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        if self.export is None:
            raise AdapterError("no adapter has been merged yet: nothing to export")
        factors, errors = self.export
        rank = write_adapter(factors, out_dir, ctx.run.model.name_or_path,
                             fan_in_fan_out=any(self.fan_in_fan_out.values()))
        info = {"kind": "peft_lora_concatenated" if self.options.method == "cat"
                else "peft_lora_svd", "method": self.options.method, "rank": rank,
                "adapters_merged": len(self.adapters), "relative_error": error_summary(errors)}
        return info


# -- helpers also used by magmax (functions, not base-class behaviour) ----------------------------


def adapter_rank(factors: dict[str, LoraFactors]) -> int:
    return max(f.A.shape[0] for f in factors.values())


def refuse_quantised(model: nn.Module) -> None:
    """Merging a float32 update into quantised weights would round it away or fail: refuse."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    flags = [getattr(inner, "is_loaded_in_4bit", False), getattr(inner, "is_loaded_in_8bit", False),
             getattr(inner, "is_quantized", False),
             getattr(getattr(inner, "config", None), "quantization_config", None) is not None]
    if any(flags):
        raise ConfigError("this base model is quantised: merging updates into quantised weights "
                          "is refused. Load the base in float32 (or bf16) to merge, and quantise "
                          "the merged model afterwards")


def fan_in_fan_out(peft_model: PeftModel) -> dict[str, bool]:
    """Per adapted module, whether its weight is stored transposed (GPT-2's Conv1D)."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix): bool(getattr(module, "fan_in_fan_out", False))
            for name, module in peft_model.named_modules()
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)}


def _lora_layer(peft_model: PeftModel, key: str) -> nn.Module:
    return peft_model.get_submodule(f"base_model.model.{key}")


def _weight(model: nn.Module, key: str) -> nn.Parameter:
    """The base weight of module `key`, in a plain model or under a PeftModel's LoRA layer."""
    if isinstance(model, PeftModel):
        return _lora_layer(model, key).base_layer.weight
    return model.get_submodule(key).weight


def snapshot_weights(model: nn.Module, store: dict[str, torch.Tensor], keys) -> None:
    """Copy W0 of the modules in `keys` not yet stored (called while they still hold W0)."""
    for key in keys:
        if key not in store:
            store[key] = _weight(model, key).detach().clone()


@torch.no_grad()
def set_weights(model: nn.Module, base: dict[str, torch.Tensor], dense: dict[str, torch.Tensor],
                transposed: dict[str, bool]) -> None:
    """W ← W0 + ΔW for every stored module (ΔW = 0 where `dense` has none; a `[d_out, d_in]`
    matrix, reshaped to a convolution's kernel), added in float32 and cast to the weight's
    dtype once."""
    for key, w0 in base.items():
        weight = _weight(model, key)
        delta = dense.get(key)
        if delta is None:
            weight.copy_(w0)
            continue
        delta = delta_as_weight(delta.to(w0.device), w0, transposed.get(key, False))
        weight.copy_((w0.float() + delta).to(weight.dtype))

