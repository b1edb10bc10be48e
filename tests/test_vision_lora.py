"""LoRA on vision backbones (seed 002's ViT and ResNet): default targets, the Conv2d update by
hand, and merging that leaves the outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import Conv2d as LoraConv2d
from transformers import (
    ConvNextConfig,
    ConvNextModel,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTModel,
)

from continual_lora.adapters import attach_lora, make_lora_config, resolve_targets


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "resnet":
        return ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                        layer_type="basic")).eval()
    if kind == "convnext":
        # layer scale 1 (pretrained values are of that order; the 1e-6 init hides any update)
        return ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                            layer_scale_init_value=1.0)).eval()
    return ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=32)).eval()


def _with_trained_lora(model, r=4, alpha=8.0):
    """LoRA on the defaults with B made non-zero, as after training (B starts at 0)."""
    peft = attach_lora(model, make_lora_config(r, alpha, 0.0, resolve_targets(model, None)), 0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    return peft.eval()


@pytest.mark.parametrize("kind, targets", [("resnet", ["convolution"]),
                                           ("convnext", ["pwconv1", "pwconv2"]),
                                           ("vit", ["q_proj", "v_proj"])])
def test_default_targets_and_merge_keeps_the_outputs(kind, targets):
    model = _tiny(kind)
    assert resolve_targets(model, None) == targets
    side = 16 if kind == "vit" else 32
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    base = model(pixel_values=x).last_hidden_state
    peft = _with_trained_lora(model)
    unmerged = peft(pixel_values=x).last_hidden_state
    assert (unmerged - base).abs().max() > 1e-3  # the adapter does something
    merged = peft.merge_and_unload()(pixel_values=x).last_hidden_state
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


def test_conv2d_lora_update_by_hand():
    """A 3x3 convolution's update: ΔW = (alpha/r) · B·A with A a (r, in, 3, 3) convolution and B
    a 1x1 (out, r) one, so ΔW[o, i, u, v] = (alpha/r) Σ_k B[o, k] A[k, i, u, v]."""
    model = _tiny("resnet")
    conv = model.encoder.stages[0].layers[0].layer[0].convolution
    w0 = conv.weight.detach().clone()
    peft = _with_trained_lora(model, r=4, alpha=8.0)
    lora = peft.base_model.model.encoder.stages[0].layers[0].layer[0].convolution
    assert isinstance(lora, LoraConv2d)
    a = lora.lora_A["default"].weight.detach()  # (r, in, 3, 3)
    b = lora.lora_B["default"].weight.detach()  # (out, r, 1, 1)
    assert a.shape == (4, *w0.shape[1:]) and b.shape == (w0.shape[0], 4, 1, 1)
    delta = (8.0 / 4) * torch.einsum("ok,kiuv->oiuv", b[:, :, 0, 0], a)
    peft.merge_and_unload()
    torch.testing.assert_close(conv.weight.detach(), w0 + delta, atol=1e-6, rtol=1e-5)
