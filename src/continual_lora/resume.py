"""Training checkpoints: everything a stage needs to continue exactly where it stopped.

A checkpoint is a folder `step-NNNNNN/` holding

    state.pt     the trainable parameters (by name), the optimizer's and the scheduler's state
                 dicts, the RNG states and the loop's counters, written with `torch.save` and
                 read back with `weights_only=True` (tensors, numbers, strings and containers
                 only: nothing in it can run code)
    meta.json    the step, the sha256 of state.pt, and whatever the caller adds (`extra`)

The folder is written whole or not at all (`atomic_dir`); a folder whose state.pt no longer
matches its sha256 (a torn copy, a disk error) is skipped with a message naming it, and the
newest good one is used. Only the trainable parameters are stored: everything frozen (the base,
merged earlier adapters, old heads) is rebuilt deterministically by the stage's setup, which
is why a resume replays that setup before loading the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from continual_lora.checkpoint import atomic_dir

STATE_FILE = "state.pt"
META_FILE = "meta.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (the message names the folder and what to do)."""


@dataclass
class ResumeState:
    """A loaded checkpoint: what `train_task` needs to continue at `steps_done`."""

    steps_done: int
    params: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict
    first_loss: float
    extra: dict = field(default_factory=dict)
    folder: Path | None = None


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the module's trainable parameters, by name (CPU, same dtype)."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters()
            if p.requires_grad}


def load_trainable_state(module: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy `params` into the module's trainable parameters, in place (references that
    strategies hold, such as O-LoRA's stacked A's, stay valid). The names and shapes must be
    exactly those of the module: anything else is a different setup, not a resume."""
    live = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(live) - set(params)), sorted(set(params) - set(live))
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint's trainable parameters do not match this setup (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}): it was written by another "
            "configuration")
    with torch.no_grad():
        for name, p in live.items():
            if tuple(p.shape) != tuple(params[name].shape):
                raise CheckpointError(f"checkpoint parameter {name} has shape "
                                      f"{tuple(params[name].shape)}, the model {tuple(p.shape)}")
            p.copy_(params[name].to(p.device, p.dtype))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """`random.setstate` needs tuples; a round trip through a state dict may give lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def save_checkpoint(root: Path, steps_done: int, module: nn.Module, optimizer, scheduler,
                    first_loss: float, extra: dict | None = None,
                    with_optimizer: bool = True) -> Path:
    """Write `root/step-NNNNNN/` atomically; returns its path. Without the optimizer (a task's
    last step, after which it never steps again) the file holds only weights, RNG and
    counters: a fraction of the size (a third, with AdamW's two moments)."""
    payload = {"steps_done": steps_done, "params": trainable_state(module),
               "optimizer": optimizer.state_dict() if with_optimizer else {},
               "scheduler": scheduler.state_dict() if with_optimizer else {},
               "rng": _plain_rng(rng_state()), "first_loss": first_loss}
    return _write(root / f"{PREFIX}{steps_done:06d}", payload, steps_done, extra)


def _write(folder: Path, payload: dict, steps_done: int, extra: dict | None) -> Path:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    with atomic_dir(folder) as tmp:
        (tmp / STATE_FILE).write_bytes(data)
        meta = {"step": steps_done, "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data), "extra": extra or {}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def _plain_rng(state: dict) -> dict:
    """RNG states as tensors and plain containers, so `weights_only=True` can read them."""
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (kind, torch.from_numpy(np.asarray(keys)), pos, has_gauss, gauss)}


def _numpy_rng(state: tuple) -> tuple:
    kind, keys, pos, has_gauss, gauss = state
    return (kind, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, gauss)


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}[0-9]*") if p.is_dir())


def read_checkpoint(folder: Path) -> ResumeState:
    """Load one checkpoint folder, verifying its checksum and its contents; anything else is a
    CheckpointError naming the folder."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        data = (folder / STATE_FILE).read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({exc})") from None
    if not isinstance(meta, dict) or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{folder}: {STATE_FILE} does not match the sha256 in {META_FILE} "
                              "(a torn or corrupted write)")
    # The checksum only says that state.pt is the file meta.json describes. One replaced (meta
    # and all) by anything but `save_checkpoint` may hold a pickle that weights_only refuses, or
    # other contents: refused like a torn one, by name, and never a traceback.
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        state = _resume_state(payload, meta, folder)
    except Exception as exc:  # pickle, zip, key and type errors alike: not what we wrote
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{folder}: {STATE_FILE} is not a checkpoint this tool wrote "
                              f"({type(exc).__name__}: {detail}); nothing in it was run") from None
    bad = [name for name, t in state.params.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{folder}: {STATE_FILE} holds non-finite parameters ({bad[:3]}): "
                              "not a state to continue from")
    return state


def _resume_state(payload: dict, meta: dict, folder: Path) -> ResumeState:
    """The checkpoint's payload as a ResumeState, its parts checked to be what `save_checkpoint`
    writes (the RNG states are tried on fresh generators, so a bad one fails here, not in the
    middle of a resume)."""
    params = dict(payload["params"])
    if not all(isinstance(t, torch.Tensor) for t in params.values()):
        raise TypeError("params holds something other than tensors")
    optimizer, scheduler = dict(payload["optimizer"]), dict(payload["scheduler"])
    if optimizer and not {"state", "param_groups"} <= set(optimizer):
        raise KeyError("the optimizer state has no state / param_groups")
    rng = dict(payload["rng"])
    rng["numpy"] = _numpy_rng(rng["numpy"])
    torch.Generator().set_state(rng["torch"])
    np.random.RandomState().set_state(rng["numpy"])
    random.Random().setstate(_tuples(rng["python"]))
    return ResumeState(int(payload["steps_done"]), params, optimizer, scheduler, rng,
                       float(payload["first_loss"]), dict(meta.get("extra") or {}), folder)


def latest_checkpoint(root: Path, echo: Callable[[str], None] = print) -> ResumeState | None:
    """The newest checkpoint under `root` that passes its checksum (bad ones are named and
    skipped), or None when there is none."""
    for folder in reversed(checkpoints(root)):
        try:
            return read_checkpoint(folder)
        except CheckpointError as exc:
            echo(f"skipping checkpoint: {exc}")
    return None


class CheckpointHook:
    """A trainer step hook that writes a checkpoint every `every` steps and at the task's last
    step, keeping the newest `keep_last`."""

    def __init__(self, every: int, root: Path, keep_last: int):
        self.every, self.root, self.keep_last = every, root, keep_last

    def __call__(self, state) -> bool:  # state: trainer.LoopState
        last = state.steps_done == state.total_steps
        save_checkpoint(self.root, state.steps_done, state.module, state.optimizer,
                        state.scheduler, state.first_loss, {"last_loss": state.last_loss},
                        with_optimizer=not last)
        prune(self.root, self.keep_last)
        return False


def prune(root: Path, keep_last: int, keep: set[Path] = frozenset()) -> None:
    """Remove all but the newest `keep_last` checkpoints, and those in `keep`, and the temporary
    folders of writes that a crash interrupted."""
    for stale in root.glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    folders = checkpoints(root)
    for folder in folders[: max(0, len(folders) - keep_last)]:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)
