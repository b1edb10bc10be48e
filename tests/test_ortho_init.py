"""Merge & Orthogonal Init: the projection math and the paper's column rule on hand-made
matrices; the strategy's hooks on tiny PEFT-wrapped Linear and Conv2d layers (three tasks of
hand-set factors: `subspace` orthogonal to every earlier A, `merge: factors` computing
W0 + s(B_old+B_t)(A_old+A_t), a bf16 base merged in float32); and on tiny_bert through the
runner, that task 2's A starts orthogonal and the exported adapter reproduces the model."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import AutoModel, AutoTokenizer

from continual_lora.adapters import lora_factors, lora_layers
from continual_lora.config import ConfigError, load_run_config
from continual_lora.runner import run
from continual_lora.strategies.base import TaskContext
from continual_lora.strategies.ortho_init import (
    SUM_ADAPTER,
    OrthoInitOptions,
    OrthoInitStrategy,
    add_factors,
    column_init,
    orthogonal_columns,
    row_space_basis,
    subspace_init,
)

T = torch.tensor


def _column_cosines(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """|cos| of each column pair, as the paper's code checks them (`F.cosine_similarity`)."""
    return F.cosine_similarity(new.double().T, old.double().T, dim=1).abs()


# -- the math on hand-made matrices -------------------------------------------------------------


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


def test_orthogonal_columns_hand_computed():
    """Columns of the previous A (r = 2): (3 4), (1 0), (0 0). The unit vectors orthogonal to
    them are ±(4 −3)/5 and ±(0 1); the zero column has every direction orthogonal: vh[-1] is
    still a unit vector. Per column, not per row: the old code's row rule gives other values."""
    previous = T([[3.0, 1, 0], [4, 0, 0]])
    new = orthogonal_columns(previous)
    assert new.shape == (2, 3) and new.dtype == torch.float64
    f64 = torch.float64
    torch.testing.assert_close(new[:, :2].abs(), T([[0.8, 0.0], [0.6, 1.0]], dtype=f64))
    torch.testing.assert_close(new.norm(dim=0), torch.ones(3, dtype=f64))
    torch.testing.assert_close((new * previous.double()).sum(0), torch.zeros(3, dtype=f64))


def test_column_init_replaces_the_draw_with_unit_orthogonal_columns():
    """As the paper's code asserts: every new column has cosine < 1e-4 with the old one, and
    unit norm (no rescaling to the draw); the draw only gives the shape. Column pairs only:
    the row spaces still overlap (A_t A_oldᵀ ≠ 0) while <A_t, A_old>_F = 0."""
    g = torch.Generator().manual_seed(0)
    previous = torch.randn(4, 50, generator=g)
    draw = 0.01 * torch.randn(4, 50, generator=g)
    new = column_init(draw, previous, "m")
    assert new.shape == draw.shape and new.dtype == draw.dtype
    assert float(_column_cosines(new, previous).max()) < 1e-4
    torch.testing.assert_close(new.norm(dim=0), torch.ones(50), rtol=0, atol=1e-6)
    assert torch.equal(new, column_init(torch.randn(4, 50, generator=g), previous, "m"))
    assert abs(float((new * previous).sum())) < 1e-4
    assert float((new @ previous.T).abs().max()) > 0.1


def test_column_init_rank_one_and_other_shapes_keep_the_draw():
    draw = T([[0.5, -0.5, 2.0]])
    with pytest.warns(UserWarning, match=r"q: rank 1 .*plain init"):
        assert torch.equal(column_init(draw, T([[1.0, 2, 3]]), "q"), draw)
    with pytest.warns(UserWarning, match=r"q: the previous A is \(3, 3\).*plain init"):
        assert torch.equal(column_init(draw, torch.ones(3, 3), "q"), draw)


def test_add_factors_folds_scalings_and_keeps_lone_modules():
    """(A_old, s·B_old) + (A_t, B_t with s = 2) = (A_old + A_t, s·B_old + 2·B_t), scaling 1."""
    from continual_lora.adapters import LoraFactors

    running = {"q": LoraFactors(T([[1.0, 0]]), T([[3.0]]), 1.0),
               "k": LoraFactors(T([[0.0, 1]]), T([[1.0]]), 1.0)}
    trained = {"q": LoraFactors(T([[0.0, 2]]), T([[0.5]]), 2.0),
               "v": LoraFactors(T([[1.0, 1]]), T([[1.0]]), 2.0)}
    out = add_factors(running, trained)
    assert torch.equal(out["q"].A, T([[1.0, 2]])) and torch.equal(out["q"].B, T([[4.0]]))
    assert out["q"].scaling == 1.0 and out["k"] is running["k"]
    assert torch.equal(out["v"].B, T([[2.0]]))
    with pytest.raises(ValueError, match=r"q: A \(2, 2\)"):
        add_factors(running, {"q": LoraFactors(torch.ones(2, 2), torch.ones(1, 2), 1.0)})


# -- the strategy's hooks on tiny PEFT-wrapped layers --------------------------------------------


class Tiny(nn.Module):
    """One adapted layer, `layer`: a Linear or a Conv2d."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class FakeFamily:
    """What the hooks use of a family: the backbone, set_backbone, fresh_backbone."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self._fresh = copy.deepcopy(backbone)

    def set_backbone(self, backbone):
        self.backbone = backbone

    def fresh_backbone(self):
        return copy.deepcopy(self._fresh)


def _ctx(family, t: int, r: int, alpha: float) -> TaskContext:
    run_cfg = SimpleNamespace(model=SimpleNamespace(name_or_path="tiny"),
                              lora=SimpleNamespace(init_adapter=None))
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["layer"], bias="none")
    return TaskContext(SimpleNamespace(index=t), [], family, run_cfg, config, seed=100 + t)


def _lora_layer(peft: PeftModel):
    (key, layer), = lora_layers(peft, "default")
    assert key == "layer"
    return layer


def _train(family: FakeFamily, A: torch.Tensor | None, B: torch.Tensor) -> torch.Tensor:
    """Stand-in for training: write A (None: keep the init) and B into the trained adapter;
    returns the A it holds."""
    layer = _lora_layer(family.backbone)
    with torch.no_grad():
        if A is not None:
            layer.lora_A["default"].weight.copy_(A.reshape(layer.lora_A["default"].weight.shape))
        layer.lora_B["default"].weight.copy_(B.reshape(layer.lora_B["default"].weight.shape))
    return layer.lora_A["default"].weight.detach().clone()


def _trainable(peft: PeftModel) -> set[str]:
    return {n for n, p in peft.named_parameters() if p.requires_grad}


def test_factors_merge_computes_the_factor_sum_with_cross_terms(tmp_path):
    """`merge: factors`, column mode, on nn.Linear(6, 4) with r = 2, alpha = 4 (s = 2):
    task 1 trains (A1, B1); task 2's A2 starts with columns orthogonal to A1's and B2 = 0, and
    trains beside the frozen sum, the model computing W0 + s B1 A1 + s B2 A2 (the paper's
    training forward); after task 2 the model is W0 + s(B1+B2)(A1+A2), cross terms included;
    the exported rank-2 adapter reproduces it on the base; task 3 starts orthogonal to the
    columns of A1 + A2."""
    torch.manual_seed(0)
    base = Tiny(nn.Linear(6, 4))
    W0, b0 = base.layer.weight.detach().clone(), base.layer.bias.detach().clone()
    family, s = FakeFamily(base), 2.0
    strategy = OrthoInitStrategy(OrthoInitOptions(mode="column", merge="factors"))
    x = torch.randn(5, 6)
    g = torch.Generator().manual_seed(1)
    A1, B1, B2 = (torch.randn(*shape, generator=g) for shape in ((2, 6), (4, 2), (4, 2)))

    def out():
        with torch.no_grad():
            return family.backbone(x)

    strategy.before_task(_ctx(family, 1, 2, 4))
    _train(family, A1, B1)
    strategy.after_task(_ctx(family, 1, 2, 4))
    torch.testing.assert_close(out(), x @ (W0 + s * B1 @ A1).T + b0)
    assert not _trainable(family.backbone) and "default" not in family.backbone.peft_config

    strategy.before_task(_ctx(family, 2, 2, 4))
    A2_init = _lora_layer(family.backbone).lora_A["default"].weight.detach().clone()
    assert float(_column_cosines(A2_init, A1).max()) < 1e-4
    torch.testing.assert_close(A2_init.norm(dim=0), torch.ones(6))
    torch.testing.assert_close(out(), x @ (W0 + s * B1 @ A1).T + b0)  # B2 = 0: unchanged
    assert _trainable(family.backbone) == {"base_model.model.layer.lora_A.default.weight",
                                           "base_model.model.layer.lora_B.default.weight"}
    A2 = A2_init + 0.3 * torch.randn(2, 6, generator=g)  # training moved A2 too
    _train(family, A2, B2)
    torch.testing.assert_close(out(), x @ (W0 + s * B1 @ A1 + s * B2 @ A2).T + b0)
    strategy.after_task(_ctx(family, 2, 2, 4))

    factor_sum = W0 + s * (B1 + B2) @ (A1 + A2)
    torch.testing.assert_close(out(), x @ factor_sum.T + b0)
    no_cross = W0 + s * B1 @ A1 + s * B2 @ A2
    assert float((factor_sum - no_cross).abs().max()) > 0.1  # the cross terms are there
    assert list(family.backbone.peft_config) == [SUM_ADAPTER]

    strategy.export_adapter(_ctx(family, 2, 2, 4), tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(family.fresh_backbone(), str(tmp_path / "adapter"))
    assert loaded.peft_config["default"].r == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), x @ factor_sum.T + b0)

    strategy.before_task(_ctx(family, 3, 2, 4))
    A3_init = _lora_layer(family.backbone).lora_A["default"].weight.detach()
    assert float(_column_cosines(A3_init, A1 + A2).max()) < 1e-4


def test_factors_merge_refuses_another_rank_before_training():
    family = FakeFamily(Tiny(nn.Linear(6, 4)))
    strategy = OrthoInitStrategy(OrthoInitOptions(mode="column", merge="factors"))
    strategy.before_task(_ctx(family, 1, 2, 2))
    _train(family, None, torch.ones(4, 2))
    strategy.after_task(_ctx(family, 1, 2, 2))
    with pytest.raises(ConfigError, match=r"merge: factors.*same rank.*merge: dense"), \
            pytest.warns(UserWarning, match="no column to pair with"):
        strategy.before_task(_ctx(family, 2, 3, 3))


@pytest.mark.parametrize("merge", ["dense", "factors"])
def test_subspace_three_tasks_orthogonal_to_every_earlier_a(merge, monkeypatch):
    """nn.Linear(3, 2), r = 1: A1 = e1, A2 = e2 (hand-set). Task 3's draw a is projected off
    span{e1, e2}: A3 = (0, 0, a3) rescaled to |a|, i.e. ±|a| e3. Projecting off the last A
    only (e2) would leave a1 ≠ 0 in A3's e1 entry: the draw is checked to have one."""
    draws = []
    original = OrthoInitStrategy.orthogonalise

    def orthogonalise(self, peft, adapter="default"):
        draws.append(lora_factors(peft, adapter)["layer"].A.clone())
        original(self, peft, adapter)

    monkeypatch.setattr(OrthoInitStrategy, "orthogonalise", orthogonalise)
    torch.manual_seed(0)
    family = FakeFamily(Tiny(nn.Linear(3, 2)))
    strategy = OrthoInitStrategy(OrthoInitOptions(mode="subspace", merge=merge))
    e = torch.eye(3)
    for t, A in ((1, e[:1]), (2, e[1:2])):
        strategy.before_task(_ctx(family, t, 1, 1))
        _train(family, A, T([[1.0], [-2.0]]) * t)
        strategy.after_task(_ctx(family, t, 1, 1))
    strategy.before_task(_ctx(family, 3, 1, 1))
    A3 = _lora_layer(family.backbone).lora_A["default"].weight.detach()
    draw = draws[-1]
    assert abs(float(draw[0, 0])) > 0.05 and abs(float(draw[0, 2])) > 0.05
    expected = torch.sign(draw[0, 2]) * draw.norm() * e[2:]
    torch.testing.assert_close(A3, expected)
    torch.testing.assert_close(A3 @ e[:2].T, torch.zeros(1, 2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,merge", [("subspace", "dense"), ("column", "dense"),
                                        ("subspace", "factors"), ("column", "factors")])
def test_conv2d_lora(mode, merge):
    """nn.Conv2d(2, 3, 3) under PEFT, r = 2, alpha = 2: A is [2, 2, 3, 3], flattened to
    [2, 18] for the math. Task 2's A starts orthogonal to task 1's (rows to its row space, or
    column by column), and after task 2 the model is the convolution with W0 + ΔW1 + ΔW2
    (dense) or W0 + (B1+B2)(A1+A2) (factors), the update reshaped to the kernel."""
    torch.manual_seed(0)
    base = Tiny(nn.Conv2d(2, 3, 3, padding=1))
    W0, b0 = base.layer.weight.detach().clone(), base.layer.bias.detach().clone()
    family = FakeFamily(base)
    strategy = OrthoInitStrategy(OrthoInitOptions(mode=mode, merge=merge))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 5, 5, generator=g)
    B1, B2 = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)

    strategy.before_task(_ctx(family, 1, 2, 2))
    A1 = _train(family, None, B1).flatten(1)
    strategy.after_task(_ctx(family, 1, 2, 2))
    strategy.before_task(_ctx(family, 2, 2, 2))
    A2_weight = _lora_layer(family.backbone).lora_A["default"].weight
    assert A2_weight.shape == (2, 2, 3, 3)
    A2 = A2_weight.detach().flatten(1)
    if mode == "subspace":
        torch.testing.assert_close(A2 @ A1.T, torch.zeros(2, 2), rtol=0, atol=1e-5)
    else:
        assert float(_column_cosines(A2, A1).max()) < 1e-4
        torch.testing.assert_close(A2.norm(dim=0), torch.ones(18))
    _train(family, None, B2)
    strategy.after_task(_ctx(family, 2, 2, 2))

    delta = B1 @ A1 + B2 @ A2 if merge == "dense" else (B1 + B2) @ (A1 + A2)
    with torch.no_grad():
        torch.testing.assert_close(family.backbone(x),
                                   F.conv2d(x, W0 + delta.reshape(W0.shape), b0, padding=1),
                                   rtol=1e-5, atol=1e-5)


def test_dense_merge_of_a_bf16_base_rounds_once():
    """A bf16 nn.Linear(32, 32), three tasks with small updates (B ~ 1e-3): after the three
    merges the weight equals round_bf16(W0 + ΔW1 + ΔW2 + ΔW3), the sum taken in float32, not a
    chain of three bf16 roundings (which loses most of such small updates)."""
    torch.manual_seed(0)
    family = FakeFamily(Tiny(nn.Linear(32, 32)).to(torch.bfloat16))
    W0 = family.backbone.layer.weight.detach().float().clone()
    strategy = OrthoInitStrategy(OrthoInitOptions(mode="subspace", merge="dense"))
    g = torch.Generator().manual_seed(3)
    total, chained = torch.zeros(32, 32), W0.to(torch.bfloat16)
    for t in (1, 2, 3):
        strategy.before_task(_ctx(family, t, 2, 2))
        A = _train(family, None, 1e-3 * torch.randn(32, 2, generator=g))
        B = _lora_layer(family.backbone).lora_B["default"].weight.detach()
        delta = B.float() @ A.float()
        total += delta
        chained = (chained.float() + delta).to(torch.bfloat16)
        strategy.after_task(_ctx(family, t, 2, 2))
    weight = family.backbone.layer.weight.detach()
    assert weight.dtype == torch.bfloat16
    expected = (W0 + total).to(torch.bfloat16)
    assert torch.equal(weight, expected)
    assert not torch.equal(chained, expected)  # a chain of roundings would be told apart


# -- through the runner, on tiny_bert ------------------------------------------------------------


@pytest.mark.parametrize("mode,merge", [("subspace", "dense"), ("column", "dense"),
                                        ("column", "factors")])
def test_two_task_run_starts_task2_orthogonal(mode, merge, tiny_run_config, tiny_bert,
                                              monkeypatch):
    starts = []
    original = OrthoInitStrategy.before_task

    def before_task(self, ctx):
        original(self, ctx)
        if ctx.t == 2:  # A_2 as it will start training, against task 1's A (kept in history)
            new = lora_factors(ctx.family.backbone)
            starts.extend((new[k].A, old.A.cpu()) for k, old in self.history[0].items())

    monkeypatch.setattr(OrthoInitStrategy, "before_task", before_task)
    data = tiny_run_config("ortho_init")
    data["strategy"]["options"] = {"mode": mode, "merge": merge}
    result = run(load_run_config(None, data=data), echo=lambda _: None)

    assert len(starts) == 4  # query and value of 2 layers, each rank 2
    for new, old in starts:
        if mode == "subspace":
            torch.testing.assert_close(new @ old.T, torch.zeros(2, 2), rtol=0, atol=1e-5)
        else:
            assert float(_column_cosines(new, old).max()) < 1e-4
            torch.testing.assert_close(new.norm(dim=0), torch.ones(new.shape[1]))

    # The exported adapter on the original base reproduces the model after task 2.
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tokenizer(["a small furry animal", "a machine for cutting grass"], padding=True,
                      return_tensors="pt")
    adapter_dir = result.run_dir / "tasks" / "02-b" / "adapter"
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(adapter_dir))
    assert plain.peft_config["default"].r == (2 if merge == "factors" else 4)
    with torch.no_grad():
        ours = result.family.backbone.eval()(**batch).last_hidden_state
        theirs = plain.eval()(**batch).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
