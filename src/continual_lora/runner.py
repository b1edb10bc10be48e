"""One strategy over one sequence, writing a run folder that describes itself.

Run folder:

    config.yaml            the resolved config (every default written out)
    lineage.json           base model identity and fingerprint, parent adapter, data manifest
    plan.json              per task: the data mix, steps, LR, trainable parameters
    tasks/NN-name/         per task: `adapter/` (PEFT format; `model/` for full_ft) with its
                           `lineage.json` (see lineage.py), and the heads
    accuracy_matrix.csv    R[t, i] with row 0 = before training, and the upstream column
    results.json           R, U, how each cell was scored, per-task training stats
    predictions.npz        per-example correctness for every (stage, task), and the labels
    metrics.json           ACC, forgetting, BWT, FWT, plasticity, upstream retention, flips
    strategy_report.json   only for strategies that report per-stage numbers (`stage_report`,
                           e.g. moe's routing accuracy): one row per stage
    log.jsonl              one JSON object per event (steps, evaluations); the same numbers
                           go to `train.trackers` (tensorboard/ by default; see monitor.py)
    report.html, figures/  the HTML report and its PNGs, written by the CLI (report/page.py)
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from continual_lora import __version__, metrics
from continual_lora.adapters import (
    count_layers,
    count_parameters,
    load_adapter,
    make_lora_config,
    resolve_layers,
    resolve_targets,
)
from continual_lora.checkpoint import (
    atomic_dir,
    create_run_dir,
    refuse_existing,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from continual_lora.config import ConfigError, RunConfig
from continual_lora.families import make_family
from continual_lora.lineage import StageLineage, stage_facts, weights_identity
from continual_lora.monitor import RunLog, check_trackers
from continual_lora.output_dir import check_not_input, check_writable, run_inputs
from continual_lora.registry import get_strategy
from continual_lora.resume import (
    CheckpointHook,
    latest_checkpoint,
    load_trainable_state,
    prune,
    set_rng_state,
)
from continual_lora.run_lock import FolderLock
from continual_lora.run_resume import (
    CHECKPOINTS,
    check_same_config,
    finished_task_state,
    read_progress,
    task_checkpoints,
)
from continual_lora.sequence import build_stream, describe_mix, format_mix, load_sequence
from continual_lora.strategies.base import AdapterError, TaskContext
from continual_lora.trainer import TrainingError, make_accelerator, train_task


@dataclass
class Row:
    """Scores of every task (and the upstream probe) at one stage."""

    scores: list[float]
    how: list[str]
    correct: list[np.ndarray]
    upstream: float = float("nan")
    upstream_correct: np.ndarray | None = None
    details: list[dict | None] = field(default_factory=list)  # per task (perplexity, ...)
    upstream_details: dict | None = None


@dataclass
class RunResult:
    run_dir: Path
    R: np.ndarray
    U: np.ndarray
    metrics: dict
    trainable_parameters: int
    wall_seconds: float
    strategy: str
    rank: int | None
    rows: list[Row] = field(default_factory=list)
    family: object = None  # the trained model (ModelFamily), for library use; not saved


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _stage_dir(run_dir: Path, task_index: int, name: str) -> Path:
    return run_dir / "tasks" / f"{task_index:02d}-{name}"


def score_row(family, tasks, probe, trained_through: int, batch_size: int, strategy=None,
              ctx: TaskContext | None = None) -> Row:
    """Score every task; those after `trained_through` with their prototype head. The strategy's
    `scoring(ctx, task)` hook is entered around each task (task None: the upstream probe)."""

    def scoring(task):
        return nullcontext() if strategy is None else strategy.scoring(ctx, task)

    scores = []
    for t in tasks:
        with scoring(t):
            scores.append(family.score_task(t, t.index <= trained_through, batch_size))
    row = Row([s.score for s in scores], [s.how for s in scores], [s.correct for s in scores],
              details=[s.details for s in scores])
    if probe is not None:
        with scoring(None):
            up = family.score_upstream(probe, batch_size)
        row.upstream, row.upstream_correct, row.upstream_details = up.score, up.correct, up.details
    return row


def run(cfg: RunConfig, echo: Callable[[str], None] = print, row0: Row | None = None,
        run_dir: Path | None = None, resume: bool = False) -> RunResult:
    """Train `cfg.strategy` over `cfg.tasks` and write the run folder. `row0` may be given by a
    bench that already scored the (identical) starting point. With `resume`, continue the
    interrupted run in the folder exactly (see run_resume.py). The run folder is locked while
    it is written (run_lock.py): a second run or resume into it is refused."""
    run_dir = run_dir or Path(cfg.output_dir) / cfg.name
    # Only the main process of a multi-process run writes, so only it locks.
    lock = FolderLock(run_dir, "run", "run --resume" if resume else "run",
                      enabled=os.environ.get("RANK", "0") == "0")
    try:
        return _run(cfg, echo, row0, run_dir, resume, lock)
    finally:
        lock.release()


def _run(cfg: RunConfig, echo: Callable[[str], None], row0: Row | None, run_dir: Path,
         resume: bool, lock: FolderLock) -> RunResult:
    wall_start = time.perf_counter()
    strategy_cls = get_strategy(cfg.strategy.name)
    strategy = strategy_cls(strategy_cls.Options.model_validate(cfg.strategy.options))
    check_trackers(cfg.train.trackers)
    tasks, probe = load_sequence(cfg)  # data errors surface before any folder is made
    config_text = _config_yaml(cfg)
    if resume:
        if run_dir.is_dir():  # (a missing one is named by check_same_config)
            check_writable(run_dir, "run folder")
        lock.acquire(echo, create=False)  # before reading what another writer may be writing
        check_same_config(run_dir, config_text)
        progress = read_progress(run_dir, [t.name for t in tasks], probe is not None)
        if (run_dir / "metrics.json").is_file():
            raise ConfigError(f"--resume {run_dir}: the run finished all {len(tasks)} tasks; "
                              "nothing to resume")
    else:
        progress = None
        # before loading anything: a live writer, an input inside, content, a read-only disk
        lock.check()
        check_not_input(run_dir, run_inputs(cfg), cfg.overwrite, "run folder")
        refuse_existing(run_dir, cfg.overwrite)
        check_writable(run_dir, "run folder")

    # The model and the user's adapter are loaded before the run folder is made: a base or an
    # adapter that does not load leaves nothing behind.
    seed_everything(cfg.seed)
    accelerator = make_accelerator()
    main = accelerator.is_main_process  # only the main process prints and writes files
    if accelerator.num_processes > 1 and strategy.not_multiprocess:
        raise ConfigError(f"strategy {strategy.name} cannot train in {accelerator.num_processes} "
                          f"processes: {strategy.not_multiprocess}")
    echo = echo if main else (lambda _: None)
    if accelerator.num_processes > 1 and cfg.train.batch_size % accelerator.num_processes:
        echo(f"warning: train.batch_size {cfg.train.batch_size} does not divide evenly over "
             f"{accelerator.num_processes} processes: the processes' examples are weighted "
             "unequally in the averaged gradient")
    family = make_family(cfg.model, cfg.seed)
    family.load()
    family.to(accelerator.device)
    family.accelerator = accelerator
    family.attach_sequence(tasks, probe)
    lora_config = None
    if strategy.uses_lora:
        targets = resolve_targets(family.backbone, cfg.lora.target_modules)
        layers = None if cfg.lora.layers is None else resolve_layers(
            cfg.lora.layers, count_layers(family.backbone))
        lora_config = make_lora_config(cfg.lora.r, cfg.lora.effective_alpha, cfg.lora.dropout,
                                       targets, layers)
    parent = None
    if cfg.lora.init_adapter:  # row 0 is the base plus the adapter the user brought
        family.set_backbone(load_adapter(family.backbone, cfg.resolve_path(cfg.lora.init_adapter)))
        parent = _adapter_identity(cfg.resolve_path(cfg.lora.init_adapter))
    if progress is None and main:
        lock.acquire(echo)
        run_dir = create_run_dir(run_dir, cfg.overwrite, echo)
    log = RunLog(run_dir, cfg.train.trackers, cfg.name, cfg.portable_dump(),
                 [t.name for t in tasks], enabled=main)
    try:
        return _run_tasks(cfg, echo, row0, run_dir, progress, strategy, strategy_cls, tasks,
                          probe, family, accelerator, lora_config, parent, config_text,
                          wall_start, log)
    except (ConfigError, TrainingError, AdapterError):
        log.close()
        # A failure before any task finished leaves nothing worth keeping (a rerun repeats
        # it): remove the folder this call made, so bad input leaves no trace.
        if progress is None and main and not (run_dir / "results.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        log.close()


def _run_tasks(cfg, echo, row0, run_dir, progress, strategy, strategy_cls, tasks, probe, family,
               accelerator, lora_config, parent, config_text, wall_start,
               log: RunLog) -> RunResult:
    """The body of `run` once the model is loaded and the run folder exists."""
    main = accelerator.is_main_process
    if progress is None:
        lineage = run_lineage(cfg, family, tasks, probe, parent, strategy_cls)
        if main:
            write_text_atomic(run_dir / "config.yaml", config_text)
            write_json_atomic(run_dir / "lineage.json", lineage)
    else:
        lineage = json.loads((run_dir / "lineage.json").read_text())
    stage_lineage = StageLineage.start(lineage, cfg.name, cfg.resolve_path(cfg.lora.init_adapter)
                                       if cfg.lora.init_adapter else None)
    echo(f"run {cfg.name}: strategy {cfg.strategy.name}, {len(tasks)} tasks, base "
         f"{cfg.model.name_or_path} ({family.fingerprint()[:12]}), folder {run_dir}")

    T = len(tasks)
    plan, stats, reports, rows = [], [], [], []
    if progress is not None and progress.scores:
        rows = [Row(progress.scores[t], progress.how[t], progress.correct[t],
                    progress.upstream[t] if progress.upstream[t] is not None else float("nan"),
                    progress.upstream_correct[t], progress.details[t],
                    progress.upstream_details[t]) for t in range(progress.stages_done + 1)]
        plan, stats, reports = progress.plan, progress.stats, progress.reports
        if progress.lineage_parent is not None:
            stage_lineage.parent = progress.lineage_parent
            stage_lineage.chain = progress.lineage_chain
        echo(f"resuming after {progress.stages_done} finished task(s) of {T}")
    else:
        if row0 is None:
            row0 = score_row(family, tasks, probe, 0, cfg.train.eval_batch_size, strategy)
        rows = [row0]
        if main:
            _write_media(run_dir, family, 0, echo)
        log({"event": "eval", "stage": 0, "scores": row0.scores, "upstream": row0.upstream})
        echo(_row_line(0, "before training", row0))
    done = progress.stages_done if progress is not None else 0
    global_step = sum(s["steps"] for s in stats)
    max_trainable = max([p["trainable_parameters"] for p in plan], default=0)

    for task in tasks:
        ctx = TaskContext(task, tasks, family, cfg, lora_config, seed=cfg.seed * 1000 + task.index)
        strategy.before_task(ctx)
        trainable_heads, reinit_heads = strategy.heads(ctx)
        family.begin_task(task, tasks, trainable_heads, reinit_heads)
        sources = strategy.sources(ctx)
        ckpt_dir = task_checkpoints(run_dir, task.index, task.name)
        if task.index <= done:  # finished before the interruption: rebuild its state
            end = finished_task_state(run_dir, task.index, task.name, plan[task.index - 1]["steps"],
                                      echo)
            load_trainable_state(family.module, end.params)
            set_rng_state(end.rng)
            strategy.after_task(ctx)
            echo(f"task {task.index}/{T} {task.name}: finished before; state rebuilt from "
                 f"{end.folder.name}")
            continue
        mix, warnings = describe_mix(sources)
        stream = build_stream(sources, cfg.train.batch_size, cfg.train.epochs,
                              cfg.train.max_steps, seed=ctx.seed)
        lr = strategy.learning_rate(ctx)
        n_trainable, n_total = count_parameters(family.module)
        max_trainable = max(max_trainable, n_trainable)
        plan.append({"task": task.name, "steps": stream.steps, "lr": lr, "mix": mix,
                     "trainable_parameters": n_trainable, "total_parameters": n_total})
        echo(f"task {task.index}/{T} {task.name}: {stream.steps} steps at lr {lr:g}, "
             f"{n_trainable:,} trainable of {n_total:,} parameters; data mix:\n"
             f"{format_mix(mix)}")
        for warning in warnings:
            echo(f"  warning: {warning}")
        resume_state = latest_checkpoint(ckpt_dir, echo) if progress is not None else None
        if resume_state is not None:
            echo(f"  resuming task {task.name} at step {resume_state.steps_done} of "
                 f"{stream.steps} from {resume_state.folder.name}")
        hook = CheckpointHook(cfg.train.checkpoint_every, ckpt_dir,
                              cfg.train.keep_checkpoints) if main else None
        result = train_task(family, strategy, task, tasks, stream, lr, cfg.train, accelerator,
                            log, global_step, hook, resume_state)
        global_step += result.steps
        stats.append({"task": task.name, **result.__dict__})
        strategy.after_task(ctx)

        row = score_row(family, tasks, probe, task.index, cfg.train.eval_batch_size, strategy,
                        ctx)
        report = strategy.stage_report(ctx)
        rows.append(row)
        reports.append(report)
        extra = {} if report is None else {"strategy_report": report}
        log({"event": "eval", "stage": task.index, "scores": row.scores,
             "upstream": row.upstream, **extra})
        echo(_row_line(task.index, f"after {task.name}", row) + _report_text(report))
        stage_dir = _stage_dir(run_dir, task.index, task.name)
        facts = stage_facts(task.index, task.name, plan[-1], cfg.train, cfg.seed,
                            [t.name for t in tasks], row.scores, row.upstream)
        if main:
            _write_media(run_dir, family, task.index, echo)
            _save_stage(ctx, strategy, stage_dir, stage_lineage, facts)
            write_json_atomic(run_dir / "plan.json", plan)
            _write_predictions(run_dir, tasks, rows, probe)
            # last: results.json marks the stage done
            _write_results(run_dir, family, tasks, rows, stats, reports)
            prune(ckpt_dir, 1)  # the task's end weights, to rebuild its state on a resume
        accelerator.wait_for_everyone()

    R = np.array([r.scores for r in rows])
    U = np.array([r.upstream for r in rows])
    summary = metrics.summarize(R, U if probe is not None else None)
    correct = {t: {i + 1: rows[t].correct[i] for i in range(T)} for t in range(T + 1)}
    summary["flips"] = metrics.flips_from_history(correct, T) if T > 1 else None
    if probe is not None:
        summary["upstream_flips"] = metrics.per_sample_flips([rows[0].upstream_correct],
                                                             [rows[-1].upstream_correct])
    wall = time.perf_counter() - wall_start
    summary.update({"strategy": cfg.strategy.name,
                    "label": cfg.strategy.label or cfg.strategy.name,
                    "rank": cfg.lora.r if strategy.uses_lora else None,
                    "trainable_parameters": max_trainable, "wall_seconds": wall,
                    "tasks": [t.name for t in tasks], "processes": accelerator.num_processes})
    if progress is not None:
        summary["resumed_after_stage"] = progress.stages_done
    if reports and reports[-1] is not None:
        summary["strategy_report"] = reports[-1]  # the final model's numbers
    if main:
        write_json_atomic(run_dir / "metrics.json", summary)
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # the run is complete
        log({"event": "done", "metrics": {k: v for k, v in summary.items() if k != "flips"}})
    return RunResult(run_dir, R, U, summary, max_trainable, wall, cfg.strategy.name,
                     summary["rank"], rows, family)


# -- writing the run folder -----------------------------------------------------------------------


def _write_media(run_dir: Path, family, stage: int, echo) -> None:
    """The family's pictures of a stage (diffusion: the fixed-seed sample grid) in `samples/`."""
    path = family.write_stage_media(run_dir / "samples", stage)
    if path is not None:
        echo(f"  samples: {path}")


def _save_stage(ctx: TaskContext, strategy, stage_dir: Path,
                stage_lineage: StageLineage | None = None, facts: dict | None = None) -> None:
    """Write the stage folder whole, the adapter's (or full model's) `lineage.json` included."""
    with atomic_dir(stage_dir) as tmp:
        (tmp / "adapter").mkdir()
        info = strategy.export_adapter(ctx, tmp / "adapter")
        if info.get("kind") == "none":
            (tmp / "adapter").rmdir()
        elif info.get("kind") == "full_weights":
            (tmp / "adapter").rename(tmp / "model")
        written = [tmp / name for name in ("adapter", "model") if (tmp / name).is_dir()]
        if stage_lineage is not None and written:
            stage_lineage.write(written[0], stage_dir / written[0].name, {**facts, "export": info})
        ctx.family.save_task_parts(tmp)
        (tmp / "stage.json").write_text(json.dumps({"task": ctx.task.name, "index": ctx.t,
                                                     "export": info}, indent=2))


def _write_results(run_dir: Path, family, tasks, rows: list[Row], stats: list[dict],
                   reports: list[dict | None]) -> None:
    names = [t.name for t in tasks]
    header = "stage," + ",".join(names) + ",upstream"
    lines = [header]
    for t, row in enumerate(rows):
        label = "before" if t == 0 else names[t - 1]
        lines.append(",".join([label] + [f"{s:.6f}" for s in row.scores]
                              + [f"{row.upstream:.6f}"]))
    write_text_atomic(run_dir / "accuracy_matrix.csv", "\n".join(lines) + "\n")
    results = {
        "tasks": names, "R": [r.scores for r in rows], "U": [r.upstream for r in rows],
        "scored_with": [r.how for r in rows], "scorers": [t.scorer for t in tasks],
        "training": stats, "definition": family.score_definition}
    if any(d for r in rows for d in r.details) or any(r.upstream_details for r in rows):
        results["details"] = [r.details for r in rows]  # indexed like R
        results["upstream_details"] = [r.upstream_details for r in rows]
    if any(r is not None for r in reports):  # only strategies that report: others unchanged
        results["strategy_report"] = [None, *reports]  # indexed by stage, like R
        write_json_atomic(run_dir / "strategy_report.json",
                          [{"stage": t, "task": names[t - 1], **(r or {})}
                           for t, r in enumerate(reports, start=1)])
    write_json_atomic(run_dir / "results.json", results)


def _write_predictions(run_dir: Path, tasks, rows: list[Row], probe=None) -> None:
    """Per-example correctness at every stage, with each task's labels and class names (and
    the upstream probe's, when it has classes), so per-class forgetting can be read back."""
    arrays = {}
    for t, row in enumerate(rows):
        for task, correct in zip(tasks, row.correct, strict=True):
            arrays[f"correct/stage{t}/{task.name}"] = correct
        if row.upstream_correct is not None:
            arrays[f"correct/stage{t}/upstream"] = row.upstream_correct
    for task in tasks:
        arrays[f"labels/{task.name}"] = task.eval.labels
        arrays[f"classes/{task.name}"] = np.array(task.classes, dtype=str)
    if getattr(probe, "classes", None) is not None:
        arrays["labels/upstream"] = np.asarray(probe.labels)
        arrays["classes/upstream"] = np.array(probe.classes, dtype=str)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes_atomic(run_dir / "predictions.npz", buffer.getvalue())


def _config_yaml(cfg: RunConfig) -> str:
    """The resolved config, with absolute data and adapter paths (`RunConfig.portable_dump`)."""
    return yaml.safe_dump(cfg.portable_dump(), sort_keys=False)


def finished_result(run_dir: Path) -> RunResult:
    """The result of a finished run, read back from its folder (a resumed bench's done rows)."""
    metrics_ = json.loads((run_dir / "metrics.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    return RunResult(run_dir, np.array(results["R"]), np.array(results["U"], dtype=float),
                     metrics_, metrics_["trainable_parameters"], metrics_["wall_seconds"],
                     metrics_["strategy"], metrics_["rank"])


def _adapter_identity(path: Path) -> dict:
    return {"path": str(path), **weights_identity(path)}


def run_lineage(cfg: RunConfig, family, tasks, probe, parent, strategy_cls) -> dict:
    """The run-level lineage (run folder's lineage.json): base identity, parent adapter,
    strategy, LoRA settings, data manifests, software versions."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "continual_lora": __version__,
        "base_model": {"name_or_path": cfg.model.name_or_path, "resolved_path": family.path,
                       "fingerprint_sha256": family.fingerprint(), "family": family.name},
        "parent_adapter": parent,
        "strategy": {"name": strategy_cls.name, "options": cfg.strategy.options},
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.effective_alpha,
                 "alpha_rule": cfg.lora.alpha_rule, "target_modules": cfg.lora.target_modules,
                 **({"layers": cfg.lora.layers} if cfg.lora.layers is not None else {})},
        "seed": cfg.seed,
        "data": [{"task": t.name, "index": t.index, "classes": t.classes,
                  "train_examples": len(t.train), "eval_examples": len(t.eval), **t.manifest}
                 for t in tasks],
        "upstream": None if probe is None else {"name": probe.name, **probe.manifest},
        "software": {**versions, "python": platform.python_version()},
    }


def _report_text(report: dict | None) -> str:
    """A strategy's stage report on the echo line: numbers, and mappings of names to numbers."""
    if not report:
        return ""

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, dict):
            return " ".join(f"{k}={fmt(v)}" for k, v in value.items())
        return "-" if value is None else str(value)

    return " | " + ", ".join(f"{key} {fmt(value)}" for key, value in report.items())


def _row_line(stage: int, label: str, row: Row) -> str:
    cells = " ".join(f"{s:.3f}" for s in row.scores)
    up = "" if np.isnan(row.upstream) else f" | upstream {row.upstream:.3f}"
    if row.upstream_details and "perplexity" in row.upstream_details:
        up += f" (perplexity {row.upstream_details['perplexity']:.2f})"
    return f"  R[{stage}] ({label}): {cells}{up}"
