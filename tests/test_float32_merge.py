"""Merges into the base add ΔW in float32 whatever the base's dtype, and convolution LoRA factors
give the update PEFT computes (ALGORITHMS.md, merge_reinit: `W0 ← W0 + ΔW` in float32)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from continual_lora.adapters import LoraFactors, delta_as_weight, lora_factors, merge_in_float32
from continual_lora.config import load_run_config
from continual_lora.runner import run


def _lora_model(base: nn.Module, seed: int, r: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["layer"], init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():  # a small update, as after a short task: most of it is below bf16's ulp
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(1e-3)
    return model


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_three_merges_equal_the_float32_sum_cast_once(dtype):
    torch.manual_seed(0)
    base = OneLayer(nn.Linear(64, 64, bias=False)).to(dtype)
    w0 = base.layer.weight.detach().float().clone()
    masters: dict = {}
    exact = w0.clone()  # W0 + ΔW_1 + ΔW_2 + ΔW_3 in float32, summed in merge order
    for task in range(3):
        model = _lora_model(base, seed=task)
        exact += lora_factors(model)["layer"].delta()
        base = merge_in_float32(model, masters)
    merged = base.layer.weight.detach()
    assert merged.dtype == dtype
    expected = exact.to(dtype)
    assert torch.equal(merged, expected)
    # PEFT's merge in the weight's dtype loses most of such an update: the reason for the masters.
    naive = OneLayer(nn.Linear(64, 64, bias=False)).to(dtype)
    naive.layer.weight.data.copy_(w0.to(dtype))
    for task in range(3):
        naive = _lora_model(naive, seed=task).merge_and_unload()
    lost = (naive.layer.weight.detach() != expected).float().mean()
    assert lost > 0.05, "the bf16/fp16 merge this guards against would not have differed"


def test_float32_base_merges_like_peft_bit_for_bit():
    torch.manual_seed(0)
    base = OneLayer(nn.Linear(16, 8))
    ours = merge_in_float32(_lora_model(base, seed=1), {})
    torch.manual_seed(0)
    reference = _lora_model(OneLayer(nn.Linear(16, 8)), seed=1).merge_and_unload()
    assert torch.equal(ours.layer.weight, reference.layer.weight)


def test_conv_factors_give_peft_delta_and_flatten_for_dense_math():
    base = OneLayer(nn.Conv2d(3, 5, kernel_size=3, padding=1))
    model = _lora_model(base, seed=2, r=2)
    layer = model.base_model.model.layer
    factors = lora_factors(model)["layer"]
    assert factors.A.shape == (2, 3, 3, 3) and factors.B.shape == (5, 2, 1, 1)
    assert (factors.d_out, factors.d_in) == (5, 27)
    delta = factors.delta()
    assert delta.shape == (5, 27)
    torch.testing.assert_close(delta_as_weight(delta, layer.base_layer.weight),
                               layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7)
    # An SVD-style export in matrix form goes back to PEFT's conv layout.
    again = factors.like(factors.a_matrix, factors.scaling * factors.b_matrix)
    assert again.A.shape == factors.A.shape and again.B.shape == factors.B.shape
    torch.testing.assert_close(again.delta(), delta)
    # Merged: the model computes what the adapter did.
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        merged = merge_in_float32(model, {})
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)


def test_merge_reinit_on_a_bf16_base_scores_the_float32_sum(tiny_run_config, monkeypatch):
    """Through the strategy: after each task the bf16 weight is round(W0 + Σ_s ΔW_s)."""
    from continual_lora.strategies.merge_reinit import MergeReinitStrategy

    seen = []
    original = MergeReinitStrategy.after_task

    def after_task(self, ctx):
        peft = ctx.family.backbone
        key = next(iter(lora_factors(peft)))
        if not seen:
            w0 = peft.get_submodule(f"base_model.model.{key}").base_layer.weight.float()
            seen.append(w0.detach().clone())
        original(self, ctx)
        exact = seen[0].clone()
        for h in self.history:  # in merge order, as the float32 master adds them
            exact += h[key].delta()
        seen.append((ctx.family.backbone.get_submodule(key).weight.detach().clone(), exact))

    monkeypatch.setattr(MergeReinitStrategy, "after_task", after_task)
    cfg = tiny_run_config("merge_reinit")
    cfg["model"]["dtype"] = "bfloat16"
    run(load_run_config(None, data=cfg), echo=lambda _: None)
    merges = seen[1:]
    assert len(merges) == 2
    for weight, exact in merges:
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, exact.to(torch.bfloat16))


def test_lora_factors_matrix_views_of_a_linear_are_the_factors():
    f = LoraFactors(A=torch.ones(2, 3), B=torch.ones(4, 2), scaling=0.5)
    assert f.a_matrix.shape == (2, 3) and f.b_matrix.shape == (4, 2)
    torch.testing.assert_close(f.delta(), torch.full((4, 3), 1.0))
