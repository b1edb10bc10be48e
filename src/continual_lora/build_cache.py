"""Build a cached folder once (the embedded models): in a temporary sibling, renamed into place.

A crash leaves no half-built folder under the final name, and two processes building the same
folder at once both end with one complete copy. A build killed outright (SIGKILL, power loss)
cannot clean up after itself; its temporary folder is removed by the next build of the same
name once it is old enough that no live builder can still own it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from continual_lora.checkpoint import share_tree

#: A temporary build folder untouched this long belongs to a build that died: every embedded
#: model builds in well under an hour on 2 CPU cores.
STALE_AFTER_S = 6 * 3600


def build_once(folder: Path, build: Callable[[Path], object],
               is_valid: Callable[[Path], bool]) -> Path:
    """`folder`, built by `build(tmp)` into a temporary sibling unless `is_valid(folder)`."""
    if is_valid(folder):
        return folder
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
    try:
        build(tmp)
        share_tree(tmp)  # a cached model is shared by every user of the machine
        if folder.exists() and not is_valid(folder):
            shutil.rmtree(folder, ignore_errors=True)  # a stale or damaged folder
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_valid(folder):  # not a concurrent builder's result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def remove_stale_builds(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the temporary folders of `folder`'s builds that died; returns them."""
    now = time.time() if now is None else now
    removed = []
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):
        try:
            age = now - tmp.stat().st_mtime
        except OSError:  # removed meanwhile
            continue
        if age > STALE_AFTER_S:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed
