"""Merge & Orthogonal Init: the projection math on hand-made matrices, the empty-complement
fallback, the weaker `column` mode, and on tiny_bert that task 2's A's start orthogonal to
task 1's and that the exported cumulative adapter reproduces the merged model."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

from continual_lora.adapters import lora_factors
from continual_lora.config import load_run_config
from continual_lora.runner import run
from continual_lora.strategies.ortho_init import (
    OrthoInitStrategy,
    accumulated_rows,
    column_init,
    row_space_basis,
    subspace_init,
)

T = torch.tensor


def test_subspace_init_is_orthogonal_and_keeps_row_norms():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(6, 10, generator=g)  # k = 6 < d_in = 10
    A = torch.randn(4, 10, generator=g)
    new = subspace_init(A, S, "m")
    torch.testing.assert_close(new @ S.T, torch.zeros(4, 6), rtol=0, atol=1e-5)
    torch.testing.assert_close(new.norm(dim=1), A.norm(dim=1))
    assert float((A @ S.T).abs().max()) > 0.1  # the draw itself was not orthogonal


def test_subspace_init_hand_computed():
    """S = [[1 0 0], [0 1 1]]: the complement of its row space is c = (0, 1, -1)/√2.
    Row (2 3 1), norm √14: (a·c) c = (0 1 -1), norm √2, rescaled ×√7 → (0 √7 -√7).
    Row (0 0 5), norm 5: (a·c) c = (0 -2.5 2.5), norm 5/√2, rescaled ×√2 → (0 -5/√2 5/√2)."""
    S = T([[1.0, 0, 0], [0, 1, 1]])
    A = T([[2.0, 3, 1], [0, 0, 5]])
    r7, r2 = math.sqrt(7), math.sqrt(2)
    expected = T([[0.0, r7, -r7], [0, -5 / r2, 5 / r2]])
    torch.testing.assert_close(subspace_init(A, S, "m"), expected)


def test_row_space_basis_drops_tiny_singular_values():
    Q = row_space_basis(T([[1.0, 0, 0], [2, 0, 0], [0, 1e-9, 0]]))  # rank 1 up to 1e-9
    assert Q.shape == (1, 3)
    torch.testing.assert_close(Q.abs(), T([[1.0, 0, 0]], dtype=torch.float64))


def test_empty_complement_warns_and_falls_back():
    g = torch.Generator().manual_seed(1)
    S = torch.randn(4, 3, generator=g)  # k = 4 ≥ d_in = 3: span is all of R^3
    A = torch.randn(2, 3, generator=g)
    with pytest.warns(UserWarning, match=r"encoder\.layer\.0\.attention\.self\.query.*plain init"):
        new = subspace_init(A, S, "encoder.layer.0.attention.self.query")
    assert torch.equal(new, A)


def test_column_mode_is_pairwise_only():
    """Old rows e1, e2; draw (1 1 0), (1 1 1).
    Row 0 minus its e1 part: (0 1 0), rescaled to √2 → (0 √2 0).
    Row 1 minus its e2 part: (1 0 1), rescaled to √3 → (√1.5 0 √1.5).
    Row i ⟂ old row i, but A_new Sᵀ = [[0 √2], [√1.5 0]] ≠ 0: the subspaces are not orthogonal."""
    old = T([[1.0, 0, 0], [0, 1, 0]])
    new = column_init(T([[1.0, 1, 0], [1, 1, 1]]), old, "m")
    s15 = math.sqrt(1.5)
    torch.testing.assert_close(new, T([[0.0, math.sqrt(2), 0], [s15, 0, s15]]))
    torch.testing.assert_close(new @ old.T, T([[0.0, math.sqrt(2)], [s15, 0]]))


def test_column_mode_uses_the_sum_of_earlier_as():
    """A_1 = e1, A_2 = e2 → previous row = (1 1 0), u = (1 1 0)/√2; draw (1 0 0):
    (1 0 0) − ½ (1 1 0) = (½ −½ 0), rescaled to 1 → (1/√2 −1/√2 0)."""
    previous = accumulated_rows([T([[1.0, 0, 0]]), T([[0.0, 1, 0]])], r=1)
    new = column_init(T([[1.0, 0, 0]]), previous, "m")
    r2 = math.sqrt(2)
    torch.testing.assert_close(new, T([[1 / r2, -1 / r2, 0.0]]))


@pytest.mark.parametrize("mode", ["subspace", "column"])
def test_two_task_run_starts_task2_orthogonal(mode, tiny_run_config, tiny_bert, monkeypatch):
    products = []
    original = OrthoInitStrategy.before_task

    def before_task(self, ctx):
        original(self, ctx)
        if ctx.t == 2:  # A_2 as it will start training, against task 1's A (kept in history)
            new = lora_factors(ctx.family.backbone)
            products.extend((new[k].A @ old.A.T) for k, old in self.history[0].items())

    monkeypatch.setattr(OrthoInitStrategy, "before_task", before_task)
    data = tiny_run_config("ortho_init")
    data["strategy"]["options"] = {"mode": mode}
    result = run(load_run_config(None, data=data), echo=lambda _: None)

    assert len(products) == 4  # query and value of 2 layers, each 2×2 (rank 2)
    for product in products:
        checked = product if mode == "subspace" else torch.diagonal(product)
        torch.testing.assert_close(checked, torch.zeros_like(checked), rtol=0, atol=1e-5)
    if mode == "column":  # pairwise only: some off-diagonal inner products stay
        assert max(float((p - torch.diag(torch.diagonal(p))).abs().max()) for p in products) > 1e-3

    # The exported rank-4 adapter on the original base reproduces the twice-merged model.
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tokenizer(["a small furry animal", "a machine for cutting grass"], padding=True,
                      return_tensors="pt")
    adapter_dir = result.run_dir / "tasks" / "02-b" / "adapter"
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(adapter_dir))
    with torch.no_grad():
        ours = result.family.backbone.eval()(**batch).last_hidden_state
        theirs = plain.eval()(**batch).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
