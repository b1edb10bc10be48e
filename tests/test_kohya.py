"""kohya / PEFT / diffusers LoRA conversion (`kohya.py`) and `continual-lora convert`
(`convert.py`), on the tiny Stable-Diffusion-shaped pipeline of `diffusion_parts`.

What matters to a user: a converted LoRA changes the model exactly as the original does (same
update, same scale: alpha ≠ rank is where tools disagree), and a LoRA that does not fit the base
is refused by name instead of half-loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from continual_lora import convert as convert_cli
from continual_lora import kohya
from continual_lora.config import ConfigError
from continual_lora.diffusion_parts import (
    PipelineSizes,
    build_components,
    make_pipeline,
    save_pipeline,
)

WORDS = ["cat", "dog", "red"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
RANK, ALPHA = 4, 8  # alpha = 2r: a LoRA whose scale is not 1


def components() -> dict:
    return build_components(PipelineSizes(), WORDS)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_pipeline(components(), tmp_path_factory.mktemp("base") / "pipe")


def peft_unet(seed: int = 0):
    """A PEFT-wrapped tiny UNet with random non-zero A and B (B is zero at init, which would
    hide any scale error), alpha = 2r, and some modules of another rank or alpha."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                        rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3, "conv1": 6})
    model = get_peft_model(components()["unet"], config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def kohya_from_peft(model, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The kohya state dict of a PEFT model, built by hand: one `.alpha` (0-d, the factors'
    dtype, as sd-scripts saves it) per module."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer):
            name = "lora_unet_" + path.replace(".", "_")
            out[f"{name}.lora_down.weight"] = layer.lora_A["default"].weight.detach().to(dtype)
            out[f"{name}.lora_up.weight"] = layer.lora_B["default"].weight.detach().to(dtype)
            out[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha["default"]), dtype=dtype)
    return out


def unet_names() -> list[str]:
    return [n for n, _ in components()["unet"].named_modules()]


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 16, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", height=32, width=32).images


def run_convert(*argv: str) -> int:
    """`continual-lora convert …` through the parser `add_parser` builds (cli.py hooks it up)."""
    parser = argparse.ArgumentParser()
    convert_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", *map(str, argv)])
    return args.func(args)


# -- formats --------------------------------------------------------------------------------------


def test_detect_format_by_keys():
    t = torch.zeros(2, 2)
    assert kohya.detect_format({"lora_unet_a_b.lora_down.weight": t}) == "kohya"
    assert kohya.detect_format({"lora_te1_a.lora_up.weight": t}) == "kohya"
    assert kohya.detect_format({"unet.a.b.lora_A.weight": t}) == "diffusers"
    assert kohya.detect_format({"unet.a.processor.to_q_lora.down.weight": t}) == "diffusers"
    assert kohya.detect_format({"base_model.model.a.lora_A.weight": t}) == "peft"


def test_kohya_peft_kohya_round_trip_is_identical():
    model = peft_unet()
    for dtype in (torch.float32, torch.float16):
        original = kohya_from_peft(model, dtype)
        (tensors, config), = kohya.kohya_to_peft(original, unet_names()).values()
        assert config["lora_alpha"] == ALPHA and config["r"] == RANK
        assert config["rank_pattern"] and config["alpha_pattern"]
        back = kohya.peft_to_kohya(tensors, config)
        assert sorted(back) == sorted(original)
        for key, tensor in original.items():
            assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
            assert torch.equal(back[key], tensor), key
    # An alpha the factors' dtype cannot hold exactly keeps its value, in a wider dtype.
    odd = {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3, dtype=torch.float16),
           "lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1, dtype=torch.float16),
           "lora_unet_conv_in.alpha": torch.tensor(0.1)}
    (tensors, config), = kohya.kohya_to_peft(odd, unet_names()).values()
    alpha = kohya.peft_to_kohya(tensors, config)["lora_unet_conv_in.alpha"]
    assert alpha.dtype == torch.float32 and torch.equal(alpha, odd["lora_unet_conv_in.alpha"])


def test_without_module_names_diffusers_converter_gives_the_same_paths():
    original = kohya_from_peft(peft_unet())
    with_names = kohya.kohya_to_peft(original, unet_names())
    without = kohya.kohya_to_peft(original)
    assert with_names["unet"][1] == without["unet"][1]
    assert with_names["unet"][0].keys() == without["unet"][0].keys()


def test_sgm_block_names_resolve_only_against_the_base():
    """SDXL kohya files name blocks as the sgm UNet does (input_blocks_1_1, …): diffusers maps
    them given the UNet's config; without a base they stay unresolved, never guessed."""
    sgm = {"down_blocks_0_attentions_0": "input_blocks_1_1",
           "mid_block_attentions_0": "middle_block_1",
           "up_blocks_1_attentions_1": "output_blocks_3_1"}
    original = kohya_from_peft(peft_unet())
    renamed = {}
    for key, tensor in original.items():
        for diffusers_name, sgm_name in sgm.items():
            key = key.replace(f"lora_unet_{diffusers_name}_", f"lora_unet_{sgm_name}_")
        renamed[key] = tensor
    assert renamed.keys() != original.keys()
    unet = components()["unet"]
    resolved = kohya.resolve_paths(kohya.parse_kohya(renamed), unet_names(), unet.config)
    expected = kohya.resolve_paths(kohya.parse_kohya(original), unet_names())
    assert sorted(m.path for m in resolved.values()) == sorted(m.path for m in expected.values())
    with pytest.raises(ConfigError, match=r"could not be mapped.*input_blocks_1_1.*--base"):
        kohya.kohya_to_peft(renamed)
    flux = "lora_unet_double_blocks_0_img_attn_qkv"  # diffusers would say double_blocks.0.img.attn
    factors = {f"{flux}.lora_down.weight": torch.ones(2, 8), f"{flux}.lora_up.weight":
               torch.ones(8, 2)}
    assert kohya.resolve_paths(kohya.parse_kohya(factors))[flux].path is None


def test_diffusers_own_files_are_read_with_their_alphas(tmp_path):
    """What diffusers writes (`save_lora_weights` with the adapter's config as metadata, as its
    training scripts do) and the old layout its kohya converter produces."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from peft.utils import get_peft_model_state_dict

    model = peft_unet()
    layers = {k.removeprefix("base_model.model."): v
              for k, v in get_peft_model_state_dict(model).items()}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers,
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict())
    lora = convert_cli.read_lora(tmp_path)
    assert lora.format == "diffusers"
    back = kohya.to_kohya(kohya.resolve_paths(lora.modules))
    original = kohya_from_peft(model)
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], v) for k, v in original.items())

    old_layout, _ = _convert_non_diffusers_lora_to_diffusers(dict(original))
    assert any("to_q_lora.down" in k for k in old_layout)
    modules = kohya.parse_diffusers(old_layout, None)
    assert sorted(m.path for m in modules.values()) == \
        sorted(layer.removesuffix(".lora_A.weight") for layer in layers if "lora_A" in layer)


def test_round_trip_through_files_and_the_command(base, tmp_path, capsys):
    original = kohya_from_peft(peft_unet())
    save_file(original, str(tmp_path / "lora.safetensors"))
    assert run_convert(tmp_path / "lora.safetensors", "--to", "peft", "--out", tmp_path / "p",
                       "--base", base) == 0
    n = len(original) // 3
    assert f"matched {n} of {n} modules" in capsys.readouterr().out
    run_convert(tmp_path / "p", "--to", "kohya", "--out", tmp_path / "back.safetensors",
                "--base", base)
    back = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in original.items())


# -- the converted LoRA does what the original does -----------------------------------------------


def test_kohya_as_peft_equals_the_update_applied_by_hand(base, tmp_path):
    from peft import PeftModel

    original = kohya_from_peft(peft_unet(seed=5))
    save_file(original, str(tmp_path / "lora.safetensors"))
    run_convert(tmp_path / "lora.safetensors", "--to", "peft", "--out", tmp_path / "p",
                "--base", base)
    loaded = unet_output(PeftModel.from_pretrained(components()["unet"], str(tmp_path / "p")))

    by_hand = components()["unet"]
    modules = dict(by_hand.named_modules())
    with torch.no_grad():
        for key, down in original.items():
            if key.endswith(".lora_down.weight"):
                name = key.removesuffix(".lora_down.weight")
                up, alpha = original[f"{name}.lora_up.weight"], original[f"{name}.alpha"]
                path = next(p for p in modules if "lora_unet_" + p.replace(".", "_") == name)
                weight = modules[path].weight
                delta = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
                weight += delta.view(weight.shape)
    assert any(len(modules[p].weight.shape) == 4 for p in modules if p.endswith("conv1"))
    expected, plain = unet_output(by_hand), unet_output(components()["unet"])
    assert not torch.allclose(expected, plain, atol=1e-3)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)


def test_our_adapter_in_diffusers_format_loads_with_the_right_scale(base, tmp_path, capsys):
    from peft import PeftModel

    stage = tmp_path / "tasks" / "01-a"
    adapter = stage / "adapter"
    peft_unet(seed=2).save_pretrained(str(adapter))
    written = convert_cli.write_diffusers_weights(adapter, adapter)
    assert written == adapter / kohya.DIFFUSERS_WEIGHTS
    assert all(k.startswith("unet.") and ".lora_" in k for k in load_file(str(written)))
    run_convert(stage, "--to", "diffusers", "--out", tmp_path / "d", "--base", base)
    assert "matched 48 of 48 modules" in capsys.readouterr().out

    plain = images(make_pipeline(components()))
    with_lora = make_pipeline(components())
    with_lora.load_lora_weights(str(adapter))
    diffusers_images = images(with_lora)
    peft_parts = components()
    PeftModel.from_pretrained(peft_parts["unet"], str(adapter))
    peft_images = images(make_pipeline(peft_parts))

    assert np.abs(diffusers_images - plain).max() > 1e-3
    np.testing.assert_allclose(diffusers_images, peft_images, atol=1e-5)
    from_command = make_pipeline(components())
    from_command.load_lora_weights(str(tmp_path / "d"))
    np.testing.assert_allclose(images(from_command), peft_images, atol=1e-5)

    # The metadata is what carries alpha: without it diffusers takes scale 1 and is wrong.
    tensors = load_file(str(written))
    (tmp_path / "bare").mkdir()
    save_file(tensors, str(tmp_path / "bare" / kohya.DIFFUSERS_WEIGHTS))
    bare = make_pipeline(components())
    bare.load_lora_weights(str(tmp_path / "bare"))
    assert np.abs(images(bare) - peft_images).max() > 1e-4


def test_kohya_with_text_encoder_to_diffusers_loads_both_parts(base, tmp_path):
    """Text-encoder modules: kohya names CLIP from `text_model.`, which transformers 5's
    CLIPTextModel no longer has; the conversion and diffusers' loader must agree on it."""
    from peft import PeftModel

    original = kohya_from_peft(peft_unet(seed=7))
    generator = torch.Generator().manual_seed(8)
    text_encoder = components()["text_encoder"]
    for path in ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"):
        weight = text_encoder.get_submodule(path).weight
        name = "lora_te_text_model_" + path.replace(".", "_")
        original[f"{name}.lora_down.weight"] = torch.randn(2, weight.shape[1],
                                                           generator=generator)
        original[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=generator)
        original[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(original, str(tmp_path / "lora.safetensors"))
    run_convert(tmp_path / "lora.safetensors", "--to", "diffusers", "--out", tmp_path / "d",
                "--base", base)
    run_convert(tmp_path / "lora.safetensors", "--to", "peft", "--out", tmp_path / "p",
                "--base", base)

    with_lora = make_pipeline(components())
    with_lora.load_lora_weights(str(tmp_path / "d"))
    parts = components()
    PeftModel.from_pretrained(parts["unet"], str(tmp_path / "p"))
    PeftModel.from_pretrained(parts["text_encoder"], str(tmp_path / "p" / "text_encoder"))
    np.testing.assert_allclose(images(with_lora), images(make_pipeline(parts)), atol=1e-5)
    back = kohya.to_kohya(convert_cli.read_lora(tmp_path / "p").modules)
    assert sorted(back) == sorted(original)


# -- refusals -------------------------------------------------------------------------------------


def test_a_module_the_base_lacks_is_refused_by_name(base, tmp_path):
    original = kohya_from_peft(peft_unet())
    n = len(original) // 3 + 1
    extra = "lora_unet_down_blocks_7_attentions_0_proj_in"
    original[f"{extra}.lora_down.weight"] = torch.randn(4, 32, 1, 1)
    original[f"{extra}.lora_up.weight"] = torch.randn(32, 4, 1, 1)
    save_file(original, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ConfigError, match=rf"applied {n - 1} of {n} modules") as err:
        run_convert(tmp_path / "lora.safetensors", "--to", "peft", "--out", tmp_path / "p",
                    "--base", base)
    assert extra in str(err.value)
    assert not (tmp_path / "p").exists()


def test_a_shape_mismatch_names_the_module_and_both_shapes(base, tmp_path):
    original = kohya_from_peft(peft_unet())
    for key, tensor in list(original.items()):  # cross-attention from SD 1.x's 768-wide CLIP
        if "attn2_to_k.lora_down" in key or "attn2_to_v.lora_down" in key:
            original[key] = torch.randn(tensor.shape[0], 768)
    save_file(original, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ConfigError) as err:
        run_convert(tmp_path / "lora.safetensors", "--to", "diffusers", "--out", tmp_path / "d",
                    "--base", base)
    message = str(err.value)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert f"{name} (the file's update is (32, 768), the base's weight is (32, 32))" in message
    assert "looks like an SD1.x LoRA" in message
    assert not (tmp_path / "d").exists()


def test_an_sdxl_lora_on_an_sd1_shaped_base_is_named_as_such(base, tmp_path):
    original = kohya_from_peft(peft_unet())
    name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    original[f"{name}.lora_down.weight"] = torch.randn(4, 1280)
    original[f"{name}.lora_up.weight"] = torch.randn(1280, 4)
    save_file(original, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ConfigError, match=rf"{name}.*looks like an SDXL LoRA on a custom UNet "
                       r"\(cross-attention width 32\) base"):
        run_convert(tmp_path / "lora.safetensors", "--to", "kohya", "--out",
                    tmp_path / "k.safetensors", "--base", base)


def test_unknown_format_names_the_file(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(file))
    with pytest.raises(ConfigError, match="model.safetensors.*encoder.weight"):
        run_convert(file, "--to", "peft", "--out", tmp_path / "p")


def test_corrupt_safetensors_names_the_file(tmp_path):
    file = tmp_path / "lora.safetensors"
    save_file(kohya_from_peft(peft_unet()), str(file))
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"lora\.safetensors.*truncated or corrupt"):
        run_convert(file, "--to", "peft", "--out", tmp_path / "p")
    pickled = tmp_path / "lora.ckpt"
    pickled.write_bytes(b"not read")
    with pytest.raises(ConfigError, match=r"lora\.ckpt.*pickle"):
        run_convert(pickled, "--to", "peft", "--out", tmp_path / "p")


def test_existing_output_is_kept_without_overwrite(tmp_path):
    save_file(kohya_from_peft(peft_unet()), str(tmp_path / "lora.safetensors"))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        run_convert(tmp_path / "lora.safetensors", "--to", "diffusers", "--out", out)
    assert out.read_bytes() == b"keep me"
    run_convert(tmp_path / "lora.safetensors", "--to", "diffusers", "--out", out, "--overwrite")
    assert kohya.detect_format(load_file(str(out))) == "diffusers"

    stage = tmp_path / "tasks" / "01-a"
    peft_unet().save_pretrained(str(stage / "adapter"))
    # --overwrite would delete it (--out lies inside the stage folder given as the source)
    with pytest.raises(ConfigError, match="lies inside the source"):
        run_convert(stage, "--to", "diffusers", "--out", stage / "adapter", "--overwrite")
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()
