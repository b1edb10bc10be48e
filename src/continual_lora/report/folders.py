"""What a run, bench or update folder says about itself, read from its files alone (the report is
built from these; nothing is recomputed)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from continual_lora.config import ConfigError


@dataclass
class RunFiles:
    """What a finished (or partly finished) run folder says about itself."""

    folder: Path
    label: str
    tasks: list[str]
    R: np.ndarray
    U: np.ndarray
    definition: str
    metrics: dict | None
    steps: list[dict] = field(default_factory=list)  # log.jsonl's step events
    base: str = ""

    @property
    def title(self) -> str:
        rank = (self.metrics or {}).get("rank")
        return self.label + (f" (rank {rank})" if rank else "")


def read_run(folder: Path) -> RunFiles:
    folder = Path(folder)
    results = _read_json(folder / "results.json")
    metrics = _read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else None
    lineage = _read_json(folder / "lineage.json") if (folder / "lineage.json").is_file() else {}
    label = (metrics or {}).get("label") or (lineage.get("strategy") or {}).get("name") \
        or folder.name
    return RunFiles(folder, label, results["tasks"], np.array(results["R"], dtype=float),
                    np.array(results["U"], dtype=float), results.get("definition", ""), metrics,
                    read_steps(folder / "log.jsonl"),
                    (lineage.get("base_model") or {}).get("name_or_path", ""))


def read_steps(log_file: Path) -> list[dict]:
    """The `step` events of a log.jsonl; a line cut short by a crash is skipped."""
    if not log_file.is_file():
        return []
    steps = []
    for line in log_file.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "step" and "global_step" in event:
            steps.append(event)
    return steps


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); the folder may be from an "
                          "interrupted write") from None


def bench_runs(bench: Path) -> list[Path]:
    """The bench's run folders that scored at least one stage, in the comparison table's
    order (comparison.csv), then any others by name."""
    found = {p.parent for p in (bench / "runs").glob("*/results.json")}
    ordered = []
    table = bench / "comparison.csv"
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                path = Path(row.get("run_dir", ""))
                match = next((p for p in found if p.name == path.name), None)
                if match is not None and match not in ordered:
                    ordered.append(match)
    return ordered + sorted(found - set(ordered))


def folder_kind(folder: Path) -> str:
    if (folder / "update_report.json").is_file():
        return "update"
    if (folder / "results.json").is_file():
        return "run"
    if (folder / "bench.yaml").is_file() or any((folder / "runs").glob("*/results.json")):
        return "bench"
    raise ConfigError(f"{folder} is not a run, bench or update folder (no results.json, "
                      "bench.yaml or update_report.json in it): give the folder that "
                      "`continual-lora run`, `bench`, `demo` or `update` wrote")
