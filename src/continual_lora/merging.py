"""Merge methods: pure tensor functions over DENSE updates `ΔW_i = s_i · B_i A_i`.

Each method takes a list of same-shape float tensors (one module's updates, one per adapter) and
returns one tensor. They merge the dense updates, not `A` and `B` separately: PEFT's
`add_weighted_adapter` combination types merge the factors, and a mean of factors is not the mean
of the updates (mean(B)·mean(A) ≠ mean(B·A)). The exact merge on factors, `cat`, lives in
`adapters.concatenate_factors`; `truncated_svd_factors` turns a dense result back into a LoRA.

Common convention for `weights` (every method but SVD): one number per delta, or one number for
all; each delta is multiplied by its weight before the merge. For task arithmetic that is the
weighted sum; for TIES and MagMax a single positive number λ selects exactly what an unweighted
merge selects and scales the result by λ (the λ of Yadav et al.), while per-delta weights weight
the deltas before sign election / selection (as PEFT's `ties` and mergekit's do).

Everything is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

Weights = float | Sequence[float] | None
DENSE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magmax")
DEFAULT_TIES_DENSITY = 0.2  # Yadav et al. 2023 keep the top 20% by default


def _stack(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The deltas as one float32 tensor `(n, *shape)`; refuses none or mixed shapes."""
    if len(deltas) == 0:
        raise ValueError("nothing to merge: no deltas given")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1:
        raise ValueError(f"deltas to merge must share one shape, got {sorted(shapes)}")
    return torch.stack([d.detach().float() for d in deltas])


def _weights(weights: Weights, n: int) -> torch.Tensor:
    """Per-delta weights as a float32 vector of length `n` (None: all 1)."""
    if weights is None:
        return torch.ones(n)
    if isinstance(weights, int | float):
        return torch.full((n,), float(weights))
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(f"weights: {len(values)} given for {n} deltas (give one per delta, "
                         "or a single number for all)")
    return torch.tensor(values)


def _weighted(stack: torch.Tensor, weights: Weights) -> torch.Tensor:
    w = _weights(weights, stack.shape[0]).to(stack.device)
    return stack * w.view(-1, *([1] * (stack.dim() - 1)))


# Streaming merges work on blocks of this many entries (1 MiB of float32): the T deltas' blocks
# stay in the CPU cache while they are combined, so each input entry is read from memory once
# and each output entry written once, as in a copy, and no (T, *shape) stack is ever made.
BLOCK = 1 << 18


def _flat_inputs(deltas: Sequence[torch.Tensor], weights: Weights
                 ) -> tuple[list[torch.Tensor], list[float], torch.Size]:
    """The deltas as flat views (no copy), their weights, and their common shape."""
    if len(deltas) == 0:
        raise ValueError("nothing to merge: no deltas given")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1:
        raise ValueError(f"deltas to merge must share one shape, got {sorted(shapes)}")
    flats = [d.detach().reshape(-1) for d in deltas]
    return flats, _weights(weights, len(deltas)).tolist(), deltas[0].shape


def _block(flat: torch.Tensor, start: int, weight: float) -> torch.Tensor:
    """`weight · flat[start:start+BLOCK]` in float32 (a view when nothing needs computing)."""
    block = flat[start:start + BLOCK].float()
    return block if weight == 1.0 else block * weight


def task_arithmetic(deltas: Sequence[torch.Tensor], weights: Weights = None) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"):
    `Σ_i w_i ΔW_i`, summed in order (i = 1, 2, ...), block by block (see BLOCK)."""
    flats, w, shape = _flat_inputs(deltas, weights)
    out = torch.empty(flats[0].numel(), dtype=torch.float32, device=flats[0].device)
    for start in range(0, out.numel(), BLOCK):
        acc = out[start:start + BLOCK]
        first = _block(flats[0], start, w[0])
        if len(flats) == 1:
            acc.copy_(first)
            continue
        # the first two in one pass, then each further delta added in place
        torch.add(first, flats[1][start:start + BLOCK].float(), alpha=w[1], out=acc)
        for flat, weight in zip(flats[2:], w[2:], strict=True):
            acc.add_(flat[start:start + BLOCK].float(), alpha=weight)
    return out.view(shape)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the top-`density` fraction of entries of one tensor by magnitude, zero
    the rest. `k = floor(density · numel)` (at least 1), and every entry with |x| ≥ the k-th
    largest |x| is kept, so entries tied at the threshold are all kept (as the reference code's
    `topk_values_mask` does)."""
    _check_density(density)
    flat = delta.float().abs().flatten()
    k = max(1, math.floor(density * flat.numel() + 1e-9))  # 0.29·100 is 28.99…
    if k >= flat.numel():
        return delta.float().clone()
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    return torch.where(delta.float().abs() >= threshold, delta.float(), 0.0)


def elect_and_mean(trimmed: torch.Tensor) -> torch.Tensor:
    """TIES steps 2–3 over a stack `(n, *shape)` of trimmed deltas.

    Elect: the sign of the summed values per entry (the sign with the larger total magnitude).
    Disjoint mean: the mean over the deltas whose entry is non-zero and has the elected sign.
    Where the sum is exactly 0 there is no elected sign and the entry is 0 (our choice: the
    reference code falls back to the sign of the whole tensor's sum there).
    """
    elected = torch.sign(trimmed.sum(0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agrees.sum(0)
    total = torch.where(agrees, trimmed, 0.0).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def ties(deltas: Sequence[torch.Tensor], density: float = DEFAULT_TIES_DENSITY,
         weights: Weights = None) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
    Models"): trim each delta to its top-`density` magnitudes, weight it, elect the sign per
    entry, take the disjoint mean. A single weight is the paper's λ (scales the result)."""
    stack = _stack(deltas)
    trimmed = torch.stack([trim(d, density) for d in stack])
    return elect_and_mean(_weighted(trimmed, weights))


def dare_drop(delta: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's Drop And REscale on one tensor: each entry is dropped with probability `p` and
    the kept ones are multiplied by exactly `1/(1-p)`, so the expectation equals the input."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    draws = torch.rand(delta.shape, generator=generator, device=generator.device)
    keep = (draws >= drop_rate).to(delta.device)  # P(keep) = 1 - p
    return torch.where(keep, delta.float() / (1.0 - drop_rate), 0.0)


def dare(deltas: Sequence[torch.Tensor], drop_rate: float, generator: torch.Generator,
         then: Literal["linear", "ties"] = "linear", weights: Weights = None,
         density: float = 1.0) -> torch.Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch"): drop and rescale every delta (`dare_drop`), then merge
    by task arithmetic (`then="linear"`) or by TIES (`then="ties"`).

    With `then="ties"` the random drop takes the place of TIES's magnitude trim, as in PEFT's
    and mergekit's `dare_ties`: `density` defaults to 1 (no extra trim); below 1 the magnitude
    trim is applied after the drop as well.
    """
    stack = _stack(deltas)
    dropped = [dare_drop(d, drop_rate, generator) for d in stack]
    if then == "linear":
        return task_arithmetic(dropped, weights)
    if then == "ties":
        return ties(dropped, density, weights)
    raise ValueError(f"dare: `then` must be 'linear' or 'ties', got {then!r}")


def magmax(deltas: Sequence[torch.Tensor], weights: Weights = None) -> torch.Tensor:
    """MagMax (Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual
    Learning"): per entry, the value of the delta with the largest magnitude,
    `τ[p] = τ_k[p]`, `k = argmax_i |τ_i[p]|`, sign included. Ties in magnitude go to the
    earliest delta (`torch.argmax` returns the first maximal index), which makes the running
    form `magmax([magmax(τ_1..τ_{t-1}), τ_t])` equal to `magmax(τ_1..τ_t)`."""
    flats, w, shape = _flat_inputs(deltas, weights)
    n, device = flats[0].numel(), flats[0].device
    out = torch.empty(n, dtype=torch.float32, device=device)
    # Scratch blocks made once and reused. The selection is done on the float32 bit patterns
    # (as int32): a magnitude |x| has sign bit 0, and non-negative floats order as their bit
    # patterns do, so `(largest − |v|) >> 31` is all ones exactly where |v| > largest (strictly:
    # a tie keeps the earlier delta) and 0 elsewhere; `chosen ^= (chosen ^ v) & mask` then takes
    # v's bits there. Exact, and several times faster here than `torch.where`.
    size = min(BLOCK, n)
    magnitude = torch.empty(size, device=device)
    largest, mask, differ = (torch.empty(size, dtype=torch.int32, device=device)
                             for _ in range(3))
    for start in range(0, n, BLOCK):  # block by block (see BLOCK)
        chosen = out[start:start + BLOCK]
        m = chosen.numel()
        chosen.copy_(_block(flats[0], start, w[0]))
        chosen_bits, mag, top = chosen.view(torch.int32), magnitude[:m], largest[:m]
        top.copy_(torch.abs(chosen, out=mag).view(torch.int32))
        for flat, weight in zip(flats[1:], w[1:], strict=True):
            value = _block(flat, start, weight).contiguous()
            mag_bits = torch.abs(value, out=mag).view(torch.int32)
            torch.sub(top, mag_bits, out=mask[:m]).bitwise_right_shift_(31)
            torch.bitwise_xor(chosen_bits, value.view(torch.int32), out=differ[:m])
            chosen_bits.bitwise_xor_(differ[:m].bitwise_and_(mask[:m]))
            torch.maximum(top, mag_bits, out=top)
    return out.view(shape)


def truncated_svd_factors(delta: torch.Tensor, rank: int
                          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`(A, B, relative_error)` with `ΔW ≈ B A`, `A: (rank, d_in)`, `B: (d_out, rank)`, the best
    rank-`rank` approximation (Eckart–Young), `relative_error = ‖ΔW − BA‖_F / ‖ΔW‖_F` (0 when
    ΔW = 0).

    The singular values are split evenly, `B = U √S`, `A = √S Vᵀ`: then ‖B‖_F = ‖A‖_F and each
    column of B has the norm of the matching row of A, so neither factor carries the whole scale.
    That keeps the two factors' gradients on the same scale if the exported adapter is trained
    further (the gradient of A is scaled by B and vice versa), and keeps either factor from
    overflowing when stored in half precision. A `rank` above min(d_out, d_in) is padded with
    zero rows/columns, so adapters of several modules can share one rank.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if delta.dim() != 2:
        raise ValueError(f"truncated SVD needs a 2-D update, got shape {tuple(delta.shape)}")
    dense = delta.detach().float()
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B = torch.zeros(dense.shape[0], rank, device=dense.device)
    A = torch.zeros(rank, dense.shape[1], device=dense.device)
    B[:, :k] = U[:, :k] * root
    A[:k] = root[:, None] * Vh[:k]
    norm = torch.linalg.norm(dense)
    error = 0.0 if norm == 0 else float(torch.linalg.norm(dense - B @ A) / norm)
    return A, B, error


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


# Which options each method takes (beyond the deltas), for `merge_dense`'s checks.
_OPTIONS = {
    "task_arithmetic": {"weights"},
    "ties": {"weights", "density"},
    "dare_linear": {"weights", "drop_rate", "generator"},
    "dare_ties": {"weights", "drop_rate", "generator", "density"},
    "magmax": {"weights"},
}
_REQUIRED = {"dare_linear": {"drop_rate", "generator"}, "dare_ties": {"drop_rate", "generator"}}


def merge_dense(method: str, deltas: Sequence[torch.Tensor], **opts) -> torch.Tensor:
    """Merge one module's dense updates by `method` (one of `DENSE_METHODS`).

    Options not used by the method, or missing required ones, are a ValueError naming them, so a
    misspelt or misplaced option never silently does nothing. `cat` is exact on factors, not a
    dense method: use `adapters.concatenate_factors`.
    """
    if method == "cat":
        raise ValueError("`cat` merges factors, not dense updates: use "
                         "adapters.concatenate_factors")
    if method not in _OPTIONS:
        raise ValueError(f"unknown merge method {method!r}; available: "
                         f"{', '.join(DENSE_METHODS)}, cat")
    given = {k for k, v in opts.items() if v is not None}
    unknown = sorted(given - _OPTIONS[method])
    if unknown:
        raise ValueError(f"merge method {method!r} does not take {', '.join(unknown)} "
                         f"(it takes: {', '.join(sorted(_OPTIONS[method]))})")
    missing = sorted(_REQUIRED.get(method, set()) - given)
    if missing:
        raise ValueError(f"merge method {method!r} needs {', '.join(missing)}")
    kwargs = {k: opts[k] for k in given}
    if method == "task_arithmetic":
        return task_arithmetic(deltas, **kwargs)
    if method == "ties":
        return ties(deltas, **kwargs)
    if method == "magmax":
        return magmax(deltas, **kwargs)
    return dare(deltas, then="linear" if method == "dare_linear" else "ties", **kwargs)
