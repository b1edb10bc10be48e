"""Files that are either whole or absent: atomic writes and run-folder creation.

A write goes to a temporary file in the same folder, is fsynced, then renamed over the target:
a crash leaves the old file or the new one, never half of one. Folders (adapters) are written
into a temporary sibling and renamed into place the same way.

Temporary files and folders are private (0600/0700) while written; what is renamed into place
gets the modes an ordinary write would give under the user's umask, so a run folder can be
shared and served like any other.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from continual_lora.run_lock import LOCK_NAME, is_only_lock


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # name the file the user will look for, not the temp one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it, even
    for an instant, would give a file another thread creates meanwhile the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)  # elsewhere the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def share_tree(root: Path) -> None:
    """Give `root` and everything under it the modes of an ordinary write under the umask
    (mkdtemp/mkstemp and some writers make private files)."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            (Path(dirpath) / name).chmod(0o777 & ~mask)
        for name in filenames:
            (Path(dirpath) / name).chmod(0o666 & ~mask)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path`, on failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with file.open("rb") as fh:
                    os.fsync(fh.fileno())
        share_tree(tmp)
        if path.exists():  # keep the old folder whole until the new one is in place
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class RunDirExists(FileExistsError):
    """The run folder exists and overwriting was not asked for."""


def _has_content(path: Path) -> bool:
    """A folder with something in it besides a lock file (see run_lock.py)."""
    return path.exists() and not is_only_lock(path)


def refuse_existing(path: Path, overwrite: bool) -> bool:
    """Raise if `path` is a non-empty folder and `overwrite` is off; True when it is one (and
    will be replaced)."""
    if not _has_content(path):
        return False
    if not overwrite:
        raise RunDirExists(
            f"run folder {path} already exists and is not empty; nothing was changed. "
            "Choose another name (name=... or output_dir=...) or pass overwrite=true."
        )
    return True


def clear_folder(path: Path) -> None:
    """Remove everything in `path` but the folder itself and its lock file (held by this
    process while it replaces the folder: removing it would let a second writer in)."""
    for child in path.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def create_run_dir(path: Path, overwrite: bool, echo: Callable[[str], None] = print) -> Path:
    """Create an empty run folder; an existing non-empty one is an error unless `overwrite`."""
    if refuse_existing(path, overwrite):
        echo(f"overwriting existing run folder {path}")
        clear_folder(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
