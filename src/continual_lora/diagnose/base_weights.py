"""‖W0‖² of each adapted module, read from the base model's safetensors files (never pickle),
one tensor at a time: the relative norms ‖ΔW‖/‖W0‖ need nothing else from the base."""

from __future__ import annotations

from pathlib import Path

from continual_lora.config import EMBEDDED_MODEL


def locate_base(names: list[str | None]) -> Path | None:
    """The first of `names` (a `--base` folder, the adapters' base_model_name_or_path, the run's
    model.name_or_path) that is a local folder holding safetensors, or the embedded default
    (inside its wheel). Other embedded models and hub ids are not looked up: that could build
    a model or reach the network; give `--base FOLDER` for them."""
    for name in names:
        if not name:
            continue
        if name == EMBEDDED_MODEL:
            from continual_lora.families.common import resolve_model_path

            return Path(resolve_model_path(name))
        folder = Path(name).expanduser()
        if folder.is_dir() and _weight_files(folder):
            return folder
    return None


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files, and those one level down (a diffusers pipeline keeps its
    denoiser in unet/ or transformer/)."""
    return sorted([*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")])


def base_square_norms(folder: Path, modules: list[str]) -> dict[str, float]:
    """{module: ‖W0‖²_F} for the modules whose weight is found: the tensor named
    `<module>.weight`, or the one tensor whose name ends with `.<module>.weight` (a checkpoint
    saved with a model prefix, as `bert.encoder...`). A name matching several tensors is left
    out rather than guessed."""
    from safetensors import safe_open

    files = _weight_files(folder)
    names = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                names.setdefault(key, []).append(file)
    found = {}
    for module in modules:
        wanted = f"{module}.weight"
        matches = [k for k in names if k == wanted] or \
            [k for k in names if k.endswith("." + wanted)]
        if len(matches) != 1 or len(names[matches[0]]) != 1:
            continue
        with safe_open(str(names[matches[0]][0]), framework="pt") as fh:
            found[module] = float(fh.get_tensor(matches[0]).double().pow(2).sum())
    return found
