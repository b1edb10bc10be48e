"""One writer per output folder: an exclusive lock for `run`, `bench`, `update` and resumes.

The lock is `LOCK_NAME` inside the folder, held with `fcntl.flock` for as long as the command
writes there. The kernel drops a flock when its process dies, however it dies (kill -9
included), so a lock left by a dead process is simply free: the next command takes it over.
The file also records who holds it (pid, host, start time, command), for the message that
refuses a second writer while the first is alive.

Where flock is not supported (some network or FUSE file systems) the recorded pid decides: a
lock whose pid is alive on this host, or that names another host, is held; any other is taken
over.

The file is removed when the lock is released; a folder that only holds it counts as empty.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from continual_lora.config import ConfigError

LOCK_NAME = ".continual-lora.lock"
# A refused flock is retried this long: a process that only checks the lock (`check`) holds it
# shared for an instant, which must not refuse a writer.
_RETRY_SECONDS = 0.3
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


class FolderLocked(ConfigError):
    """Another live process is writing to the folder."""


def lock_file(folder: Path) -> Path:
    return Path(folder) / LOCK_NAME


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    text = f"pid {holder['pid']}"
    if holder.get("host") and holder["host"] != socket.gethostname():
        text += f" on host {holder['host']}"
    if holder.get("command"):
        text += f" ({holder['command']}"
        text += f", started {holder['started']})" if holder.get("started") else ")"
    return text


def _holder_alive(holder: dict) -> bool:
    """The pid fallback: held when the recorded pid is another live process on this host."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # another host's process cannot be checked: assume it is alive
    return _pid_alive(pid)


def _refusal(folder: Path, holder: dict, what: str) -> FolderLocked:
    return FolderLocked(
        f"{what} folder {folder} is in use by {_describe(holder)}, which holds its lock "
        f"{lock_file(folder)}; nothing was changed. Wait for it to finish (or stop it), or "
        "choose another folder")


def _flock(fd: int, mode: int, holder: dict) -> bool:
    """Try the flock, retried for _RETRY_SECONDS; False when another process holds it. Where
    the file system has no flock, the recorded `holder` decides (see the module docstring)."""
    deadline = time.monotonic() + _RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                raise
            return not _holder_alive(holder)


class FolderLock:
    """The lock of one folder: `acquire` (idempotent), `release`; `check` refuses early
    without taking it. `enabled=False` (the non-main processes of a multi-process run, which
    write nothing) makes every call a no-op."""

    def __init__(self, folder: str | Path, what: str = "run", command: str = "",
                 enabled: bool = True):
        self.folder = Path(folder)
        self.what, self.command, self.enabled = what, command or what, enabled
        self._fd: int | None = None
        self.taken_over: dict | None = None  # what a dead holder left, when one was replaced

    @property
    def held(self) -> bool:
        return self._fd is not None

    def check(self) -> None:
        """Refuse (FolderLocked) when a live process holds the lock; creates nothing."""
        path = lock_file(self.folder)
        if not self.enabled or self.held or not path.is_file():
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            holder = _read_holder(fd)
            if not _flock(fd, fcntl.LOCK_SH, holder):
                raise _refusal(self.folder, holder, self.what)
        finally:
            os.close(fd)  # drops the shared lock taken to look

    def acquire(self, echo: Callable[[str], None] | None = None, create: bool = True) -> bool:
        """Take the lock (making the folder when `create`); FolderLocked when a live process
        holds it. Returns False, taking nothing, when the folder does not exist and not
        `create` (the caller's own check then says what is missing)."""
        if not self.enabled or self.held:
            return self.held
        if not self.folder.is_dir():
            if not create:
                return False
            self.folder.mkdir(parents=True, exist_ok=True)
        path = lock_file(self.folder)
        for _ in range(20):  # the file can be removed under us by a releasing holder: retry
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                holder = _read_holder(fd)
                if not _flock(fd, fcntl.LOCK_EX, holder):
                    raise _refusal(self.folder, holder, self.what)
                if not _same_file(fd, path):  # released and unlinked meanwhile: that lock
                    os.close(fd)              # is no one's; take the current file's
                    continue
                holder = _read_holder(fd)  # what the previous holder left (it is dead)
                self._write_holder(fd)
            except BaseException:
                if fd != self._fd:
                    os.close(fd)
                raise
            if holder.get("pid") and holder.get("pid") != os.getpid():
                self.taken_over = holder
                if echo is not None:
                    echo(f"taking over the lock of {self.folder} left by {_describe(holder)}, "
                         "which ended without releasing it")
            return True
        raise FolderLocked(f"could not lock {self.folder}: its lock file {path} keeps being "
                           "replaced by another process; try again")

    def _write_holder(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (when it is still ours) and drop the lock; safe to repeat,
        and safe after the folder itself was removed."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            path = lock_file(self.folder)
            if _same_file(fd, path):
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def is_only_lock(folder: Path) -> bool:
    """True when `folder` is empty but for a lock file (an interrupted command's, or ours)."""
    return all(p.name == LOCK_NAME for p in folder.iterdir())
