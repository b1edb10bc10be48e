"""Strategies (× ranks) over one sequence, side by side, in one comparison table.

Bench folder:

    bench.yaml             the resolved bench config
    runs/<strategy>-r<rank>/   one run folder per row (see runner.py)
    comparison.md          the table, with the metric definitions under it
    comparison.csv         the same numbers, machine-readable
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import yaml

from continual_lora.checkpoint import create_run_dir, refuse_existing, write_text_atomic
from continual_lora.config import BenchConfig, ConfigError, RunConfig, StrategyConfig
from continual_lora.output_dir import check_not_input, check_writable, run_inputs
from continual_lora.registry import get_strategy
from continual_lora.report.rounds import format_rounds, run_rounds
from continual_lora.run_lock import FolderLock
from continual_lora.run_resume import config_diff
from continual_lora.runner import RunResult, finished_result, run

COLUMNS = [
    ("strategy", "strategy"), ("rank", "rank"), ("acc", "ACC ↑"), ("forgetting", "Forgetting ↓"),
    ("bwt", "BWT ↑"), ("fwt", "FWT ↑"), ("plasticity", "Plasticity ↑"),
    ("upstream_retention", "Upstream retention ↑"), ("trainable_parameters", "Trainable params"),
    ("wall_seconds", "Wall time (s)"),
]

DEFINITIONS = """\
Definitions (R[t, i]: task i's score on its held-out split after training through task t: accuracy
for a classifier, the runs' results.json `definition` for the others; row 0 is before training;
T tasks; U[t]: upstream score after task t):
- ACC = (1/T) Σ_i R[T, i]
- Forgetting = (1/(T-1)) Σ_{i<T} (max_{t∈[i,T-1]} R[t, i] − R[T, i])  (raw, not clipped)
- BWT = (1/(T-1)) Σ_{i<T} (R[T, i] − R[i, i])
- FWT = (1/(T-1)) Σ_{i≥2} (R[i-1, i] − R[0, i])  (a classifier scores untrained tasks with their
  nearest-class-mean head on the current features)
- Plasticity = (1/T) Σ_i R[i, i]
- Upstream retention = U[T] / U[0]
`joint` retrains from the base on all tasks so far: the upper bound on ACC.
"""


ROUNDS_DEFINITIONS = """Per round t (a stage of the sequence):
- acquisition = R[t, t], the round just learned (exact match of greedy answers for facts)
- retention of earlier = mean over i < t of R[t, i], the earlier rounds now
- retained share = Σ_{i<t} R[t, i] / Σ_{i<t} R[i, i], what the earlier rounds had reached that is
  still there
- all rounds so far = mean over i ≤ t of R[t, i]
- upstream perplexity: on held-out general text the base model was good at (lower is better)
"""


def plan_rows(cfg: BenchConfig) -> list[tuple[StrategyConfig, int | None]]:
    """(strategy, rank) pairs in table order; `joint` added last when asked and missing."""
    strategies = list(cfg.strategies)
    if cfg.include_joint and not any(s.name == "joint" for s in strategies):
        strategies.append(StrategyConfig(name="joint"))
    ranks = cfg.ranks or [cfg.run.lora.r]
    rows = []
    for strategy in strategies:
        if get_strategy(strategy.name).uses_lora:
            rows += [(strategy, r) for r in ranks]
        else:
            rows.append((strategy, None))
    return rows


def row_config(cfg: BenchConfig, strategy: StrategyConfig, rank: int | None) -> RunConfig:
    """The run config of one bench row. A rank sweep changes `r` only: alpha follows
    `lora.alpha_rule` (or stays the fixed `lora.alpha`), as the config says."""
    run_cfg = cfg.run.model_copy(deep=True)
    run_cfg.strategy = strategy
    label = strategy.label or strategy.name
    run_cfg.name = f"{label}-r{rank}" if rank is not None else label
    if rank is not None:
        run_cfg.lora.r = rank
    return run_cfg


def bench_yaml(cfg: BenchConfig) -> str:
    """The bench's settings as saved in its folder, with absolute data paths."""
    data = cfg.model_dump(mode="json", exclude={"run": {"base_dir"}})
    data["run"] = cfg.run.portable_dump()
    return yaml.safe_dump(data, sort_keys=False)


def _check_same_bench(bench_dir: Path, cfg: BenchConfig) -> None:
    stored_file = bench_dir / "bench.yaml"
    if not stored_file.is_file():
        raise ConfigError(f"--resume {bench_dir}: no bench.yaml there, so no bench was started "
                          "in it")
    stored, now = yaml.safe_load(stored_file.read_text()), yaml.safe_load(bench_yaml(cfg))
    for data in (stored, now):
        data["run"].pop("overwrite", None)
    changed = config_diff(stored, now)
    if changed:
        raise ConfigError(f"--resume {bench_dir}: the bench was started with another "
                          f"configuration (changed: {', '.join(changed[:8])}); --resume "
                          "continues it exactly: give no config and no overrides")


def run_bench(cfg: BenchConfig, echo: Callable[[str], None] = print,
              bench_dir: Path | None = None, resume: bool = False
              ) -> tuple[Path, list[RunResult]]:
    """Every row of the bench, then the comparison table. With `resume`, finished rows are read
    back from their folders, an interrupted row continues from its checkpoints
    (`run --resume`), and the rest run as usual. The bench folder is locked while it is
    written (run_lock.py): a second bench or resume into it is refused."""
    # Under `torchrun`/`accelerate launch` every process runs the bench; the main one writes.
    main = os.environ.get("RANK", "0") == "0"
    bench_dir = bench_dir or Path(cfg.run.output_dir) / cfg.name
    lock = FolderLock(bench_dir, "bench", "bench --resume" if resume else "bench", enabled=main)
    try:
        if resume:
            if bench_dir.is_dir():
                check_writable(bench_dir, "bench folder")
            lock.acquire(echo, create=False)
            _check_same_bench(bench_dir, cfg)
        elif main:
            lock.check()
            check_not_input(bench_dir, run_inputs(cfg.run), cfg.run.overwrite, "bench folder")
            refuse_existing(bench_dir, cfg.run.overwrite)
            check_writable(bench_dir, "bench folder")
            lock.acquire(echo)
            bench_dir = create_run_dir(bench_dir, cfg.run.overwrite, echo)
            write_text_atomic(bench_dir / "bench.yaml", bench_yaml(cfg))
        return bench_dir, _run_rows(cfg, echo, bench_dir, resume, main)
    finally:
        lock.release()


def _run_rows(cfg: BenchConfig, echo: Callable[[str], None], bench_dir: Path, resume: bool,
              main: bool) -> list[RunResult]:
    """Every row of the bench in order (see `run_bench`), the comparison rewritten after each."""
    if not main:
        echo = lambda _: None  # noqa: E731
    results: list[RunResult] = []
    row0 = None  # the starting point is the same for every row: score it once
    for strategy, rank in plan_rows(cfg):
        run_cfg = row_config(cfg, strategy, rank)
        label = run_cfg.name
        run_dir = bench_dir / "runs" / label
        if resume and (run_dir / "metrics.json").is_file():
            echo(f"\n=== bench {cfg.name}: {label} (finished before) ===")
            results.append(finished_result(run_dir))
            continue
        echo(f"\n=== bench {cfg.name}: {label} ===")
        if resume and (run_dir / "config.yaml").is_file():
            result = run(run_cfg, echo=echo, run_dir=run_dir, resume=True)
        else:  # a row never started, or killed before it wrote anything worth keeping
            run_cfg.overwrite = run_cfg.overwrite or resume
            result = run(run_cfg, echo=echo, row0=row0, run_dir=run_dir)
            row0 = result.rows[0]
        results.append(result)
        if main:
            write_comparison(bench_dir, results)
    return results


def format_cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "trainable_parameters":
        return f"{value:,}"
    if key == "wall_seconds":
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def comparison_rows(results: list[RunResult]) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics
        rows.append({"strategy": m.get("label", r.strategy), "rank": r.rank, "acc": m["acc"],
                     "forgetting": m["forgetting"], "bwt": m["bwt"], "fwt": m["fwt"],
                     "plasticity": m["plasticity"],
                     "upstream_retention": m.get("upstream_retention"),
                     "trainable_parameters": r.trainable_parameters,
                     "wall_seconds": r.wall_seconds,
                     "strategy_report": report_cell(m.get("strategy_report")),
                     "run_dir": str(r.run_dir)})
    return rows


def report_cell(report: dict | None) -> str:
    """A strategy's final-stage report in one cell: its scalars, and the `mean` of any mapping
    that has one (moe: `router prototype; routing_accuracy_mean 0.912`; merge/magmax:
    `export_error mean 0.123`). Per-task mappings are left to the run folder."""
    if not report:
        return ""
    parts = []
    for key, value in report.items():
        if isinstance(value, dict) and "mean" in value:
            parts.append(f"{key} mean {value['mean']:.3f}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.3f}")
        elif isinstance(value, (str, int)):
            parts.append(f"{key} {value}")
    return "; ".join(parts)


def table_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """COLUMNS, and the strategy-report column when some strategy reported something."""
    return COLUMNS + ([("strategy_report", "Strategy report")]
                      if any(row.get("strategy_report") for row in rows) else [])


def format_table(rows: list[dict]) -> str:
    columns = table_columns(rows)
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format_cell(k, row.get(k)) for k, _ in columns) + " |"
            for row in rows]
    return "\n".join([header, rule, *body])


def write_comparison(bench_dir: Path, results: list[RunResult]) -> str:
    """comparison.md/.csv; for a causal LM's knowledge rounds also rounds.md (per round:
    acquisition, retention, upstream perplexity). Returns what to print."""
    rows = comparison_rows(results)
    table = format_table(rows)
    write_text_atomic(bench_dir / "comparison.md", f"{table}\n\n{DEFINITIONS}")
    from continual_lora.report.personalization import (
        DEFINITIONS as IMAGE_DEFINITIONS,
    )
    from continual_lora.report.personalization import (
        format_personalization,
        is_image_run,
        run_scores,
    )

    if is_image_run(results[0].run_dir):  # diffusion: seed 003's table, per image metric
        scores = format_personalization([run_scores(r.run_dir) for r in results])
        write_text_atomic(bench_dir / "personalization.md", f"{scores}\n\n{IMAGE_DEFINITIONS}")
        table = f"{table}\n\n{scores}"
    elif any(json.loads((r.run_dir / "results.json").read_text()).get("upstream_details")
             for r in results):
        rounds = format_rounds([run_rounds(r.run_dir) for r in results])
        write_text_atomic(bench_dir / "rounds.md", f"{rounds}\n\n{ROUNDS_DEFINITIONS}")
        table = f"{table}\n\n{rounds}"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(bench_dir / "comparison.csv", buffer.getvalue())
    return table
