"""The one check of an adapter file that every command reading an adapter makes, and its wording.

- **Whole.** A safetensors file is complete when its header's tensor offsets cover exactly the
  bytes after the header (`read_header`, without reading a tensor) and every tensor reads back
  (`read_weights`). A truncated file (an interrupted copy, download or save) is refused naming it.
- **Finite.** A tensor holding NaN or ±Inf is refused naming the tensor and the file
  (`check_finite`): such an adapter comes from a diverged training, and training on it, merging
  it (an SVD of NaN fails) or converting it only spreads the damage.
- **Not empty.** An adapter whose every up factor (PEFT's `lora_B`, kohya's `lora_up`, diffusers'
  `lora.up`) is zero changes nothing (ΔW = s·B·A = 0): an adapter saved before any training step,
  or an empty save (alpaca-lora#293). It is refused where it would be trained on, merged,
  converted, scored or generated with (`check_has_update`), and `inspect` warns about it
  (`zero_update_note`).

These are checks of files a user gives. A fresh adapter that a run attaches has B = 0 by design
before its first step and is never read through here; a run's own saves are checked by
`strategies.base.check_adapter_tensors` before they are written.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from continual_lora.config import ConfigError

MAX_HEADER = 100 << 20  # the safetensors reference reader's own limit
# Bytes per element of the safetensors dtypes (an unknown one is not size-checked).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
               "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# The up factor's key in each layout: PEFT and diffusers `lora_B`, kohya `lora_up`, old
# diffusers `lora.up` / `_lora.up` / `lora_linear_layer.up`.
UP_MARKS = (".lora_B.", ".lora_up.", ".lora.up.", "_lora.up.", ".lora_linear_layer.up.")
INCOMPLETE_HINT = ("truncated or corrupted (an interrupted copy, download or save?): copy it "
                   "again, or use an earlier adapter or the run's last good checkpoint "
                   "(`continual-lora run --resume RUN_DIR`)")
ZERO_WHY = ("the adapter changes nothing (ΔW = s·B·A = 0): saved before any training step, or an "
            "empty save")


class AdapterFileError(ConfigError):
    """An adapter file or folder that cannot be read or used; the message names it."""


def incomplete(file: Path, detail: str) -> AdapterFileError:
    return AdapterFileError(f"{file}: not a complete safetensors file ({detail}): "
                            f"{INCOMPLETE_HINT}")


# -- whole --------------------------------------------------------------------------------------


def read_header(file: Path) -> tuple[dict[str, dict], dict]:
    """{tensor name: {"dtype", "shape"}} and the `__metadata__` of a safetensors file whose header
    says it is whole: every tensor's byte range has the size of its shape and dtype, and the
    ranges end exactly where the file does. Reads the header only, never a tensor."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            text = fh.read(length) if length is not None and length <= MAX_HEADER else b""
    except OSError as exc:
        raise AdapterFileError(f"{file}: cannot be read ({exc})") from None
    if length is None:
        raise incomplete(file, f"{size} bytes, shorter than the 8-byte header length")
    if length > min(MAX_HEADER, size - 8):
        raise incomplete(file, f"a header of {length} bytes in a file of {size}")
    try:
        header = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise incomplete(file, f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise incomplete(file, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = (int(v) for v in entry["data_offsets"])
            dtype, shape = entry["dtype"], [int(d) for d in entry["shape"]]
        except (KeyError, TypeError, ValueError):
            raise incomplete(file, f"tensor {name} has no dtype, shape and data_offsets") from None
        expected = math.prod(shape) * DTYPE_BYTES.get(dtype, 0)
        if stop < begin or (dtype in DTYPE_BYTES and stop - begin != expected):
            raise incomplete(file, f"tensor {name} {dtype} {shape} has data_offsets "
                                   f"[{begin}, {stop}]")
        end = max(end, stop)
    data = size - 8 - length
    if end != data:
        raise incomplete(file, f"its header describes {end} bytes of tensors, the file holds "
                               f"{data}")
    return {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in header.items()}, metadata


def read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a whole safetensors file (see `read_header`)."""
    from safetensors import safe_open

    read_header(file)
    try:
        with safe_open(str(file), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises its own error type for each kind of damage
        raise incomplete(file, " ".join(str(exc).split())) from None
    return tensors, metadata


# -- finite and not empty -----------------------------------------------------------------------


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or ±Inf, sorted."""
    return sorted(k for k, t in tensors.items()
                  if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def check_finite(tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse NaN or ±Inf anywhere, naming the first such tensor and `source` (the file)."""
    bad = non_finite(tensors)
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise AdapterFileError(
            f"{source}: tensor {bad[0]} holds non-finite values (NaN or Inf){more}: a broken "
            "adapter, saved from a diverged training? Refusing to use it; use an earlier "
            "adapter or the run's last good checkpoint")


def up_factors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The up factors (B) among `tensors`, in any of the layouts (see UP_MARKS)."""
    return {k: t for k, t in tensors.items() if any(m in k for m in UP_MARKS)}


def zero_update_note(ups: Mapping[str, torch.Tensor]) -> str | None:
    """'every up factor ... is all zero: ...' when there are up factors and all are zero."""
    if not ups or any(bool(t.any()) for t in ups.values()):
        return None
    kind = "lora_up" if any(".lora_up." in k for k in ups) else "lora_B"
    return f"every {kind} ({len(ups)} tensors) is all zero: {ZERO_WHY}"


def check_has_update(ups: Mapping[str, torch.Tensor], source: str | Path, use: str) -> None:
    """Refuse an adapter whose every up factor is zero; `use` says what it was read for, as
    words after "refusing to" ("train on it", "merge it", ...)."""
    note = zero_update_note(ups)
    if note:
        raise AdapterFileError(f"{source}: {note}. Refusing to {use}; give the trained adapter")


def check_values(tensors: Mapping[str, torch.Tensor], source: str | Path, use: str) -> None:
    """`check_finite` and `check_has_update` on one file's tensors."""
    check_finite(tensors, source)
    check_has_update(up_factors(tensors), source, use)


def read_checked(file: Path, use: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A whole safetensors adapter file, finite and not all zero: its tensors and metadata."""
    tensors, metadata = read_weights(file)
    check_values(tensors, file, use)
    return tensors, metadata
