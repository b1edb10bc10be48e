"""The embedded diffusion model: a small latent diffusion pipeline pretrained in-process on the
embedded images (animal-mnist silhouettes and scikit-learn's digits), offline, and cached.

It is a small-scale stand-in for Stable Diffusion, built so the personalization benchmark runs
here without downloads: the same pipeline shape (CLIP tokenizer and text encoder, KL VAE,
cross-attention UNet, DDPM/DDIM schedulers; `diffusion_parts.py`), saved as an ordinary diffusers
folder that `StableDiffusionPipeline.from_pretrained` loads. Images are 32×32 RGB (white on
black), latents 4×8×8.

Pretraining, in three steps (each seeded; `recipe.json` records the recipe, its key, the losses
and wall seconds):

1. the VAE learns to reconstruct every pretraining image (MSE + a small KL term); its scaling
   factor is then set to 1/std of the latents, as SD's 0.18215 was;
2. the UNet and the text encoder learn ε-prediction on the cached latents of the pretraining
   classes, with captions `a silhouette of a <animal>` / `a handwritten <digit>`, dropped to the
   empty caption 10% of the time so that classifier-free guidance works;
3. the stand-in scorer (`image_scoring.SilhouetteNet`) learns to classify all 20 classes, the
   held-out ones included (it plays DINO/CLIP, which have seen every kind of image): its
   features score samples against reference images.

Held out from the denoiser's pretraining: `HELD_OUT` classes, the new concepts of the benchmark;
their words are in the tokenizer's vocabulary but never trained on (like DreamBooth's rare
tokens). Every class's images are split once (fixed seed) into a training pool and a reference
pool of `REFERENCE_IMAGES` images that no training ever sees.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from continual_lora.build_cache import build_once
from continual_lora.config import ConfigError
from continual_lora.diffusion_parts import PipelineSizes

HELD_OUT = ("giraffe", "elephant", "zebra", "seven")
REFERENCE_IMAGES = 40  # per class, never trained on: the references samples are scored against
SPLIT_SEED = 20241201
EXTRA_WORDS = ("a", "an", "the", "of", "silhouette", "handwritten", "photo", "drawing", "sks",
               "digit", "animal", "number", "in", "style")


def caption(name: str) -> str:
    """The caption of a class: digits are `a handwritten <name>`, animals `a silhouette of a
    <name>`."""
    from continual_lora.data.images import DIGIT_CLASSES

    return f"a handwritten {name}" if name in DIGIT_CLASSES else f"a silhouette of a {name}"


@dataclass(frozen=True)
class DiffusionRecipe:
    """Everything that determines the embedded diffusion model (its cache key)."""

    # 32×32 images, latents 4×8×8 (the VAE halves the side twice): a UNet step at batch 32
    # costs about 0.12 s on 2 CPU cores, 16×16 latents cost 4× that.
    sizes: PipelineSizes = PipelineSizes(image_size=32, vae_channels=(16, 32, 32),
                                         unet_channels=(32, 64), layers_per_block=1,
                                         attention_head_dim=8, text_width=32, text_layers=2,
                                         text_heads=4, max_length=12, norm_groups=8)
    held_out: tuple[str, ...] = HELD_OUT
    vae_steps: int = 600
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    unet_steps: int = 3000
    # Draw each UNet and scorer batch class-balanced: the digits have ~140 pretraining images a
    # class, the animals ~960, and drawn by image the digit words got too few steps to be
    # learned (v2's samples ignored them: every digit prompt gave the same image at a seed).
    balanced_classes: bool = True
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    scorer_steps: int = 600
    batch_size: int = 32
    seed: int = 0
    # 2: every caption word is one token (1 cut captions off at 12 tokens); 3: class-balanced
    # draws, 3000 UNet and 600 scorer steps (2 had not learned the digit words)
    version: int = 3

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def embedded_diffusion_path(recipe: DiffusionRecipe | None = None, cache_root: Path | None = None,
                            echo=print) -> Path:
    """The pipeline folder of the recipe, pretrained on first use (a few minutes on 2 CPU
    cores) and cached under `cache_root` (built in a temporary folder, renamed into place)."""
    from continual_lora.embedded_lm import default_cache_root

    recipe = recipe or DiffusionRecipe()
    root = (cache_root or default_cache_root()) / "embedded-diffusion"
    folder = root / f"silhouette-diffusion-{recipe.key()}"

    def build(tmp: Path) -> None:
        echo(f"building the embedded diffusion model (first use; cached in {folder})")
        pretrain(recipe, tmp, echo)

    return build_once(folder, build, lambda f: (f / "recipe.json").is_file())


def scorer_folder(pipeline_folder: str | Path) -> Path:
    folder = Path(pipeline_folder) / "scorer"
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{pipeline_folder} has no stand-in scorer (scorer/model.safetensors): "
                          "the `silhouette` scorer belongs to the embedded diffusion model")
    return folder


# -- data ---------------------------------------------------------------------------------------


@functools.cache
def _images():
    """The embedded images, read once per process (every concept and probe class reads them)."""
    from continual_lora.data.images import load_embedded_images

    return load_embedded_images("animal-mnist+digits")


@functools.cache
def _pools() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per class of the embedded images: (training pool, reference pool), fixed once for
    everyone (and computed once per process)."""
    images = _images()
    labels, n_classes = images.labels, len(images.classes)
    pools = {}
    for c in range(n_classes):
        idx = np.random.default_rng([SPLIT_SEED, c]).permutation(np.flatnonzero(labels == c))
        pools[c] = (np.sort(idx[REFERENCE_IMAGES:]), np.sort(idx[:REFERENCE_IMAGES]))
    return pools


def concept_records(concept: str, n: int, split: str, seed: int, instance_prompt: str | None,
                    what: str) -> list:
    """`n` images of an embedded class as image records: from its training pool (a sample
    drawn with `seed`) or its reference pool (`split` "eval": the first `n`)."""
    from continual_lora.image_data import ImageRecord

    images = _images()
    if concept not in images.classes:
        raise ConfigError(f"{what}.concept: {concept!r} is not an embedded class; choose one of "
                          f"{', '.join(images.classes)} (held out from pretraining: "
                          f"{', '.join(HELD_OUT)})")
    c = images.classes.index(concept)
    train_pool, reference_pool = _pools()[c]
    if split == "train":
        if n > len(train_pool):
            raise ConfigError(f"{what}.train_per_class: {concept} has {len(train_pool)} "
                              f"training images; ask for at most that many")
        chosen = np.sort(np.random.default_rng([seed, c]).choice(train_pool, n, replace=False))
    else:
        chosen = reference_pool[:min(n, len(reference_pool))]
    size = DiffusionRecipe().sizes.image_size
    text = instance_prompt or caption(concept)
    out = []
    for i in chosen:
        array = _rgb(images.images[i], size)
        out.append(ImageRecord(key=f"embedded/{concept}/{int(i)}", path=None, array=array,
                               caption=text, repeats=1, is_reg=False, source=concept))
    return out


def _rgb(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    small = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(small)[..., None], 3, axis=-1)


def pretraining_probe(seeds: list[int], seed: int):
    """The `concepts` upstream probe: each pretraining class's caption, sampled with `seeds`,
    against its reference images."""
    from continual_lora.diffusion_data import ImageProbe

    images = _images()
    classes = [c for c in images.classes if c not in HELD_OUT]
    prompts = [caption(c) for c in classes]
    references = [concept_records(c, REFERENCE_IMAGES, "eval", seed, None, "upstream")
                  for c in classes]
    return ImageProbe("upstream:concepts", prompts, seeds, references,
                      {"kind": "concepts", "classes": classes,
                       "references_per_class": REFERENCE_IMAGES})


# -- pretraining --------------------------------------------------------------------------------


def _draw_weights(labels: np.ndarray, balanced: bool):
    """Per-image probabilities of a draw: uniform over images, or uniform over classes."""
    import torch

    if not balanced:
        return torch.ones(len(labels), dtype=torch.float64)
    counts = np.bincount(labels)
    return torch.from_numpy(1.0 / counts[labels])


def _schedule(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(recipe: DiffusionRecipe, folder: Path, echo=print) -> dict:
    """Pretrain the pipeline and its stand-in scorer into `folder`; returns the report."""
    import torch
    import torch.nn.functional as F

    from continual_lora.diffusion_parts import build_components, save_pipeline

    start = time.perf_counter()
    data = _images()
    size = recipe.sizes.image_size
    pools = _pools()
    held = {data.classes.index(c) for c in recipe.held_out}
    train_idx = np.concatenate([pools[c][0] for c in range(len(data.classes)) if c not in held])
    pixels = torch.from_numpy(np.stack([_rgb(data.images[i], size) for i in train_idx]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    captions = [caption(data.classes[data.labels[i]]) for i in train_idx]
    words = sorted({w for c in data.classes for w in caption(c).split()} | set(EXTRA_WORDS))
    parts = build_components(recipe.sizes, words, recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    report: dict = {"recipe": dataclasses.asdict(recipe), "key": recipe.key(),
                    "pretraining_images": len(train_idx),
                    "pretraining_classes": [c for c in data.classes if c not in recipe.held_out]}

    # 1. VAE
    vae = parts["vae"].train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, recipe.vae_steps))
    for step in range(recipe.vae_steps):
        batch = pixels[torch.randint(0, len(pixels), (recipe.batch_size,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, batch)
        loss = mse + recipe.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == recipe.vae_steps - 1:
            echo(f"  vae step {step}/{recipe.vae_steps}: reconstruction mse "
                 f"{float(mse.detach()):.4f}")
    report["vae_reconstruction_mse"] = float(mse.detach())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean
                             for i in range(0, len(pixels), 256)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    report["vae_scaling_factor"] = scaling

    # 2. UNet + text encoder on cached latents
    unet, text_encoder, tokenizer = parts["unet"].train(), parts["text_encoder"].train(), \
        parts["tokenizer"]
    noise_scheduler = parts["scheduler"]
    unique = sorted(set(captions)) + [""]
    ids = tokenizer(unique, padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    caption_index = torch.tensor([unique.index(c) for c in captions])
    draw_weights = _draw_weights(data.labels[train_idx], recipe.balanced_classes)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, recipe.unet_steps))
    ema = None
    for step in range(recipe.unet_steps):
        rows = torch.multinomial(draw_weights, recipe.batch_size, replacement=True,
                                 generator=gen)
        which = caption_index[rows].clone()
        which[torch.rand(len(rows), generator=gen) < recipe.caption_dropout] = len(unique) - 1
        cond = text_encoder(ids[which]).last_hidden_state
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(rows),),
                          generator=gen)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        if step % 250 == 0 or step == recipe.unet_steps - 1:
            echo(f"  unet step {step}/{recipe.unet_steps}: loss {ema:.4f}")
    report["unet_loss"] = ema
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    save_pipeline(parts, folder)

    # 3. the stand-in scorer, on every class's training pool
    report.update(_train_scorer(data, pools, recipe, folder / "scorer", gen, echo))
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    (folder / "recipe.json").write_text(json.dumps(report, indent=2))
    echo(f"embedded diffusion model built in {report['wall_seconds']:.0f} s")
    return report


def _train_scorer(data, pools, recipe: DiffusionRecipe, folder: Path, gen, echo) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from continual_lora.image_scoring import SilhouetteNet

    size = recipe.sizes.image_size
    n = len(data.classes)
    train_idx = np.concatenate([pools[c][0] for c in range(n)])
    ref_idx = np.concatenate([pools[c][1] for c in range(n)])

    def tensors(idx):
        rgb = np.stack([_rgb(data.images[i], size) for i in idx])
        return SilhouetteNet.prepare(rgb), torch.from_numpy(data.labels[idx])

    x, y = tensors(train_idx)
    x_ref, y_ref = tensors(ref_idx)
    net = SilhouetteNet(n)
    draw_weights = _draw_weights(data.labels[train_idx], recipe.balanced_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, recipe.scorer_steps))
    for _ in range(recipe.scorer_steps):
        rows = torch.multinomial(draw_weights, 64, replacement=True, generator=gen)
        batch = x[rows]
        # small random shifts: samples are never pixel-aligned with the training images
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(net(batch), y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x_ref).argmax(1) == y_ref).float().mean())
    echo(f"  stand-in scorer: accuracy {accuracy:.3f} on the {len(ref_idx)} reference images")
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"classes": data.classes, "width": 32,
                                                    "reference_accuracy": accuracy}, indent=2))
    return {"scorer_reference_accuracy": accuracy}
