"""The embedded diffusion model: its pretraining recipe at a tiny size, and the concept images
it holds out."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from continual_lora.diffusion_parts import PipelineSizes
from continual_lora.embedded_diffusion import (
    HELD_OUT,
    REFERENCE_IMAGES,
    DiffusionRecipe,
    concept_records,
    embedded_diffusion_path,
)

TINY = DiffusionRecipe(
    sizes=PipelineSizes(image_size=16, vae_channels=(8, 16), unet_channels=(16, 32),
                        attention_head_dim=8, text_width=16, text_layers=1, text_heads=2,
                        max_length=12, norm_groups=8),
    vae_steps=3, unet_steps=3, scorer_steps=3, batch_size=4)


def test_tiny_recipe_builds_a_loadable_pipeline_with_its_scorer(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = embedded_diffusion_path(TINY, cache_root=tmp_path, echo=lambda _: None)
    assert folder.name == f"silhouette-diffusion-{TINY.key()}"
    report = json.loads((folder / "recipe.json").read_text())
    assert set(report["pretraining_classes"]).isdisjoint(HELD_OUT)
    assert len(report["pretraining_classes"]) == 20 - len(HELD_OUT)
    assert report["vae_scaling_factor"] > 0
    assert (folder / "scorer" / "model.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert pipe.vae.config.scaling_factor == pytest.approx(report["vae_scaling_factor"])
    # cached: a second call returns the same folder without building
    assert embedded_diffusion_path(TINY, cache_root=tmp_path,
                                   echo=lambda m: pytest.fail(m)) == folder
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".building")]
    # a different recipe is a different model
    assert replace(TINY, seed=1).key() != TINY.key()


def test_concept_images_never_include_the_references():
    train = concept_records("giraffe", 50, "train", seed=0, instance_prompt=None, what="t")
    refs = concept_records("giraffe", 100, "eval", seed=0, instance_prompt=None, what="t")
    assert len(refs) == REFERENCE_IMAGES  # capped at the reference pool
    assert {r.key for r in train}.isdisjoint({r.key for r in refs})
    assert train[0].caption == "a silhouette of a giraffe"
    assert train[0].array.shape == (32, 32, 3) and train[0].array.dtype == np.uint8
    other_seed = concept_records("giraffe", 50, "train", seed=1, instance_prompt="sks",
                                 what="t")
    assert {r.key for r in other_seed} != {r.key for r in train}
    assert other_seed[0].caption == "sks"
