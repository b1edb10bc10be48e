"""olora (O-LoRA): earlier adapters frozen, a new adapter trained with an orthogonality penalty
between its A and the earlier A's.

Adapters are named `task1`, `task2`, ... (task 1 keeps the name of a user's `lora.init_adapter`
when one was loaded). The earlier adapters only ever enter the model as `W0 + Σ_{s<t} ΔW_s`, so by
default (`frozen_adapters: merged`) each finished adapter is merged into the base weights and the
next task gets one fresh PEFT adapter: a step costs what naive's does, plus the penalty. The
finished adapters' factors are kept as tensors, for the penalty (their A's) and for the export.
With `frozen_adapters: active` they stay on one PeftModel as frozen, active adapters instead;
PEFT's LoRA forward adds every active adapter's `s · B A x` to the base output, which gives the
same `W0 + Σ_s ΔW_s` at the price of every adapter's matmuls in every step.

The penalty is computed with batched matrix products: before a task the adapted modules are
grouped by shape, the earlier A's of each group are stacked once into a frozen tensor
`[L, k, d_in]`, and each step does one `torch.stack` of the new A's and one `torch.bmm` per group.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from peft import PeftModel, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from continual_lora.adapters import (
    LoraFactors,
    lora_factors,
    merge_in_float32,
)
from continual_lora.config import ConfigError
from continual_lora.registry import register_strategy
from continual_lora.strategies.base import (
    Strategy,
    TaskContext,
    check_adapter_tensors,
    export_concatenated,
)

NonNegative = Annotated[float, Field(ge=0)]


class OloraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lambda1: NonNegative | list[NonNegative] = 0.5
    """Weight of the orthogonality penalty; a list gives one weight per task (the paper's code
    used 0 on task 1, 0.5 in the middle, 5 at the end)."""
    lambda2: NonNegative = 0.0
    """Weight of the squared L2 norm of the new adapter's parameters (A_t and B_t)."""
    orthogonal_norm: Literal["l1", "squared"] = "l1"
    """Norm of A_s A_tᵀ: `l1` sums absolute entries (the public code), `squared` is the squared
    Frobenius norm (the paper)."""
    frozen_adapters: Literal["merged", "active"] = "merged"
    """How the earlier adapters enter the model. `merged` (default): after each task its
    ΔW = s·B·A is merged into the base weights (added in float32 whatever the base's dtype)
    and the next task trains one fresh PEFT adapter, so a step costs what naive's does (a
    prototype measured 1.007× naive at 8 earlier adapters); the base then differs from the
    original by the float32 rounding of the merge. `active`: every earlier adapter stays a
    frozen, active PEFT adapter on the original base, so each step also pays two thin matmuls,
    a multiply and an add per earlier adapter per adapted layer, forward and backward (1.24×
    naive with 2 earlier adapters, 1.92× with 8); use it when the base cannot take a float32
    merge (a quantised base) or its weights must stay untouched."""


# -- the penalty, as pure tensor functions -------------------------------------------------------


@dataclass
class PenaltyGroup:
    """Modules whose new A has one shape and whose earlier A's stack to one row count."""

    keys: list[str]
    old: torch.Tensor  # [L, k, d_in]: the earlier A's of each module, stacked, frozen
    new: list[torch.Tensor]  # L tensors [r, d_in] (or conv [r, in, k, k]): each new A (trainable)


def build_penalty_groups(old: dict[str, list[torch.Tensor]],
                         new: dict[str, torch.Tensor]) -> list[PenaltyGroup]:
    """Group modules by (shape of the new A, rows of the earlier A's) so that each group is one
    batched product. Modules without earlier A's contribute nothing and are left out."""
    grouped: dict[tuple, list[str]] = defaultdict(list)
    stacked_old = {}
    for key in sorted(new):
        if not old.get(key):
            continue
        # A convolution's A [r, in, k, k] enters as the matrix [r, in·k·k] (LoraFactors).
        stacked_old[key] = torch.cat([a.detach().flatten(1) for a in old[key]], dim=0)
        grouped[(tuple(new[key].flatten(1).shape), stacked_old[key].shape[0])].append(key)
    return [PenaltyGroup(keys, torch.stack([stacked_old[k] for k in keys]),
                         [new[k] for k in keys])
            for keys in grouped.values()]


def reduce_norm(products: torch.Tensor, norm: str) -> torch.Tensor:
    """‖·‖ of the products: `l1` = Σ |entries|, `squared` = Σ entries²."""
    return products.abs().sum() if norm == "l1" else products.pow(2).sum()


def batched_penalty(old: torch.Tensor, new: torch.Tensor, norm: str) -> torch.Tensor:
    """Σ_layers ‖S_l A_{t,l}ᵀ‖ for `old` = [L, k, d_in] (S_l = [A_1; …; A_{t-1}] of layer l) and
    `new` = [L, r, d_in]. Both norms are sums over entries, so ‖S A_tᵀ‖ = Σ_{s<t} ‖A_s A_tᵀ‖."""
    return reduce_norm(torch.bmm(old, new.transpose(1, 2)), norm)


def orthogonality_penalty(groups: list[PenaltyGroup], norm: str) -> torch.Tensor | None:
    """Σ_layers Σ_{s<t} ‖A_s A_tᵀ‖ over all groups; None when there is nothing to compare."""
    terms = [batched_penalty(g.old, torch.stack([a.flatten(1) for a in g.new]), norm)
             for g in groups]
    return torch.stack(terms).sum() if terms else None


def group_by_shape(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by shape, so that a sum over all of them is one stack per group."""
    grouped: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        grouped[tuple(tensor.shape)].append(tensor)
    return list(grouped.values())


def squared_l2(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """‖θ‖² = Σ of the squared entries of every tensor, one stack per shape group."""
    return torch.stack([torch.stack(g).pow(2).sum() for g in groups]).sum()


# -- the strategy --------------------------------------------------------------------------------


def lora_layers(model: PeftModel) -> list[tuple[str, nn.Module]]:
    """(module path inside the base model, layer) of every LoRA-wrapped layer."""
    prefix = "base_model.model."
    return [(name.removeprefix(prefix), m) for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]


@register_strategy
class OloraStrategy(Strategy):
    """O-LoRA (Wang et al. 2023): task t trains a new adapter (A_t, B_t) while A_s, B_s for s < t
    stay frozen and in the forward pass (their ΔW summed), with the loss

        L = L_task + λ1_t · Σ_layers Σ_{s<t} ‖A_s A_tᵀ‖ + λ2 · ‖θ_t‖²,

    θ_t = (A_t, B_t) of every adapted layer. Choices where ALGORITHMS.md leaves room:
    - ‖θ_t‖² is the squared L2 norm summed over all of the new adapter's tensors (ALGORITHMS.md);
      the public code adds the unsquared norm of each tensor instead.
    - The penalty uses the raw A's (the scaling alpha/r is not folded in), as the public code.
    - With λ1_t = 0 and λ2 = 0 (or on task 1, which has no earlier A, with λ2 = 0), `extra_loss`
      returns None: nothing is added and nothing is computed.
    - "Frozen and active" is implemented, by default, as merged into the base weights
      (`frozen_adapters`): the forward is the same W0 + Σ_{s<t} ΔW_s + ΔW_t up to the float32
      rounding of the merge. One difference: with `lora.dropout` > 0, `active` also applies
      dropout to the earlier adapters' inputs while training, `merged` does not (their ΔW is
      part of the weight).

    The exported adapter after task t is the exact Σ_{s≤t} ΔW_s as one PEFT adapter of rank
    Σ r_s (the kept factors concatenated, scalings folded into B), loadable with plain
    `PeftModel.from_pretrained` on the original base. All modules must then share one total
    rank (true unless a user's `lora.init_adapter` targets other modules than
    `lora.target_modules`).
    """

    name = "olora"
    Options = OloraOptions
    summary = "freeze earlier adapters, train a new one orthogonal to them (O-LoRA)"
    new_adapter_per_task = True

    def __init__(self, options=None):
        super().__init__(options)
        self.adapters: list[str] = []
        # Factors of each finished adapter (float32 copies, frozen), in task order.
        self.finished: list[dict[str, LoraFactors]] = []
        self.masters: dict = {}  # `merged`: float32 copies of a low-precision base's weights
        self.lambda1_now = 0.0
        self.groups: list[PenaltyGroup] = []
        self.l2_groups: list[list[torch.Tensor]] = []

    @property
    def merged(self) -> bool:
        return self.options.frozen_adapters == "merged"

    def lambda1_for(self, t: int, n_tasks: int) -> float:
        """λ1 of task t (1-based); a list must have exactly one entry per task."""
        lam = self.options.lambda1
        if not isinstance(lam, list):
            return float(lam)
        if len(lam) != n_tasks:
            raise ConfigError(f"strategy.options.lambda1: a list needs one weight per task; the "
                              f"sequence has {n_tasks} tasks, the list has {len(lam)} entries")
        return float(lam[t - 1])

    def before_task(self, ctx: TaskContext) -> None:
        self.lambda1_now = self.lambda1_for(ctx.t, len(ctx.tasks))
        peft = self._add_task_adapter(ctx)
        new = self.adapters[-1]
        # Merged: the PeftModel holds only the new adapter. Active: PEFT's set_adapter marks
        # every active adapter trainable, so the earlier ones are re-frozen below.
        peft.base_model.set_adapter([new] if self.merged else self.adapters)
        layers = lora_layers(peft)
        for _, layer in layers:
            for attr in layer.adapter_layer_names:
                for adapter, part in getattr(layer, attr).items():
                    part.requires_grad_(adapter == new)
        self._prepare_penalty(layers, new)

    def _add_task_adapter(self, ctx: TaskContext) -> PeftModel:
        """The PeftModel with this task's new adapter added (seeded by the task)."""
        family, name = ctx.family, f"task{ctx.t}"
        backbone = family.backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            if not isinstance(backbone, PeftModel):  # task 1, or any task on a merged base
                backbone = get_peft_model(backbone, copy.deepcopy(ctx.lora_config),
                                          adapter_name=name)
                family.set_backbone(backbone)
            elif not self.adapters:  # task 1 on the user's `lora.init_adapter`: train that one
                name = backbone.active_adapter
            else:
                backbone.add_adapter(name, copy.deepcopy(ctx.lora_config))
        self.adapters.append(name)
        return backbone

    def _prepare_penalty(self, layers: list[tuple[str, nn.Module]], new: str) -> None:
        """Penalty groups from the kept A's of the finished adapters and the new A's (live)."""
        new_A, new_params = {}, []
        for key, layer in layers:
            if new not in layer.lora_A:
                continue
            new_A[key] = layer.lora_A[new].weight
            new_params += [new_A[key], layer.lora_B[new].weight]
        old_A = {key: [f[key].A.to(a.dtype) for f in self.finished if key in f]
                 for key, a in new_A.items()}
        self.groups = build_penalty_groups(old_A, new_A)
        self.l2_groups = group_by_shape(new_params)

    def extra_loss(self, batch, outputs) -> torch.Tensor | None:
        terms = []
        if self.lambda1_now > 0:
            penalty = orthogonality_penalty(self.groups, self.options.orthogonal_norm)
            if penalty is not None:
                terms.append(self.lambda1_now * penalty)
        if self.options.lambda2 > 0:
            terms.append(self.options.lambda2 * squared_l2(self.l2_groups))
        return sum(terms[1:], terms[0]) if terms else None

    def adopt(self, ctx: TaskContext) -> None:
        """The old adapter is a finished adapter: its A's enter the next task's penalty."""
        self.adapters.append(ctx.family.backbone.active_adapter)
        self.after_task(ctx)

    def after_task(self, ctx: TaskContext) -> None:
        peft = ctx.family.backbone
        check_adapter_tensors(peft)
        self.finished.append(lora_factors(peft, self.adapters[-1]))
        if self.merged:  # W0 ← W0 + ΔW_t in float32; the next task attaches one fresh adapter
            ctx.family.set_backbone(merge_in_float32(peft, self.masters))

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        history = list(self.finished)
        backbone = ctx.family.backbone
        if len(history) < len(self.adapters) and isinstance(backbone, PeftModel):
            history.append(lora_factors(backbone, self.adapters[-1]))  # called mid-task
        return {**export_concatenated(ctx, history, out_dir),
                "adapters": self.adapters[:len(history)],
                "frozen_adapters": self.options.frozen_adapters}
