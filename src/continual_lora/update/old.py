"""What the old adapter is, read from its files alone: the PEFT folder, its rank/alpha/targets,
its lineage (first stage's LR, batch and base fingerprint), and the heads saved beside it.

Accepted paths: a PEFT adapter folder; a run's stage folder (`tasks/NN-name/`, whose `adapter/`
is used); a run folder (its last stage). Heads are looked for in the adapter folder (an
update's output keeps them there) and then beside it (a run's stage folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from continual_lora.config import ConfigError
from continual_lora.lineage import LineageError, read_lineage, verify, weights_identity
from continual_lora.resume import META_FILE, STATE_FILE

CONFIG_FILE = "adapter_config.json"
HEADS_META = "heads.json"
HEADS_WEIGHTS = "heads.safetensors"


@dataclass
class OldAdapter:
    path: Path
    config: dict
    rank: int
    alpha: float
    targets: list[str]
    identity: dict  # weights_identity of the folder
    lineage: dict | None
    lineage_matches: bool | None  # None: no lineage to compare with
    heads_dir: Path | None
    heads_meta: dict | None

    @property
    def base_name(self) -> str | None:
        if self.lineage:
            return self.lineage["base_model"]["name_or_path"]
        return self.config.get("base_model_name_or_path")

    @property
    def base_fingerprint(self) -> str | None:
        return self.lineage["base_model"].get("fingerprint_sha256") if self.lineage else None

    @property
    def first_stage_train(self) -> dict:
        """The training settings (lr, batch_size, ...) of the lineage's first trained stage:
        the oldest stage with a `train` record that is not itself an update. The update's
        recipe scales *that* stage's LR: reading this adapter's own record instead would
        compound the factor with every update (0.4, then 0.16, then 0.064 × the first LR).
        A merge has no `train` record and is skipped; an update is skipped because its LR is
        already scaled. {} when no such stage is recorded (no lineage.json, or only updates
        of an adapter that had none): the recipe then assumes the tool's default, as the first
        update of that chain did."""
        return next((stage["train"] for stage in self.stages
                     if stage.get("train") and not _is_update(stage)), {})

    @property
    def stages(self) -> list[dict]:
        """Every stage in the lineage, oldest first (the chain, then this adapter's record)."""
        if not self.lineage:
            return []
        return [*self.lineage.get("chain", []),
                {k: v for k, v in self.lineage.items() if k != "chain"}]

    @property
    def head_tasks(self) -> list[dict]:
        return list((self.heads_meta or {}).get("tasks", []))


def _is_update(stage: dict) -> bool:
    """A stage written by `continual-lora update` (its export records the update's plan)."""
    return "update" in (stage.get("export") or {})


def locate_adapter(path: Path) -> Path:
    """The PEFT adapter folder `path` designates (see the module docstring)."""
    if not path.exists():
        raise ConfigError(f"adapter: {path} does not exist")
    if path.is_dir() and (path / STATE_FILE).is_file() and (path / META_FILE).is_file():
        raise ConfigError(
            f"adapter: {path} is a training checkpoint of an interrupted update, not an "
            f"adapter. To continue that update exactly, run `continual-lora update --resume "
            f"{path.parent.parent}`; `--adapter` starts a new stage from a finished adapter.")
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "adapter" / CONFIG_FILE).is_file():
        return path / "adapter"
    stages = sorted(p for p in (path / "tasks").glob("[0-9][0-9]-*") if p.is_dir())
    if stages:
        last = stages[-1]
        if (last / "adapter" / CONFIG_FILE).is_file():
            return last / "adapter"
        raise ConfigError(f"adapter: the run folder {path} has no PEFT adapter in its last "
                          f"stage {last.name} (a full_ft or moe run?); give an adapter folder")
    raise ConfigError(f"adapter: {path} is not a PEFT adapter folder (no {CONFIG_FILE}), a "
                      "run's stage folder or a run folder")


def _targets(config: dict) -> list[str]:
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else sorted(targets)


def read_old_adapter(path: Path) -> OldAdapter:
    folder = locate_adapter(Path(path))
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"adapter: {folder / CONFIG_FILE} is not valid JSON ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"adapter: {folder} is a {config.get('peft_type')} adapter; update "
                          "trains LoRA adapters")
    if not (folder / "adapter_model.safetensors").is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise ConfigError(
            f"adapter: {folder} has no adapter_model.safetensors"
            + (" (only adapter_model.bin: convert it to safetensors; pickle files are not "
               "loaded)" if pickled else ""))
    try:
        lineage = read_lineage(folder)
    except LineageError as exc:
        raise ConfigError(f"adapter: {exc}") from None
    heads_dir = next((d for d in (folder, folder.parent)
                      if (d / HEADS_META).is_file() and (d / HEADS_WEIGHTS).is_file()), None)
    heads_meta = json.loads((heads_dir / HEADS_META).read_text()) if heads_dir else None
    return OldAdapter(
        path=folder, config=config, rank=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", config.get("r", 8))), targets=_targets(config),
        identity=weights_identity(folder), lineage=lineage,
        lineage_matches=None if lineage is None else verify(folder, lineage),
        heads_dir=heads_dir, heads_meta=heads_meta)
