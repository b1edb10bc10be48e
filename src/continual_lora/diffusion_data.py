"""Diffusion tasks: which images a concept is trained on, with which captions, how often, and
what its samples are scored against.

A task's data comes from one of:

    images: DIR            images with a caption file beside each (`img.png` + `img.txt`), or a
                           kohya `train_data_dir` whose subfolders are `<repeats>_<tokens>`
    dataset_config: TOML   a kohya sd-scripts dataset config (subsets with `num_repeats`,
                           `class_tokens`, `is_reg`), so "the old 20 images + the new 10 with
                           repeats 2" is one file
    concept: NAME          a class of the embedded images (embedded model only)

The train split holds one entry per image *per repeat* (kohya's `num_repeats` copies per epoch);
the family caches each image's latents and each caption's text-encoder output once, so copies cost
nothing. `is_reg` images (regularization, DreamBooth's class images) train with `prior_weight`.

The held-out split is the evaluation prompts, each sampled with seeds 0..samples_per_prompt-1:
the same images at every stage, so a change in a score is a change of the model. The references
are `eval_images`, or the task's own (non-regularization) training images, as DreamBooth's
DINO/CLIP-I scores compare samples with the subject's photos.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from continual_lora.config import EMBEDDED_DIFFUSION, ConfigError, RunConfig, TaskConfig
from continual_lora.sequence import Split, TaskData, inside_data_dir

# Prompts of the `sample_drift` probe when the config gives none: generic subjects a base model
# draws well before any personalization (what a LoRA should not change).
DRIFT_PROMPTS = ("a photo of a dog", "a painting of a house by the sea", "a red car in a street",
                 "a bowl of fruit on a table")


@dataclass
class ImageProbe:
    """Upstream probe of a diffusion model: fixed-seed samples of `prompts`, compared with
    `references[i]` (images of prompt i), or, when references is None, with the starting
    model's own samples at the same seeds (how far the model drifted)."""

    name: str
    prompts: list[str]
    seeds: list[int]
    references: list[list] | None = None
    manifest: dict = field(default_factory=dict)


def resolve_scorer(task: TaskConfig, run: RunConfig, what: str) -> str:
    """The image similarity a task is scored with; a scorer whose model is missing is an error."""
    model = run.model
    if task.scorer == "auto":
        if model.dino:
            return "dino"
        if model.clip:
            return "clip_i"
        if model.name_or_path == EMBEDDED_DIFFUSION:
            return "silhouette"
        raise ConfigError(
            f"{what}: samples are scored by image similarity to the references: set model.dino "
            "(e.g. facebook/dino-vits16) or model.clip (e.g. openai/clip-vit-base-patch32), as a "
            "local folder or hub id")
    needs = {"dino": model.dino, "clip_i": model.clip}
    if task.scorer in needs and not needs[task.scorer]:
        field_name = "dino" if task.scorer == "dino" else "clip"
        raise ConfigError(f"{what}.scorer {task.scorer}: set model.{field_name} to the model "
                          "that computes it (local folder or hub id)")
    return task.scorer


def _train_records(cfg: TaskConfig, run: RunConfig, what: str
                   ) -> tuple[list, list[int], list[str], dict]:
    """(image records, one epoch's record indices with repeats applied, ignored kohya
    settings, manifest) of a task's training images."""
    from continual_lora import image_data

    if cfg.concept is not None:
        from continual_lora.embedded_diffusion import concept_records

        records = concept_records(cfg.concept, cfg.train_per_class, "train", run.seed,
                                  cfg.instance_prompt, what)
        return (records, list(range(len(records))), [],
                {"source": "embedded", "concept": cfg.concept})
    if cfg.dataset_config is not None:
        path = inside_data_dir(run, run.resolve_path(cfg.dataset_config),
                               f"{what}.dataset_config")
        dataset = image_data.read_kohya_dataset_config(path)
        for subset in dataset.subsets:
            inside_data_dir(run, subset.image_dir, f"{what}.dataset_config image_dir")
        return (dataset.records, dataset.epoch_indices(balance_reg=True), list(dataset.ignored),
                {"source": "kohya_dataset_config", "path": str(path)})
    folder = inside_data_dir(run, run.resolve_path(cfg.images or ""), f"{what}.images")
    if not folder.is_dir():
        raise ConfigError(f"{what}.images: {folder} is not a folder")
    if any(d.is_dir() and image_data.parse_kohya_folder_name(d.name) for d in folder.iterdir()):
        # kohya's train_data_dir: `<repeats>_<class tokens>` subfolders; `.txt` captions, as
        # the kohya_ss GUI writes them
        dataset = image_data.read_kohya_train_dir(folder, caption_extension=".txt")
        return (dataset.records, dataset.epoch_indices(balance_reg=True), list(dataset.ignored),
                {"source": "kohya_train_dir", "path": str(folder)})
    records = image_data.read_image_folder(folder, default_caption=cfg.instance_prompt)
    return (records, image_data.expand_repeats(records), [],
            {"source": "images", "path": str(folder)})


def _reference_records(cfg: TaskConfig, run: RunConfig, train: list, what: str) -> list:
    from continual_lora import image_data

    if cfg.concept is not None:
        from continual_lora.embedded_diffusion import concept_records

        return concept_records(cfg.concept, cfg.eval_per_class, "eval", run.seed, None, what)
    if cfg.eval_images is not None:
        folder = inside_data_dir(run, run.resolve_path(cfg.eval_images), f"{what}.eval_images")
        return image_data.read_image_folder(folder, default_caption="", repeats=1)
    unique = {r.key: r for r in train if not r.is_reg}
    if not unique:
        raise ConfigError(f"{what}: every training image is a regularization image (is_reg); "
                          "give eval_images to compare the samples with")
    return list(unique.values())


def load_diffusion_task(cfg: TaskConfig, index: int, run: RunConfig) -> tuple[TaskData, list]:
    """A diffusion task, and the kohya keys its dataset config had that training ignores."""
    what = f"tasks.{index - 1} ({cfg.name})"
    records, epoch, ignored, manifest = _train_records(cfg, run, what)
    if not records:
        raise ConfigError(f"{what}: no training images found")
    if cfg.max_train_examples is not None:  # a fixed, seeded sample of the images
        rng = np.random.default_rng(run.seed)
        keep = set(rng.choice(len(records), min(len(records), cfg.max_train_examples),
                              replace=False).tolist())
        epoch = [i for i in epoch if i in keep]
    stream = [records[i] for i in epoch]
    records = list({id(r): r for r in stream}.values())
    train_rows = [{"image": r, "caption": r.caption,
                   "weight": cfg.prior_weight if r.is_reg else 1.0} for r in stream]
    captions = Counter(r.caption for r in records if not r.is_reg)
    prompts = list(cfg.prompts or [cfg.instance_prompt or
                                   (captions.most_common(1)[0][0] if captions else "")])
    if not all(p.strip() for p in prompts):
        raise ConfigError(f"{what}.prompts: an evaluation prompt is empty; set `prompts` or "
                          "`instance_prompt`")
    eval_rows = [{"prompt": p, "seed": s} for p in prompts
                 for s in range(run.model.samples_per_prompt)]
    references = _reference_records(cfg, run, records, what)
    manifest.update({"images": len({r.key for r in records}), "train_entries": len(stream),
                     "regularization_images": sum(r.is_reg for r in records),
                     "prompts": prompts, "references": len(references),
                     "repeats": {r.source: r.repeats for r in records}})
    prior = None
    if cfg.prior_images:
        prior = {"class_prompt": cfg.class_prompt, "images": cfg.prior_images,
                 "weight": cfg.prior_weight}
    task = TaskData(
        index, cfg.name, [cfg.name],
        Split([r["caption"] for r in train_rows], np.zeros(len(train_rows), dtype=np.int64),
              train_rows),
        Split([r["prompt"] for r in eval_rows], np.zeros(len(eval_rows), dtype=np.int64),
              eval_rows),
        cfg.repeats, cfg.weight, manifest, resolve_scorer(cfg, run, what), references, prior)
    return task, ignored


def load_upstream_probe(run: RunConfig) -> ImageProbe | None:
    kind, seeds = run.upstream.kind, list(range(run.model.samples_per_prompt))
    if kind == "none":
        return None
    if kind == "concepts":
        from continual_lora.embedded_diffusion import pretraining_probe

        return pretraining_probe(seeds, run.seed)
    prompts = list(run.upstream.prompts or DRIFT_PROMPTS)
    return ImageProbe("upstream:sample_drift", prompts, seeds, None,
                      {"kind": "sample_drift", "prompts": prompts})


def load_diffusion_sequence(run: RunConfig) -> tuple[list[TaskData], ImageProbe | None]:
    tasks = []
    for i, cfg in enumerate(run.tasks, start=1):
        task, ignored = load_diffusion_task(cfg, i, run)
        if ignored:
            task.manifest["kohya_keys_ignored"] = ignored
        tasks.append(task)
    return tasks, load_upstream_probe(run)
