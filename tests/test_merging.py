"""Merge methods on small matrices worked out by hand: task arithmetic, TIES, DARE, MagMax, the
truncated SVD export, and why the dense update (not A and B separately) is what gets merged."""

from __future__ import annotations

import math

import pytest
import torch

from continual_lora.adapters import LoraFactors, concatenate_factors
from continual_lora.merging import (
    dare,
    dare_drop,
    elect_and_mean,
    magmax,
    merge_dense,
    task_arithmetic,
    ties,
    trim,
    truncated_svd_factors,
)

T = torch.tensor

# Three 2×3 task vectors for the TIES example (density 0.5: keep 3 of 6 entries each).
TAU1 = T([[4.0, -1.0, 2.0], [-3.0, 0.5, 1.0]])  # |τ| top 3: 4, 3, 2
TAU2 = T([[-2.0, 5.0, -1.0], [1.0, -4.0, 0.5]])  # |τ| top 3: 5, 4, 2
TAU3 = T([[3.0, -6.0, -0.5], [-1.0, 2.0, 3.0]])  # |τ| top 3: 6, 3, 3 (3 twice)


def test_task_arithmetic_is_the_weighted_sum():
    a, b = T([[1.0, 2.0], [3.0, 4.0]]), T([[-1.0, 0.0], [2.0, -2.0]])
    # 2·a + 0.5·b = [[2−0.5, 4+0], [6+1, 8−1]]
    assert torch.equal(task_arithmetic([a, b], [2.0, 0.5]), T([[1.5, 4.0], [7.0, 7.0]]))
    assert torch.equal(task_arithmetic([a, b]), a + b)  # default weight 1
    assert torch.equal(task_arithmetic([a, b], 0.5), (a + b) / 2)  # one number for all


def test_ties_trim_keeps_top_density_per_tensor():
    assert torch.equal(trim(TAU1, 0.5), T([[4.0, 0.0, 2.0], [-3.0, 0.0, 0.0]]))
    assert torch.equal(trim(TAU2, 0.5), T([[-2.0, 5.0, 0.0], [0.0, -4.0, 0.0]]))
    assert torch.equal(trim(TAU3, 0.5), T([[3.0, -6.0, 0.0], [0.0, 0.0, 3.0]]))
    assert torch.equal(trim(TAU1, 1.0), TAU1)
    # Ties at the threshold are all kept: |x| = 1, 1, 1, 1 with density 0.25 keeps k=1 → all 4.
    assert torch.equal(trim(T([1.0, -1.0, 1.0, -1.0]), 0.25), T([1.0, -1.0, 1.0, -1.0]))


def test_ties_elect_and_disjoint_mean_by_hand():
    trimmed = torch.stack([trim(t, 0.5) for t in (TAU1, TAU2, TAU3)])
    # Sums: [[4−2+3, 5−6, 2], [−3, −4, 3]] = [[5, −1, 2], [−3, −4, 3]]
    # → elected signs [[+, −, +], [−, −, +]].
    # Disjoint mean over the entries agreeing with the elected sign:
    #   (0,0) +: 4 and 3 agree (−2 does not) → 3.5     (0,1) −: only −6 → −6
    #   (0,2) +: only 2 → 2                           (1,0) −: only −3 → −3
    #   (1,1) −: only −4 → −4                         (1,2) +: only 3 → 3
    expected = T([[3.5, -6.0, 2.0], [-3.0, -4.0, 3.0]])
    assert torch.equal(elect_and_mean(trimmed), expected)
    assert torch.equal(ties([TAU1, TAU2, TAU3], density=0.5), expected)
    # A single weight is λ: it scales the merged result.
    assert torch.equal(ties([TAU1, TAU2, TAU3], density=0.5, weights=2.0), 2 * expected)


def test_ties_per_delta_weights_act_before_the_election():
    # Weights [1, 3, 1]: τ2's trimmed entries become [[−6, 15, 0], [0, −12, 0]].
    # (0,0): 4 − 6 + 3 = 1 → + → mean(4, 3) = 3.5; (0,1): 15 − 6 = 9 → + → 15 (the sign flips
    # against the unweighted merge); the others are as before.
    merged = ties([TAU1, TAU2, TAU3], density=0.5, weights=[1.0, 3.0, 1.0])
    assert torch.equal(merged, T([[3.5, 15.0, 2.0], [-3.0, -12.0, 3.0]]))


def test_ties_no_elected_sign_gives_zero():
    # +1 and −1 cancel: no sign wins, the entry is 0; an entry kept by nobody is 0 too.
    assert torch.equal(ties([T([1.0, 0.0]), T([-1.0, 0.0])], density=1.0), T([0.0, 0.0]))


def test_dare_rescale_factor_is_exact():
    delta = torch.arange(1.0, 201.0).reshape(10, 20)
    out = dare_drop(delta, 0.75, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.equal(out[kept], delta[kept] * 4.0)  # 1 / (1 − 0.75) = 4, exactly
    assert 0.15 < kept.float().mean() < 0.35  # about 1 − p of the entries survive
    assert torch.equal(dare_drop(delta, 0.0, torch.Generator().manual_seed(0)), delta)


def test_dare_is_unbiased_in_expectation():
    torch.manual_seed(1)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    gen = torch.Generator().manual_seed(123)
    draws = torch.stack([dare([a, b], 0.5, gen, then="linear") for _ in range(4000)])
    # An entry's mean over 4000 draws has std sqrt(a² + b²)·sqrt(p/(1−p))/sqrt(4000) ≤ 0.037
    # here: 0.12 is over 3 std. Without the 1/(1−p) rescale the mean would be (a + b)/2.
    torch.testing.assert_close(draws.mean(0), a + b, atol=0.12, rtol=0)


def test_dare_ties_is_drop_then_ties_election():
    a, b = TAU1, TAU2
    merged = dare([a, b], 0.5, torch.Generator().manual_seed(7), then="ties")
    gen = torch.Generator().manual_seed(7)  # the same draws, in the same order
    dropped = [dare_drop(a, 0.5, gen), dare_drop(b, 0.5, gen)]
    assert torch.equal(merged, ties(dropped, density=1.0))


def test_magmax_selects_largest_magnitude_with_its_sign():
    t1 = T([[1.0, -5.0], [2.0, 0.0]])
    t2 = T([[-3.0, 4.0], [-2.0, 0.5]])
    # (0,0): |−3| > |1| → −3; (0,1): |−5| > |4| → −5 (sign kept);
    # (1,0): |2| = |−2|, a tie → the earlier delta, +2; (1,1): 0.5.
    assert torch.equal(magmax([t1, t2]), T([[-3.0, -5.0], [2.0, 0.5]]))
    assert torch.equal(magmax([t2, t1]), T([[-3.0, -5.0], [-2.0, 0.5]]))  # tie → earlier
    # The running form equals the one-shot form (ties keep going to the earliest).
    t3 = T([[2.0, 5.0], [-2.0, -0.5]])
    assert torch.equal(magmax([magmax([t1, t2]), t3]), magmax([t1, t2, t3]))


def _matrix_with_singular_values(values: list[float], rows: int, cols: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=gen))
    V, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=gen))
    return U @ torch.diag(T(values)) @ V.T


def test_truncated_svd_error_is_the_dropped_singular_values():
    delta = _matrix_with_singular_values([3.0, 2.0, 1.0], 5, 4)
    A, B, error = truncated_svd_factors(delta, 1)
    assert A.shape == (1, 4) and B.shape == (5, 1)
    # ‖ΔW − B A‖_F / ‖ΔW‖_F = sqrt(2² + 1²) / sqrt(3² + 2² + 1²)
    assert error == pytest.approx(math.sqrt(5 / 14), abs=1e-6)
    assert float(torch.linalg.norm(delta - B @ A) / torch.linalg.norm(delta)) == \
        pytest.approx(error, abs=1e-7)
    # Even split: ‖A‖ = ‖B‖ = sqrt(σ1) for rank 1.
    assert float(A.norm()) == pytest.approx(math.sqrt(3.0), abs=1e-5)
    assert float(B.norm()) == pytest.approx(math.sqrt(3.0), abs=1e-5)
    _, _, error2 = truncated_svd_factors(delta, 2)
    assert error2 == pytest.approx(math.sqrt(1 / 14), abs=1e-6)


def test_truncated_svd_exact_rank_padding_and_zero():
    delta = _matrix_with_singular_values([3.0, 2.0, 1.0], 5, 4)
    A, B, error = truncated_svd_factors(delta, 6)  # above min(5, 4): padded with zeros
    assert A.shape == (6, 4) and B.shape == (5, 6)
    assert torch.equal(A[4:], torch.zeros(2, 4)) and torch.equal(B[:, 4:], torch.zeros(5, 2))
    assert error < 1e-6
    torch.testing.assert_close(B @ A, delta, atol=1e-5, rtol=0)
    A0, B0, error0 = truncated_svd_factors(torch.zeros(3, 3), 2)
    assert error0 == 0.0 and torch.equal(B0 @ A0, torch.zeros(3, 3))


def test_merging_dense_updates_differs_from_merging_factors():
    # Two rank-1 adapters: ΔW1 = e1 e1ᵀ, ΔW2 = e2 e2ᵀ.
    f1 = LoraFactors(A=T([[1.0, 0.0]]), B=T([[1.0], [0.0]]), scaling=1.0)
    f2 = LoraFactors(A=T([[0.0, 1.0]]), B=T([[0.0], [1.0]]), scaling=1.0)
    dense_mean = task_arithmetic([f1.delta(), f2.delta()], 0.5)
    assert torch.equal(dense_mean, T([[0.5, 0.0], [0.0, 0.5]]))  # mean(B·A) = I/2
    # Averaging the factors, as a factor-wise "linear" merge does: mean(B)·mean(A)
    # = [[.5], [.5]] · [[.5, .5]] = all 0.25: a different matrix (even of a different rank).
    factor_mean = ((f1.B + f2.B) / 2) @ ((f1.A + f2.A) / 2)
    assert torch.equal(factor_mean, torch.full((2, 2), 0.25))
    assert not torch.allclose(factor_mean, dense_mean)
    # `cat` is exact on factors: [B1 B2][A1; A2] = ΔW1 + ΔW2.
    cat = concatenate_factors([{"m": f1}, {"m": f2}])["m"]
    assert torch.equal(cat.delta(), f1.delta() + f2.delta())


def test_merge_dense_dispatches_and_checks_options():
    deltas = [TAU1, TAU2, TAU3]
    assert torch.equal(merge_dense("ties", deltas, density=0.5), ties(deltas, 0.5))
    assert torch.equal(merge_dense("task_arithmetic", deltas, weights=[1, 2, 3]),
                       TAU1 + 2 * TAU2 + 3 * TAU3)
    assert torch.equal(merge_dense("magmax", deltas), magmax(deltas))
    gen = torch.Generator().manual_seed(3)
    out = merge_dense("dare_linear", deltas, drop_rate=0.5, generator=gen)
    assert torch.equal(out, dare(deltas, 0.5, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="unknown merge method 'mean'"):
        merge_dense("mean", deltas)
    with pytest.raises(ValueError, match="does not take density"):
        merge_dense("task_arithmetic", deltas, density=0.5)
    with pytest.raises(ValueError, match="needs generator"):
        merge_dense("dare_ties", deltas, drop_rate=0.5)
    with pytest.raises(ValueError, match="concatenate_factors"):
        merge_dense("cat", deltas)
    with pytest.raises(ValueError, match="density must be in"):
        merge_dense("ties", deltas, density=0.0)
    with pytest.raises(ValueError, match="2 given for 3 deltas"):
        merge_dense("task_arithmetic", deltas, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="share one shape"):
        merge_dense("magmax", [TAU1, TAU1.T])


def test_streaming_merges_over_many_blocks_equal_the_stacked_formula():
    """task_arithmetic and magmax go block by block (merging.BLOCK entries): over tensors of
    several blocks and a partial last one, with weights and mixed dtypes, they equal the formula
    computed on the whole stack at once."""
    from continual_lora.merging import BLOCK

    g = torch.Generator().manual_seed(0)
    shape = (3, BLOCK + 1000)  # 3 blocks and a bit: the last block is partial
    deltas = [torch.randn(shape, generator=g) for _ in range(4)]
    deltas[2] = deltas[2].to(torch.bfloat16)  # merged in float32 all the same
    deltas[3][0, :50] = 4 * deltas[0][0, :50]  # tied after weighting: the earlier delta wins
    w = [1.0, -0.5, 2.0, 0.25]
    stack = torch.stack([d.float() * wi for d, wi in zip(deltas, w, strict=True)])
    assert torch.allclose(task_arithmetic(deltas, w), stack.sum(0), rtol=0, atol=1e-5)
    expected = stack.gather(0, stack.abs().argmax(0, keepdim=True)).squeeze(0)
    merged = magmax(deltas, w)
    assert merged.dtype == torch.float32 and merged.shape == shape
    assert torch.equal(merged, expected)
    # the inputs are left as they were (blocks are views, never written)
    assert torch.equal(deltas[0], torch.randn(shape, generator=torch.Generator().manual_seed(0)))
