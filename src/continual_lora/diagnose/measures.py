"""The diagnosis's measures: pure functions of tensors, computed in float64.

Conventions (the tests check each against hand-computed values):

* **Opposed-parameter ratio** of an update τ_j against an earlier τ_i (seed 003, Figure 2):
  ‖τ_j restricted to the entries where sign(τ_j) ≠ sign(τ_i), both nonzero‖ / ‖τ_j‖. Identical
  updates give 0, exactly opposite ones give 1, and two updates whose signs are unrelated give
  about √½ ≈ 0.71 (half the entries, by squared norm, disagree): that is the level to compare
  with, not 0.
* **Cosine** of two updates, over all their entries.
* **Subspace overlap** of two subspaces with orthonormal bases U (d×p) and V (d×q): the mean of
  the squared cosines of their min(p, q) principal angles, ‖UᵀV‖²_F / min(p, q). 1: one contains
  the other; 0: orthogonal. Two random subspaces give about max(p, q) / d.
* **Linear CKA** (Kornblith et al. 2019) of two representations of the same n examples,
  X (n×d1) and Y (n×d2), columns centred: ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F). 1 for a representation
  and any orthogonal rotation or isotropic scaling of it.
* **Relative norm** ‖ΔW‖_F / ‖W0‖_F.

Sums that a layer aggregates over several modules (the opposed ratio and the cosine of a layer
are those of its modules' entries taken together) are returned as parts, added, then divided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A singular value below RANK_TOL · (the largest) does not count towards a subspace: float32
# factors carry rounding at about 1e-7 of their scale, and an exact cancellation (the earlier
# tasks' blocks of two cumulative exports) leaves values many orders below that.
RANK_TOL = 1e-6
#: Opposed-parameter ratio of two updates whose signs are independent: √½.
CHANCE_OPPOSED = math.sqrt(0.5)


@dataclass
class Factored:
    """A low-rank update ΔW = left @ right (left d_out×k, right k×d_in), kept factored so that
    its subspaces come from a k×k problem, however large the layer."""

    left: torch.Tensor
    right: torch.Tensor

    @staticmethod
    def of(left: torch.Tensor, right: torch.Tensor) -> Factored:
        return Factored(left.double(), right.double())

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def minus(self, other: Factored) -> Factored:
        """self − other, still factored (rank up to the sum of both ranks)."""
        return Factored(torch.cat([self.left, -other.left], dim=1),
                        torch.cat([self.right, other.right], dim=0))

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]


# -- signs and directions --------------------------------------------------------------------------


def opposed_parts(reference: torch.Tensor, update: torch.Tensor) -> tuple[float, float]:
    """(Σ update² over the entries whose sign opposes `reference`'s, both nonzero; Σ update²)."""
    reference, update = reference.double(), update.double()
    opposed = torch.sign(reference) * torch.sign(update) < 0
    return float(update[opposed].pow(2).sum()), float(update.pow(2).sum())


def opposed_ratio(reference: torch.Tensor, update: torch.Tensor) -> float:
    """‖update where its sign opposes reference's‖ / ‖update‖ (NaN for a zero update)."""
    return sqrt_ratio(*opposed_parts(reference, update))


def sqrt_ratio(numerator_sq: float, denominator_sq: float) -> float:
    """√(numerator² / denominator²): a ratio of norms from sums of squares (NaN over zero)."""
    return math.sqrt(numerator_sq / denominator_sq) if denominator_sq > 0 else math.nan


def cosine_parts(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(⟨a, b⟩, ‖a‖², ‖b‖²) over all entries."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b), float(a @ a), float(b @ b)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two updates over all their entries (NaN if either is zero)."""
    return cosine_of_parts(*cosine_parts(a, b))


def cosine_of_parts(dot: float, a_sq: float, b_sq: float) -> float:
    return dot / math.sqrt(a_sq * b_sq) if a_sq > 0 and b_sq > 0 else math.nan


# -- subspaces -------------------------------------------------------------------------------------


def _keep(singular: torch.Tensor, k: int) -> int:
    """How many leading singular vectors span the update: at most `k`, and only those whose
    singular value is not rounding noise."""
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return 0
    return min(k, int((singular >= RANK_TOL * singular[0]).sum()))


def dense_subspaces(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output basis d_out×m, input basis d_in×m): the top-m left and right singular vectors of
    a dense update, m = min(k, its numerical rank)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    m = _keep(s, k)
    return u[:, :m], vh[:m].T


def factored_subspaces(delta: Factored, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`dense_subspaces` of left @ right without forming it: left = Q_l R_l, rightᵀ = Q_r R_r,
    so ΔW = Q_l (R_l R_rᵀ) Q_rᵀ and the SVD of the small core gives the singular vectors."""
    q_left, r_left = torch.linalg.qr(delta.left)
    q_right, r_right = torch.linalg.qr(delta.right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    m = _keep(s, k)
    return q_left @ u[:, :m], q_right @ vh[:m].T


def principal_cosines(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(U) and span(V) (orthonormal columns),
    largest first: the singular values of UᵀV."""
    if U.shape[1] == 0 or V.shape[1] == 0:
        return torch.empty(0, dtype=torch.float64)
    return torch.linalg.svdvals(U.double().T @ V.double()).clamp(0.0, 1.0)


def subspace_overlap(U: torch.Tensor, V: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between span(U) and span(V), in [0, 1]
    (NaN when either is empty)."""
    cosines = principal_cosines(U, V)
    return float(cosines.pow(2).mean()) if cosines.numel() else math.nan


def chance_overlap(p: int, q: int, d: int) -> float:
    """Expected `subspace_overlap` of random p- and q-dimensional subspaces of R^d:
    E‖UᵀV‖²_F = pq/d, over min(p, q) angles."""
    return max(p, q) / d if min(p, q) > 0 else math.nan


# -- representations and sizes ---------------------------------------------------------------------


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA of two representations (rows: the same examples)."""
    X = X.double() - X.double().mean(0, keepdim=True)
    Y = Y.double() - Y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(Y.T @ X) ** 2
    norms = torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y)
    return float(cross / norms) if float(norms) > 0 else math.nan


def relative_norm(delta: torch.Tensor, base: torch.Tensor) -> float:
    """‖ΔW‖_F / ‖W0‖_F."""
    return sqrt_ratio(float(delta.double().pow(2).sum()), float(base.double().pow(2).sum()))


# -- across runs -----------------------------------------------------------------------------------


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def tie_close(values: list[float], tolerance: float) -> list[float]:
    """`values` with those closer than `tolerance` to their neighbour (in sorted order) set
    equal, to the first of their group: differences below a measure's resolution must not
    order runs."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = list(values)
    for previous, current in zip(order, order[1:], strict=False):
        if values[current] - values[previous] < tolerance:
            out[current] = out[previous]
    return out


def spearman(xs, ys) -> float:
    """Spearman's rank correlation of two equally long sequences (NaN when either is constant)."""
    rx, ry = _ranks(list(xs)), _ranks(list(ys))
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan
