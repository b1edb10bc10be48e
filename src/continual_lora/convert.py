"""`continual-lora convert`: a LoRA between kohya, PEFT and diffusers layouts, checked on a base.

    continual-lora convert SRC --to {kohya,peft,diffusers} --out PATH [--base DIR] [--overwrite]

SRC is a kohya `.safetensors` file, a diffusers `pytorch_lora_weights.safetensors` (or its
folder), a PEFT folder, or a run's stage folder (`tasks/NN-name/`, whose `adapter/` is the PEFT
folder). With `--base` (a diffusers pipeline folder) every module is checked by name and shape
against the base's own modules, and a LoRA that does not fit all of it is refused: a partial
load is worse than none, because the images still come out, only wrong.

The base's components are built from their config on PyTorch's `meta` device: the module names
and weight shapes are all the check needs, so a multi-GB checkpoint is never read.

Outputs are written whole or not at all (a temporary sibling renamed into place) and an existing
output is only replaced with `--overwrite`. The conversions themselves are in `kohya.py`.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from continual_lora.adapter_check import check_has_update
from continual_lora.adapter_files import CONFIG_FILE, WEIGHTS_FILE
from continual_lora.checkpoint import atomic_dir, write_bytes_atomic
from continual_lora.config import ConfigError
from continual_lora.kohya import (
    COMPONENTS,
    DIFFUSERS_WEIGHTS,
    TEXT_ENCODERS,
    LoraFormatError,
    LoraModule,
    MatchReport,
    detect_format,
    load_safetensors,
    module_shapes,
    parse_diffusers,
    parse_kohya,
    parse_peft,
    require_match,
    resolve_paths,
    split_components,
    to_diffusers,
    to_kohya,
    to_peft,
)
from continual_lora.output_dir import check_not_input

TARGETS = ("kohya", "peft", "diffusers")
STAGE_ADAPTER = "adapter"  # a run's stage folder keeps its PEFT adapter here
EXAMPLE = """examples:
  continual-lora convert runs/a/tasks/02-b --to kohya --out b.safetensors --base sd15
  continual-lora convert my_lora.safetensors --to peft --out my_lora_peft --base sd15
  continual-lora convert my_lora.safetensors --to diffusers --out my_lora_diffusers
"""


@dataclass
class LoadedLora:
    """A LoRA as read: where from, in which layout, its modules, and the base it names."""

    path: Path
    format: str
    modules: dict[str, LoraModule]
    base_model: str | None = None


# -- reading a source -----------------------------------------------------------------------------


def _read_peft_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"{file}: not valid JSON ({exc})") from None


def _read_peft_folder(folder: Path, component: str) -> dict[str, LoraModule]:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = " (it has adapter_model.bin: only safetensors are read, never pickle)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise LoraFormatError(f"{folder}: no {WEIGHTS_FILE}{pickled}")
    tensors, _ = load_safetensors(weights)
    if detect_format(tensors, weights) != "peft":
        raise LoraFormatError(f"{weights}: not PEFT keys (base_model.model.….lora_A.weight)")
    return parse_peft(tensors, _read_peft_config(folder), component, folder)


def _is_transformer_denoiser(modules: dict[str, LoraModule]) -> bool:
    """SD3's and FLUX's transformer paths start at their blocks (`transformer_blocks.0.attn.to_q`,
    `single_transformer_blocks.3.attn.to_k`); a UNet's at `down_blocks`, `mid_block` or
    `up_blocks`."""
    return all(m.path.startswith(("transformer_blocks.", "single_transformer_blocks."))
               for m in modules.values())


def read_peft(folder: Path, denoiser: str | None = None) -> LoadedLora:
    """A PEFT folder: the denoiser's adapter at its root (`denoiser`: "unet", or "transformer"
    for SD3 and FLUX; by default told by its module paths), text encoders' in `text_encoder/` and
    `text_encoder_2/` subfolders when present (the layout `--to peft` writes)."""
    modules: dict[str, LoraModule] = {}
    base_model = None
    if (folder / CONFIG_FILE).is_file():
        found = _read_peft_folder(folder, denoiser or "unet")
        if denoiser is None and _is_transformer_denoiser(found):
            found = {path: replace(m, component="transformer")
                     for path, m in found.items()}
        modules.update(found)
        base_model = _read_peft_config(folder).get("base_model_name_or_path")
    for component in TEXT_ENCODERS:
        if (folder / component / CONFIG_FILE).is_file():
            found = _read_peft_folder(folder / component, component)
            modules.update({f"{component}.{k}": m for k, m in found.items()})
    return LoadedLora(folder, "peft", modules, base_model)


def read_lora_file(file: Path) -> LoadedLora:
    """A single `.safetensors` LoRA, its layout told by its keys."""
    tensors, metadata = load_safetensors(file)
    fmt = detect_format(tensors, file)
    if fmt == "kohya":
        return LoadedLora(file, fmt, parse_kohya(tensors, file))
    if fmt == "diffusers":
        return LoadedLora(file, fmt, parse_diffusers(tensors, metadata, file))
    if (file.parent / CONFIG_FILE).is_file():
        return read_peft(file.parent)
    raise LoraFormatError(f"{file}: PEFT weights without their {CONFIG_FILE} (which holds "
                          "alpha); give the adapter folder instead")


def read_lora(src: str | Path) -> LoadedLora:
    """Whatever SRC names (see the module docstring); errors say what was looked for."""
    src = Path(src)
    if src.is_dir():
        if (src / CONFIG_FILE).is_file() or any((src / c / CONFIG_FILE).is_file()
                                                 for c in TEXT_ENCODERS):
            return read_peft(src)
        if (src / STAGE_ADAPTER / CONFIG_FILE).is_file():
            return read_peft(src / STAGE_ADAPTER)
        if (src / DIFFUSERS_WEIGHTS).is_file():
            return read_lora_file(src / DIFFUSERS_WEIGHTS)
        files = sorted(src.glob("*.safetensors"))
        if len(files) == 1:
            return read_lora_file(files[0])
        raise LoraFormatError(f"{src}: no LoRA found: expected a PEFT folder ({CONFIG_FILE}), a "
                              f"run's stage folder ({STAGE_ADAPTER}/), {DIFFUSERS_WEIGHTS}, or "
                              f"a single .safetensors file (found {len(files)}); name the file")
    if not src.exists():
        raise LoraFormatError(f"{src}: no such file or folder")
    return read_lora_file(src)


# -- the base -------------------------------------------------------------------------------------


@dataclass
class BaseModules:
    """What a check needs of a base: module names and weight shapes per component."""

    names: dict[str, list[str]]
    shapes: dict[str, dict[str, tuple[int, ...]]]
    unet_config: object | None  # diffusers' FrozenDict: read by key and by attribute


def _meta_component(base: Path, component: str, library: str, class_name: str
                    ) -> torch.nn.Module:
    """The component built from its config on the meta device (no weights read)."""
    cls = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(cls.load_config(str(base), subfolder=component))
        config = cls.config_class.from_pretrained(str(base), subfolder=component)
        return cls(config)


def base_modules(base: str | Path, components: Iterable[str]) -> BaseModules:
    """Module names and shapes of `components` of a diffusers pipeline folder. A component the
    pipeline lacks has none, so every module the LoRA has for it is reported unmatched."""
    base = Path(base)
    index_file = base / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(f"--base {base}: not a diffusers pipeline folder (no model_index.json)"
                          "; give the folder that `StableDiffusionPipeline.from_pretrained` "
                          "loads")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--base {base}: {index_file} is not valid JSON ({exc})") from None
    names: dict[str, list[str]] = {}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    unet_config = None
    for component in components:
        library, class_name = (index.get(component) or [None, None])[:2]
        if library is None:
            names[component], shapes[component] = [], {}
            continue
        try:
            model = _meta_component(base, component, library, class_name)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
            raise ConfigError(f"--base {base}: cannot build its {component} ({library}."
                              f"{class_name}) from {base / component}: {exc}") from None
        names[component] = [n for n, _ in model.named_modules()]
        shapes[component] = module_shapes(model)
        if component == "unet":
            unet_config = model.config
    return BaseModules(names, shapes, unet_config)


def check_against_base(lora: LoadedLora, base: str | Path
                       ) -> tuple[dict[str, LoraModule], MatchReport]:
    """The LoRA's modules resolved against the base and checked by name and shape; refused
    (LoraMatchError) unless every one matches."""
    components = sorted({m.component for m in lora.modules.values()}, key=COMPONENTS.index)
    found = base_modules(base, components)
    modules = resolve_paths(lora.modules, found.names, found.unet_config)
    return modules, require_match(modules, found.shapes, lora.path, base)


# -- writing --------------------------------------------------------------------------------------


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _write_peft_folder(folder: Path, modules: dict[str, LoraModule], base_model: str | None
                       ) -> None:
    from peft import LoraConfig

    tensors, config = to_peft(modules)
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(**config, bias="none", base_model_name_or_path=base_model) \
        .save_pretrained(str(folder))
    (folder / WEIGHTS_FILE).write_bytes(_safetensors_bytes(tensors, {"format": "pt"}))


def write_peft(modules: dict[str, LoraModule], out: Path, base_model: str | None) -> Path:
    """A PEFT folder: the denoiser's adapter at `out` (so `PeftModel.from_pretrained(unet, out)`
    loads it), each text encoder's in `out/<component>/`."""
    with atomic_dir(out) as tmp:
        for component, by_path in split_components(modules).items():
            folder = tmp if component in ("unet", "transformer") else tmp / component
            _write_peft_folder(folder, by_path, base_model)
    return out


def write_diffusers(modules: dict[str, LoraModule], out: Path) -> Path:
    """`out` itself when it names a .safetensors file, else `out/pytorch_lora_weights.safetensors`
    (the folder `pipe.load_lora_weights(out)` takes)."""
    data = _safetensors_bytes(*to_diffusers(modules))
    if out.suffix == ".safetensors":
        write_bytes_atomic(out, data)
        return out
    with atomic_dir(out) as tmp:
        (tmp / DIFFUSERS_WEIGHTS).write_bytes(data)
    return out / DIFFUSERS_WEIGHTS


def write_kohya(modules: dict[str, LoraModule], out: Path) -> Path:
    write_bytes_atomic(out, _safetensors_bytes(to_kohya(modules), {"format": "pt"}))
    return out


def write_diffusers_weights(peft_folder: Path, out_folder: Path,
                            denoiser: str | None = None) -> Path:
    """`out_folder/pytorch_lora_weights.safetensors` from a denoiser's PEFT adapter folder
    (`denoiser`: "unet", or "transformer" for SD3), replacing any earlier one atomically;
    out_folder may be the adapter folder itself, so that `pipe.load_lora_weights(stage/adapter)`
    works there directly. Returns the file."""
    lora = read_peft(Path(peft_folder), denoiser)
    file = Path(out_folder) / DIFFUSERS_WEIGHTS
    write_bytes_atomic(file, _safetensors_bytes(*to_diffusers(lora.modules)))
    return file


# -- the command ----------------------------------------------------------------------------------


def _check_out(src: Path, to: str, out: Path, overwrite: bool) -> None:
    """User errors before anything is read, each naming the flag."""
    if to not in TARGETS:
        raise ConfigError(f"--to {to}: unknown; choose from {', '.join(TARGETS)}")
    _check_not_source(out, src, overwrite)
    if to == "kohya" and out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: a kohya LoRA is one file; give a name ending in "
                          ".safetensors")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} already exists; nothing was changed. Choose another "
                          "path or pass --overwrite")
    if to == "kohya" and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; a kohya LoRA is one .safetensors file")


def _check_not_source(out: Path, source: Path, overwrite: bool) -> None:
    """Replacing --out must not delete what was read (a stage's adapter/, or a folder above)."""
    check_not_input(out, [("source", source)], overwrite)


def describe(modules: dict[str, LoraModule]) -> str:
    """'24 modules (unet), rank 4, alpha 8' for printing."""
    parts = sorted({m.component for m in modules.values()}, key=COMPONENTS.index)
    ranks = sorted({m.rank for m in modules.values()})
    alphas = sorted({m.alpha for m in modules.values()})
    return (f"{len(modules)} modules ({', '.join(parts)}), rank "
            f"{'/'.join(map(str, ranks))}, alpha {'/'.join(f'{a:g}' for a in alphas)}")


def convert(src: str | Path, to: str, out: str | Path, base: str | Path | None = None,
            overwrite: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Read SRC, check it against `base` when given, write it as `to` at `out`; returns the
    written file or folder."""
    src, out = Path(src), Path(out)
    _check_out(src, to, out, overwrite)
    lora = read_lora(src)
    _check_not_source(out, lora.path, overwrite)
    up = ".lora_up.weight" if lora.format == "kohya" else ".lora_B.weight"
    check_has_update({m.key + up: m.up for m in lora.modules.values()}, lora.path, "convert it")
    echo(f"read {lora.path}: {lora.format}, {describe(lora.modules)}")
    if base is not None:
        modules, report = check_against_base(lora, base)
        echo(f"{report.summary()} against base {base}")
    else:
        modules = resolve_paths(lora.modules)
        echo("not checked against a base model: give --base PIPELINE_FOLDER to check every "
             "module by name and shape")
    if to == "kohya":
        written = write_kohya(modules, out)
    elif to == "peft":
        written = write_peft(modules, out, str(base) if base is not None else lora.base_model)
    else:
        written = write_diffusers(modules, out)
    echo(f"wrote {written} ({to})")
    return written


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a LoRA between kohya, PEFT and diffusers layouts, checking "
        "every module against a base pipeline", epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="kohya .safetensors, diffusers "
                   "pytorch_lora_weights.safetensors (or its folder), PEFT folder, or a run's "
                   "stage folder")
    p.add_argument("--to", required=True, choices=TARGETS, help="output layout")
    p.add_argument("--out", required=True, help="output: a .safetensors file (kohya; diffusers "
                   "too if it ends in .safetensors) or a folder (peft, diffusers)")
    p.add_argument("--base", metavar="PIPELINE_FOLDER", help="diffusers pipeline folder to "
                   "check every module against by name and shape (needed to map kohya names "
                   "exactly for architectures diffusers does not know)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    convert(args.src, args.to, args.out, args.base, args.overwrite)
    return 0
