"""The lineage an adapter folder carries with it: `adapter/lineage.json` (`model/` for full_ft).

Schema `continual-lora/lineage/1`, one JSON object:

    schema        "continual-lora/lineage/1"
    created       ISO time of writing; `continual_lora` the tool version
    run           {"name", "stage", "task"}: where the folder was written
    base_model    {"name_or_path", "resolved_path", "fingerprint_sha256", "family"}
    adapter       {"sha256", "files"}: this folder's own weights (see `weights_identity`)
    parent        the adapter this one was trained from ({"path", "sha256", "files"}) or null:
                  task 1: the run's `lora.init_adapter`; task t > 1: the previous stage's adapter
    data          the data manifest of every task trained so far (the run lineage's entries)
    strategy      {"name", "options"}; lora {"r", "alpha", "alpha_rule", "target_modules"}
    train         {"lr", "epochs", "batch_size", "max_steps", "steps", "seed"} of this task
    metrics       {"tasks", "R_row", "acc_so_far", "upstream"}: the scores after this stage
    export        what `strategy.export_adapter` returned (stage.json's `export`)
    chain         the ancestors' records, oldest first, each without its own `chain`

An adapter written by `continual-lora merge` has `run.task` "merge", `parent` null and
`parents` (each input's {"path", "sha256", "files", "lineage_matches"}), `train` and `metrics`
null, `strategy.name` "merge:<method>", and a chain that holds every input's chain and record
(each ancestor once, in input order).

The chain travels with the folder: a run started from an adapter that has a `lineage.json`
copies that record and its chain in, so `continual-lora inspect` shows every earlier stage.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = "continual-lora/lineage/1"
FILE = "lineage.json"
NOT_WEIGHTS = {"heads.safetensors"}


class LineageError(ValueError):
    """A lineage.json that cannot be read as this schema; the message names the file."""


def weights_identity(folder: Path) -> dict:
    """sha256 over the bytes of the folder's top-level `*.safetensors` files, in name order (the
    same method as the run lineage's parent identity), and their names. Subfolders (moe's
    `task*/`) are not included: the root files are what a plain PEFT load reads. Classifier
    heads (`heads.safetensors`, kept inside an update's output folder) are not the adapter's
    weights and are left out too."""
    files = sorted(f for f in Path(folder).glob("*.safetensors") if f.name not in NOT_WEIGHTS)
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return {"sha256": digest.hexdigest(), "files": [f.name for f in files]}


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: an absent score (no upstream probe) is written as null."""
    return None if value is None or math.isnan(value) else float(value)


def stage_facts(stage: int, task: str, plan_entry: dict, train, seed: int, task_names: list[str],
                scores: list[float], upstream: float) -> dict:
    """What the runner knows about one stage before it is saved, in the record's shape (`train`
    is a TrainConfig; `export` is added by `StageLineage.write`'s caller). `acc_so_far` is the
    mean of R[t, i] over the tasks trained so far (i ≤ t): ACC as if the sequence ended here."""
    return {
        "stage": stage, "task": task,
        "train": {"lr": plan_entry["lr"], "epochs": train.epochs, "batch_size": train.batch_size,
                  "max_steps": train.max_steps, "steps": plan_entry["steps"], "seed": seed},
        "metrics": {"tasks": list(task_names), "R_row": [_finite(s) for s in scores],
                    "acc_so_far": sum(scores[:stage]) / stage, "upstream": _finite(upstream)},
    }


def build_record(run_lineage: dict, run_name: str, facts: dict, weights: dict,
                 parent: dict | None, chain: list[dict], created: str | None = None) -> dict:
    """The lineage record of one written adapter folder (a pure function of its inputs)."""
    from continual_lora import __version__

    stage = facts["stage"]
    return {
        "schema": SCHEMA,
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
        "continual_lora": __version__,
        "run": {"name": run_name, "stage": stage, "task": facts["task"]},
        "base_model": run_lineage["base_model"],
        "adapter": weights,
        "parent": parent,
        "data": [d for d in run_lineage["data"] if d["index"] <= stage],
        "strategy": run_lineage["strategy"],
        "lora": run_lineage["lora"],
        "train": facts["train"],
        "metrics": facts["metrics"],
        "export": facts["export"],
        "chain": list(chain),
    }


def child_chain(record: dict) -> list[dict]:
    """The chain of an adapter trained from `record`'s folder: its chain, then itself."""
    return [*record.get("chain", []), {k: v for k, v in record.items() if k != "chain"}]


def read_lineage(folder: Path) -> dict | None:
    """The folder's lineage record, or None when it has none."""
    file = Path(folder) / FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise LineageError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        found = record.get("schema") if isinstance(record, dict) else type(record).__name__
        raise LineageError(f"{file}: not a {SCHEMA} record (schema {found!r})")
    return record


def verify(folder: Path, record: dict) -> bool:
    """True when the folder's weights are byte for byte those its record was written for."""
    return weights_identity(folder) == record["adapter"]


@dataclass
class StageLineage:
    """Writes each stage's record and remembers it as the next stage's parent."""

    run_lineage: dict
    run_name: str
    parent: dict | None = None
    chain: list[dict] = field(default_factory=list)

    @classmethod
    def start(cls, run_lineage: dict, run_name: str, init_adapter: Path | None) -> StageLineage:
        """The first stage's parent is the run's `parent_adapter`; a parent folder that carries
        its own lineage contributes its record and chain (with whether its weights still match
        the record, under `parent.lineage_matches`)."""
        parent = run_lineage.get("parent_adapter")
        chain: list[dict] = []
        if init_adapter is not None and parent is not None:
            record = read_lineage(init_adapter)
            if record is not None:
                chain = child_chain(record)
                parent = {**parent, "lineage_matches": verify(init_adapter, record)}
        return cls(run_lineage, run_name, parent, chain)

    def write(self, folder: Path, final_path: Path, facts: dict) -> dict:
        """Write `folder/lineage.json` (the folder will live at `final_path`); returns it."""
        record = build_record(self.run_lineage, self.run_name, facts, weights_identity(folder),
                              self.parent, self.chain)
        (Path(folder) / FILE).write_text(json.dumps(record, indent=2) + "\n")
        self.parent = {"path": str(final_path), **record["adapter"]}
        self.chain = child_chain(record)
        return record


def merge_record(inputs: list[Path], folder: Path, method: str, options: dict, lora: dict,
                 export: dict, base_model: str | None) -> dict:
    """The lineage record of a merged adapter written into `folder` from the adapter folders
    `inputs`. Inputs with lineage must agree on the base's fingerprint (adapters of different
    bases do not merge); inputs without lineage contribute a parent entry only."""
    from continual_lora import __version__

    records = [read_lineage(p) for p in inputs]
    bases = {r["base_model"]["fingerprint_sha256"] for r in records if r is not None}
    if len(bases) > 1:
        raise LineageError(
            "the adapters were trained on different base models (fingerprints "
            f"{', '.join(sorted(b[:12] for b in bases))} in their lineage.json): merging them "
            "would add updates made for other weights; merge adapters of one base")
    first = next((r for r in records if r is not None), None)
    base = first["base_model"] if first else {"name_or_path": base_model, "resolved_path": None,
                                               "fingerprint_sha256": None, "family": None}
    parents, chain, seen, data = [], [], set(), []
    for path, record in zip(inputs, records, strict=True):
        identity = weights_identity(path)  # hashed once: `verify` would hash it again
        parents.append({"path": str(path), **identity,
                        "lineage_matches": None if record is None
                        else identity == record["adapter"]})
        for ancestor in child_chain(record) if record is not None else []:
            key = ancestor["adapter"]["sha256"]
            if key not in seen:
                seen.add(key)
                chain.append(ancestor)
        for entry in (record or {}).get("data", []):
            if entry not in data:
                data.append(entry)
    record = {
        "schema": SCHEMA, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "continual_lora": __version__,
        "run": {"name": Path(folder).name, "stage": None, "task": "merge"},
        "base_model": base, "adapter": weights_identity(folder), "parent": None,
        "parents": parents, "data": data,
        "strategy": {"name": f"merge:{method}", "options": options}, "lora": lora,
        "train": None, "metrics": None, "export": export, "chain": chain,
    }
    (Path(folder) / FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
