"""Model families; `make_family` builds the one a config names."""

from __future__ import annotations

from continual_lora.config import ModelConfig


def make_family(cfg: ModelConfig, seed: int = 0):
    """The family of `cfg.family`, not loaded yet (call `.load()`)."""
    if cfg.family == "diffusion":
        from continual_lora.families.diffusion import DiffusionFamily

        return DiffusionFamily(cfg, seed)
    if cfg.family == "causal_lm":
        from continual_lora.families.causal_lm import CausalLMFamily

        return CausalLMFamily(cfg, seed)
    from continual_lora.families.image_classifier import ImageClassifierFamily, is_image_model

    if is_image_model(cfg.name_or_path, cfg.trust_remote_code):
        return ImageClassifierFamily(cfg, seed)
    from continual_lora.families.classifier import ClassifierFamily

    return ClassifierFamily(cfg, seed)
