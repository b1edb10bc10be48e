"""Cached folders are built once, atomically, and a dead build's leftovers are cleared; atomic
writes land with the modes of an ordinary write."""

from __future__ import annotations

import os
import stat
import time

import pytest

from continual_lora.build_cache import STALE_AFTER_S, build_once, remove_stale_builds


def _valid(folder):
    return (folder / "done.json").is_file()


def _build(tmp):
    (tmp / "sub").mkdir()
    (tmp / "sub" / "weights.bin").write_bytes(b"x")
    (tmp / "done.json").write_text("{}")


def test_builds_into_place_with_shared_permissions_and_then_reuses(tmp_path):
    folder = tmp_path / "cache" / "model-abc"
    old_mask = os.umask(0o022)
    try:
        assert build_once(folder, _build, _valid) == folder
    finally:
        os.umask(old_mask)
    assert _valid(folder)
    assert stat.S_IMODE(os.stat(folder / "sub" / "weights.bin").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(folder / "sub").st_mode) == 0o755
    assert [p.name for p in folder.parent.iterdir()] == ["model-abc"]  # no temporary left
    build_once(folder, lambda tmp: pytest.fail("rebuilt a valid folder"), _valid)


def test_a_failed_build_leaves_nothing_and_a_damaged_folder_is_replaced(tmp_path):
    folder = tmp_path / "model-abc"

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError, match="killed halfway"):
        build_once(folder, broken, _valid)
    assert list(tmp_path.iterdir()) == []
    folder.mkdir()
    (folder / "half.bin").write_bytes(b"x")  # damaged: no done.json
    build_once(folder, _build, _valid)
    assert _valid(folder) and not (folder / "half.bin").exists()


def test_only_old_temporary_folders_of_the_same_name_are_removed(tmp_path):
    folder = tmp_path / "model-abc"
    dead = tmp_path / ".model-abc.k2j3.tmp"
    live = tmp_path / ".model-abc.p9q8.tmp"
    other = tmp_path / ".model-xyz.a1b2.tmp"
    for path in (dead, live, other):
        path.mkdir()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(dead, (old, old))
    os.utime(other, (old, old))
    assert remove_stale_builds(folder) == [dead]
    assert not dead.exists() and live.exists() and other.exists()


def test_atomic_writes_get_the_modes_of_an_ordinary_write(tmp_path):
    """mkstemp/mkdtemp make private files; what lands in a run folder follows the umask."""
    from continual_lora.checkpoint import atomic_dir, write_json_atomic

    old_mask = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "results.json", {"R": [[0.5]]})
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "weights.safetensors").write_bytes(b"x")
            os.chmod(tmp / "weights.safetensors", 0o600)  # as some writers leave them
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(os.stat(tmp_path / "results.json").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "adapter").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tmp_path / "adapter" / "weights.safetensors").st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "results.json"]
