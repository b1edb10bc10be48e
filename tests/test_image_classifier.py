"""Image classifiers: loading a transformers image model as backbone + frozen upstream head,
image data (class folders, `datasets` tables, the embedded images), the upstream probe, LwF on
the upstream head, and the per-class / contextual forgetting report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_tiny_image_model as _save_model
from conftest import write_class_folder as _write_class_folder
from continual_lora.config import ConfigError, load_run_config
from continual_lora.data.images import load_embedded_images

ANIMALS = ("bear", "sheep", "cow", "horse")


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vit")
    _save_model(folder, "vit", ("bear", "sheep"))
    return folder


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for split, per_class, offset in (("train", 12, 0), ("eval", 6, 100)):
        _write_class_folder(root / "farm" / split, ("cow", "horse"), per_class, offset)
        _write_class_folder(root / "wild" / split, ("giraffe", "zebra"), per_class, offset)
    _write_class_folder(root / "upstream", ("bear", "sheep"), 8, 200)
    return root


def _config(tmp_path, model, data, strategy="naive", options=None, **extra):
    cfg = {
        "name": "img", "model": {"name_or_path": str(model)}, "lora": {"r": 2},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_batch_size": 16},
        "strategy": {"name": strategy, "options": options or {}},
        "upstream": {"kind": "classes", "images": str(data / "upstream")},
        "tasks": [{"name": "farm", "train": str(data / "farm/train"),
                   "eval": str(data / "farm/eval")},
                  {"name": "wild", "train": str(data / "wild/train"),
                   "eval": str(data / "wild/eval")}],
        "output_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))
    return load_run_config(path)


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_backbone_and_upstream_head_reproduce_the_checkpoint(tmp_path, arch):
    """Split into base model + frozen head, the family's upstream logits are the checkpoint's
    own logits, and its pixels are the image processor's."""
    from transformers import ViTImageProcessor

    from continual_lora.config import ModelConfig
    from continual_lora.families import make_family
    from continual_lora.families.image_classifier import ImageClassifierFamily

    model = _save_model(tmp_path, arch, ("bear", "sheep", "cow"))
    family = make_family(ModelConfig(name_or_path=str(tmp_path)))
    assert isinstance(family, ImageClassifierFamily)
    family.load()
    assert family.upstream_labels == ["bear", "sheep", "cow"]
    assert not any(p.requires_grad for p in family.module.parameters())
    images = [load_embedded_images("digits").images[i] for i in range(5)]
    pixels = family.pixels(images)
    expected_pixels = ViTImageProcessor(size={"height": 32, "width": 32})(
        images=[Image.fromarray(x).convert("RGB") for x in images],
        return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected_pixels)
    with torch.no_grad():
        ours = family.module.head_logits("upstream", family.module.features(pixels))
        theirs = model(pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_image_folder_tasks_and_upstream_probe_load(tmp_path, vit_folder, image_data):
    from continual_lora.sequence import ClassProbe, load_sequence

    cfg = _config(tmp_path, vit_folder, image_data)
    tasks, probe = load_sequence(cfg)
    assert [t.classes for t in tasks] == [["cow", "horse"], ["giraffe", "zebra"]]
    assert len(tasks[0].train) == 24 and len(tasks[0].eval) == 12
    assert all(p.suffix == ".png" for p in tasks[0].train.images)
    assert isinstance(probe, ClassProbe)
    assert probe.classes == ["bear", "sheep"]
    assert np.bincount(probe.labels).tolist() == [8, 8]


def test_datasets_parquet_with_an_image_feature_loads(tmp_path, vit_folder, image_data):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    from continual_lora.sequence import load_sequence

    images = load_embedded_images("animal-mnist").subset(["cow", "horse"])
    for split, rows in (("train", range(0, 2000, 100)), ("eval", range(50, 2000, 200))):
        table = Dataset.from_dict(
            {"img": [Image.fromarray(images.images[i]) for i in rows],
             "animal": [images.classes[images.labels[i]] for i in rows]},
            features=Features({"img": ImageFeature(), "animal": Value("string")}))
        table.to_parquet(str(tmp_path / f"{split}.parquet"))
    cfg = _config(tmp_path, vit_folder, image_data, tasks=[
        {"name": "farm", "train": str(tmp_path / "train.parquet"),
         "eval": str(tmp_path / "eval.parquet"), "image_column": "img",
         "label_column": "animal"}])
    tasks, _ = load_sequence(cfg)
    assert tasks[0].classes == ["cow", "horse"]
    assert len(tasks[0].train) == 20 and len(tasks[0].eval) == 10
    assert isinstance(tasks[0].train.images[0], Image.Image)


def test_bad_image_data_is_named(tmp_path, vit_folder, image_data):
    from continual_lora.sequence import load_sequence

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (8, 8)).save(flat / "a.png")
    cfg = _config(tmp_path, vit_folder, image_data, tasks=[
        {"name": "farm", "train": str(flat), "eval": str(image_data / "farm/eval")}])
    with pytest.raises(ConfigError, match="no class subfolders"):
        load_sequence(cfg)
    cfg = _config(tmp_path, vit_folder, image_data, tasks=[
        {"name": "farm", "train": str(image_data / "farm/train"),
         "eval": str(image_data / "wild/eval")}])
    with pytest.raises(ConfigError, match="classes the train data does not"):
        load_sequence(cfg)
    cfg = _config(tmp_path, vit_folder, image_data, tasks=[
        {"name": "x", "image_classes": ["cow", "unicorn"]}])
    with pytest.raises(ConfigError, match="unknown class.*unicorn.*known classes: bear"):
        load_sequence(cfg)


def test_upstream_probe_classes_must_be_the_heads(tmp_path, vit_folder, image_data):
    from continual_lora.runner import run

    _write_class_folder(tmp_path / "up", ("bear", "zebra"), 2)
    cfg = _config(tmp_path, vit_folder, image_data)
    cfg.upstream.images = str(tmp_path / "up")
    with pytest.raises(ConfigError, match=r"classes \['zebra'\] are not classes of the model's"):
        run(cfg, echo=lambda *_: None)
    assert not (tmp_path / "runs" / "img").exists()


def test_upstream_config_rules(tmp_path):
    base = {"tasks": [{"name": "a", "image_classes": ["cow", "horse"]}]}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({**base, "model": {"name_or_path": "embedded:vit"}}))
    assert load_run_config(path).upstream.kind == "classes"  # auto for the embedded models
    path.write_text(json.dumps({**base, "model": {"name_or_path": "org/vit"},
                                "upstream": {"kind": "classes"}}))
    with pytest.raises(ConfigError, match="needs upstream.images"):
        load_run_config(path)
    path.write_text(json.dumps({**base, "upstream": {"kind": "wordnet_retrieval",
                                                     "images": "up"}}))
    with pytest.raises(ConfigError, match="upstream.images is used by upstream.kind classes"):
        load_run_config(path)


def test_lwf_distils_the_upstream_head_from_task_one(tmp_path, vit_folder, image_data):
    """LwF's old outputs on an image model include its pretrained head, also on task 1; with
    `merge` the adapter is merged after each task and the export is Σ ΔW."""
    from peft import PeftModel

    from continual_lora.runner import run

    cfg = _config(tmp_path, vit_folder, image_data, strategy="lwf",
                  options={"merge": True, "alpha": 1.0})
    seen = []
    from continual_lora.strategies import lwf

    original = lwf.LwfStrategy.before_task

    def spy(self, ctx):
        original(self, ctx)
        seen.append(([o.head for o in self.old_outputs], [t.shape for t in self.teacher]))

    lwf.LwfStrategy.before_task = spy
    try:
        result = run(cfg, echo=lambda *_: None)
    finally:
        lwf.LwfStrategy.before_task = original
    assert seen[0] == (["upstream"], [torch.Size([24, 2])])
    assert seen[1][0] == ["upstream", "task1"]
    assert not isinstance(result.family.backbone, PeftModel)  # merged after the last task
    stage = json.loads((result.run_dir / "tasks/02-wild/stage.json").read_text())
    assert stage["export"] == {"kind": "peft_lora_concatenated", "rank": 4, "tasks_merged": 2}


def test_run_saves_upstream_labels_and_its_adapter_loads_with_peft(tmp_path, vit_folder,
                                                                  image_data):
    """The run's adapter loads on `AutoModel` of the checkpoint with plain PEFT and gives the
    features the run's model had; predictions.npz holds what per-class forgetting needs."""
    from peft import PeftModel
    from transformers import AutoModel

    from continual_lora.runner import run

    result = run(_config(tmp_path, vit_folder, image_data), echo=lambda *_: None)
    with np.load(result.run_dir / "predictions.npz") as pred:
        assert pred["classes/upstream"].tolist() == ["bear", "sheep"]
        assert pred["labels/upstream"].tolist() == [0] * 8 + [1] * 8
        assert pred["classes/farm"].tolist() == ["cow", "horse"]
        assert pred["correct/stage2/upstream"].shape == (16,)
    base = AutoModel.from_pretrained(str(vit_folder), add_pooling_layer=False)
    peft_model = PeftModel.from_pretrained(base, str(result.run_dir / "tasks/02-wild/adapter"))
    family = result.family
    pixels = family.pixels([np.zeros((28, 28), np.uint8) + 40])
    with torch.no_grad():
        ours = family.module.features(pixels)
        theirs = peft_model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert len(result.R) == 3 and 0.0 <= result.U[-1] <= 1.0


def test_moe_refuses_an_image_model(tmp_path, vit_folder, image_data):
    from continual_lora.runner import run

    with pytest.raises(ConfigError, match="does not route an image model"):
        run(_config(tmp_path, vit_folder, image_data, strategy="moe"), echo=lambda *_: None)


# --------------------------------------------------------------------------------------------
# The embedded vision models' data


def test_upstream_split_is_disjoint_and_tasks_avoid_it():
    from continual_lora.embedded_vision import (
        PROBE_PER_CLASS,
        UPSTREAM_CLASSES,
        reserved_keys,
        upstream_images,
        upstream_split,
    )

    images = upstream_images()
    pretrain, probe = upstream_split(images)
    assert not set(pretrain) & set(probe)
    assert np.bincount(images.labels[probe]).tolist() == [PROBE_PER_CLASS] * 11
    counts = np.bincount(images.labels[pretrain])
    assert counts[:6].tolist() == [600] * 6  # animals: 1000 images a class
    assert all(100 <= n < 125 for n in counts[6:])  # digits: what the probe leaves
    reserved = reserved_keys()
    assert len(reserved) == len(pretrain) + len(probe)
    assert {name for name, _ in reserved} == set(UPSTREAM_CLASSES)


def test_embedded_task_never_reuses_a_pretraining_image(tmp_path):
    from continual_lora.embedded_vision import reserved_keys
    from continual_lora.sequence import load_sequence

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": "embedded:vit"},
                                "upstream": {"kind": "none"},
                                "tasks": [{"name": "a", "image_classes": ["sheep", "cow"],
                                           "train_per_class": 200, "eval_per_class": 100}]}))
    tasks, _ = load_sequence(load_run_config(path))
    sheep = load_embedded_images("animal-mnist").subset(["sheep"]).images
    reserved = {k for name, k in reserved_keys() if name == "sheep"}
    used = [i for i, y in enumerate(tasks[0].train.labels) if y == 0]
    # find each used training image's position among the sheep images
    positions = {sheep[k].tobytes(): k for k in range(len(sheep))}
    picked = {positions[tasks[0].train.images[i].tobytes()] for i in used}
    assert len(picked) == 200 and not picked & reserved


def test_embedded_vision_build_is_cached(tmp_path):
    from continual_lora.embedded_vision import VisionRecipe, embedded_vision_path

    recipe = VisionRecipe.tiny("resnet")
    lines = []
    folder = embedded_vision_path("resnet", recipe, cache_dir=tmp_path, echo=lines.append)
    meta = json.loads((folder / "recipe.json").read_text())
    assert meta["upstream_classes"][:2] == ["bear", "bird"] and 0 <= meta["probe_accuracy"] <= 1
    assert (folder / "model.safetensors").is_file()
    lines.clear()
    assert embedded_vision_path("resnet", recipe, cache_dir=tmp_path, echo=lines.append) == folder
    assert lines == []  # no second build

