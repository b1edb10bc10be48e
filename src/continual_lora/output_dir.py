"""Checks on an output folder made before anything is loaded or written.

- `check_not_input`: an output must not be an input, hold one, or (when `--overwrite` would
  remove it) lie inside one. `run`, `bench`, `update`, `convert` and `merge` share this one
  check, so that no command's `--overwrite` can delete what it reads.
- `check_writable`: the output's folder (or its nearest existing ancestor) accepts a new file:
  a read-only disk or a folder without write permission is reported in one line before the
  model loads, not as an `OSError` after it.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from continual_lora.config import ConfigError

PROBE_PREFIX = ".continual-lora-write-test."


class OutputNotWritable(ConfigError):
    """The output folder cannot be written (read-only disk, no permission)."""


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _will_be_removed(out: Path, overwrite: bool) -> bool:
    """True when `--overwrite` replaces an existing `out` (a file, or a non-empty folder)."""
    if not overwrite or not out.exists():
        return False
    return not out.is_dir() or any(out.iterdir())


def check_not_input(out: str | Path, inputs: Iterable[tuple[str, str | Path | None]],
                    overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse `out` when it is one of `inputs` ((what, path) pairs; None and paths that do not
    exist, such as hub ids, are skipped) or a folder above one: writing there would replace
    what is read. When `overwrite` would remove an existing `out`, also refuse an `out` inside
    an input folder (removing it would delete part of that input)."""
    out_path = _resolved(out)
    removed = _will_be_removed(out_path, overwrite)
    for what, path in inputs:
        if path is None or str(path) == "" or not Path(path).expanduser().exists():
            continue
        source = _resolved(path)
        if out_path == source or out_path in source.parents:
            raise ConfigError(
                f"{flag} {out} is or holds the {what} {source}; writing there would replace it. "
                "Choose another path")
        if removed and source.is_dir() and source in out_path.parents:
            raise ConfigError(
                f"{flag} {out} lies inside the {what} {source}; --overwrite would delete part "
                "of it. Choose a path outside it")


def run_inputs(cfg) -> list[tuple[str, str | Path | None]]:
    """The local paths a run config reads (a `RunConfig`): base model, adapter, data."""
    inputs: list[tuple[str, str | Path | None]] = []

    def add(what: str, value: str | None) -> None:
        if value:
            inputs.append((what, cfg.resolve_path(value)))

    add("base model (model.name_or_path)", cfg.model.name_or_path)
    add("model.dino", cfg.model.dino)
    add("model.clip", cfg.model.clip)
    add("adapter (lora.init_adapter)", cfg.lora.init_adapter)
    for task in cfg.tasks:
        for key in ("train", "eval", "images", "dataset_config", "eval_images"):
            add(f"data (task {task.name} {key})", getattr(task, key, None))
    add("data (upstream.file)", cfg.upstream.file)
    add("data (upstream.images)", cfg.upstream.images)
    return inputs


def _existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, else the nearest folder above it that does."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _probe(folder: Path) -> None:
    """Create and remove an empty file in `folder` (raises the OSError a real write would)."""
    name = folder / f"{PROBE_PREFIX}{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.unlink(name)


def _why(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "it is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "this user has no permission to write there"
    return exc.strerror or str(exc)


def check_writable(out: str | Path, what: str = "output folder") -> None:
    """Raise OutputNotWritable naming `out` when a file cannot be created in it (or, when it
    does not exist yet, in the nearest existing folder above it, where it would be made).
    --overwrite empties an existing folder in place (`checkpoint.clear_folder`), so its
    parent need not be writable."""
    out_path = Path(out).expanduser().absolute()
    folder = _existing_ancestor(out_path)
    if not folder.is_dir():
        raise OutputNotWritable(f"{what} {out_path}: {folder} is a file, not a folder; choose "
                                "another path")
    try:
        _probe(folder)
    except OSError as exc:
        where = "" if folder == out_path else f" (checked in {folder}, where it would be made)"
        raise OutputNotWritable(
            f"cannot write the {what} {out_path}: {_why(exc)}{where}. Nothing was changed; "
            "choose a writable location") from None
