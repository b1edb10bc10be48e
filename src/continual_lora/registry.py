"""One explicit registry of strategies, checked at registration.

Registry key = file name = class-name prefix: `merge_reinit` lives in
`strategies/merge_reinit.py` as `MergeReinitStrategy`. Registration rejects duplicates, bad
names and mismatched class names, as PEFT's `register_peft_method` does.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from continual_lora.strategies.base import Strategy

_STRATEGIES: dict[str, type[Strategy]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# Strategy modules shipped with the package, imported on first lookup (not at package import).
BUILTIN_STRATEGIES = (
    "naive", "replay", "joint", "merge_reinit", "full_ft", "lwf", "olora", "moe", "ortho_init",
    "merge", "magmax",
)


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy under its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"strategy {cls.__name__}: `name` must be snake_case, got {name!r}")
    expected = f"{_camel(name)}Strategy"
    if cls.__name__ != expected:
        raise ValueError(f"strategy {name!r} must be implemented by a class named {expected}")
    if name in _STRATEGIES and _STRATEGIES[name] is not cls:
        raise ValueError(f"strategy {name!r} is already registered by {_STRATEGIES[name]!r}")
    _STRATEGIES[name] = cls
    return cls


def _load_builtins() -> None:
    for module in BUILTIN_STRATEGIES:
        importlib.import_module(f"continual_lora.strategies.{module}")


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered under `name` (KeyError if none)."""
    _load_builtins()
    return _STRATEGIES[name]


def strategy_names() -> list[str]:
    """All registered strategy names, sorted."""
    _load_builtins()
    return sorted(_STRATEGIES)
