"""Image-classification tasks and the upstream image probe, read into `TaskData` / `ClassProbe`.

Sources, as image-classifier users keep their data:

* a folder with one subfolder of images per class (torchvision's and `datasets`' ImageFolder
  layout), for `train` and `eval` -- :func:`read_class_folder`;
* a table file read by `datasets` (Parquet with an Image feature, or CSV / JSON lines with image
  paths relative to the file) with an image column and a label column;
* the embedded images (`image_classes`: animal-mnist animals, scikit-learn digits), drawn per
  class with the run's seed and never from the images the embedded vision models were
  pretrained or probed on.

A split's `images` hold what the family turns into pixels: uint8 arrays (embedded images),
file paths (folders, path columns) or PIL images (decoded `datasets` Image features). Its
`texts` are display names (`cow#17`, file names) for logs and the per-sample reports.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np

from continual_lora.config import EMBEDDED_VISION, ConfigError, RunConfig, TaskConfig
from continual_lora.image_data import IMAGE_EXTENSIONS
from continual_lora.sequence import ClassProbe, Split, TaskData, inside_data_dir, load_table


def read_class_folder(folder: Path, what: str) -> tuple[list[Path], list[str]]:
    """(image paths, class names) of a folder with one subfolder per class, sorted by class
    then file name; hidden files are skipped. A missing folder, a folder without class
    subfolders or a class without images is a ConfigError naming it."""
    if not folder.is_dir():
        raise ConfigError(f"{what}: image folder not found: {folder}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{what}: {folder} has no class subfolders; put each class's images "
                          f"in a subfolder named after the class ({folder}/cat/1.png, ...)")
    paths, labels = [], []
    for name in classes:
        found = sorted(p for p in (folder / name).iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not found:
            raise ConfigError(f"{what}: class folder {folder / name} holds no images "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
        paths += found
        labels += [name] * len(found)
    return paths, labels


def _hash_items(items: list, labels: list[str]) -> str:
    digest = hashlib.sha256()
    for item, label in zip(items, labels, strict=True):
        if isinstance(item, np.ndarray):
            digest.update(item.tobytes())
        else:
            digest.update(str(item).encode())
        digest.update(label.encode())
    return digest.hexdigest()


def _read_table_images(path: Path, cfg: TaskConfig, what: str) -> tuple[list, list[str]]:
    table = load_table(path, what)
    for column in (cfg.image_column, cfg.label_column):
        if column not in table.column_names:
            raise ConfigError(f"{what}: {path.name} has no column {column!r}; its columns are "
                              f"{table.column_names}. Set `image_column`/`label_column` in the "
                              "task.")
    images = []
    for value in table[cfg.image_column]:
        if isinstance(value, str):  # a path, relative to the table file
            image_path = (path.parent / value) if not Path(value).is_absolute() else Path(value)
            if not image_path.is_file():
                raise ConfigError(f"{what}: {path.name}: image {value!r} not found (looked for "
                                  f"{image_path})")
            images.append(image_path)
        elif value is None:
            raise ConfigError(f"{what}: {path.name}: column {cfg.image_column!r} has empty rows")
        else:  # a decoded datasets Image feature (PIL image)
            images.append(value)
    labels = [str(x) for x in table[cfg.label_column]]
    return images, labels


def _read_images(run: RunConfig, cfg: TaskConfig, key: str, what: str) -> tuple[list, list, Path]:
    path = inside_data_dir(run, run.resolve_path(getattr(cfg, key)), f"{what}.{key}")
    if path.is_dir():
        paths, labels = read_class_folder(path, f"{what}.{key}")
        for p in paths:
            inside_data_dir(run, p, f"{what}.{key}")  # a linked image must not lead out either
        return list(paths), labels, path
    images, labels = _read_table_images(path, cfg, what)
    return images, labels, path


def file_task_table(run: RunConfig, cfg: TaskConfig, index: int):
    """(holds images, the train table or None) of a `train`/`eval` task: a folder holds images;
    a table does when it has the image column and no text column. The table is returned so the
    text loader does not read it again; a bad file is reported here, naming the task."""
    what = f"tasks.{index - 1} ({cfg.name})"
    path = inside_data_dir(run, run.resolve_path(cfg.train or ""), f"{what}.train")
    if path.is_dir():
        return True, None
    table = load_table(path, what)
    columns = table.column_names
    return cfg.image_column in columns and cfg.text_column not in columns, table


def load_image_file_task(cfg: TaskConfig, index: int, run: RunConfig) -> TaskData:
    """A task from the user's train and held-out image folders or tables."""
    what = f"tasks.{index - 1} ({cfg.name})"
    train_items, train_raw, train_path = _read_images(run, cfg, "train", what)
    eval_items, eval_raw, eval_path = _read_images(run, cfg, "eval", what)
    classes = sorted(set(train_raw))
    if len(classes) < 2:
        raise ConfigError(f"{what}: {train_path.name} has a single class {classes}; need ≥ 2")
    unknown = sorted(set(eval_raw) - set(classes))
    if unknown:
        raise ConfigError(f"{what}: the held-out data {eval_path.name} has classes the train "
                          f"data does not: {unknown[:10]}. Every held-out class must occur in "
                          "training.")
    rng = random.Random(run.seed)
    keep = list(range(len(train_items)))
    if cfg.max_train_examples is not None and cfg.max_train_examples < len(keep):
        keep = sorted(rng.sample(keep, cfg.max_train_examples))
    position = {c: i for i, c in enumerate(classes)}
    train = Split([_display(train_items[i], i) for i in keep],
                  np.array([position[train_raw[i]] for i in keep], dtype=np.int64),
                  images=[train_items[i] for i in keep])
    held = Split([_display(x, i) for i, x in enumerate(eval_items)],
                 np.array([position[c] for c in eval_raw], dtype=np.int64), images=eval_items)
    manifest = {"source": "images",
                "train": {"path": str(train_path), "images": len(train_items), "used": len(keep),
                          "sha256": _hash_items(train_items, train_raw)},
                "eval": {"path": str(eval_path), "images": len(eval_items),
                         "sha256": _hash_items(eval_items, eval_raw)}}
    return TaskData(index, cfg.name, classes, train, held, cfg.repeats, cfg.weight, manifest)


def _display(item, i: int) -> str:
    return item.name if isinstance(item, Path) else f"image#{i}"


def load_image_classes_task(cfg: TaskConfig, index: int, run: RunConfig) -> TaskData:
    """A task of embedded images (`image_classes`), `train_per_class` + `eval_per_class` per
    class, drawn with the run's seed; with an embedded vision model, never an image it was
    pretrained or probed on."""
    from continual_lora.data.images import load_embedded_images
    from continual_lora.embedded_vision import EMBEDDED_IMAGES, reserved_keys

    what = f"tasks.{index - 1} ({cfg.name})"
    classes = list(cfg.image_classes or [])
    try:
        images = load_embedded_images(EMBEDDED_IMAGES).subset(classes)
    except ConfigError as exc:
        raise ConfigError(f"{what}.image_classes: {exc}") from None
    reserved = reserved_keys() if run.model.name_or_path in EMBEDDED_VISION else set()
    need = cfg.train_per_class + cfg.eval_per_class
    train_idx, eval_idx, train_lab, eval_lab = [], [], [], []
    for c, name in enumerate(classes):
        members = np.flatnonzero(images.labels == c)
        free = [i for k, i in enumerate(members) if (name, k) not in reserved]
        if len(free) < need:
            raise ConfigError(
                f"{what}.image_classes: {name} has {len(free)} images"
                f"{' the embedded model has not seen' if reserved else ''}, fewer than "
                f"train_per_class + eval_per_class = {need}; lower them")
        picked = random.Random(f"{run.seed}:{name}").sample(free, need)
        train_idx += picked[:cfg.train_per_class]
        eval_idx += picked[cfg.train_per_class:]
        train_lab += [c] * cfg.train_per_class
        eval_lab += [c] * cfg.eval_per_class
    order = list(range(len(train_idx)))
    random.Random(f"{run.seed}:{cfg.name}").shuffle(order)
    train_idx = [train_idx[i] for i in order]
    train_lab = [train_lab[i] for i in order]
    train = Split([f"{classes[y]}#{i}" for i, y in zip(train_idx, train_lab, strict=True)],
                  np.array(train_lab, dtype=np.int64), images=[images.images[i] for i in train_idx])
    held = Split([f"{classes[y]}#{i}" for i, y in zip(eval_idx, eval_lab, strict=True)],
                 np.array(eval_lab, dtype=np.int64), images=[images.images[i] for i in eval_idx])
    manifest = {"source": EMBEDDED_IMAGES, "classes": classes, "license": images.license,
                "train_sha256": _hash_items(train.images, [str(x) for x in train.labels]),
                "eval_sha256": _hash_items(held.images, [str(x) for x in held.labels])}
    return TaskData(index, cfg.name, classes, train, held, cfg.repeats, cfg.weight, manifest)


def load_class_probe(run: RunConfig) -> ClassProbe:
    """The upstream probe of an image classifier: held-out images of its pretraining classes."""
    if run.upstream.images is None:
        from continual_lora.embedded_vision import upstream_images, upstream_split

        images = upstream_images()
        _, probe = upstream_split(images)
        items = [images.images[i] for i in probe]
        labels = images.labels[probe]
        classes = list(images.classes)
        source = {"source": "embedded", "images": len(items)}
    else:
        folder = inside_data_dir(run, run.resolve_path(run.upstream.images), "upstream.images")
        paths, raw = read_class_folder(folder, "upstream.images")
        classes = sorted(set(raw))
        labels = np.array([classes.index(c) for c in raw], dtype=np.int64)
        items = list(paths)
        source = {"source": "folder", "path": str(folder), "images": len(items)}
    manifest = {**source, "classes": classes,
                "sha256": _hash_items(items, [classes[y] for y in labels])}
    return ClassProbe("upstream:classes", items, np.asarray(labels, dtype=np.int64), classes,
                      manifest)
