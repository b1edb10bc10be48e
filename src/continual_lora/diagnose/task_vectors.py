"""One update per task, τ_t, read from a run folder or from adapter folders (safetensors only).

What a stage's adapter holds depends on the strategy (see each strategy's `export_adapter`), so
the task vector is defined per kind of export, and the definition travels with the diagnosis:

* `cumulative_difference`: the stage adapter reproduces the model scored after the stage and
  builds on the previous one: `naive`, `replay`, `lwf` (one adapter trained through task t) and
  `merge_reinit`, `ortho_init`, `olora`, `merge` with `cat` (the exact sum Σ_{s≤t} ΔW_s of the
  per-task adapters). τ_t = ΔW_t − ΔW_{t−1}: for the merged strategies that is exactly task t's
  own adapter s·B_t·A_t.
* `retrained_difference`: `joint` retrains a fresh adapter from the base at each stage, so
  τ_t = ΔW_t − ΔW_{t−1} is how the model changed at that stage, not what task t alone taught.
* `svd_export_difference`: `magmax` and `merge` export a truncated SVD of the scored model's
  update; τ_t is the change of that approximation (the per-task vectors they merge are not saved).
* `own_adapter`: `moe` keeps one adapter per task, each from the base: τ_t is task t's adapter.
* `independent_adapters` / `cumulative_adapters`: adapter folders given on the command line,
  each its own update from the base, or (`--cumulative`) each continuing the previous one.

Updates stay factored (`measures.Factored`): a difference of two adapters is the concatenation
of their factors, so the subspaces of τ_t come from a small core even for large layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from continual_lora.config import EMBEDDED_MODEL, ConfigError
from continual_lora.diagnose.measures import Factored

DEFINITIONS = {
    "cumulative_difference":
        "τ_t = ΔW_t − ΔW_{t−1}, the difference of consecutive stage adapters; each stage's "
        "adapter reproduces the model scored after it and builds on the previous stage",
    "cumulative_difference_merged":
        "τ_t = ΔW_t − ΔW_{t−1}; each stage's adapter is the exact sum Σ_{s≤t} of the per-task "
        "adapters merged so far, so τ_t is task t's own adapter s·B_t·A_t",
    "retrained_difference":
        "τ_t = ΔW_t − ΔW_{t−1}; joint retrains a fresh adapter from the base on tasks 1..t at "
        "each stage, so τ_t is how the model changed at stage t (the difference of two "
        "independent adapters), not what task t alone taught",
    "svd_export_difference":
        "τ_t = ΔW_t − ΔW_{t−1} of the stage adapters, each a truncated SVD of the scored "
        "model's update (its relative error is in stage.json): the change of that "
        "approximation; the per-task vectors the strategy merges are not saved",
    "own_adapter":
        "τ_t = task t's own adapter (adapter/task<t>/ of the last stage), each trained from the "
        "base",
    "independent_adapters":
        "τ_t = ΔW of adapter folder t, each taken as its own update from the base (pass "
        "--cumulative if each adapter continued the previous one)",
    "cumulative_adapters":
        "τ_t = ΔW_t − ΔW_{t−1} of consecutive adapter folders (--cumulative: each continued "
        "the previous one)",
}


class DiagnoseError(ConfigError):
    """Something `diagnose` cannot work with; the message names the path and what to do."""


@dataclass
class TaskVectors:
    """τ_t per task and module, and how they were obtained."""

    tasks: list[str]
    updates: list[dict[str, Factored]]  # one dict per task: module path → τ_t
    ranks: list[int]  # dimension of each task's subspaces (the rank it was trained with)
    definition: str  # a key of DEFINITIONS
    adapters: list[Path]  # the folder read for each task
    base_name: str | None = None  # base_model_name_or_path of the adapters
    notes: list[str] = field(default_factory=list)

    @property
    def modules(self) -> list[str]:
        return sorted(self.updates[0])

    @property
    def explanation(self) -> str:
        return DEFINITIONS[self.definition]


# -- one adapter folder ----------------------------------------------------------------------------


@dataclass
class Adapter:
    """One adapter folder's update per module (ΔW = s·B·A, factored) and its rank."""

    path: Path
    base_name: str | None
    updates: dict[str, Factored]
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return max(u.right.shape[0] for u in self.updates.values())


def read_update(path: Path) -> Adapter:
    """A PEFT LoRA folder's ΔW per module (safetensors only, never pickle)."""
    from continual_lora.adapter_files import AdapterFileError, read_adapter

    try:
        files = read_adapter(path, use="diagnose it")
    except AdapterFileError as exc:
        raise DiagnoseError(f"{exc}. diagnose reads PEFT LoRA folders (adapter_config.json + "
                            "adapter_model.safetensors)") from None
    updates = {module: Factored.of(f.scaling * f.B, f.A) for module, f in files.factors.items()}
    return Adapter(Path(path), files.base_model, updates, bool(files.config.get("fan_in_fan_out")))


def check_same_layout(adapters: list[Adapter]) -> None:
    """One base, the same target modules with the same shapes: what makes two updates
    comparable entry by entry. The error names both folders."""
    first = adapters[0]
    for other in adapters[1:]:
        where = f"{other.path} and {first.path}"
        if not _same_base(other.base_name, first.base_name):
            raise DiagnoseError(f"{where} were trained on different base models "
                                f"({other.base_name!r} vs {first.base_name!r}): diagnose "
                                "compares updates of one base; give adapters of the same base")
        if other.fan_in_fan_out != first.fan_in_fan_out:
            raise DiagnoseError(f"{where}: one stores its weights transposed (fan_in_fan_out) "
                                "and the other does not; they are not updates of one base")
        if set(other.updates) != set(first.updates):
            only = sorted(set(other.updates) ^ set(first.updates))
            raise DiagnoseError(f"{where} adapt different target modules ({len(only)} modules "
                                f"in one only, e.g. {only[0]}): diagnose compares updates "
                                "module by module; give adapters trained with the same "
                                "lora.target_modules")
        for module, update in other.updates.items():
            if update.shape != first.updates[module].shape:
                raise DiagnoseError(f"{where}: module {module} has update shape {update.shape} "
                                    f"vs {first.updates[module].shape}: not the same base")


def _same_base(a: str | None, b: str | None) -> bool:
    """Base names as adapters record them: the embedded default is written both by name and as
    the folder it resolves to, which are the same base."""
    return a == b or _resolved(a) == _resolved(b)


def _resolved(name: str | None) -> str | None:
    if name == EMBEDDED_MODEL:
        from continual_lora.families.common import resolve_model_path

        return str(Path(resolve_model_path(name)).resolve())
    if name and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def differences(adapters: list[Adapter], start: Adapter | None = None
                ) -> tuple[list[dict[str, Factored]], list[int]]:
    """τ_t = ΔW_t − ΔW_{t−1} for consecutive adapters (τ_1 = ΔW_1 − ΔW_start, or ΔW_1), and
    each task's rank: the adapter's own when consecutive ranks are equal (one adapter trained
    on), else the rank it added (a concatenation grows by the new task's rank)."""
    updates, ranks = [], []
    previous = start
    for adapter in adapters:
        if previous is None:
            updates.append(dict(adapter.updates))
            ranks.append(adapter.rank)
        else:
            updates.append({m: u.minus(previous.updates[m]) for m, u in adapter.updates.items()})
            added = adapter.rank - previous.rank
            ranks.append(added if added > 0 else adapter.rank)
        previous = adapter
    return updates, ranks


# -- adapter folders given on the command line -----------------------------------------------------


def adapter_list_vectors(paths: list[Path], cumulative: bool) -> TaskVectors:
    """Task vectors of adapter folders given in task order."""
    if len(paths) < 2:
        raise DiagnoseError(f"{paths[0] if paths else 'no adapter'}: a single adapter has no "
                            "pair of tasks to compare; give two or more adapter folders (in "
                            "task order), a run folder, or a bench folder")
    adapters = [read_update(p) for p in paths]
    check_same_layout(adapters)
    names = [_adapter_name(p) for p in paths]
    if cumulative:
        updates, ranks = differences(adapters)
        definition = "cumulative_adapters"
    else:
        updates, ranks = [a.updates for a in adapters], [a.rank for a in adapters]
        definition = "independent_adapters"
    return TaskVectors(names, updates, ranks, definition, list(paths), adapters[0].base_name)


def _adapter_name(path: Path) -> str:
    """A short, readable name: the folder, or the stage folder around `adapter/`."""
    path = Path(path)
    return path.parent.name if path.name == "adapter" else path.name


# -- run folders -----------------------------------------------------------------------------------


@dataclass
class RunFolder:
    """What diagnose reads from a run folder besides the adapters."""

    path: Path
    config: dict
    stages: list[Path]  # tasks/NN-name, in order
    metrics: dict | None

    @property
    def strategy(self) -> str:
        return (self.config.get("strategy") or {}).get("name") or "?"

    @property
    def label(self) -> str:
        return (self.metrics or {}).get("label") or self.strategy

    @property
    def rank(self) -> int | None:
        return (self.config.get("lora") or {}).get("r")


def read_run_folder(path: Path) -> RunFolder:
    path = Path(path)
    config_file = path / "config.yaml"
    stages = sorted(p for p in (path / "tasks").glob("[0-9][0-9]-*") if p.is_dir())
    if not config_file.is_file() or not stages:
        raise DiagnoseError(f"{path}: not a run folder (no config.yaml or no tasks/NN-name/ "
                            "stages): give the folder `continual-lora run` or `bench` wrote, or "
                            "PEFT adapter folders")
    config = yaml.safe_load(config_file.read_text()) or {}
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return RunFolder(path, config, stages, metrics)


def stage_export(stage: Path) -> dict:
    """The `export` facts of a stage's stage.json (kind, rank, ...); {} without one."""
    stage_file = stage / "stage.json"
    if not stage_file.is_file():
        return {}
    return json.loads(stage_file.read_text()).get("export") or {}


def _task_name(stage: Path) -> str:
    return stage.name.split("-", 1)[1] if "-" in stage.name else stage.name


def run_task_vectors(run: RunFolder) -> TaskVectors:
    """Task vectors of a run folder, defined as its strategy's export requires."""
    kinds = {stage_export(s).get("kind", "peft_lora") for s in run.stages}
    if kinds & {"full_weights", "none"} or not any((s / "adapter").is_dir() for s in run.stages):
        raise DiagnoseError(f"{run.path}: no LoRA adapters in tasks/*/adapter ({run.strategy} "
                            "saves full weights): diagnose compares LoRA updates; run a LoRA "
                            "strategy")
    missing = [s.name for s in run.stages if not (s / "adapter" / "adapter_config.json").is_file()]
    if missing:
        raise DiagnoseError(f"{run.path}: stages {missing} have no adapter/adapter_config.json: "
                            "an interrupted run? Resume it (`continual-lora run --resume "
                            f"{run.path}`) or diagnose its finished stages' adapter folders")
    if len(run.stages) < 2:
        raise DiagnoseError(f"{run.path}: a single task ({run.stages[0].name}) has no pair of "
                            "tasks to compare; diagnose needs a run over two or more tasks")
    names = [_task_name(s) for s in run.stages]
    if "peft_lora_mixture" in kinds:
        return _mixture_vectors(run, names)
    adapters = [read_update(s / "adapter") for s in run.stages]
    start = _starting_adapter(run)
    check_same_layout(adapters + ([start] if start else []))
    updates, ranks = differences(adapters, start)
    if run.strategy == "joint":
        definition = "retrained_difference"
    elif "peft_lora_svd" in kinds:
        definition = "svd_export_difference"
    elif kinds == {"peft_lora_concatenated"}:
        definition = "cumulative_difference_merged"
    else:
        definition = "cumulative_difference"
    notes = []
    if (run.config.get("lora") or {}).get("init_adapter") and start is None:
        notes.append("the run started from lora.init_adapter, which was not found: τ_1 includes "
                     "that starting adapter")
    return TaskVectors(names, updates, ranks, definition, [s / "adapter" for s in run.stages],
                       adapters[0].base_name, notes)


def _starting_adapter(run: RunFolder) -> Adapter | None:
    """The user's `lora.init_adapter` the run started from (row 0 of its matrix), when it can be
    found: τ_1 is then what task 1 added to it."""
    init = (run.config.get("lora") or {}).get("init_adapter")
    if not init:
        return None
    for candidate in (Path(init).expanduser(), run.path / init):
        if (candidate / "adapter_config.json").is_file():
            return read_update(candidate)
    return None


def _mixture_vectors(run: RunFolder, names: list[str]) -> TaskVectors:
    """moe: the last stage holds every task's adapter under adapter/<name>/ (router.json)."""
    last = run.stages[-1] / "adapter"
    router = json.loads((last / "router.json").read_text())
    folders = [last / name for name in router.get("adapters", [])][-len(names):]
    adapters = [read_update(f) for f in folders]
    check_same_layout(adapters)
    return TaskVectors(names, [a.updates for a in adapters], [a.rank for a in adapters],
                       "own_adapter", folders, adapters[0].base_name)
