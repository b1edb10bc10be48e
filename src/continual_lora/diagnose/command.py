"""What `continual-lora diagnose PATH...` does: decide what the paths are (a run folder, a bench
folder, or adapter folders), diagnose each run, and write `diagnosis.json`, `diagnosis.md` and
the figures (`figures/diagnosis_*.png`) into the folder, or into `--out`.

A bench is diagnosed run by run (each run's files go into its own folder, or `OUT/runs/<name>/`)
and then side by side: the bench's `diagnosis.json` holds one row per run with its forgetting
and its mean interference between consecutive tasks, and their rank correlation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from continual_lora.diagnose import figures, tables, verdict
from continual_lora.diagnose.analysis import analyse, summarise
from continual_lora.diagnose.base_weights import base_square_norms, locate_base
from continual_lora.diagnose.drift import DriftCache, representation_drift, skip_reason
from continual_lora.diagnose.measures import spearman, tie_close
from continual_lora.diagnose.report_section import DIAGNOSIS_JSON
from continual_lora.diagnose.task_vectors import (
    DiagnoseError,
    TaskVectors,
    adapter_list_vectors,
    read_run_folder,
    run_task_vectors,
    stage_export,
)

SCHEMA = "continual-lora/diagnosis/1"
DIAGNOSIS_MD = "diagnosis.md"
FIGURES = "figures"
#: The per-run numbers a bench compares with forgetting (means over consecutive task pairs).
COMPARED = ("opposed_ratio_consecutive", "cosine_consecutive", "overlap_input_consecutive",
            "overlap_output_consecutive", "cka_last_layer_after_last_task")


@dataclass
class DiagnoseOptions:
    """The command's options (see `continual-lora diagnose --help`)."""

    drift: bool = True
    out: Path | None = None
    base: Path | None = None
    cumulative: bool = False
    batch_size: int = 64


@dataclass
class Outcome:
    """What was diagnosed and written, for the command to print."""

    kind: str  # "run", "bench" or "adapters"
    folder: Path  # where diagnosis.json was written
    diagnosis: dict
    written: list[Path] = field(default_factory=list)


def diagnose(paths: list[Path], options: DiagnoseOptions) -> Outcome:
    """Diagnose a run folder, a bench folder, or adapter folders (in task order)."""
    paths = [Path(p) for p in paths]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DiagnoseError(f"{missing[0]}: no such file or folder; give a run folder, a bench "
                            "folder, or PEFT adapter folders")
    if len(paths) == 1 and _is_run(paths[0]):
        return _single_run(paths[0], options)
    if len(paths) == 1 and _is_bench(paths[0]):
        return _bench(paths[0], options)
    return _adapters(paths, options)


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "tasks").is_dir()


def _is_bench(path: Path) -> bool:
    return (path / "runs").is_dir() and any(_is_run(p) for p in (path / "runs").iterdir())


# -- one run ---------------------------------------------------------------------------------------


def diagnose_run(run_dir: Path, options: DiagnoseOptions, cache: DriftCache) -> dict:
    """The diagnosis of one run folder, as written to its diagnosis.json."""
    run = read_run_folder(run_dir)
    vectors = run_task_vectors(run)
    model_name = (run.config.get("model") or {}).get("name_or_path")
    base_sq, base_note = _base_norms(vectors, [options.base, vectors.base_name, model_name])
    result = analyse(vectors, base_sq)
    drift = _drift(run, vectors, options, cache)
    metrics = run.metrics or {}
    diagnosis = {
        "schema": SCHEMA,
        "source": {"kind": "run", "path": str(run.path)},
        "label": run.label, "strategy": run.strategy, "rank": run.rank,
        "task_vectors": _definition(vectors, base_note),
        **result,
        "drift": drift,
        "metrics": {k: metrics.get(k) for k in ("acc", "forgetting", "bwt",
                                                "upstream_retention")},
        "old_task_drop": old_task_drops(run.path, len(vectors.tasks)),
    }
    diagnosis["summary"] = summarise(result, drift)
    diagnosis["verdict"] = verdict.run_verdict(diagnosis)
    return diagnosis


def old_task_drops(run_dir: Path, n_tasks: int) -> list[float | None] | None:
    """Per stage t (from 2), how much the earlier tasks' mean score fell during it:
    mean_{i<t} (R[t−1, i] − R[t, i]) from results.json; None without one. It tells the verdict
    at which stage forgetting happened, so that it describes the updates of that stage."""
    file = run_dir / "results.json"
    if not file.is_file():
        return None
    R = json.loads(file.read_text()).get("R") or []
    drops: list[float | None] = [None]
    for t in range(2, n_tasks + 1):
        if t >= len(R) or any(v is None for v in R[t][:t - 1] + R[t - 1][:t - 1]):
            drops.append(None)  # an unfinished run: stage t not scored yet
            continue
        drops.append(sum(R[t - 1][i] - R[t][i] for i in range(t - 1)) / (t - 1))
    return drops


def _definition(vectors: TaskVectors, base_note: str | None) -> dict:
    notes = list(vectors.notes) + ([base_note] if base_note else [])
    return {"definition": vectors.definition, "explanation": vectors.explanation,
            "adapters": [str(p) for p in vectors.adapters], "notes": notes}


def _base_norms(vectors: TaskVectors, names: list) -> tuple[dict | None, str | None]:
    """‖W0‖² per module, or None with the reason the relative norms are left out."""
    names = [str(n) if n else None for n in names]
    folder = locate_base(names)
    if folder is None:
        return None, (f"the base weights were not found ({', '.join(n for n in names if n)}): "
                      "‖ΔW‖/‖W0‖ is left out; pass --base FOLDER (a local model folder with "
                      "safetensors)")
    found = base_square_norms(folder, vectors.modules)
    if not found:
        return None, (f"{folder} holds none of the adapted modules' weights: ‖ΔW‖/‖W0‖ is left "
                      "out; pass --base with the adapters' base model folder")
    note = None
    if len(found) < len(vectors.modules):
        note = (f"W0 found for {len(found)} of {len(vectors.modules)} modules in {folder}; "
                "‖ΔW‖/‖W0‖ covers those")
    return found, note


def _drift(run, vectors: TaskVectors, options: DiagnoseOptions, cache: DriftCache) -> dict:
    if not options.drift:
        return {"skipped": "--no-drift"}
    if vectors.definition == "own_adapter":
        return {"skipped": "a mixture of adapters (moe) is scored through its router, not as "
                           "one adapter on the base"}
    from continual_lora.config import ConfigError, load_run_config

    try:
        config = load_run_config(run.path / "config.yaml")
    except ConfigError as exc:  # a config this version cannot read: the adapter math still can
        return {"skipped": f"{run.path / 'config.yaml'}: {exc}"}
    reason = skip_reason(config)
    if reason:
        return {"skipped": reason}
    kind = stage_export(run.stages[-1]).get("kind", "peft_lora")
    return representation_drift(config, vectors.tasks, vectors.adapters, kind, cache,
                                options.batch_size)


def _single_run(run_dir: Path, options: DiagnoseOptions) -> Outcome:
    diagnosis = diagnose_run(run_dir, options, DriftCache())
    folder = options.out or run_dir
    written = write_diagnosis(diagnosis, folder, diagnosis["label"])
    if options.out is None:
        written += _rebuild_report(run_dir)
    return Outcome("run", folder, diagnosis, written)


# -- a bench ---------------------------------------------------------------------------------------


def _bench(bench: Path, options: DiagnoseOptions) -> Outcome:
    from continual_lora.report.folders import bench_runs

    run_dirs = bench_runs(bench) or sorted(p for p in (bench / "runs").iterdir() if _is_run(p))
    cache = DriftCache()
    rows, skipped, written = [], [], []
    for run_dir in run_dirs:
        try:
            diagnosis = diagnose_run(run_dir, options, cache)
        except DiagnoseError as exc:
            skipped.append({"run": run_dir.name, "reason": str(exc)})
            continue
        folder = options.out / "runs" / run_dir.name if options.out else run_dir
        written += write_diagnosis(diagnosis, folder, diagnosis["label"])
        rows.append(bench_row(diagnosis, run_dir.name))
    if not rows:
        reasons = "; ".join(f"{s['run']}: {s['reason']}" for s in skipped)
        raise DiagnoseError(f"{bench}: no run in this bench could be diagnosed ({reasons})")
    out = options.out or bench
    diagnosis = {"schema": SCHEMA, "source": {"kind": "bench", "path": str(bench)},
                 "runs": rows, "skipped": skipped, "correlations": correlations(rows)}
    diagnosis["verdict"] = verdict.bench_verdict(diagnosis)
    chart = figures.bench_chart(rows, out / FIGURES / "diagnosis_strategies.png")
    diagnosis["figures"] = [_relative(chart, out)] if chart else []
    written += [*([chart] if chart else []), *_write_files(diagnosis, out, tables.bench_markdown)]
    if options.out is None:
        written += _rebuild_report(bench)
    return Outcome("bench", out, diagnosis, written)


def bench_row(diagnosis: dict, run_name: str) -> dict:
    """One run's line of the bench comparison."""
    return {"run": run_name, "label": diagnosis["label"], "strategy": diagnosis["strategy"],
            "rank": diagnosis["rank"], "definition": diagnosis["task_vectors"]["definition"],
            **diagnosis["metrics"], **diagnosis["summary"],
            "diagnosis": f"runs/{run_name}/{DIAGNOSIS_JSON}"}


def correlations(rows: list[dict]) -> dict:
    """Spearman rank correlation of forgetting with each compared number, over the runs that
    train sequentially (joint retrains from the base at every stage, so its stage-to-stage
    changes are not updates stacked on each other: it is left out), values closer than
    verdict.TIE_TOLERANCE ranked as ties."""
    sequential = [r for r in rows if r["strategy"] != "joint"
                  and _finite(r.get("forgetting"))]
    forgetting = tie_close([r["forgetting"] for r in sequential], verdict.TIE_TOLERANCE)
    out = {"runs": [r["label"] for r in sequential], "n": len(sequential),
           "forgetting_levels": len(set(forgetting)), "tie_tolerance": verdict.TIE_TOLERANCE}
    for key in COMPARED:
        pairs = [(r[key], f) for r, f in zip(sequential, forgetting, strict=True)
                 if _finite(r.get(key))]
        if len(pairs) < 3:
            out[key] = None
            continue
        values, levels = zip(*pairs, strict=True)
        out[key] = spearman(tie_close(list(values), verdict.TIE_TOLERANCE), levels)
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# -- adapter folders -------------------------------------------------------------------------------


def _adapters(paths: list[Path], options: DiagnoseOptions) -> Outcome:
    folders = [_adapter_folder(p) for p in paths]
    vectors = adapter_list_vectors(folders, options.cumulative)
    if options.out is None:
        raise DiagnoseError("adapter folders: give --out FOLDER, where to write the diagnosis "
                            "(a run or bench folder is diagnosed in place)")
    base_sq, base_note = _base_norms(vectors, [options.base, vectors.base_name])
    result = analyse(vectors, base_sq)
    drift = {"skipped": "adapter folders alone: the upstream probe and the model's settings "
                        "are in a run folder; diagnose the run folder to measure drift"}
    diagnosis = {"schema": SCHEMA, "source": {"kind": "adapters",
                                              "paths": [str(p) for p in folders]},
                 "label": "adapters", "strategy": None, "rank": None,
                 "task_vectors": _definition(vectors, base_note), **result, "drift": drift,
                 "metrics": {}}
    diagnosis["summary"] = summarise(result, None)
    diagnosis["verdict"] = verdict.run_verdict(diagnosis)
    written = write_diagnosis(diagnosis, options.out, "adapters")
    return Outcome("adapters", options.out, diagnosis, written)


def _adapter_folder(path: Path) -> Path:
    """A PEFT folder, or a run's stage folder holding one in adapter/."""
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    raise DiagnoseError(f"{path}: no LoRA adapters found (not a run folder with tasks/*/adapter, "
                        "not a bench folder with runs/, not a PEFT adapter folder with "
                        "adapter_config.json): give the folder `continual-lora run` or `bench` "
                        "wrote, or PEFT adapter folders")


# -- writing ---------------------------------------------------------------------------------------


def write_diagnosis(diagnosis: dict, folder: Path, title: str) -> list[Path]:
    """The figures (figures/diagnosis_*.png), diagnosis.json and diagnosis.md in `folder`."""
    folder = Path(folder)
    drawn = [figures.pair_heatmaps(diagnosis, folder / FIGURES / "diagnosis_pairs.png",
                                   f"{title}: interference between tasks, per layer"),
             figures.layer_norms(diagnosis, folder / FIGURES / "diagnosis_layer_norms.png",
                                 f"{title}: which layers moved, ‖τ_t‖ / ‖W0‖"),
             figures.drift_curves(diagnosis["drift"], folder / FIGURES / "diagnosis_drift.png",
                                  f"{title}: upstream representation drift (CKA with the base)")]
    drawn = [p for p in drawn if p is not None]
    diagnosis["figures"] = [_relative(p, folder) for p in drawn]
    return drawn + _write_files(diagnosis, folder, tables.run_markdown)


def _write_files(diagnosis: dict, folder: Path, markdown) -> list[Path]:
    from continual_lora.checkpoint import write_text_atomic

    json_file, md_file = folder / DIAGNOSIS_JSON, folder / DIAGNOSIS_MD
    write_text_atomic(json_file, json.dumps(_jsonable(diagnosis), indent=2,
                                            ensure_ascii=False) + "\n")
    write_text_atomic(md_file, markdown(diagnosis))
    return [json_file, md_file]


def _jsonable(value):
    """NaN (a measure with nothing to measure) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _relative(path: Path, folder: Path) -> str:
    return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()


def _rebuild_report(folder: Path) -> list[Path]:
    """report.html again, now with its Diagnosis section, where the folder has a report."""
    if not (folder / "report.html").is_file():
        return []
    from continual_lora.report.page import build_report

    return [build_report(folder)]
