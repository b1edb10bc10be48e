"""ortho_init (Merge & Orthogonal Init): Merge & Init, with each new A started orthogonal to the
earlier A's. The math is in module-level functions, on plain tensors."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from pydantic import BaseModel, ConfigDict
from torch import nn

from continual_lora.adapters import (
    LoraFactors,
    lora_factors,
)
from continual_lora.registry import register_strategy
from continual_lora.strategies.base import (
    Strategy,
    TaskContext,
    check_adapter_tensors,
    ensure_adapter,
    export_concatenated,
)

RANK_TOL = 1e-6  # singular values below RANK_TOL · s_max do not count towards the row space
VANISHED = 1e-6  # a projected row shorter than VANISHED · its old norm is treated as zero


class OrthoInitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    mode: Literal["subspace", "column"] = "subspace"
    """`subspace`: rows of A_t orthogonal to the whole row space of the earlier A's;
    `column` (the diffusion paper's code): row i orthogonal to row i of Σ_{s<t} A_s only."""


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


def accumulated_rows(old: list[torch.Tensor], r: int) -> torch.Tensor:
    """Σ_{s<t} A_s, row by row, as an r×d_in matrix (row i sums the A_s that have a row i)."""
    acc = torch.zeros(r, old[0].shape[1], dtype=torch.float64)
    for A_s in old:
        n = min(r, A_s.shape[0])
        acc[:n] += A_s[:n].double()
    return acc


def column_init(A: torch.Tensor, previous: torch.Tensor, name: str = "") -> torch.Tensor:
    """Row i of A made orthogonal to row i of `previous` (Σ_{s<t} A_s), rescaled to its norm.

    For a 1-row matrix p = U Σ Vᴴ, the right-singular vectors of the zero singular values span
    p's orthogonal complement; the paper's code takes one of them. We project the single direction
    p/‖p‖ out of the standard draw instead: also orthogonal to p, and still random. A zero row of
    `previous` leaves its row as drawn. Rows are orthogonal pairwise only: row i of A can have
    any inner product with row j ≠ i of earlier A's.
    """
    A64, P = A.double(), previous.double()
    p_norm = P.norm(dim=1, keepdim=True)
    unit = torch.where(p_norm > 0, P / p_norm.clamp_min(torch.finfo(P.dtype).tiny),
                       torch.zeros_like(P))
    projected = A64 - (A64 * unit).sum(1, keepdim=True) * unit
    out = rescale_rows(projected, A)
    if out is None:
        warnings.warn(f"ortho_init: {name}: a row of the new A is parallel to the earlier row; "
                      "plain init for this module", stacklevel=2)
        return A
    return out.to(A.dtype)


# -- the strategy --------------------------------------------------------------------------------


def _lora_layers(model: PeftModel, adapter: str) -> list[tuple[str, nn.Module]]:
    prefix = "base_model.model."
    return [(name.removeprefix(prefix), m) for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and adapter in m.lora_A]


@register_strategy
class OrthoInitStrategy(Strategy):
    """Merge & Orthogonal Init (seed 003): after task t, W0 ← W0 + ΔW_t (PEFT's merge) and a fresh
    adapter; before task t ≥ 2 its A_t (drawn with the standard init, B_t = 0) is made orthogonal
    to the A's of the earlier tasks, module by module (`mode`, see the functions above). Heads
    are kept per task. A module without earlier A's keeps its plain init.

    The exported adapter of task t is the exact Σ_{s≤t} ΔW_s as one PEFT adapter of rank Σ r_s,
    as in merge_reinit.
    """

    name = "ortho_init"
    Options = OrthoInitOptions
    summary = "merge each task's adapter, start the next one orthogonal to the earlier A's"
    new_adapter_per_task = True

    def __init__(self, options=None):
        super().__init__(options)
        self.history: list[dict[str, LoraFactors]] = []

    def before_task(self, ctx: TaskContext) -> None:
        ensure_adapter(ctx)
        if self.history:
            self.orthogonalise(ctx.family.backbone)

    def orthogonalise(self, peft: PeftModel, adapter: str = "default") -> None:
        """Overwrite each A of `adapter` with its orthogonal version (B = 0: the model's output
        is unchanged)."""
        with torch.no_grad():
            for key, layer in _lora_layers(peft, adapter):
                old = [h[key].A for h in self.history if key in h]
                if not old:
                    continue
                weight = layer.lora_A[adapter].weight
                A = weight.detach().float().cpu()
                if self.options.mode == "subspace":
                    new = subspace_init(A, torch.cat(old, dim=0), key)
                else:
                    new = column_init(A, accumulated_rows(old, A.shape[0]), key)
                weight.copy_(new.to(weight.dtype))

    def after_task(self, ctx: TaskContext) -> None:
        peft_model = ctx.family.backbone
        check_adapter_tensors(peft_model)
        self.history.append({k: LoraFactors(f.A.cpu(), f.B.cpu(), f.scaling)
                             for k, f in lora_factors(peft_model).items()})
        ctx.family.set_backbone(peft_model.merge_and_unload())

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        return {**export_concatenated(ctx, self.history, out_dir),
                "tasks_merged": len(self.history)}
