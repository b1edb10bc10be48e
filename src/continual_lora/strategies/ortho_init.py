"""ortho_init (Merge & Orthogonal Init): each new A starts orthogonal to the earlier A's, and the
finished adapter is merged, either into the base weights (`merge: dense`, as merge_reinit) or,
as the diffusion paper's public code does, into one running LoRA by adding the factors
(`merge: factors`). The math is in module-level functions, on plain tensors."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel
from pydantic import BaseModel, ConfigDict

from continual_lora.adapters import (
    LoraFactors,
    lora_factors,
    lora_layers,
    save_factors_as_adapter,
)
from continual_lora.config import ConfigError
from continual_lora.registry import register_strategy
from continual_lora.strategies.base import (
    AdapterError,
    Strategy,
    TaskContext,
    check_adapter_tensors,
    ensure_adapter,
    export_concatenated,
    merge_into_base,
)

RANK_TOL = 1e-6  # singular values below RANK_TOL · s_max do not count towards the row space
VANISHED = 1e-6  # a projected row shorter than VANISHED · its old norm is treated as zero
TRAINED = "default"  # the PEFT adapter trained on the task at hand
SUM_ADAPTER = "ortho_sum"  # `merge: factors`: the frozen running sum of the finished adapters


class OrthoInitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    mode: Literal["subspace", "column"] = "subspace"
    """`subspace`: the rows of A_t are projected off the whole row space of the earlier A's
    (A_t A_sᵀ = 0 for every s < t). `column` (the diffusion paper's code): per input index j,
    A_t[:, j] is a unit vector orthogonal to the previous A's column j (the running factor sum's
    A with `merge: factors`, the last merged adapter's A with `merge: dense`); it replaces the
    random draw."""
    merge: Literal["dense", "factors"] = "dense"
    """`dense`: after each task W0 ← W0 + ΔW_t (in float32), then a fresh adapter, as
    merge_reinit. `factors` (the diffusion paper's code): one LoRA is kept and the factors are
    added, A ← A_old + A_t, B ← B_old + B_t, so the model is W0 + s(B_old+B_t)(A_old+A_t), cross
    terms included; every task's adapter must then have the same rank and scaling."""


# -- the math ------------------------------------------------------------------------------------


def row_space_basis(S: torch.Tensor, rel_tol: float = RANK_TOL) -> torch.Tensor:
    """Orthonormal rows Q (m×d_in) spanning the row space of S (k×d_in), from the SVD, keeping
    singular values ≥ rel_tol · s_max (m = numerical rank of S)."""
    _, s, vh = torch.linalg.svd(S.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return vh[:0]
    return vh[s >= rel_tol * s[0]]


def project_to_complement(A: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """A − (A Qᵀ) Q: the rows of A with their components in span(Q) removed (Q orthonormal)."""
    A = A.double()
    return A - (A @ Q.T) @ Q


def rescale_rows(projected: torch.Tensor, original: torch.Tensor) -> torch.Tensor | None:
    """Each projected row scaled back to the norm its original row had, or None when a projected
    row vanished (nothing of it was left outside the subspace)."""
    old_norm = original.double().norm(dim=1, keepdim=True)
    new_norm = projected.norm(dim=1, keepdim=True)
    if bool((new_norm <= VANISHED * old_norm).any()):
        return None
    return projected * (old_norm / new_norm)


def subspace_init(A: torch.Tensor, S: torch.Tensor, name: str = "") -> torch.Tensor:
    """A (r×d_in, a standard draw) made orthogonal to the row space of S = [A_1; …; A_{t-1}]:
    A ← A − (A Qᵀ) Q, rows rescaled to their norms, so A Sᵀ = 0.

    The complement is empty when rank(S) = d_in (always so for a generic S with k ≥ d_in; we test
    the numerical rank, so a rank-deficient S with k ≥ d_in still gets projected). Then, or when a
    row vanishes under the projection, warn and return A unchanged (the plain init).
    """
    Q = row_space_basis(S)
    d_in = A.shape[1]
    if Q.shape[0] >= d_in:
        warnings.warn(f"ortho_init: {name}: the earlier A's span all of R^{d_in} (rank "
                      f"{Q.shape[0]}), no orthogonal complement is left; plain init for this "
                      "module", stacklevel=2)
        return A
    out = rescale_rows(project_to_complement(A, Q), A)
    if out is None:
        warnings.warn(f"ortho_init: {name}: a row of the new A lies in the span of the earlier "
                      "A's; plain init for this module", stacklevel=2)
        return A
    return out.to(A.dtype)


def orthogonal_columns(previous: torch.Tensor) -> torch.Tensor:
    """[r, d_in] → [r, d_in]: column j is vh[-1] of the SVD of the 1×r matrix previous[:, j]ᵀ,
    the right-singular vector of its smallest singular value (the paper's code, one batched
    float64 SVD over the d_in columns instead of its Python loop).

    For r ≥ 2 that vector has unit norm and is orthogonal to previous[:, j]; its sign is
    whatever torch's SVD returns. A zero column (the previous A ignores input j) has only zero
    singular values: vh[-1] is then still a unit vector (torch returns the standard basis), and
    trivially orthogonal to it; we keep it, as the paper's code does.
    """
    columns = previous.double().T.unsqueeze(1)  # [d_in, 1, r]: each column as a 1×r matrix
    _, _, vh = torch.linalg.svd(columns, full_matrices=True)  # vh: [d_in, r, r]
    return vh[:, -1, :].T.contiguous()


def column_init(A: torch.Tensor, previous: torch.Tensor, name: str = "") -> torch.Tensor:
    """The new A (r×d_in; `A` is the standard draw) in `column` mode: `orthogonal_columns` of
    `previous` (r×d_in), replacing the draw: unit-norm columns, no rescaling.

    Only each column pair is orthogonal (<A_t, A_old>_F = 0), not the row spaces: A_t A_oldᵀ ≠ 0
    in general. With r = 1 there is no unit vector orthogonal to a non-zero number, and a
    `previous` of another shape (an update that changed the rank) has no column to pair with:
    both warn and return the draw (the plain init).
    """
    if previous.shape != A.shape:
        warnings.warn(f"ortho_init: {name}: the previous A is {tuple(previous.shape)}, the new "
                      f"one {tuple(A.shape)}: no column to pair with; plain init for this "
                      "module", stacklevel=2)
        return A
    if A.shape[0] < 2:
        warnings.warn(f"ortho_init: {name}: rank 1 leaves no direction orthogonal to a column "
                      "(column mode needs lora.r ≥ 2); plain init for this module", stacklevel=2)
        return A
    return orthogonal_columns(previous).to(A.dtype)


def add_factors(running: dict[str, LoraFactors],
                trained: dict[str, LoraFactors]) -> dict[str, LoraFactors]:
    """The paper's `merge_loras`: A ← A_old + A_t, B ← B_old + B_t, per module, with each
    scaling folded into its B (the sum has scaling 1): s(B_old + B_t)(A_old + A_t) when the
    scalings are equal, as they are in a run. A module in only one of the two is kept as is.
    Raises ValueError when a module's factors differ in shape (they cannot be added)."""
    out = dict(running)
    for key, f in trained.items():
        folded = LoraFactors(f.A, f.scaling * f.B, 1.0)
        old = running.get(key)
        if old is None:
            out[key] = folded
            continue
        if old.A.shape != f.A.shape or old.B.shape != f.B.shape:
            raise ValueError(f"{key}: A {tuple(f.A.shape)}, B {tuple(f.B.shape)} cannot be "
                             f"added to the running sum's A {tuple(old.A.shape)}, B "
                             f"{tuple(old.B.shape)}")
        out[key] = LoraFactors(old.A + f.A.to(old.A.device),
                               old.B + folded.B.to(old.B.device), 1.0)
    return out


# -- the strategy --------------------------------------------------------------------------------


@register_strategy
class OrthoInitStrategy(Strategy):
    """Merge & Orthogonal Init (seed 003). Before task t ≥ 2 the new adapter's A (drawn with the
    standard init, B = 0, so the model's output is unchanged) is made orthogonal, module by
    module, to what came before (`mode`): the A's of every earlier task (`subspace`), or column
    by column the previous A (`column`). Convolutions' A [r, in, k, k] are flattened to
    [r, in·k·k] for the math. A module without earlier A's keeps its plain init. Heads are kept
    per task.

    `merge: dense`: after task t, W0 ← W0 + ΔW_t, added in float32 whatever the base's dtype
    (`merge_into_base`), then a fresh adapter. The exported adapter of task t is the exact
    Σ_{s≤t} ΔW_s as one PEFT adapter of rank Σ r_s, as in merge_reinit.

    `merge: factors`, what the paper's code does (`init_lora_with_checkpoint_rotate`,
    `merge_loras`): the running sum (A_sum, B_sum) of the finished adapters' factors is a
    frozen PEFT adapter `ortho_sum` (scaling folded into B, no dropout) on the untouched base;
    task t trains a fresh adapter (A_t orthogonal, B_t = 0) beside it, so while task t trains
    the model is W0 + B_sum A_sum + s B_t A_t (the paper fuses the sum into the U-Net, then
    trains a new LoRA on top). After the task the factors are added, A_sum ← A_sum + A_t,
    B_sum ← B_sum + s B_t, the trained adapter is removed, and the model is
    W0 + B_sum A_sum: cross terms B_sum A_t and B_t A_sum included, which training did not see.
    The exported adapter of task t is that sum, one PEFT adapter of rank r. `subspace` mode
    projects off every earlier task's own A (their span holds A_sum's rows).
    """

    name = "ortho_init"
    Options = OrthoInitOptions
    summary = "merge each task's adapter, start the next one orthogonal to the earlier A's"
    new_adapter_per_task = True

    def __init__(self, options=None):
        super().__init__(options)
        self.history: list[dict[str, LoraFactors]] = []  # each finished task's own factors
        self.masters: dict[str, torch.Tensor] = {}  # dense: float32 copies of a bf16/fp16 base
        self.running: dict[str, LoraFactors] = {}  # factors: Σ A_s and Σ s·B_s, scaling 1

    @property
    def factors(self) -> bool:
        return self.options.merge == "factors"

    # -- before a task -----------------------------------------------------------------------

    def before_task(self, ctx: TaskContext) -> None:
        peft = self._task_adapter(ctx) if self.factors else None
        if peft is None:
            ensure_adapter(ctx)
            peft = ctx.family.backbone
        if self.history:
            self.orthogonalise(peft)
        if self.factors:
            self._check_summable(peft)
            activate(peft, [SUM_ADAPTER, TRAINED] if SUM_ADAPTER in peft.peft_config
                     else [TRAINED], trainable=TRAINED)

    def _task_adapter(self, ctx: TaskContext) -> PeftModel | None:
        """`factors`: the backbone with a fresh trained adapter beside the running sum (seeded
        by the task, as `attach_lora`), or None when `ensure_adapter` applies (task 1)."""
        backbone = ctx.family.backbone
        if not isinstance(backbone, PeftModel) or SUM_ADAPTER not in backbone.peft_config:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            backbone.add_adapter(TRAINED, copy.deepcopy(ctx.lora_config))
        return backbone

    def previous_a(self, key: str) -> torch.Tensor | None:
        """What the new A of module `key` is made orthogonal to, as a float32 CPU matrix
        [k, d_in]: every earlier task's A stacked (`subspace`), or the previous A (`column`:
        the running sum's with `merge: factors`, the last merged adapter's with `dense`)."""
        if self.options.mode == "subspace":
            old = [h[key].a_matrix for h in self.history if key in h]
            return torch.cat(old, dim=0).float().cpu() if old else None
        if self.factors:
            f = self.running.get(key)
        else:
            f = next((h[key] for h in reversed(self.history) if key in h), None)
        return None if f is None else f.a_matrix.float().cpu()

    def orthogonalise(self, peft: PeftModel, adapter: str = TRAINED) -> None:
        """Overwrite each A of `adapter` with its orthogonal version (B = 0: the model's output
        is unchanged)."""
        with torch.no_grad():
            for key, layer in lora_layers(peft, adapter):
                previous = self.previous_a(key)
                if previous is None:
                    continue
                weight = layer.lora_A[adapter].weight
                A = weight.detach().float().cpu().flatten(1)
                if self.options.mode == "subspace":
                    new = subspace_init(A, previous, key)
                else:
                    new = column_init(A, previous, key)
                weight.copy_(new.reshape(weight.shape).to(weight.dtype))

    def _check_summable(self, peft: PeftModel) -> None:
        """`factors` adds the new factors to the running sum: refuse, before training, a new
        adapter whose shapes differ (an update that changed the rank)."""
        try:
            add_factors(self.running, lora_factors(peft, TRAINED))
        except ValueError as exc:
            raise ConfigError(f"strategy.options.merge: factors adds each task's LoRA factors to "
                              f"the running sum, so every task needs the same rank and targets: "
                              f"{exc}. Keep the old adapter's rank, or use merge: dense") from None

    # -- after a task ------------------------------------------------------------------------

    def after_task(self, ctx: TaskContext) -> None:
        if not self.factors:
            merge_into_base(ctx, self.history, self.masters)
            return
        peft = ctx.family.backbone
        check_adapter_tensors(peft)
        trained = {k: LoraFactors(f.A.cpu(), f.B.cpu(), f.scaling)
                   for k, f in lora_factors(peft, TRAINED).items()}
        self.history.append(trained)
        self.running = add_factors(self.running, trained)
        write_sum_adapter(peft, self.running)
        activate(peft, [SUM_ADAPTER, TRAINED], trainable=None)
        peft.delete_adapter(TRAINED)  # the model is now W0 + B_sum A_sum
        activate(peft, [SUM_ADAPTER], trainable=None)

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        if not self.factors:
            return {**export_concatenated(ctx, self.history, out_dir),
                    "tasks_merged": len(self.history), "merge": "dense"}
        if not self.running:
            raise AdapterError("no adapter has been trained yet: nothing to export")
        save_factors_as_adapter(self.running, ctx.family.fresh_backbone(), out_dir,
                                ctx.run.model.name_or_path)
        return {"kind": "peft_lora_factor_sum", "rank": sum_rank(self.running),
                "tasks_merged": len(self.history), "merge": "factors"}


# -- PEFT plumbing of `merge: factors` -----------------------------------------------------------


def sum_rank(running: dict[str, LoraFactors]) -> int:
    """The one rank of the running sum (a PEFT adapter needs one rank for all its modules)."""
    ranks = {f.A.shape[0] for f in running.values()}
    if len(ranks) != 1:
        raise AdapterError(f"ortho_init: the running factor sum has modules of ranks "
                           f"{sorted(ranks)}; one PEFT adapter needs one rank")
    return ranks.pop()


def write_sum_adapter(peft: PeftModel, running: dict[str, LoraFactors]) -> None:
    """(Re)create the frozen PEFT adapter `ortho_sum` holding `running` exactly: scaling 1
    (lora_alpha = r, the scalings are folded into B), no dropout (the paper fuses the sum into
    the weights), exactly the modules of the sum. The adapter is rebuilt rather than edited so
    that its targets always match the sum's modules."""
    if SUM_ADAPTER in peft.peft_config:
        activate(peft, [TRAINED], trainable=None)
        peft.delete_adapter(SUM_ADAPTER)
    rank = sum_rank(running)
    fan_in_fan_out = any(getattr(layer, "fan_in_fan_out", False)
                         for _, layer in lora_layers(peft, TRAINED))
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none",
                        target_modules=sorted(running), fan_in_fan_out=fan_in_fan_out)
    peft.add_adapter(SUM_ADAPTER, config)
    with torch.no_grad():
        for key, layer in lora_layers(peft, SUM_ADAPTER):
            a, b = layer.lora_A[SUM_ADAPTER].weight, layer.lora_B[SUM_ADAPTER].weight
            a.copy_(running[key].A.reshape(a.shape))
            b.copy_(running[key].B.reshape(b.shape))


def activate(peft: PeftModel, adapters: list[str], trainable: str | None) -> None:
    """Make `adapters` the active ones (PEFT adds every active adapter's s·B·A x) and only
    `trainable`'s LoRA parameters trainable (PEFT's set_adapter marks every active adapter
    trainable, the running sum included)."""
    peft.base_model.set_adapter(adapters)
    for _, layer in lora_layers(peft):
        for attr in layer.adapter_layer_names:
            for adapter, part in getattr(layer, attr).items():
                part.requires_grad_(adapter == trainable)
