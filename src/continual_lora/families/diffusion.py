"""Diffusion models: a diffusers Stable Diffusion pipeline (SD 1.x, SDXL) whose UNet carries the
LoRA, trained DreamBooth-style on each task's images and scored on fixed-seed samples.

    backbone (what PEFT wraps)   the UNet (default targets: the attention projections
                                 to_q, to_k, to_v, to_out.0, as diffusers' and kohya's scripts;
                                 `adapters.DEFAULT_TARGETS`)
    frozen, run once per item    the VAE (image → latents) and the text encoder(s) (caption →
                                 hidden states), cached like kohya's `cache_latents` and
                                 `cache_text_encoder_outputs`: training runs the UNet only
    training loss                ε-prediction MSE (v-prediction when the scheduler says so) at a
                                 uniformly drawn timestep, per example weighted (prior images and
                                 kohya `is_reg` subsets by `prior_weight`)
    task score                   fixed-seed DDIM samples of the task's prompts, their mean cosine
                                 similarity to the task's reference images (image_scoring.py)

Latents are the VAE posterior's mean times its scaling factor (deterministic, so a cached latent
is the latent; kohya caches one posterior sample). Captions are encoded without dropout.

`correct` (per sample, for per-sample forgetting): the sample is nearer (mean similarity) to its
own task's references than to any other task's (or any upstream concept's): it is recognisably
the concept among those the run knows.

SDXL: both text encoders' penultimate hidden states concatenated, the second one's pooled
projection and the size/crop time ids as added conditions.

SD3 (`SD3Transformer2DModel`, a rectified-flow transformer): the LoRA goes on the joint
attention's projections of both streams; captions are encoded as `StableDiffusion3Pipeline`
does (both CLIPs' penultimate states side by side, zero-padded to the T5 width, followed by the
T5 states, or zeros when the pipeline has no T5; the two pooled projections concatenated).
Training is flow matching as diffusers' SD3 DreamBooth script: σ from a logit-normal draw of the
training schedule, noisy = (1 − σ)·x0 + σ·ε, target ε − x0. Sampling is the flow-matching Euler
scheduler with classifier-free guidance.

FLUX (`FluxTransformer2DModel`): the same flow matching on latents packed into 2×2 patches (the
module packs and unpacks, so caches and losses stay in (C, H, W)); captions as `FluxPipeline`
encodes them (T5's states, CLIP's pooled output); FLUX-dev's distilled guidance is an input
(`model.guidance_scale`, in training as in diffusers' FLUX script) instead of a second pass;
the sampler's σ grid and shift are the pipeline's. Samples equal the pipelines' own for the same
seed (tests). Other denoisers are refused with a message.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from continual_lora.config import EMBEDDED_DIFFUSION, ConfigError, ModelConfig
from continual_lora.families.base import ForwardOutput, ModelFamily, TaskScore
from continual_lora.families.common import DTYPES, fingerprint_module
from continual_lora.image_scoring import mean_similarity
from continual_lora.sequence import TaskData


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """An in-memory uint8 RGB image at `size`² (bilinear), unchanged when it already is."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


#: Samples per row of a stage's grid (samples/stage-NN.png).
GRID_COLUMNS = 8
#: T5 tokens of an SD3 caption (`StableDiffusion3Pipeline`'s default max_sequence_length).
SD3_T5_TOKENS = 256


class DiffusionModule(nn.Module):
    """The denoiser (possibly PEFT-wrapped): noisy latents, timesteps, text conditions →
    prediction. This is what the optimizer and accelerate see. `added` is SDXL's
    `added_cond_kwargs`, or SD3's and FLUX's `{"pooled": pooled projections}` (FLUX: and
    `"guidance"`, its distilled guidance scale, when the transformer embeds one).

    FLUX sees latents packed into 2×2 patches (`FluxPipeline._pack_latents`); they are packed
    here and the prediction unpacked, so the family works in (C, H, W) latents for every kind."""

    def __init__(self, backbone: nn.Module, kind: str = "unet"):
        super().__init__()
        self.backbone = backbone
        self.kind = kind

    def forward(self, noisy, timesteps, cond, added=None):
        if self.kind == "sd3":
            return self.backbone(hidden_states=noisy, timestep=timesteps,
                                 encoder_hidden_states=cond,
                                 pooled_projections=added["pooled"]).sample
        if self.kind == "flux":
            return self._flux(noisy, timesteps, cond, added)
        kwargs = {"added_cond_kwargs": added} if added else {}
        return self.backbone(noisy, timesteps, encoder_hidden_states=cond, **kwargs).sample


    def _flux(self, noisy, timesteps, cond, added):
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device,
                                                         noisy.dtype)
        txt_ids = torch.zeros((cond.shape[1], 3), device=noisy.device, dtype=noisy.dtype)
        out = self.backbone(hidden_states=packed, timestep=timesteps / 1000,
                            guidance=added.get("guidance"), pooled_projections=added["pooled"],
                            encoder_hidden_states=cond, txt_ids=txt_ids, img_ids=img_ids).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


#: Denoiser classes the family trains: class name → (kind, pipeline subfolder).
DENOISERS = {"UNet2DConditionModel": ("unet", "unet"),
             "SD3Transformer2DModel": ("sd3", "transformer"),
             "FluxTransformer2DModel": ("flux", "transformer")}
#: Tokens of FLUX's T5 caption (`FluxPipeline`'s default max_sequence_length).
FLUX_T5_TOKENS = 512


class DiffusionFamily(ModelFamily):
    """A diffusers SD 1.x / SDXL pipeline (hub id or local folder, or the embedded model)."""

    name = "diffusion"
    score_definition = (
        "R[t][i]: task i's score after training through task t (row 0: before training): the "
        "mean cosine similarity of its prompts' fixed-seed samples to its reference images "
        "under the first scorer (`scored_with`; `details` holds every image metric, CLIP-T "
        "prompt fidelity and `recognised`, the fraction of samples nearest their own task's "
        "references). U[t]: the upstream probe's score the same way (`concepts`: samples of the "
        "pretraining classes against their references, `recognised` the fraction nearest their "
        "own class; `sample_drift`: similarity to the base model's samples at the same seeds).")

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        if cfg.name_or_path == EMBEDDED_DIFFUSION:
            from continual_lora.embedded_diffusion import embedded_diffusion_path

            self.path = str(embedded_diffusion_path())
        else:
            from continual_lora.families.common import resolve_model_path

            self.path = resolve_model_path(cfg.name_or_path)
        self.device = torch.device("cpu")
        self.accelerator = None
        self._latents: dict[str, torch.Tensor] = {}
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        #: how many items each frozen encoder has processed (each item once: the caches work)
        self.encoder_calls: Counter = Counter()
        self._encoders: dict[str, object] = {}
        self._reference_embeddings: dict[tuple[str, str], torch.Tensor] = {}
        self._drift_base: dict[str, torch.Tensor] = {}
        self._tasks: dict[int, TaskData] = {}
        self._all_tasks: list[TaskData] = []
        self._probe = None
        #: the latest samples per task name (and "upstream"), uint8 (N, H, W, 3)
        self.samples: dict[str, np.ndarray] = {}

    # -- loading -------------------------------------------------------------------------------

    def _pipeline(self):
        from diffusers import DiffusionPipeline

        try:
            return DiffusionPipeline.from_pretrained(self.path, dtype=DTYPES[self.cfg.dtype],
                                                     use_safetensors=True,
                                                     **self._absent_components())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"model.name_or_path: cannot load a diffusers pipeline from "
                f"{self.cfg.name_or_path!r}: {exc}. Give a local pipeline folder (with "
                "model_index.json and safetensors weights) or a hub id reachable from here."
            ) from None

    def _absent_components(self) -> dict:
        """Components the pipeline class takes but the folder was saved without (an SD3
        pipeline saved with `text_encoder_3=None` to drop T5): passed as None, as its user
        loaded it, instead of failing."""
        import diffusers

        try:
            index = diffusers.DiffusionPipeline.load_config(self.path)
        except (OSError, ValueError):
            return {}  # from_pretrained reports it
        pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
        if pipeline_class is None:
            return {}
        expected, _ = pipeline_class._get_signature_keys(pipeline_class)
        return {name: None for name in expected
                if name not in index or index[name] in (None, [None, None])}

    def _load_backbone(self) -> nn.Module:
        import diffusers

        denoiser = getattr(diffusers, self.denoiser_class).from_pretrained(
            self.path, subfolder=DENOISERS[self.denoiser_class][1],
            dtype=DTYPES[self.cfg.dtype], use_safetensors=True)
        return denoiser.requires_grad_(False)

    def load(self) -> None:
        pipe = self._pipeline()
        denoiser = getattr(pipe, "unet", None)
        if denoiser is None:
            denoiser = getattr(pipe, "transformer", None)
        name = type(denoiser).__name__
        if name not in DENOISERS or not hasattr(pipe, "vae"):
            raise ConfigError(
                f"model.name_or_path: {self.cfg.name_or_path!r} is a {type(pipe).__name__}"
                f"{f' with a {name}' if denoiser is not None else ''}; the diffusion family "
                "trains Stable Diffusion 1.x/2.x and SDXL (UNet), SD3 (SD3Transformer2DModel) and "
                "FLUX (FluxTransformer2DModel) pipelines.")
        self.denoiser_class = name
        self.kind = DENOISERS[name][0]
        self.flow = self.kind in ("sd3", "flux")  # rectified flow: flow-matching schedule
        self.vae = pipe.vae.requires_grad_(False).eval()
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        self.text_encoders = [getattr(pipe, n, None) for n in names]
        self.tokenizers = [getattr(pipe, n.replace("text_encoder", "tokenizer"), None)
                           for n in names]
        if self.kind != "sd3":  # SD3 keeps its slots: the third (T5) may be absent
            self.text_encoders = [m for m in self.text_encoders if m is not None]
            self.tokenizers = [t for t in self.tokenizers if t is not None]
        for encoder in self.text_encoders:
            if encoder is not None:
                encoder.requires_grad_(False).eval()
        self.sdxl = self.kind == "unet" and len(self.text_encoders) == 2
        self._set_schedulers(pipe.scheduler.config)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.kind == "sd3":
            downsampling = denoiser.config.patch_size
        elif self.kind == "flux":
            downsampling = 2  # the 2×2 packing
        else:
            downsampling = 2 ** (len(denoiser.config.block_out_channels) - 1)
        # FLUX's config has no sample size: its pipeline's default is 128 latent pixels
        latent_side = getattr(denoiser.config, "sample_size", None) or 128
        self.image_size = self.cfg.image_size or latent_side * self.vae_scale
        if self.image_size % (self.vae_scale * downsampling):
            raise ConfigError(f"model.image_size {self.image_size} must be a multiple of "
                              f"{self.vae_scale * downsampling} (the VAE's and the denoiser's "
                              "downsampling)")
        denoiser.requires_grad_(False)
        self._fingerprint = fingerprint_module(denoiser)
        self.module = DiffusionModule(denoiser, self.kind)
        del pipe

    def _set_schedulers(self, config) -> None:
        """The training schedule and the sampler: DDPM/DDIM for a UNet, flow matching (Euler)
        for SD3 and FLUX."""
        if self.flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
            self.sampler = FlowMatchEulerDiscreteScheduler.from_config(config)
        else:
            from diffusers import DDIMScheduler, DDPMScheduler

            self.noise_scheduler = DDPMScheduler.from_config(config)
            self.sampler = DDIMScheduler.from_config(config)

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.vae.to(device)
        for encoder in self.text_encoders:
            if encoder is not None:
                encoder.to(device)

    def load_saved_backbone(self, folder: Path) -> nn.Module:
        import diffusers

        return getattr(diffusers, self.denoiser_class).from_pretrained(str(folder)).to(
            self.device)

    # -- frozen encoders, run once per item ----------------------------------------------------

    def _pixels(self, record) -> torch.Tensor:
        """An image record as (3, S, S) in [-1, 1] at the training resolution."""
        from continual_lora.image_data import load_image

        if record.array is not None:
            array = resize_array(record.array, self.image_size)
        else:
            array = load_image(record.path, self.image_size)
        return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0

    @torch.no_grad()
    def cache_latents(self, records: list, batch_size: int = 32) -> None:
        """Encode the images not cached yet (each once), in batches."""
        todo = list({r.key: r for r in records if r.key not in self._latents}.values())
        dtype = self.vae.dtype
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            pixels = torch.stack([self._pixels(r) for r in chunk]).to(self.device, dtype)
            latents = self.vae.encode(pixels).latent_dist.mean
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            latents = (latents - shift) * self.vae.config.scaling_factor
            for record, latent in zip(chunk, latents.float().cpu(), strict=True):
                self._latents[record.key] = latent
            self.encoder_calls["vae"] += len(chunk)

    def latent(self, key: str) -> torch.Tensor:
        """The cached latent of an image record's key."""
        return self._latents[key]

    @torch.no_grad()
    def cache_text(self, captions: list[str], batch_size: int = 64) -> None:
        """Encode the captions not cached yet (each once), in batches."""
        todo = sorted({c for c in captions if c not in self._text})
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            hidden, pooled = self._encode_text(chunk)
            for i, caption in enumerate(chunk):
                self._text[caption] = (hidden[i].float().cpu(),
                                       None if pooled is None else pooled[i].float().cpu())
            self.encoder_calls["text"] += len(chunk)

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "sd3":
            return self._encode_text_sd3(captions)
        if self.kind == "flux":
            return self._encode_text_flux(captions)
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(captions, padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            if self.sdxl:  # SDXL conditions on the penultimate layer of both encoders
                states.append(out.hidden_states[-2])
                pooled = out[0] if encoder is self.text_encoders[-1] else pooled
            else:
                states.append(out.last_hidden_state)
        return torch.cat(states, dim=-1), pooled

    def _encode_text_sd3(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As `StableDiffusion3Pipeline.encode_prompt` (no clip skip)."""
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2], strict=True):
            ids = tokenizer(captions, padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])
            pooled.append(out[0])
        width = self.module.backbone.config.joint_attention_dim
        clip = torch.cat(clip_states, dim=-1)
        clip = F.pad(clip, (0, width - clip.shape[-1]))
        t5_tokenizer, t5 = self.tokenizers[2], self.text_encoders[2]
        if t5 is None:  # the pipeline's stand-in for a missing T5: zeros, 256 tokens
            t5_states = clip.new_zeros((len(captions), SD3_T5_TOKENS, width))
        else:
            ids = t5_tokenizer(captions, padding="max_length", truncation=True,
                               max_length=SD3_T5_TOKENS, return_tensors="pt").input_ids
            t5_states = t5(ids.to(self.device))[0]
        return torch.cat([clip, t5_states.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def _encode_text_flux(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As `FluxPipeline.encode_prompt`: T5's states (512 tokens) and CLIP's pooled output."""
        (clip_tokenizer, t5_tokenizer), (clip, t5) = self.tokenizers, self.text_encoders
        ids = clip_tokenizer(captions, padding="max_length", truncation=True,
                             max_length=clip_tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output
        ids = t5_tokenizer(captions, padding="max_length", truncation=True,
                           max_length=FLUX_T5_TOKENS, return_tensors="pt").input_ids
        return t5(ids.to(self.device), output_hidden_states=False)[0], pooled

    def _conditions(self, captions: list[str]) -> tuple[torch.Tensor, dict | None]:
        self.cache_text(captions)
        dtype = self.module.backbone.dtype
        cond = torch.stack([self._text[c][0] for c in captions]).to(self.device, dtype)
        if self.flow:
            pooled = torch.stack([self._text[c][1] for c in captions]).to(self.device, dtype)
            added = {"pooled": pooled}
            if self.kind == "flux" and self.module.backbone.config.guidance_embeds:
                # FLUX-dev is guidance-distilled: the scale is an input, in training too (as
                # diffusers' FLUX DreamBooth script), not a second pass
                added["guidance"] = torch.full((len(captions),), self.cfg.guidance_scale,
                                               device=self.device, dtype=torch.float32)
            return cond, added
        if not self.sdxl:
            return cond, None
        pooled = torch.stack([self._text[c][1] for c in captions]).to(self.device, dtype)
        size = self.image_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(captions),
                                device=self.device, dtype=dtype)
        return cond, {"text_embeds": pooled, "time_ids": time_ids}

    # -- the engine's interface -----------------------------------------------------------------

    def begin_task(self, task: TaskData, tasks: list[TaskData], trainable_tasks: list[int],
                   reinit_tasks: list[int]) -> None:
        self._tasks[task.index] = task
        self.complete_task_data(task)
        records = task.train.records
        self.cache_latents([r["image"] for r in records if not r.get("latent_only")])
        self.cache_text([r["caption"] for r in records])

    def complete_task_data(self, task: TaskData) -> None:
        """Add the task's prior-preservation images, once, sampled from the model as it is
        now (before the task). Strategies that cache something per training example before
        the family's `begin_task` (lwf's teacher) call it first, so the cache covers them."""
        if task.prior and not task.manifest.get("prior_images_added"):
            self._add_prior_images(task)

    def collate(self, examples: list[tuple[int, int]], tasks: dict[int, TaskData]) -> dict:
        rows = [tasks[t].train.records[i] for t, i in examples]
        self.cache_latents([r["image"] for r in rows])  # encodes only what is not cached
        latents = torch.stack([self._latents[r["image"].key] for r in rows]).to(self.device)
        cond, added = self._conditions([r["caption"] for r in rows])
        noise = torch.randn_like(latents)
        timesteps = self.draw_timesteps(len(rows)).to(self.device)
        noisy = self.add_noise(latents, noise, timesteps)
        target = self.training_target(latents, noise, timesteps)
        dtype = self.module.backbone.dtype
        return {"noisy": noisy.to(dtype), "timesteps": timesteps, "cond": cond, "added": added,
                "target": target,
                "weights": torch.tensor([r["weight"] for r in rows], device=self.device),
                "task_ids": torch.tensor([t for t, _ in examples], device=self.device),
                "example_ids": torch.tensor([i for _, i in examples], device=self.device)}

    def forward(self, batch: dict, module: nn.Module | None = None) -> ForwardOutput:
        prediction = (module or self.module)(batch["noisy"], batch["timesteps"], batch["cond"],
                                             batch["added"])
        per_example = F.mse_loss(prediction.float(), batch["target"].float(),
                                 reduction="none").mean(dim=(1, 2, 3))
        loss = (per_example * batch["weights"]).mean()
        return ForwardOutput(loss, per_example.detach(), {}, prediction.new_zeros(0),
                             prediction=prediction)

    # -- the training schedule: DDPM (ε or v) for a UNet, flow matching for SD3 ----------------

    def draw_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps: uniform over the DDPM schedule; for flow matching, diffusers'
        SD3 default (a logit-normal draw of the schedule's index)."""
        steps = self.noise_scheduler.config.num_train_timesteps
        if not self.flow:
            return torch.randint(0, steps, (n,), generator=generator)
        u = torch.sigmoid(torch.randn((n,), generator=generator))
        index = (u * steps).long().clamp(max=steps - 1)
        return self.noise_scheduler.timesteps[index].float()

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        if not self.flow:
            return self.noise_scheduler.add_noise(latents, noise, timesteps)
        sigma = self._sigma(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return noise - latents  # the flow's velocity
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def _sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # the flow-matching training schedule has timesteps = σ · num_train_timesteps
        sigma = timesteps.float() / self.noise_scheduler.config.num_train_timesteps
        return sigma.to(like.device, like.dtype).view(-1, *[1] * (like.dim() - 1))

    def predict(self, module: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                captions: list[str]) -> torch.Tensor:
        """The denoiser's prediction for given noisy latents (strategies' extra terms)."""
        cond, added = self._conditions(captions)
        dtype = self.module.backbone.dtype
        return module(noisy.to(self.device, dtype), timesteps.to(self.device), cond, added)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    @torch.no_grad()
    def encode_split(self, task: TaskData, split: str, batch_size: int) -> torch.Tensor:
        """Mean text-encoder state of each example's caption (train) or prompt (eval)."""
        texts = getattr(task, split).texts
        self.cache_text(texts)
        return torch.stack([self._text[t][0].mean(0) for t in texts])

    def save_task_parts(self, out_dir: Path) -> None:
        """Beside the PEFT adapter, the same adapter in diffusers' format
        (`pytorch_lora_weights.safetensors`), so `pipe.load_lora_weights(adapter_dir)` works."""
        adapter = out_dir / "adapter"
        if (adapter / "adapter_model.safetensors").is_file():
            from continual_lora.convert import write_diffusers_weights

            write_diffusers_weights(adapter, adapter, DENOISERS[self.denoiser_class][1])

    def write_stage_media(self, folder: Path, stage: int) -> Path | None:
        """The stage's sample grid: a row per task (and the upstream probe), a column per seed."""
        if not self.samples:
            return None
        from continual_lora.sample_grid import save_grid

        return save_grid(self.samples, folder / f"stage-{stage:02d}.png", GRID_COLUMNS)

    # -- sampling and scoring ------------------------------------------------------------------

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seeds: list[int], batch_size: int,
                       steps: int | None = None) -> torch.Tensor:
        """Samples (latents) of `prompts[i]` from the noise of `seeds[i]`: DDIM (UNet) or
        Euler flow matching (SD3, FLUX), with classifier-free guidance (FLUX: none, its
        guidance is an input of the transformer); the noise is drawn on the CPU, so a seed gives
        the same image on any device."""
        steps = steps or self.cfg.inference_steps
        denoiser = self.module
        channels = self.module.backbone.config.in_channels
        if self.kind == "flux":
            channels //= 4  # in_channels counts the 2×2 packed latent
        side = self.image_size // self.vae_scale
        guidance = 1.0 if self.kind == "flux" else self.cfg.guidance_scale
        out = []
        with self._eval():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                latents = torch.stack([
                    torch.randn((channels, side, side), generator=torch.Generator().manual_seed(s))
                    for s in seeds[start:start + batch_size]]).to(self.device)
                self._set_sampler_steps(steps, side)
                latents = latents * getattr(self.sampler, "init_noise_sigma", 1.0)
                cond, added = self._conditions(list(chunk))
                if guidance > 1.0:
                    uncond, added_u = self._conditions([""] * len(chunk))
                    cond = torch.cat([uncond, cond])
                    if added:
                        added = {k: torch.cat([added_u[k], v]) for k, v in added.items()}
                dtype = self.module.backbone.dtype
                for t in self.sampler.timesteps:
                    x = torch.cat([latents, latents]) if guidance > 1.0 else latents
                    if hasattr(self.sampler, "scale_model_input"):
                        x = self.sampler.scale_model_input(x, t)
                    pred = denoiser(x.to(dtype), t.expand(len(x)), cond, added).float()
                    if guidance > 1.0:
                        p_uncond, p_cond = pred.chunk(2)
                        pred = p_uncond + guidance * (p_cond - p_uncond)
                    latents = self.sampler.step(pred, t, latents).prev_sample
                out.append(latents.float().cpu())
        return torch.cat(out)

    def _set_sampler_steps(self, steps: int, side: int) -> None:
        """The sampler's steps as each pipeline sets them: FluxPipeline passes its own σ grid
        (1 → 1/steps, shifted or not); FLUX and SD3.5-style schedules with dynamic shifting
        shift by the image's token count."""
        config, kwargs = self.sampler.config, {}
        if self.kind == "flux":
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if self.flow and config.get("use_dynamic_shifting"):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
                calculate_shift,
            )

            patch = 2 if self.kind == "flux" else self.module.backbone.config.patch_size
            kwargs["mu"] = calculate_shift((side // patch) ** 2, config.base_image_seq_len,
                                           config.max_image_seq_len, config.base_shift,
                                           config.max_shift)
        self.sampler.set_timesteps(None if "sigmas" in kwargs else steps, device=self.device,
                                   **kwargs)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Latents → uint8 RGB images (N, H, W, 3)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        images = []
        for start in range(0, len(latents), batch_size):
            z = latents[start:start + batch_size].to(self.device, self.vae.dtype)
            x = self.vae.decode(z / self.vae.config.scaling_factor + shift).sample.float()
            images.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                          .permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(images)

    def sample(self, prompts: list[str], seeds: list[int], batch_size: int) -> np.ndarray:
        return self.decode(self.sample_latents(prompts, seeds, batch_size))

    def encoder(self, scorer: str):
        """The image encoder of a scorer, loaded once."""
        if scorer not in self._encoders:
            from continual_lora import image_scoring

            if scorer == "silhouette":
                from continual_lora.embedded_diffusion import scorer_folder

                self._encoders[scorer] = image_scoring.SilhouetteEncoder(scorer_folder(self.path),
                                                                         self.device)
            elif scorer == "dino":
                self._encoders[scorer] = image_scoring.DinoEncoder(self.cfg.dino, self.device)
            else:
                self._encoders[scorer] = image_scoring.ClipEncoder(self.cfg.clip, self.device)
        return self._encoders[scorer]

    def _scorers(self, primary: str) -> list[str]:
        """The primary scorer first, then every other one the config can compute."""
        names = [primary]
        for name, given in (("dino", self.cfg.dino), ("clip_i", self.cfg.clip),
                            ("silhouette", self.cfg.name_or_path == EMBEDDED_DIFFUSION)):
            if given and name not in names:
                names.append(name)
        return names

    def _references(self, scorer: str, key: str, records: list) -> torch.Tensor:
        if (scorer, key) not in self._reference_embeddings:
            from continual_lora.image_data import load_image

            images = np.stack([resize_array(r.array, self.image_size) if r.array is not None
                               else load_image(r.path, self.image_size) for r in records])
            self._reference_embeddings[(scorer, key)] = self.encoder(scorer).images(images)
        return self._reference_embeddings[(scorer, key)]

    def _reference_sets(self, scorer: str) -> dict[str, torch.Tensor]:
        """Every reference set the run knows (tasks and upstream concepts): `correct` asks
        whether a sample is nearest its own."""
        sets = {f"task:{t.name}": self._references(scorer, f"task:{t.name}", t.references)
                for t in self._all_tasks if t.references}
        probe = self._probe
        if probe is not None and probe.references:
            for prompt, refs in zip(probe.prompts, probe.references, strict=True):
                sets[f"upstream:{prompt}"] = self._references(scorer, f"upstream:{prompt}", refs)
        return sets

    def attach_sequence(self, tasks: list[TaskData], probe) -> None:
        """Every task and the probe, before row 0: the reference sets of `correct`, and, for a
        `sample_drift` probe, the base model's own samples (called while the backbone is still
        the plain base, so every run and `eval` compares with the same images)."""
        self._all_tasks, self._probe = tasks, probe
        if probe is not None and probe.references is None:
            scorer = self._scorers(self._primary())[0]
            images = self.sample(*self._probe_prompts(probe), batch_size=32)
            self._drift_base[scorer] = self.encoder(scorer).images(images)

    def score_task(self, task: TaskData, trained: bool, batch_size: int) -> TaskScore:
        prompts = [r["prompt"] for r in task.eval.records]
        seeds = [r["seed"] for r in task.eval.records]
        images = self.sample(prompts, seeds, batch_size)
        self.samples[task.name] = images
        details, correct, score, embeddings = {}, None, 0.0, {}
        for scorer in self._scorers(task.scorer):
            embedded = embeddings[scorer] = self.encoder(scorer).images(images)
            own = mean_similarity(embedded, self._references(scorer, f"task:{task.name}",
                                                             task.references))
            details[scorer] = float(own.mean())
            if scorer == task.scorer:
                score = details[scorer]
                others = [mean_similarity(embedded, refs) for key, refs in
                          self._reference_sets(scorer).items() if key != f"task:{task.name}"]
                correct = (own > torch.stack(others).max(0).values if others
                           else torch.ones_like(own, dtype=torch.bool)).numpy()
                # identity, not likeness: similar concepts (two animal silhouettes) score high
                # against each other's references, so the fraction nearest its own is reported
                details["recognised"] = float(correct.mean())
        if self.cfg.clip:
            clip = self.encoder("clip_i")
            texts = clip.texts(sorted(set(prompts)))
            index = {p: i for i, p in enumerate(sorted(set(prompts)))}
            details["clip_t"] = float((embeddings["clip_i"] * texts[[index[p] for p in prompts]])
                                      .sum(-1).mean())
        return TaskScore(score, correct, task.scorer, details)

    @staticmethod
    def _probe_prompts(probe) -> tuple[list[str], list[int]]:
        return ([p for p in probe.prompts for _ in probe.seeds],
                [s for _ in probe.prompts for s in probe.seeds])

    def score_upstream(self, probe, batch_size: int) -> TaskScore:
        prompts, seeds = self._probe_prompts(probe)
        images = self.sample(prompts, seeds, batch_size)
        # the grid shows the row's first GRID_COLUMNS samples: name the prompts they are of
        shown = list(dict.fromkeys(prompts[:GRID_COLUMNS]))
        self.samples["\n".join(["upstream:", *shown])] = images
        scorer = self._scorers(self._primary())[0]
        embedded = self.encoder(scorer).images(images)
        if probe.references is None:  # drift from the starting model's own samples
            base = self._drift_base[scorer]
            own = (embedded * base).sum(-1)
            correct = ((embedded @ base.T).argmax(1) == torch.arange(len(base))).numpy()
            return TaskScore(float(own.mean()), correct, "sample_drift",
                             {scorer: float(own.mean())})
        sets = [self._references(scorer, f"upstream:{p}", refs)
                for p, refs in zip(probe.prompts, probe.references, strict=True)]
        sims = torch.stack([mean_similarity(embedded, refs) for refs in sets], dim=1)
        owner = torch.tensor([i for i in range(len(probe.prompts)) for _ in probe.seeds])
        own = sims[torch.arange(len(owner)), owner]
        correct = (sims.argmax(1) == owner).numpy()
        return TaskScore(float(own.mean()), correct, "concepts",
                         {scorer: float(own.mean()), "recognised": float(correct.mean())})

    def _primary(self) -> str:
        tasks = self._all_tasks or list(self._tasks.values())
        return tasks[0].scorer if tasks else "silhouette"

    # -- prior preservation ---------------------------------------------------------------------

    def _add_prior_images(self, task: TaskData) -> None:
        """DreamBooth's class images, sampled from the model as it is before the task (fixed
        seeds), added to the task's training split with `prior_weight`. Their latents are the
        sampler's output itself (no decode/encode round trip)."""
        from continual_lora.image_data import ImageRecord

        prior = task.prior
        n = prior["images"]
        seeds = [1_000_000 + task.index * 10_000 + i for i in range(n)]
        latents = self.sample_latents([prior["class_prompt"]] * n, seeds, 16)
        for i, latent in enumerate(latents):
            key = f"prior:{task.name}:{i}"
            self._latents[key] = latent
            record = ImageRecord(key=key, path=None, array=None, caption=prior["class_prompt"],
                                 repeats=1, is_reg=True, source="prior")
            task.train.records.append({"image": record, "caption": prior["class_prompt"],
                                       "weight": prior["weight"], "latent_only": True})
            task.train.texts.append(prior["class_prompt"])
        task.train.labels = np.zeros(len(task.train.texts), dtype=np.int64)
        task.manifest["prior_images_added"] = n
