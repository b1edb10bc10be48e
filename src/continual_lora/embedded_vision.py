"""The embedded vision models: a small ViT and a small ResNet, pretrained in-process on an
upstream split of the embedded images and cached (the offline stand-ins for an ImageNet ViT or
ResNet-50, the models seed 002 updates with LoRA).

Why in-process: no pretrained vision weights ship with any installable package, and model hubs
are not reachable, so the "pretrained" model is made here, once, from real images: 11 upstream
classes of `animal-mnist+digits` (six animals and the digits zero to four). The other classes
(cow, giraffe, horse, zebra; five to nine) are never seen in pretraining: they are the
downstream tasks of the vision study, one domain close to the upstream animals and one close to
the upstream digits, which is what contextual forgetting needs.

Each model is saved as a transformers `...ForImageClassification` with its upstream classes in
`id2label` and an image processor beside it, so it loads like any hub checkpoint; the classifier
family splits it into the backbone (what LoRA adapts) and the frozen upstream head.

The images split per class with a fixed seed into pretraining and upstream-held-out images
(:func:`upstream_split`); the held-out ones are the upstream probe, so the probe never saw
training. Builds are cached under ``{cache}/embedded-vision/{arch}-{key}`` (key: hash of the
recipe) through `build_cache.build_once`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from continual_lora.build_cache import build_once
from continual_lora.data.images import ImageSet, load_embedded_images, split_per_class

EMBEDDED_IMAGES = "animal-mnist+digits"
UPSTREAM_CLASSES: tuple[str, ...] = (
    "bear", "bird", "cat", "dog", "elephant", "sheep", "zero", "one", "two", "three", "four",
)
#: Classes the embedded vision models never saw: the study's downstream tasks draw from these.
HELD_OUT_CLASSES: tuple[str, ...] = (
    "cow", "giraffe", "horse", "zebra", "five", "six", "seven", "eight", "nine",
)
UPSTREAM_SPLIT_SEED = 20260301
#: Upstream-held-out images per class (the upstream probe). The digits have 174-183 images a
#: class, so pretraining takes what is left of them after the probe, up to PRETRAIN_PER_CLASS.
PROBE_PER_CLASS = 60
PRETRAIN_PER_CLASS = 600
BUILD_VERSION = 1
RECIPE_FILE = "recipe.json"
_MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
ARCHES = ("vit", "resnet")


@dataclass(frozen=True)
class VisionRecipe:
    """Everything a build depends on; its hash names the cached folder."""

    arch: str = "vit"
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    #: Random shifts of up to this many pixels during pretraining (a little augmentation).
    shift: int = 2
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        blob = json.dumps({"build_version": BUILD_VERSION, "recipe": self.to_dict(),
                           "classes": UPSTREAM_CLASSES, "probe": PROBE_PER_CLASS,
                           "pretrain": PRETRAIN_PER_CLASS, "split_seed": UPSTREAM_SPLIT_SEED},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def key(self) -> str:
        return self.sha256()[:16]

    @classmethod
    def tiny(cls, arch: str) -> VisionRecipe:
        """Builds in seconds, for tests."""
        return cls(arch=arch, steps=30, batch_size=32)


def upstream_images() -> ImageSet:
    """The upstream classes' images, labelled 0..10 in `UPSTREAM_CLASSES` order."""
    return load_embedded_images(EMBEDDED_IMAGES).subset(UPSTREAM_CLASSES)


def upstream_split(images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """(pretraining indices, probe indices) into `upstream_images()`: PROBE_PER_CLASS held-out
    images a class, the rest (up to PRETRAIN_PER_CLASS) for pretraining; fixed."""
    pretrain, probe = [], []
    for c in range(len(images.classes)):
        members = np.flatnonzero(images.labels == c)
        n_pre = min(PRETRAIN_PER_CLASS, len(members) - PROBE_PER_CLASS)
        _, held = split_per_class(images.labels[members], 0, PROBE_PER_CLASS,
                                  UPSTREAM_SPLIT_SEED + c)
        rest = np.setdiff1d(np.arange(len(members)), held)
        probe.append(members[held])
        pretrain.append(members[rest[:n_pre]])
    return np.sort(np.concatenate(pretrain)), np.sort(np.concatenate(probe))


def reserved_keys() -> set[tuple[str, int]]:
    """(class, index within that class in the embedded set) of every image the embedded vision
    models trained or are probed on, so that a downstream task never reuses one."""
    images = upstream_images()
    pretrain, probe = upstream_split(images)
    used = set(np.concatenate([pretrain, probe]).tolist())
    out = set()
    for c, name in enumerate(images.classes):
        members = np.flatnonzero(images.labels == c)
        out |= {(name, k) for k, i in enumerate(members) if i in used}
    return out


def _config(arch: str, labels: tuple[str, ...]):
    from transformers import ResNetConfig, ViTConfig

    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if arch == "vit":
        return ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=64,
                         num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         id2label=id2label, label2id=label2id)
    if arch == "resnet":
        return ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128, 128],
                            depths=[1, 1, 1, 1], layer_type="basic", id2label=id2label,
                            label2id=label2id)
    raise ValueError(f"unknown embedded vision architecture {arch!r}; choose {ARCHES}")


def _processor():
    from transformers import ViTImageProcessor

    # White-on-black 28×28 grayscale in, one channel normalised to [-1, 1] out.
    return ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5],
                             image_std=[0.5], do_convert_rgb=False)


def _pixels(images: np.ndarray) -> Any:
    import torch

    return (torch.from_numpy(np.asarray(images, dtype=np.float32)) / 127.5 - 1.0).unsqueeze(1)


def _shifted(x, shift: int, generator):
    """Each image rolled by its own random (dy, dx) in [-shift, shift] (background is 0 → -1,
    and the silhouettes do not touch the border, so rolling only moves them)."""
    import torch

    if shift == 0:
        return x
    out = torch.empty_like(x)
    offsets = torch.randint(-shift, shift + 1, (len(x), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = torch.roll(x[i], shifts=(dy, dx), dims=(1, 2))
    return out


def _accuracy(model, x, y, batch_size: int = 256) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(pixel_values=x[i:i + batch_size]).logits.argmax(-1)
                          for i in range(0, len(x), batch_size)])
    model.train()
    return float((pred == y).float().mean())


def _build(recipe: VisionRecipe, out: Path, echo: Callable[[str], object]) -> None:
    import torch
    from transformers import AutoModelForImageClassification

    start = time.perf_counter()
    images = upstream_images()
    pretrain, probe = upstream_split(images)
    x, y = _pixels(images.images[pretrain]), torch.from_numpy(images.labels[pretrain])
    x_probe, y_probe = _pixels(images.images[probe]), torch.from_numpy(images.labels[probe])
    torch.manual_seed(recipe.seed)
    model = AutoModelForImageClassification.from_config(_config(recipe.arch, UPSTREAM_CLASSES))
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    warmup = max(1, recipe.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps))))
    # Class-balanced draws: the digits have a fifth of the animals' images.
    weights = 1.0 / torch.bincount(y).double()[y]
    generator = torch.Generator().manual_seed(recipe.seed)
    echo(f"embedded vision: {recipe.arch} {n_params / 1e6:.2f}M parameters, {len(pretrain)} "
         f"pretraining images of {len(UPSTREAM_CLASSES)} classes, {recipe.steps} steps")
    model.train()
    every = max(1, recipe.steps // 10)
    recent: list[float] = []
    for step in range(recipe.steps):
        rows = torch.multinomial(weights, recipe.batch_size, replacement=True,
                                 generator=generator)
        loss = model(pixel_values=_shifted(x[rows], recipe.shift, generator),
                     labels=y[rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-every:]
        if (step + 1) % every == 0:
            echo(f"embedded vision: {recipe.arch} step {step + 1}/{recipe.steps} loss "
                 f"{sum(recent) / len(recent):.3f} ({time.perf_counter() - start:.0f}s)")
    probe_accuracy = _accuracy(model, x_probe, y_probe)
    seconds = time.perf_counter() - start
    echo(f"embedded vision: {recipe.arch} upstream probe accuracy {probe_accuracy:.3f}, "
         f"{seconds:.0f}s")
    model.save_pretrained(out)
    _processor().save_pretrained(out)
    meta = {"name": f"embedded:{recipe.arch}", "recipe": recipe.to_dict(), "key": recipe.key(),
            "sha256": recipe.sha256(), "build_version": BUILD_VERSION, "parameters": n_params,
            "upstream_classes": list(UPSTREAM_CLASSES), "images": EMBEDDED_IMAGES,
            "pretrain_images": len(pretrain), "probe_images": len(probe),
            "probe_accuracy": round(probe_accuracy, 4), "build_seconds": round(seconds, 2),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    (out / RECIPE_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _folder_is_valid(folder: Path, recipe: VisionRecipe) -> bool:
    try:
        meta = json.loads((folder / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (meta.get("sha256") == recipe.sha256()
            and all((folder / name).is_file() for name in _MODEL_FILES))


def embedded_vision_path(arch: str, recipe: VisionRecipe | None = None,
                         cache_dir: str | Path | None = None,
                         echo: Callable[[str], object] = print) -> Path:
    """The folder of the embedded `arch` model ("vit" or "resnet"), built on first use."""
    from continual_lora.embedded_lm import default_cache_root

    recipe = recipe or VisionRecipe(arch=arch)
    if recipe.arch != arch:
        raise ValueError(f"recipe is for {recipe.arch!r}, not {arch!r}")
    parent = (Path(cache_dir) if cache_dir is not None else default_cache_root())
    folder = parent / "embedded-vision" / f"{arch}-{recipe.key()}"
    if _folder_is_valid(folder, recipe):
        return folder

    def build(tmp: Path) -> None:
        echo(f"embedded vision: building {folder.name} (once; cached under {folder.parent})")
        _build(recipe, tmp, echo)

    build_once(folder, build, lambda f: _folder_is_valid(f, recipe))
    return folder
