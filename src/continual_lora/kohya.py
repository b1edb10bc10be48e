"""LoRA files in the three layouts Stable Diffusion users meet, read and written as state dicts.

- kohya (sd-scripts, A1111, ComfyUI): `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`
  and a per-module `.alpha` scalar (text encoders: `lora_te_`, `lora_te1_`, `lora_te2_`);
- diffusers (`pytorch_lora_weights.safetensors`): `unet.<path>.lora_A.weight` / `.lora_B.weight`
  (older files: `.lora.down.weight`, `.to_q_lora.down.weight`), alpha in the safetensors metadata;
- PEFT (`adapter_model.safetensors`): `base_model.model.<path>.lora_A.weight`, alpha in
  `adapter_config.json` (`lora_alpha`, `alpha_pattern`, `rank_pattern`).

All three hold the same thing per module: down (A, r × in[…]), up (B, out × r[…]) and a scale
alpha / r, so converting is renaming plus carrying alpha. The one hard part is kohya's names: they
replace every `.` of the module path with `_`, and module names contain `_` too. With the target
model's module names the mapping is exact for any architecture; without them diffusers' own
converter (which knows SD 1.x/SDXL naming) is used and only trusted where it is unambiguous.

A LoRA applied to a base it was not made for loads silently in half the tools out there (unknown
keys are skipped with a warning). Here every module is checked by name and shape (`match_modules`)
and anything unmatched is refused (`require_match`), with a guess at what went wrong.

Only safetensors are read: pickle files can run code when loaded.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from continual_lora.adapter_files import PREFIX as PEFT_PREFIX
from continual_lora.adapter_files import AdapterFileError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
#: Pipeline parts a LoRA can adapt, in pipeline order: the denoiser (a UNet, or SD3's
#: transformer), then the text encoders.
COMPONENTS = ("unet", "transformer", *TEXT_ENCODERS)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder",
                  "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' own key (loaders.lora_base)
# Old diffusers layouts (attention processors, LoRACompatibleLinear, CLIP's lora_linear_layer).
OLD_DIFFUSERS_MARKS = (".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.",
                       ".lora_linear_layer.")
LYCORIS_SUFFIXES = (".hada_w1_a", ".hada_w2_a", ".lokr_w1", ".lokr_w1_a", ".lokr_w2",
                    ".lokr_w2_a", ".oft_blocks", ".oft_diag", ".diff", ".diff_b")
SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
# Module names of SD 1.x/2.x/XL UNets and CLIP text encoders. Without the base's own module list
# a path from diffusers' converter is only trusted when made of these: the converter turns every
# `_` it does not know into `.`, so a Flux name like `img_attn` would come back as `img.attn`.
SD_MODULE_NAMES = frozenset({
    "conv_in", "conv_out", "time_embedding", "linear_1", "linear_2", "add_embedding",
    "down_blocks", "mid_block", "up_blocks", "attentions", "resnets", "downsamplers",
    "upsamplers", "conv", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "proj_in",
    "proj_out", "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "ff",
    "net", "proj", "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj",
    "out_proj", "mlp", "fc1", "fc2", "text_projection"})
# Cross-attention width (the input of attn2.to_k) of the UNets people train LoRAs for.
CROSS_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
SHOW = 5  # examples named in an error


class LoraFormatError(AdapterFileError):
    """A LoRA file or state dict that cannot be read or converted; the message names it."""


class LoraMatchError(LoraFormatError):
    """A LoRA whose modules do not all exist, with the same shapes, in the base it is put on."""


@dataclass
class LoraModule:
    """One adapted module: ΔW = (alpha / rank) · up @ down (kohya's and PEFT's convention).

    `key` is the module's name in the file it came from (kohya: `lora_unet_…`; diffusers:
    `unet.<path>`; PEFT: `<path>`), kept so that errors name what the user can find in the file.
    `path` is the module's path in `component` (e.g. `down_blocks.0….to_q`), None while a kohya
    name is not yet resolved.
    """

    key: str
    component: str
    path: str | None
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def update_shape(self) -> tuple[int, ...]:
        """Shape of ΔW, which must equal the base weight's: (out, in[, kh, kw])."""
        return (self.up.shape[0], *self.down.shape[1:])


@dataclass
class MatchReport:
    """How a LoRA's modules meet a base model's, named by the LoRA file's keys."""

    matched: list[str] = field(default_factory=list)
    unmatched_file_keys: list[str] = field(default_factory=list)
    unmatched_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = \
        field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.unmatched_file_keys) + len(self.unmatched_shape)

    @property
    def ok(self) -> bool:
        return not (self.unmatched_file_keys or self.unmatched_shape)

    def summary(self) -> str:
        return f"matched {len(self.matched)} of {self.total} modules"


# -- reading files and telling formats apart ------------------------------------------------------


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and `__metadata__` of a whole safetensors file without NaN/Inf (`adapter_check`);
    anything else is refused by name."""
    from continual_lora.adapter_check import check_finite, read_weights

    path = Path(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise LoraFormatError(f"{path}: a pickle file; only .safetensors LoRA files are read "
                              "(loading pickle can run arbitrary code). Ask for a .safetensors "
                              "version of this LoRA.")
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file")
    try:
        tensors, metadata = read_weights(path)
        check_finite(tensors, path)
    except AdapterFileError as exc:
        raise LoraFormatError(str(exc)) from None
    if not tensors:
        raise LoraFormatError(f"{path}: holds no tensors")
    return tensors, metadata


def detect_format(state_dict: Mapping[str, torch.Tensor], source: str | Path = "state dict"
                  ) -> str:
    """'kohya', 'diffusers' or 'peft', from the keys alone; anything else is an error naming
    `source` and a few of its keys."""
    keys = list(state_dict)
    if keys and all(k.startswith(PEFT_PREFIX) for k in keys) \
            and any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(k.startswith(tuple(KOHYA_PREFIXES)) and k.endswith((".lora_down.weight",
                                                                ".lora_up.weight"))
           for k in keys):
        return "kohya"
    lora_marks = (".lora_A.", ".lora_B.", *OLD_DIFFUSERS_MARKS)
    if any(k.split(".")[0] in COMPONENTS and any(m in k for m in lora_marks) for k in keys):
        return "diffusers"
    examples = ", ".join(keys[:3]) or "none"
    if any(k.endswith(LYCORIS_SUFFIXES) for k in keys):
        raise LoraFormatError(f"{source}: a LyCORIS file (LoHa/LoKr/OFT, e.g. {examples}), not a "
                              "LoRA: only LoRA (down/up factors) can be converted")
    raise LoraFormatError(f"{source}: not a LoRA file this tool knows (keys such as {examples}); "
                          "expected kohya (lora_unet_….lora_down.weight), diffusers "
                          "(unet.….lora_A.weight) or PEFT (base_model.model.….lora_A.weight)")


# -- parsing each format into LoraModules ---------------------------------------------------------


def _module(key: str, component: str, path: str | None, parts: dict[str, torch.Tensor],
            alpha: float | None, source: str | Path) -> LoraModule:
    """A checked LoraModule: both factors present, ranks agreeing, up's extra dims all 1."""
    if "down" not in parts or "up" not in parts:
        missing = "down (A)" if "down" not in parts else "up (B)"
        raise LoraFormatError(f"{source}: module {key} has no {missing} weight")
    down, up = parts["down"], parts["up"]
    if down.dim() < 2 or up.dim() != down.dim() or up.shape[1] != down.shape[0] \
            or any(d != 1 for d in up.shape[2:]):
        raise LoraFormatError(f"{source}: module {key} has factors of shapes down "
                              f"{tuple(down.shape)} and up {tuple(up.shape)}, which do not "
                              "make a LoRA update")
    return LoraModule(key, component, path, down, up,
                      float(down.shape[0]) if alpha is None else float(alpha))


def _kohya_prefix(name: str) -> str:
    return next((p for p in KOHYA_PREFIXES if name.startswith(p)), "")


def _kohya_component(name: str) -> str | None:
    return KOHYA_PREFIXES.get(_kohya_prefix(name))


def parse_kohya(state_dict: Mapping[str, torch.Tensor], source: str | Path = "state dict"
                ) -> dict[str, LoraModule]:
    """kohya modules by kohya name, paths not yet resolved (see `resolve_paths`). A missing
    `.alpha` means alpha = rank, kohya's own default."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, _, part = key.partition(".")
        if _kohya_component(name) is None:
            raise LoraFormatError(f"{source}: key {key} has no kohya prefix "
                                  f"({', '.join(KOHYA_PREFIXES)})")
        if part not in KOHYA_PARTS:
            what = "DoRA (dora_scale)" if part == "dora_scale" else f"unsupported tensor {part}"
            raise LoraFormatError(f"{source}: key {key}: {what}; only plain LoRA "
                                  "(lora_down, lora_up, alpha) can be converted")
        groups.setdefault(name, {})[KOHYA_PARTS[part]] = tensor
    modules = {}
    for name, parts in sorted(groups.items()):
        alpha = parts.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise LoraFormatError(f"{source}: {name}.alpha has shape {tuple(alpha.shape)}; "
                                  "it must be one number")
        modules[name] = _module(name, _kohya_component(name), None, parts,
                                None if alpha is None else alpha.item(), source)
    return modules


def peft_alpha(config: Mapping, path: str, rank: int) -> float:
    """The module's alpha in kohya's sense (scale = alpha / rank) from a PEFT LoraConfig dict:
    `alpha_pattern` matched as PEFT matches it, and rsLoRA's alpha / √r folded in."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = float(patterns.get(get_pattern_key(patterns.keys(), path), config.get("lora_alpha",
                                                                                   8)))
    return alpha * rank**0.5 if config.get("use_rslora") else alpha


def _check_peft_config(config: Mapping, source: str | Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraFormatError(f"{source}: a {config.get('peft_type')} adapter, not LoRA")
    for flag in ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices",
                 "fan_in_fan_out"):
        if config.get(flag):
            raise LoraFormatError(f"{source}: {flag} is set in its adapter_config.json; only a "
                                  "plain LoRA (ΔW = s·B·A on Linear/Conv weights) can be "
                                  "converted")


def _lora_ab(tensors: Mapping[str, torch.Tensor], source: str | Path, prefix: str = ""
             ) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"down", "up"}} of `<prefix><path>.lora_A.weight` / `.lora_B.weight` keys."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(prefix)
        for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up")):
            if key.startswith(prefix) and name.endswith(suffix):
                modules.setdefault(name.removesuffix(suffix), {})[part] = tensor
                break
        else:
            raise LoraFormatError(f"{source}: unsupported tensor {key} {tuple(tensor.shape)}; "
                                  "only plain LoRA (lora_A, lora_B) can be converted")
    return modules


def parse_peft(tensors: Mapping[str, torch.Tensor], config: Mapping, component: str = "unet",
               source: str | Path = "PEFT adapter") -> dict[str, LoraModule]:
    """A PEFT adapter's modules by path (`base_model.model.` removed), alpha from `config`."""
    _check_peft_config(config, source)
    modules = {}
    for path, parts in sorted(_lora_ab(tensors, source, PEFT_PREFIX).items()):
        rank = parts["down"].shape[0] if "down" in parts else 0
        modules[path] = _module(path, component, path, parts, peft_alpha(config, path, rank),
                                source)
    if not modules:
        raise LoraFormatError(f"{source}: holds no LoRA weights")
    return modules


def _metadata_configs(metadata: Mapping[str, str] | None, source: str | Path
                      ) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` ({"unet.r": …, "unet.lora_alpha": …}) per component."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"{source}: metadata {METADATA_KEY} is not JSON ({exc})") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _diffusers_component_to_peft(tensors: dict[str, torch.Tensor], component: str
                                 ) -> dict[str, torch.Tensor]:
    """Old diffusers key layouts renamed to PEFT's by diffusers' own maps."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if not any(mark in k for k in tensors for mark in OLD_DIFFUSERS_MARKS):
        return tensors
    if component == "unet":
        return convert_unet_state_dict_to_peft(tensors)
    return convert_state_dict_to_peft(tensors, original_type=StateDictType.DIFFUSERS_OLD)


def parse_diffusers(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                    source: str | Path = "state dict") -> dict[str, LoraModule]:
    """A diffusers LoRA's modules by `<component>.<path>`. Alpha comes from the metadata diffusers
    writes (`lora_adapter_metadata`), else from `<component>.<path>.alpha` keys, else it is the
    rank: diffusers' convention for files without alphas (scale 1)."""
    configs = _metadata_configs(metadata, source)
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:
            raise LoraFormatError(f"{source}: key {key} is for a `{component}`, not one of "
                                  f"{', '.join(COMPONENTS)}: only Stable Diffusion (UNet) and "
                                  "SD3 (transformer) pipelines' LoRAs are supported")
        if rest.endswith(".alpha"):
            alphas[f"{component}.{rest.removesuffix('.alpha')}"] = float(tensor.item())
        else:
            by_component.setdefault(component, {})[rest] = tensor
    modules = {}
    for component, tensors in by_component.items():
        tensors = _diffusers_component_to_peft(tensors, component)
        config = configs.get(component)
        for path, parts in sorted(_lora_ab(tensors, source).items()):
            key = f"{component}.{path}"
            rank = parts["down"].shape[0] if "down" in parts else 0
            alpha = peft_alpha(config, path, rank) if config else alphas.get(key)
            modules[key] = _module(key, component, path, parts, alpha, source)
    unused = sorted(set(alphas) - set(modules))
    if unused and not configs:  # a scale silently left at 1 would be a wrong LoRA
        raise LoraFormatError(f"{source}: alpha keys that match no module: "
                              f"{', '.join(unused[:SHOW])}")
    return modules


# -- kohya names ↔ module paths -------------------------------------------------------------------


def _flat(path: str) -> str:
    return path.replace(".", "_")


def kohya_name(component: str, path: str, te1_prefix: str = "lora_te_") -> str:
    """kohya's name of a module. Text encoders are named from `text_model.` down, as every kohya
    tool names CLIP (transformers 5 dropped that level from CLIPTextModel's module paths)."""
    if component == "unet":
        return "lora_unet_" + _flat(path)
    if not path.startswith("text_model."):
        path = "text_model." + path
    prefix = te1_prefix if component == "text_encoder" else "lora_te2_"
    return prefix + _flat(path)


def _exact_lookup(component: str, names: Iterable[str]) -> dict[str, str]:
    """{kohya name without prefix: module path} for one component's modules."""
    lookup = {}
    for name in filter(None, names):  # "" is the model itself
        lookup[_flat(name)] = name
        if component != "unet" and not name.startswith("text_model."):
            lookup[_flat("text_model." + name)] = name  # kohya files made for transformers < 5
    return lookup


def diffusers_kohya_paths(names: Iterable[str], unet_config: Mapping | None = None
                          ) -> dict[str, str]:
    """{kohya name: module path} by diffusers' own converter (SD 1.x names; SDXL's sgm block
    names need `unet_config`). Names it cannot convert are left out."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if unet_config is not None and not hasattr(unet_config, "layers_per_block"):
        unet_config = SimpleNamespace(**unet_config)  # diffusers reads it by attribute
    out = {}
    for name in names:  # one at a time: one bad name must not lose the others
        dummy = {f"{name}.lora_down.weight": torch.zeros(1), f"{name}.lora_up.weight":
                 torch.zeros(1)}
        try:
            if unet_config is not None and any(b in name for b in SGM_BLOCKS):
                dummy = _maybe_map_sgm_blocks_to_diffusers(dummy, unet_config)
            converted, _ = _convert_non_diffusers_lora_to_diffusers(dummy)
        except (ValueError, KeyError, IndexError, AttributeError):
            continue
        down = next((k for k in converted if ".down." in k), None)
        if down is None:
            continue
        component, _, key = down.partition(".")
        one = {key: torch.zeros(1)}
        peft = convert_unet_state_dict_to_peft(one) if component == "unet" else \
            convert_state_dict_to_peft(one, original_type=StateDictType.DIFFUSERS_OLD)
        path = next(iter(peft)).removesuffix(".weight")
        if path.endswith(".lora_A"):
            out[name] = path.removesuffix(".lora_A")
    return out


def _as_targets(targets: Mapping[str, Iterable[str]] | Sequence[str] | None
                ) -> dict[str, list[str]] | None:
    if targets is None:
        return None
    if isinstance(targets, Mapping):
        return {k: list(v) for k, v in targets.items()}
    return {"unet": list(targets)}


def resolve_paths(modules: Mapping[str, LoraModule],
                  targets: Mapping[str, Iterable[str]] | Sequence[str] | None = None,
                  unet_config: Mapping | None = None) -> dict[str, LoraModule]:
    """The modules with each kohya name resolved to its module path where that can be done
    reliably; the others keep `path=None` (and `match_modules` reports them).

    `targets`: the target model's module names per component ({"unet": [...], "text_encoder":
    [...]}, or a plain list for the UNet alone), e.g. `[n for n, _ in unet.named_modules()]`.
    With them a kohya name maps to the module whose path, `.` → `_`, is that name: exact for any
    architecture; diffusers' converter is then tried on what is left (SDXL's sgm names). Without
    them only diffusers' converter is used, and a result is kept only when the path gives the
    kohya name back and is made of Stable Diffusion module names, so no guess is silently taken
    for a fact.

    Paths that already exist (PEFT, diffusers files) are kept, except that `text_model.` is
    dropped where the target text encoder has no such level (transformers 5's CLIPTextModel).
    """
    wanted = _as_targets(targets)
    known = None if wanted is None else {c: set(names) for c, names in wanted.items()}
    out, pending = {}, {}
    for key, module in modules.items():
        if module.path is not None:
            out[key] = replace(module, path=_align_text_model(module.component, module.path,
                                                              known))
        else:
            pending[key] = module
    lookups = {c: _exact_lookup(c, names) for c, names in (wanted or {}).items()}
    exact = {key: lookups.get(m.component, {}).get(key.removeprefix(_kohya_prefix(key)))
             for key, m in pending.items()}
    rest = [key for key, path in exact.items() if path is None]
    guessed = diffusers_kohya_paths(rest, unet_config) if rest else {}
    for key, module in pending.items():
        path = exact[key] or _confirmed(key, module.component, guessed.get(key), known)
        out[key] = replace(module, path=path)
    return dict(sorted(out.items()))


def _confirmed(key: str, component: str, path: str | None,
               known: Mapping[str, set[str]] | None) -> str | None:
    """A path from diffusers' converter, kept only where it is confirmed: it exists in the
    target model, or (without one) its kohya name is `key` again and it is made of SD module
    names (see SD_MODULE_NAMES)."""
    if path is None:
        return None
    if known is not None:
        path = _align_text_model(component, path, known)
        return path if path in known.get(component, set()) else None
    sd_names = all(part.isdigit() or part in SD_MODULE_NAMES for part in path.split("."))
    return path if sd_names and kohya_name(component, path, _kohya_prefix(key)) == key else None


def _align_text_model(component: str, path: str, known: Mapping[str, set[str]] | None) -> str:
    """`path` without `text_model.` where the target text encoder has no such level."""
    if known is None or component == "unet" or path in known.get(component, set()):
        return path
    short = path.removeprefix("text_model.")
    return short if short in known.get(component, set()) else path


# -- checking against a base ----------------------------------------------------------------------


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{module path: weight shape} of the modules a LoRA can adapt here (Linear, Conv1d/2d)."""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    return {name: tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, kinds)}


def match_modules(modules: Mapping[str, LoraModule],
                  shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> MatchReport:
    """Each module checked by path and update shape against `shapes` ({component: {path:
    weight shape}}, see `module_shapes`). Unresolved kohya names count as unmatched."""
    report = MatchReport()
    for key, module in modules.items():
        model_shape = shapes.get(module.component, {}).get(module.path or "")
        if model_shape is None:
            report.unmatched_file_keys.append(key)
        elif tuple(model_shape) != module.update_shape:
            report.unmatched_shape.append((key, module.update_shape, tuple(model_shape)))
        else:
            report.matched.append(key)
    return report


def _cross_width(widths: Iterable[int]) -> str | None:
    found = [int(w) for w in widths]
    if not found:
        return None
    width = int(_most_common(found))
    return CROSS_WIDTHS.get(width, f"custom UNet (cross-attention width {width})")


def guess_lora_model(modules: Mapping[str, LoraModule]) -> str:
    """What a LoRA was most likely trained on, from its names and shapes (for error messages)."""
    text = " ".join(list(modules) + [m.path or "" for m in modules.values()])
    if "double_blocks" in text or "single_blocks" in text or "single_transformer" in text:
        return "Flux"
    if "joint_blocks" in text:
        return "SD3"
    if any(m.component == "text_encoder_2" for m in modules.values()):
        return "SDXL"
    width = _cross_width(m.down.shape[1] for k, m in modules.items()
                         if re.search(r"attn2[._]to_[kv]$", m.path or k))
    if width:
        return width
    if any(b in text for b in SGM_BLOCKS):
        return "SDXL-style (sgm block names)"
    return "unknown model"


def guess_base_model(shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str:
    """What a base is, from its modules' shapes (for error messages)."""
    if shapes.get("text_encoder_2"):
        return "SDXL"
    width = _cross_width(s[1] for p, s in shapes.get("unet", {}).items()
                         if re.search(r"attn2\.to_k$", p))
    return width or "unknown model"


def mismatch_message(report: MatchReport, modules: Mapping[str, LoraModule],
                     shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
                     source: str | Path, base: str | Path) -> str:
    """Why a LoRA does not fit a base: counts, the first examples, and a guess at the cause."""
    parts = [f"{source} on {base}: applied {len(report.matched)} of {report.total} modules"]
    if report.unmatched_file_keys:
        shown = ", ".join(report.unmatched_file_keys[:SHOW])
        more = len(report.unmatched_file_keys) - SHOW
        parts.append(f"unmatched ({len(report.unmatched_file_keys)}, no such module in the "
                     f"base): {shown}" + (f" and {more} more" if more > 0 else ""))
    if report.unmatched_shape:
        shown = ", ".join(f"{key} (the file's update is {tuple(fs)}, the base's weight is "
                          f"{tuple(ms)})" for key, fs, ms in report.unmatched_shape[:SHOW])
        parts.append(f"shape mismatches ({len(report.unmatched_shape)}): {shown}")
    lora, base_kind = guess_lora_model(modules), guess_base_model(shapes)
    if lora != base_kind:
        parts.append(f"this looks like {_a(lora)} {lora} LoRA on {_a(base_kind)} {base_kind} "
                     "base")
    else:
        parts.append(f"the LoRA and the base both look like {_a(lora)} {lora}; the LoRA was "
                     "probably trained on a variant with other layers or sizes")
    return "; ".join(parts) + ". Nothing was loaded or written: use the base the LoRA was " \
        "trained on (or a LoRA made for this base)."


def _a(kind: str) -> str:
    return "an" if kind.startswith(("SD", "unknown")) else "a"  # "an SD1.x", "a custom UNet"


def require_match(modules: Mapping[str, LoraModule],
                  shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
                  source: str | Path, base: str | Path) -> MatchReport:
    """The match report, or LoraMatchError when anything is unmatched: never a partial load."""
    report = match_modules(modules, shapes)
    if not report.ok:
        raise LoraMatchError(mismatch_message(report, modules, shapes, source, base))
    return report


# -- writing each format --------------------------------------------------------------------------


def _require_paths(modules: Mapping[str, LoraModule]) -> None:
    missing = [k for k, m in modules.items() if m.path is None]
    if missing:
        raise LoraMatchError(f"{len(missing)} kohya module names could not be mapped to module "
                             f"paths without the base model (e.g. {', '.join(missing[:SHOW])}); "
                             "give the base (--base PIPELINE_FOLDER) so every name is matched "
                             "exactly")


def split_components(modules: Mapping[str, LoraModule]) -> dict[str, dict[str, LoraModule]]:
    """{component: {path: module}}, components in pipeline order."""
    _require_paths(modules)
    out: dict[str, dict[str, LoraModule]] = {}
    for module in modules.values():
        out.setdefault(module.component, {})[module.path] = module
    return {c: dict(sorted(out[c].items())) for c in COMPONENTS if c in out}


def to_kohya(modules: Mapping[str, LoraModule]) -> dict[str, torch.Tensor]:
    """kohya keys, an `.alpha` for every module (a 0-d tensor, see `_alpha_tensor`), tensors
    otherwise untouched."""
    _require_paths(modules)
    if any(m.component == "transformer" for m in modules.values()):
        raise LoraFormatError("this is a transformer (SD3/FLUX) LoRA; kohya's naming for those "
                              "is not written yet: convert it --to diffusers or --to peft")
    te1 = "lora_te1_" if any(m.component == "text_encoder_2" for m in modules.values()) \
        else "lora_te_"  # SDXL files say te1/te2; SD 1.x files say te
    out = {}
    for module in modules.values():
        name = kohya_name(module.component, module.path, te1)
        out[f"{name}.lora_down.weight"] = module.down.contiguous()
        out[f"{name}.lora_up.weight"] = module.up.contiguous()
        out[f"{name}.alpha"] = _alpha_tensor(module.alpha, module.down.dtype)
    return dict(sorted(out.items()))


def _alpha_tensor(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha in the factors' dtype, as sd-scripts saves it, unless that would round it (alpha
    0.1 in float16): then in float32 or float64, so the scale never changes."""
    for candidate in (dtype, torch.float32, torch.float64):
        tensor = torch.tensor(alpha, dtype=candidate)
        if tensor.item() == alpha:
            return tensor
    return tensor


def _most_common(values: Iterable[float]) -> float:
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))  # ties: the smallest, so output is stable


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def peft_config(modules: Mapping[str, LoraModule]) -> dict:
    """LoraConfig arguments for one component's modules (keyed by path): exact target paths,
    the most common rank and alpha as `r`/`lora_alpha`, the others per module in
    `rank_pattern`/`alpha_pattern` under `^path` (anchored: matches that module only)."""
    r = int(_most_common(m.rank for m in modules.values()))
    alpha = _most_common(m.alpha for m in modules.values())
    return {
        "r": r, "lora_alpha": _number(alpha), "target_modules": sorted(modules),
        "rank_pattern": {f"^{p}": m.rank for p, m in modules.items() if m.rank != r},
        "alpha_pattern": {f"^{p}": _number(m.alpha) for p, m in modules.items()
                          if m.alpha != alpha},
    }


def to_peft(modules: Mapping[str, LoraModule]) -> tuple[dict[str, torch.Tensor], dict]:
    """One component's modules (keyed by path) as PEFT's (tensors, LoraConfig arguments)."""
    tensors = {}
    for path, module in sorted(modules.items()):
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = module.down.contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = module.up.contiguous()
    return tensors, peft_config(modules)


def to_diffusers(modules: Mapping[str, LoraModule]) -> tuple[dict[str, torch.Tensor],
                                                             dict[str, str]]:
    """(tensors, safetensors metadata) of a `pytorch_lora_weights.safetensors`.

    Keys are `<component>.<path>.lora_A.weight` / `.lora_B.weight`. diffusers 0.42 has no alpha
    in these keys: without metadata it assumes alpha = rank (scale 1). So each component's
    LoraConfig arguments go into the `lora_adapter_metadata` entry, flattened as
    `<component>.<argument>` exactly as `save_lora_weights(unet_lora_adapter_metadata=…)`
    writes them; `load_lora_weights` then builds the adapter from them (`LoraConfig(**metadata)`)
    and the scale is alpha / rank as in PEFT.
    """
    tensors: dict[str, torch.Tensor] = {}
    flat: dict[str, object] = {}
    for component, by_path in split_components(modules).items():
        peft_tensors, config = to_peft(by_path)
        for key, tensor in peft_tensors.items():
            tensors[f"{component}.{key.removeprefix(PEFT_PREFIX)}"] = tensor
        flat.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True)}
    return tensors, metadata


# -- the conversions by name ----------------------------------------------------------------------


def kohya_to_peft(state_dict: Mapping[str, torch.Tensor],
                  targets: Mapping[str, Iterable[str]] | Sequence[str] | None = None,
                  source: str | Path = "state dict") -> dict[str, tuple[dict[str, torch.Tensor],
                                                                        dict]]:
    """A kohya state dict as PEFT (tensors, LoraConfig arguments) per component. `targets` as in
    `resolve_paths`; names that cannot be mapped raise LoraMatchError."""
    modules = resolve_paths(parse_kohya(state_dict, source), targets)
    return {c: to_peft(m) for c, m in split_components(modules).items()}


def peft_to_kohya(tensors: Mapping[str, torch.Tensor], config: Mapping,
                  component: str = "unet") -> dict[str, torch.Tensor]:
    """A PEFT adapter (its safetensors and adapter_config.json as a dict) in kohya keys.

    diffusers' `convert_state_dict_to_kohya` is not used: it writes every `.alpha` as the rank
    (an int64 tensor), which changes the scale of any LoRA trained with alpha ≠ r."""
    return to_kohya(parse_peft(tensors, config, component))


def peft_to_diffusers(tensors: Mapping[str, torch.Tensor], config: Mapping,
                      component: str = "unet") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A PEFT adapter as (tensors, metadata) of a diffusers `pytorch_lora_weights.safetensors`."""
    return to_diffusers(parse_peft(tensors, config, component))
