"""Small Stable-Diffusion-shaped pipelines built from config: the tokenizer, text encoder, VAE,
UNet and scheduler of `StableDiffusionPipeline`, at any size.

Used for the embedded offline denoiser (`embedded_diffusion.py`, pretrained in-process) and for
tests. The result is an ordinary diffusers pipeline folder (`model_index.json`, one subfolder per
component) that `StableDiffusionPipeline.from_pretrained` loads like any hub model, so every code
path that serves SD 1.x serves it too.

The tokenizer is a real CLIP byte-level BPE: the 512 byte symbols (with and without the
end-of-word mark `</w>`) plus merges learned on a given word list until each of its words is a
single token; any other text still tokenizes (in pieces, down to bytes). No vocabulary file
is downloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) map from bytes to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in codes], strict=True))


def clip_vocabulary(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a CLIP BPE in which every word of `words` is one token.

    The merges are learned the way BPE is trained (most frequent adjacent pair first, ties by
    name) until every word is one symbol, so applying them in rank order, as the tokenizer does,
    rebuilds each word whole; chains written per word would not (another word's merge, say
    `h o` of "horse", can win inside "silhouette" and split it)."""
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    pieces = [list(w[:-1]) + [w[-1] + "</w>"]
              for w in sorted({w.lower() for w in words if w.isalpha()})]
    while True:
        counts: dict[tuple[str, str], int] = {}
        for word in pieces:
            for pair in zip(word, word[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        for k, word in enumerate(pieces):
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            pieces[k] = out
    vocab += [BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}, merges


def clip_tokenizer(words: list[str], max_length: int = 16):
    """A `CLIPTokenizer` whose vocabulary holds `words` as single tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


@dataclass(frozen=True)
class PipelineSizes:
    """Sizes of a small SD-shaped pipeline. Images are `image_size`² RGB; the VAE halves the
    side once per extra block, so latents are (4, image_size / 2^(len(vae_channels)-1))²."""

    image_size: int = 32
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 16
    norm_groups: int = 8

    def to_json(self) -> dict:
        return asdict(self)


def build_components(sizes: PipelineSizes, words: list[str], seed: int = 0) -> dict:
    """Freshly initialised pipeline components (unet, vae, text_encoder, tokenizer, scheduler),
    the same for the same arguments."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(words, sizes.max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=sizes.text_width,
            intermediate_size=4 * sizes.text_width, num_attention_heads=sizes.text_heads,
            num_hidden_layers=sizes.text_layers, max_position_embeddings=sizes.max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        n_vae = len(sizes.vae_channels)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=sizes.latent_channels,
            block_out_channels=sizes.vae_channels, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * n_vae,
            up_block_types=("UpDecoderBlock2D",) * n_vae, norm_num_groups=sizes.norm_groups,
            sample_size=sizes.image_size)
        n_unet = len(sizes.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=sizes.image_size // 2 ** (n_vae - 1),
            in_channels=sizes.latent_channels, out_channels=sizes.latent_channels,
            block_out_channels=sizes.unet_channels, layers_per_block=sizes.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
            cross_attention_dim=sizes.text_width, attention_head_dim=sizes.attention_head_dim,
            norm_num_groups=sizes.norm_groups)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def make_pipeline(components: dict):
    """A `StableDiffusionPipeline` of the components (no safety checker: these are not photos)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_pipeline(components: dict, folder: Path) -> Path:
    """Write the components as a diffusers pipeline folder."""
    make_pipeline(components).save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
