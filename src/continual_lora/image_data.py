"""Image training data as kohya sd-scripts and diffusers users keep it, read into records.

Why: people who train image LoRAs already have their data laid out for one of these tools; the
diffusion family reads those layouts as they are instead of asking for a new one.

Layouts read:

* a folder of images with a caption file beside each (``img.png`` + ``img.txt``, or kohya's
  ``img.caption``) -- :func:`read_image_folder`;
* kohya's ``train_data_dir``: a parent folder of ``<N>_<class tokens>`` subfolders (``10_sks
  dog``: 10 repeats, default caption ``sks dog``) -- :func:`read_kohya_train_dir`;
* kohya's dataset config TOML (``--dataset_config``): ``[general]``, ``[[datasets]]``,
  ``[[datasets.subsets]]`` -- :func:`read_kohya_dataset_config`.

Repeats follow kohya: an image of a subset with ``num_repeats = N`` is seen N times per epoch
(:func:`expand_repeats`). Images are loaded as diffusers' DreamBooth script does by default
(:func:`load_image`: RGB, shorter side resized to the resolution, centre crop).

Captions are read once and cached, so kohya options that rewrite a caption at every step
(``shuffle_caption``, ``keep_tokens``, caption dropout, ...) and the image augmentations are
accepted but do nothing; they are returned as ``ignored`` so the caller can say so. Errors are
:class:`~continual_lora.config.ConfigError` naming the file or key and saying what to do.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from continual_lora.config import ConfigError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "KohyaDataset",
    "Subset",
    "expand_repeats",
    "kohya_reg_repeats",
    "load_image",
    "parse_kohya_folder_name",
    "read_image_folder",
    "read_kohya_dataset_config",
    "read_kohya_train_dir",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # kohya's list, without avif
KOHYA_CAPTION_EXTENSION = ".caption"  # kohya's default `caption_extension`


@dataclass
class ImageRecord:
    """One training image: a file (``path``) or an in-memory array (``array``, embedded data)."""

    key: str
    """Stable id: the absolute path for files; a name such as ``animal-mnist/123`` otherwise."""
    path: Path | None
    array: np.ndarray | None
    caption: str
    repeats: int = 1
    """Copies per epoch (kohya's `num_repeats`)."""
    is_reg: bool = False
    """A regularization (prior-preservation) image rather than an instance image."""
    source: str = ""
    """Name of the subset (folder) it came from."""


@dataclass
class Subset:
    """One kohya subset: a folder of images with its settings, and the records read from it."""

    name: str
    image_dir: Path
    num_repeats: int
    is_reg: bool
    class_tokens: str | None
    caption_extension: str
    records: list[ImageRecord] = field(default_factory=list)
    dataset: int = 0
    """Index of the `[[datasets]]` entry it belongs to (kohya balances reg images per dataset)."""


@dataclass
class KohyaDataset:
    """What a kohya config or train_data_dir holds: its subsets, and the settings this reader
    accepted but does not apply (one human-readable line each, for the caller to print)."""

    subsets: list[Subset]
    ignored: list[str] = field(default_factory=list)

    @property
    def records(self) -> list[ImageRecord]:
        """All records, subset after subset."""
        return [r for s in self.subsets for r in s.records]

    def epoch_indices(self, balance_reg: bool = True) -> list[int]:
        """One epoch as indices into :attr:`records` (see :func:`expand_repeats`). With
        ``balance_reg`` (kohya always does it), regularization repeats are balanced per
        ``[[datasets]]`` entry, as kohya balances them within each dataset."""
        records = self.records
        repeats = [r.repeats for r in records]
        if balance_reg:
            owner = [s.dataset for s in self.subsets for _ in s.records]
            for d in sorted(set(owner)):
                idx = [i for i, o in enumerate(owner) if o == d]
                for i, n in zip(idx, kohya_reg_repeats([records[i] for i in idx]), strict=True):
                    repeats[i] = n
        return _expand(repeats)


# --- folders of images with captions -------------------------------------------------------------

def _list_images(folder: Path) -> list[Path]:
    # Sorted by file name (kohya sorts its glob too). Dot files are skipped like kohya's glob
    # skips them: macOS leaves `._img.png` resource forks that are not images.
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name)


def _read_caption(caption_file: Path) -> str:
    """kohya's rule: the first line of the file, stripped; an empty file is an error (kohya
    refuses it too) rather than a silent empty caption."""
    try:
        lines = caption_file.read_text(encoding="utf-8-sig").splitlines()  # -sig: drop a BOM
    except UnicodeDecodeError as e:
        raise ConfigError(f"{caption_file}: not UTF-8 text ({e}); save the caption as "
                          f"UTF-8") from e
    except OSError as e:
        raise ConfigError(f"{caption_file}: cannot read the caption ({e})") from e
    if not lines or not lines[0].strip():
        raise ConfigError(f"{caption_file}: the caption file is empty (or its first line is); "
                          f"write a caption on its first line, or delete the file to use the "
                          f"default caption")
    return lines[0].strip()


def _read_folder(folder: Path, extensions: Sequence[str], fallback: str | None, repeats: int,
                 is_reg: bool, source: str) -> list[ImageRecord]:
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder of images; check the path")
    if repeats < 1:
        raise ConfigError(f"{folder}: repeats must be >= 1, got {repeats}")
    for ext in extensions:
        if not ext.startswith(".") or len(ext) < 2 or "/" in ext:
            raise ConfigError(f"{folder}: caption extension {ext!r} must look like '.txt' "
                              f"(with the dot)")
    images = _list_images(folder)
    if not images:
        raise ConfigError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder; "
                          f"put the training images directly in it")
    records = []
    for img in images:
        caption = None
        for ext in extensions:
            caption_file = img.with_suffix(ext)
            if caption_file.is_file():
                caption = _read_caption(caption_file)
                break
        if caption is None:
            if fallback is None:
                wanted = " or ".join(img.with_suffix(e).name for e in extensions)
                others = [img.with_suffix(e).name for e in (".txt", ".caption")
                          if e not in extensions and img.with_suffix(e).is_file()]
                hint = (f" ({others[0]} exists: set the caption extension to "
                        f"{Path(others[0]).suffix!r})" if others else "")
                raise ConfigError(
                    f"{img}: no caption file ({wanted}){hint}; write one beside the image, or "
                    f"give a default caption (class tokens, e.g. a folder named `10_sks dog`)")
            caption = fallback
        path = img.resolve()
        records.append(ImageRecord(key=str(path), path=path, array=None, caption=caption,
                                   repeats=repeats, is_reg=is_reg, source=source))
    return records


def read_image_folder(folder: str | Path, caption_extension: str = ".txt",
                      default_caption: str | None = None, repeats: int = 1,
                      class_tokens: str | None = None, *, is_reg: bool = False,
                      source: str | None = None) -> list[ImageRecord]:
    """Images of ``folder`` (not its subfolders; .png .jpg .jpeg .webp .bmp, any case), sorted by
    name, each captioned by the first line of the caption file beside it: ``caption_extension``
    (``img.txt``), else kohya's ``img.caption``. Without a caption file an image gets
    ``default_caption`` (diffusers' instance prompt) or ``class_tokens`` (kohya's name for the
    same fallback); without either it is an error naming the image. ``source`` defaults to the
    folder's name."""
    folder = Path(folder)
    if default_caption is not None and class_tokens is not None and \
            default_caption != class_tokens:
        raise ConfigError(f"{folder}: default_caption {default_caption!r} and class_tokens "
                          f"{class_tokens!r} are the same fallback; give one")
    fallback = default_caption if default_caption is not None else class_tokens
    extensions = list(dict.fromkeys([caption_extension, KOHYA_CAPTION_EXTENSION]))
    return _read_folder(folder, extensions, fallback, repeats, is_reg,
                        source if source is not None else folder.name)


def parse_kohya_folder_name(name: str) -> tuple[int, str] | None:
    """kohya's ``<N>_<class tokens>`` folder name -> (N, class tokens); None when the name does
    not start with a number (kohya skips such folders). ``10_sks dog`` -> (10, "sks dog");
    further underscores stay in the tokens, as in kohya."""
    head, _, tokens = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, tokens


def read_kohya_train_dir(folder: str | Path, reg_dir: str | Path | None = None,
                         caption_extension: str = KOHYA_CAPTION_EXTENSION) -> KohyaDataset:
    """kohya's ``--train_data_dir`` (and ``--reg_data_dir``) without a TOML: every
    ``<N>_<class tokens>`` subfolder is a subset with N repeats whose images without a caption
    file get the class tokens as caption. ``caption_extension`` is kohya's
    ``--caption_extension`` (its default ``.caption``; many set ``.txt``). Subfolders not named
    so, or with N < 1, are skipped as kohya skips them, and listed in ``ignored``."""
    subsets: list[Subset] = []
    ignored: list[str] = []
    for base, is_reg in ((Path(folder), False), (None if reg_dir is None else Path(reg_dir), True)):
        if base is None:
            continue
        if not base.is_dir():
            raise ConfigError(f"{base}: not a folder; give kohya's "
                              f"{'reg_data_dir' if is_reg else 'train_data_dir'}, the folder "
                              f"holding `<N>_<class tokens>` subfolders")
        for sub in sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name):
            parsed = parse_kohya_folder_name(sub.name)
            if parsed is None or parsed[0] < 1:
                ignored.append(f"{sub}: skipped (kohya reads only subfolders named "
                               f"`<N>_<class tokens>` with N >= 1)")
                continue
            repeats, tokens = parsed
            # kohya passes the tokens as class_tokens even when empty (`10_`): an empty caption
            fallback = tokens
            records = _read_folder(sub, [caption_extension], fallback, repeats, is_reg,
                                   sub.name)
            subsets.append(Subset(sub.name, sub.resolve(), repeats, is_reg, tokens,
                                  caption_extension, records))
    if not any(not s.is_reg for s in subsets):
        raise ConfigError(f"{folder}: no `<N>_<class tokens>` subfolder with images (e.g. "
                          f"`10_sks dog/`); kohya's train_data_dir holds images in such "
                          f"subfolders, not directly")
    return KohyaDataset(subsets, ignored)


# --- kohya dataset config (TOML) -----------------------------------------------------------------

# Keys this reader applies (subset level; all but image_dir/is_reg may also be set in
# [general] or [[datasets]] as defaults, as in kohya).
_USED = {"image_dir", "num_repeats", "caption_extension", "class_tokens", "is_reg"}
_SUBSET_ONLY = {"image_dir", "is_reg"}
# Known kohya keys, accepted and not applied, with why (kohya sd-scripts
# library/config_util.py, ConfigSanitizer schemas, early 2026).
_CACHED_CAPTION = "captions are read once and cached, so per-step caption edits do not apply"
_CACHED_IMAGE = "images are cached at one size, so per-step augmentation does not apply"
_IGNORED_SUBSET: dict[str, str] = {
    **dict.fromkeys(["shuffle_caption", "keep_tokens", "keep_tokens_separator",
                     "caption_separator", "secondary_separator", "enable_wildcard",
                     "caption_prefix", "caption_suffix", "caption_dropout_rate",
                     "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                     "token_warmup_min", "token_warmup_step"], _CACHED_CAPTION),
    **dict.fromkeys(["color_aug", "flip_aug", "face_crop_aug_range", "random_crop"],
                    _CACHED_IMAGE),
    "cache_info": "kohya's image-size cache; images are read directly",
    "alpha_mask": "alpha-masked loss is not supported; the alpha channel is dropped",
    "custom_attributes": "kohya-internal per-subset attributes",
    "resize_interpolation": "images are resized with bilinear filtering (diffusers' default)",
}
_IGNORED_DATASET: dict[str, str] = {
    **dict.fromkeys(["resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                     "bucket_reso_steps", "bucket_no_upscale"],
                    "the resolution and square centre crop come from this tool's config"),
    "batch_size": "the batch size comes from this tool's config (train.batch_size)",
    "network_multiplier": "not applicable",
    **dict.fromkeys(["validation_seed", "validation_split"],
                    "held-out data is chosen by this tool's config"),
}
# kohya fine-tuning (metadata JSON) and ControlNet subsets: known, but a different data model
_UNSUPPORTED = {
    "metadata_file": "kohya fine-tuning subsets (metadata JSON) are not supported; use a "
                     "DreamBooth-style subset: image_dir with caption files",
    "conditioning_data_dir": "ControlNet subsets are not supported",
}


def _check_keys(table: dict[str, Any], where: str, subset_level: bool, toml: Path,
                ignored: list[str]) -> None:
    """Sort the keys of one table: used, known-and-ignored (appended to ``ignored``), or an
    error. Levels as in kohya: `image_dir` and `is_reg` only in a subset; dataset settings
    (`resolution`, `batch_size`, ...) only in [general] or [[datasets]]."""
    used = _USED if subset_level else _USED - _SUBSET_ONLY
    known_ignored = _IGNORED_SUBSET if subset_level else {**_IGNORED_SUBSET, **_IGNORED_DATASET}
    for key, value in table.items():
        if key in _UNSUPPORTED:
            raise ConfigError(f"{toml}: {where}{key}: {_UNSUPPORTED[key]}")
        if key in used:
            continue
        if key in known_ignored:
            ignored.append(f"{where}{key} = {value!r}: ignored ({known_ignored[key]})")
            continue
        if key in _USED or key in _IGNORED_DATASET:
            place = ("a [[datasets.subsets]] table" if key in _SUBSET_ONLY
                     else "[general] or [[datasets]]")
            raise ConfigError(f"{toml}: {where}{key}: kohya reads this key only in {place}; "
                              f"move it there")
        known = sorted(_USED | set(_IGNORED_SUBSET) | set(_IGNORED_DATASET))
        raise ConfigError(f"{toml}: unknown key {where}{key!r}; kohya dataset-config keys are "
                          f"{', '.join(known)} (check its spelling)")


def _typed(value: Any, kind: type, key: str, where: str, toml: Path) -> Any:
    # bool is an int in Python: `num_repeats = true` must not pass as 1
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{toml}: {where}{key} must be {kind.__name__}, got {value!r}")
    return value


def read_kohya_dataset_config(toml_path: str | Path) -> KohyaDataset:
    """Read kohya sd-scripts' dataset config (``--dataset_config``): DreamBooth-style subsets
    under ``[[datasets]]``, with defaults in ``[general]`` and ``[[datasets]]`` (a subset's own
    value wins, then its dataset's, then general's, as in kohya). Applied: ``image_dir``
    (relative to the TOML's folder), ``num_repeats``, ``caption_extension`` (kohya's default
    ``.caption``), ``class_tokens`` (caption of images without a caption file), ``is_reg``.
    Other kohya keys are listed in ``ignored``; unknown keys are errors naming key and file.
    Subsets with ``num_repeats < 1`` are skipped, as kohya does."""
    toml = Path(toml_path)
    try:
        with toml.open("rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{toml}: no such dataset config file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{toml}: not valid TOML ({e})") from e
    base = toml.resolve().parent
    ignored: list[str] = []

    for key in config:
        if key not in ("general", "datasets"):
            raise ConfigError(f"{toml}: unknown top-level key {key!r}; a kohya dataset config "
                              f"has [general] and [[datasets]] only")
    general = config.get("general", {})
    datasets = config.get("datasets", [])
    if not isinstance(general, dict):
        raise ConfigError(f"{toml}: general must be a table ([general])")
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise ConfigError(f"{toml}: datasets must be an array of tables ([[datasets]])")
    if not datasets:
        raise ConfigError(f"{toml}: no [[datasets]]; add one with [[datasets.subsets]] "
                          f"image_dir = \"...\"")
    _check_keys(general, "general.", False, toml, ignored)

    subsets: list[Subset] = []
    names: set[str] = set()
    for d, dataset in enumerate(datasets):
        where_d = f"datasets[{d}]."
        _check_keys({k: v for k, v in dataset.items() if k != "subsets"}, where_d, False,
                    toml, ignored)
        subs = dataset.get("subsets", [])
        if not isinstance(subs, list) or not subs or not all(isinstance(s, dict) for s in subs):
            raise ConfigError(f"{toml}: {where_d}subsets: add at least one [[datasets.subsets]] "
                              f"table with image_dir")
        for s, sub in enumerate(subs):
            where = f"{where_d}subsets[{s}]."
            _check_keys(sub, where, True, toml, ignored)
            levels = ((where, sub), (where_d, dataset), ("general.", general))

            def get(key: str, default: Any, kind: type, levels=levels) -> Any:
                # the subset's own value wins, then its dataset's, then [general] (kohya)
                for level, table in levels:
                    if key in table:
                        return _typed(table[key], kind, key, level, toml)
                return default

            if "image_dir" not in sub:
                raise ConfigError(f"{toml}: {where}image_dir is missing; every subset needs the "
                                  f"folder of its images")
            image_dir = Path(_typed(sub["image_dir"], str, "image_dir", where, toml))
            image_dir = image_dir if image_dir.is_absolute() else base / image_dir
            repeats = get("num_repeats", 1, int)
            is_reg = _typed(sub.get("is_reg", False), bool, "is_reg", where, toml)
            class_tokens = get("class_tokens", None, str)
            caption_extension = get("caption_extension", KOHYA_CAPTION_EXTENSION, str)
            if repeats < 1:
                ignored.append(f"{where[:-1]}: skipped, num_repeats = {repeats} < 1 (as kohya)")
                continue
            if not image_dir.is_dir():
                # kohya only warns and trains without it; a typo should not silently drop data
                raise ConfigError(f"{toml}: {where}image_dir: {image_dir} is not a folder; fix "
                                  f"the path (relative paths start at the TOML's folder)")
            name = image_dir.name
            if name in names:  # two subsets from same-named folders: keep `source` distinct
                name = f"{name}#{len(subsets)}"
            names.add(name)
            try:
                records = _read_folder(image_dir, [caption_extension], class_tokens, repeats,
                                       is_reg, name)
            except ConfigError as e:
                raise ConfigError(f"{toml}: {where[:-1]}: {e}") from e
            subsets.append(Subset(name, image_dir.resolve(), repeats, is_reg, class_tokens,
                                  caption_extension, records, dataset=d))
    if not any(not s.is_reg for s in subsets):
        raise ConfigError(f"{toml}: no training subset (every subset is is_reg or skipped); "
                          f"add a subset of instance images")
    return KohyaDataset(subsets, ignored)


# --- the training stream -------------------------------------------------------------------------

def kohya_reg_repeats(records: Sequence[ImageRecord]) -> list[int]:
    """Repeats per record after kohya's balancing of regularization images within one
    dataset: reg images are taken in order, each with its own repeats, until they make as many
    entries as the training images (sum of their repeats); reg images past that point get 0;
    when the reg images are too few, extra repeats are added one at a time from the first
    (kohya sd-scripts DreamBoothDataset). Training images keep their repeats. With no reg
    images, or no training images, the repeats are unchanged."""
    out = [r.repeats for r in records]
    n_train = sum(r.repeats for r in records if not r.is_reg)
    reg = [i for i, r in enumerate(records) if r.is_reg]
    if not reg or n_train == 0:
        return out
    for i in reg:
        out[i] = 0
    n = 0
    first = True
    while n < n_train:
        for i in reg:
            if first:
                out[i] = records[i].repeats
                n += records[i].repeats
            else:
                out[i] += 1
                n += 1
            if n >= n_train:
                break
        first = False
    return out


def expand_repeats(records: Sequence[ImageRecord], balance_reg: bool = False) -> list[int]:
    """Indices into ``records`` for one epoch: record i appears ``records[i].repeats`` times
    (kohya's num_repeats). Stable order, pass after pass: the first pass lists every record,
    the k-th pass those with more than k repeats, so a shortened epoch still sees each image
    before any repeat. The trainer shuffles as it likes. ``balance_reg=True`` first applies
    :func:`kohya_reg_repeats` (give it the records of one kohya dataset)."""
    repeats = kohya_reg_repeats(records) if balance_reg else [r.repeats for r in records]
    for r, n in zip(records, repeats, strict=True):
        if n < 0:
            raise ConfigError(f"{r.key}: repeats must be >= 0, got {n}")
    return _expand(repeats)


def _expand(repeats: Sequence[int]) -> list[int]:
    """Pass k lists, in order, the indices whose repeat count exceeds k."""
    out: list[int] = []
    for k in range(max(repeats, default=0)):
        out.extend(i for i, n in enumerate(repeats) if n > k)
    return out


def load_image(path: str | Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB, as diffusers' DreamBooth script prepares an image by default:
    EXIF orientation applied, converted to RGB (alpha dropped), shorter side resized to ``size``
    (bilinear, the longer one to int(size·long/short) like torchvision's Resize), then centre
    cropped. An unreadable file is an error naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not later
            img = ImageOps.exif_transpose(im)
            img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises OSError (incl. UnidentifiedImageError) for unreadable files, ValueError /
        # SyntaxError for some malformed headers
        raise ConfigError(f"{path}: cannot read this image ({e}); re-save it as PNG or JPEG, "
                          f"or remove it") from e
    w, h = img.size
    if min(w, h) < 1:
        raise ConfigError(f"{path}: the image is empty ({w}×{h})")
    if w <= h:
        new = (size, max(size, int(size * h / w)))
    else:
        new = (max(size, int(size * w / h)), size)
    if new != (w, h):
        img = img.resize(new, Image.Resampling.BILINEAR)
    # torchvision CenterCrop's offsets: round((dim - size) / 2)
    left = int(round((new[0] - size) / 2.0))
    top = int(round((new[1] - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).copy()
