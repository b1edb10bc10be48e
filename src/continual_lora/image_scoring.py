"""Image embeddings that score samples against reference images: DINO, CLIP, and the embedded
model's stand-in.

DreamBooth's subject-fidelity scores, which seed 003 reports per task: the mean pairwise cosine
similarity between generated images and the real images of the subject, under

    dino        a self-supervised ViT (facebook/dino-vits16 in DreamBooth): the CLS embedding
    clip_i      CLIP's image embedding (openai/clip-vit-*)
    clip_t      prompt fidelity: cosine of CLIP's image embedding of a sample with CLIP's text
                embedding of its prompt (reported beside clip_i when a CLIP model is given)
    silhouette  the embedded diffusion model's stand-in: the penultimate features of a small CNN
                trained to classify the embedded images (animal silhouettes and digits). It is a
                small-scale stand-in for DINO/CLIP, meaningful only for those images.

Models load from a local folder or a hub id through transformers (`trust_remote_code` off,
safetensors preferred); every encoder maps uint8 RGB images (N, H, W, 3) to L2-normalised
embeddings (N, D), batched and without gradients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from continual_lora.config import ConfigError


def mean_similarity(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean cosine similarity to every reference (both L2-normalised)."""
    return (samples @ references.T).mean(dim=1)


class SilhouetteNet(nn.Module):
    """The stand-in encoder: three conv blocks and a linear classifier over the embedded classes;
    `embed` is the normalised 128-d feature before the classifier."""

    def __init__(self, n_classes: int, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out),
                                 nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                                 nn.GroupNorm(8, c_out), nn.SiLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, width), block(width, 2 * width),
                                      block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(4 * width, 128))
        self.classifier = nn.Linear(128, n_classes)

    @staticmethod
    def prepare(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB (N, H, W, 3) → grey (N, 1, H, W) in [-1, 1]."""
        x = torch.as_tensor(np.asarray(images)).float() / 127.5 - 1.0
        return x.mean(dim=-1, keepdim=True).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.silu(self.features(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=-1)


class SilhouetteEncoder:
    """The embedded model's stand-in encoder, read from its `scorer/` folder."""

    name = "silhouette"

    def __init__(self, folder: Path, device: torch.device):
        import json

        from safetensors.torch import load_file

        info = json.loads((folder / "config.json").read_text())
        self.net = SilhouetteNet(len(info["classes"]), info["width"])
        self.net.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.net.eval().to(device)
        self.device = device

    @torch.no_grad()
    def images(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        out = [self.net.embed(SilhouetteNet.prepare(images[i:i + batch_size]).to(self.device))
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).float().cpu()


class DinoEncoder:
    """A DINO ViT (any transformers image backbone): the CLS token of the last hidden state."""

    name = "dino"

    def __init__(self, name_or_path: str, device: torch.device):
        from transformers import AutoImageProcessor, AutoModel

        self.processor = _load(AutoImageProcessor, name_or_path, "model.dino")
        self.model = _load(AutoModel, name_or_path, "model.dino").eval().to(device)
        self.device = device

    def images(self, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        def cls_token(pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]

        return _embed_images(self.processor, cls_token, images, batch_size, self.device)


class ClipEncoder:
    """CLIP's image and text embeddings (CLIP-I and CLIP-T)."""

    name = "clip_i"

    def __init__(self, name_or_path: str, device: torch.device):
        from transformers import AutoProcessor, CLIPModel

        self.processor = _load(AutoProcessor, name_or_path, "model.clip")
        self.model = _load(CLIPModel, name_or_path, "model.clip").eval().to(device)
        self.device = device

    def images(self, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        def image_features(pixel_values: torch.Tensor) -> torch.Tensor:
            features = self.model.get_image_features(pixel_values=pixel_values)
            return getattr(features, "pooler_output", features)

        return _embed_images(self.processor, image_features, images, batch_size, self.device)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        features = self.model.get_text_features(
            **{k: v.to(self.device) for k, v in tokens.items()})
        features = getattr(features, "pooler_output", features)
        return F.normalize(features.float(), dim=-1).cpu()


@torch.no_grad()
def _embed_images(processor, embed, images: np.ndarray, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """L2-normalised `embed(pixel_values)` of uint8 images, through a transformers image
    processor, in batches."""
    out = []
    for i in range(0, len(images), batch_size):
        pixels = processor(images=list(images[i:i + batch_size]), return_tensors="pt")
        out.append(F.normalize(embed(pixels["pixel_values"].to(device)).float(), dim=-1).cpu())
    return torch.cat(out)


def _load(auto_class, name_or_path: str, field: str):
    try:
        return auto_class.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot load {name_or_path!r}: {exc}. Give a local folder "
                          "or a hub id reachable from this machine.") from None
