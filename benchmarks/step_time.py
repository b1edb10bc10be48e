"""Per-step training time of strategies as a ratio to `naive`, measured side by side.

Every case is a strategy in the state it reaches after some earlier tasks (O-LoRA with 2 or 8
frozen adapters, LwF with 8 old heads), built by driving the strategy's own hooks in the
runner's order on small WordNet tasks, one real training step each. All cases then train on the
same timed task: the same batches, the same base model (each case has its own copy, loaded from
the same weights), through the real trainer (`trainer.train_task`) and the real `extra_loss`.

Timing: repetitions are interleaved (each repetition runs every case once, in a rotated order).
Each run of a case is one `train_task` call of 1 + `--steps` steps over the same fixed batches;
the per-step times come from the trainer's own log callback (called after every optimizer step
with `log_every=1`); the first step of each call (AdamW's lazy state) and the whole first
`--warmup-reps` repetitions are discarded. A case's time in a repetition is the median of its
steps; its ratio is that time over naive's in the same repetition; the reported ratio is the
median over repetitions.

    python benchmarks/step_time.py                    # all cases; writes benchmarks/results/
    python benchmarks/step_time.py --cases naive,lwf-8 --reps 3 --no-write
    python benchmarks/step_time.py --profile olora-8  # where the time goes, against naive
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from continual_lora.adapters import make_lora_config, resolve_targets
from continual_lora.config import RunConfig, load_run_config
from continual_lora.families.classifier import ClassifierFamily
from continual_lora.registry import get_strategy
from continual_lora.sequence import Stream, TaskData, build_stream, load_sequence
from continual_lora.strategies.base import Strategy, TaskContext
from continual_lora.trainer import train_task

TARGET_RATIO = 1.10
RESULTS = Path(__file__).parent / "results"
# Earlier tasks: small 2-class WordNet tasks (their content does not matter for the timing).
EARLIER = [["noun.act", "noun.event"], ["noun.group", "noun.location"],
           ["noun.state", "noun.time"], ["noun.quantity", "noun.possession"],
           ["verb.motion", "verb.contact"], ["verb.change", "verb.social"],
           ["verb.creation", "verb.stative"], ["noun.process", "noun.phenomenon"]]
# The timed task: the demo's first task (4 classes of real glosses).
TIMED = ["noun.animal", "noun.plant", "noun.person", "noun.body"]


@dataclass
class Case:
    key: str
    strategy: str
    earlier: int  # tasks trained before the timed one
    options: dict = field(default_factory=dict)


CASES = [Case("naive", "naive", 0), Case("olora-2", "olora", 2), Case("olora-8", "olora", 8),
         Case("lwf-8", "lwf", 8)]


@dataclass
class Prepared:
    """A case in its state at the start of the timed task, ready to train on it."""

    case: Case
    family: ClassifierFamily
    strategy: Strategy
    task: TaskData
    tasks: list[TaskData]
    cfg: RunConfig
    ctx: TaskContext | None = None  # the timed task's context, once its hooks have run
    times: list[list[float]] = field(default_factory=list)  # per repetition: per-step seconds


# -- configuration --------------------------------------------------------------------------------


def demo_run_mapping() -> dict:
    """The demo preset's run settings (model, LoRA, batch size), as a mapping."""
    preset = files("continual_lora") / "presets" / "demo.yaml"
    return yaml.safe_load(preset.read_text(encoding="utf-8"))["run"]


def case_config(case: Case, args: argparse.Namespace) -> RunConfig:
    """The demo's settings with this case's task sequence: `earlier` small tasks, then the timed
    task (same name and seed in every case, so the same examples)."""
    data = demo_run_mapping()
    tasks = [{"name": f"earlier{i + 1}", "wordnet": EARLIER[i], "train_per_class": 8,
              "eval_per_class": 2} for i in range(case.earlier)]
    per_class = -(-args.batch_size * (args.steps + 1) // len(TIMED))
    tasks.append({"name": "timed", "wordnet": TIMED, "train_per_class": per_class,
                  "eval_per_class": 2})
    data.update(name=f"step-time-{case.key}", tasks=tasks, upstream={"kind": "none"},
                strategy={"name": case.strategy, "options": case.options})
    data["model"] = {**data["model"], "name_or_path": args.model}
    data["train"] = {**data["train"], "batch_size": args.batch_size, "log_every": 1}
    return load_run_config(None, data=data)


# -- building each case's state through the strategy's hooks ----------------------------------


def start_task(prepared: Prepared, cfg: RunConfig, lora_config, task: TaskData) -> TaskContext:
    """The runner's hooks before training, in its order."""
    ctx = TaskContext(task, prepared.tasks, prepared.family, cfg, lora_config,
                      seed=cfg.seed * 1000 + task.index)
    prepared.strategy.before_task(ctx)
    trainable, reinit = prepared.strategy.heads(ctx)
    prepared.family.begin_task(task, prepared.tasks, trainable, reinit)
    return ctx


def prepare(case: Case, args: argparse.Namespace, accelerator: Accelerator) -> Prepared:
    cfg = case_config(case, args)
    tasks, _ = load_sequence(cfg)
    strategy_cls = get_strategy(case.strategy)
    family = ClassifierFamily(cfg.model, cfg.seed)
    family.load()
    family.to(accelerator.device)
    targets = resolve_targets(family.backbone, cfg.lora.target_modules)
    lora_config = make_lora_config(cfg.lora.r, cfg.lora.effective_alpha, cfg.lora.dropout,
                                   targets)
    prepared = Prepared(case, family, strategy_cls(strategy_cls.Options.model_validate(
        cfg.strategy.options)), tasks[-1], tasks, cfg)
    for task in tasks[:-1]:  # earlier tasks: one real training step each, then after_task
        ctx = start_task(prepared, cfg, lora_config, task)
        stream = build_stream(prepared.strategy.sources(ctx), cfg.train.batch_size, 1, 1,
                              ctx.seed)
        quietly(train_task, family, prepared.strategy, task, tasks, stream,
                prepared.strategy.learning_rate(ctx), cfg.train, accelerator, lambda _: None)
        prepared.strategy.after_task(ctx)
    prepared.ctx = start_task(prepared, cfg, lora_config, prepared.task)
    return prepared


def quietly(fn, *args, **kwargs):
    """Call `fn` with the trainer's progress lines (stderr) swallowed."""
    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


# -- timing -------------------------------------------------------------------------------------


def timed_stream(prepared: Prepared, steps: int, batch_size: int) -> Stream:
    """The same batches for every case: the timed task's examples in index order."""
    order = [(prepared.task.index, i) for i in range((steps + 1) * batch_size)]
    return Stream(order, batch_size, steps + 1)


def time_steps(prepared: Prepared, accelerator: Accelerator, steps: int) -> list[float]:
    """Seconds of each step but the first, from the trainer's per-step log callback."""
    stamps: list[float] = []
    cfg = prepared.cfg
    stream = timed_stream(prepared, steps, cfg.train.batch_size)
    quietly(train_task, prepared.family, prepared.strategy, prepared.task, prepared.tasks,
            stream, prepared.strategy.learning_rate(prepared.ctx), cfg.train, accelerator,
            lambda event: stamps.append(time.perf_counter()))
    assert len(stamps) == steps + 1, "train_task must log every step (log_every=1)"
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def measure(cases: list[Prepared], accelerator: Accelerator, args: argparse.Namespace) -> None:
    for rep in range(args.warmup_reps + args.reps):
        shift = rep % len(cases)
        for prepared in cases[shift:] + cases[:shift]:  # rotate: no case always runs first
            seconds = time_steps(prepared, accelerator, args.steps)
            if rep >= args.warmup_reps:
                prepared.times.append(seconds)
        print(f"  repetition {rep + 1}/{args.warmup_reps + args.reps}"
              f"{' (warm-up, discarded)' if rep < args.warmup_reps else ''}", flush=True)


def summarize(cases: list[Prepared]) -> list[dict]:
    naive = next(p for p in cases if p.case.key == "naive")
    base = [statistics.median(t) for t in naive.times]
    rows = []
    for p in cases:
        per_rep = [statistics.median(t) for t in p.times]
        ratios = [x / b for x, b in zip(per_rep, base, strict=True)]
        rows.append({"case": p.case.key, "strategy": p.case.strategy,
                     "earlier_tasks": p.case.earlier,
                     "median_step_ms": 1000 * statistics.median(per_rep),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "ratios": ratios,
                     "step_seconds": p.times,
                     "trainable_parameters": sum(q.numel() for q in p.family.module.parameters()
                                                 if q.requires_grad)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | strategy | earlier tasks | median step (ms) | ratio to naive (median) | "
             f"ratio range | ≤ {TARGET_RATIO:.2f} |", "|---|---|---:|---:|---:|---:|:-:|"]
    for r in rows:
        ok = "yes" if r["ratio"] <= TARGET_RATIO else "**no**"
        lines.append(f"| {r['case']} | {r['strategy']} | {r['earlier_tasks']} | "
                     f"{r['median_step_ms']:.0f} | {r['ratio']:.3f} | "
                     f"{r['ratio_min']:.3f}–{r['ratio_max']:.3f} | {ok} |")
    return "\n".join(lines)


# -- profiling ----------------------------------------------------------------------------------


def profile(cases: list[Prepared], accelerator: Accelerator, steps: int, top: int) -> str:
    """Operator table (self CPU time) of `steps` steps of each case, after a warm-up call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = []
    for prepared in cases:
        time_steps(prepared, accelerator, 1)  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            time_steps(prepared, accelerator, steps)
        events = prof.key_averages()
        total_ms = sum(e.self_cpu_time_total for e in events) / 1000
        out.append(f"\n=== {prepared.case.key}: {total_ms:.0f} ms of operator self time over "
                   f"{steps + 1} steps ===\n"
                   + events.table(sort_by="self_cpu_time_total", row_limit=top))
    return "\n".join(out)


# -- the results file -------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment(args: argparse.Namespace, cases: list[Prepared]) -> dict:
    import peft
    import transformers

    widths = [int(b) for b in batch_widths(cases[0], args)]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
        "device": str(cases[0].family.device),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "model": args.model, "batch_size": args.batch_size,
        "max_length": cases[0].cfg.model.max_length, "lora_r": cases[0].cfg.lora.r,
        "lora_alpha": cases[0].cfg.lora.effective_alpha,
        "lora_targets": cases[0].cfg.lora.target_modules,
        "padded_widths_of_timed_batches": widths[1:],
        "steps_per_call": args.steps, "reps": args.reps, "warmup_reps": args.warmup_reps,
    }


def batch_widths(prepared: Prepared, args: argparse.Namespace) -> list[int]:
    stream = timed_stream(prepared, args.steps, args.batch_size)
    by_index = {t.index: t for t in prepared.tasks}
    return [prepared.family.collate(ex, by_index)["input_ids"].shape[1]
            for _, ex in stream.batches()]


def write_results(rows: list[dict], env: dict, elapsed: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_time.json").write_text(json.dumps(
        {"environment": env, "wall_seconds": elapsed, "target_ratio": TARGET_RATIO,
         "cases": rows}, indent=2) + "\n")
    md = [
        "# Per-step training time, as a ratio to `naive`", "",
        f"Measured {env['date']} by `benchmarks/step_time.py` (see `benchmarks/README.md`).", "",
        table(rows), "",
        f"- command: `{env['command']}` (from the repository root, OMP_NUM_THREADS "
        f"{env['OMP_NUM_THREADS']})",
        f"- machine: {env['machine']}; device {env['device']}; {env['torch_threads']} torch "
        "threads",
        f"- software: Python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}",
        f"- model `{env['model']}`, batch {env['batch_size']}, max_length {env['max_length']} "
        f"(timed batches padded to {env['padded_widths_of_timed_batches']} tokens), LoRA "
        f"r={env['lora_r']} alpha={env['lora_alpha']:g} on {env['lora_targets']}",
        f"- {env['reps']} interleaved repetitions after {env['warmup_reps']} warm-up; each a "
        f"`train_task` call of 1 + {env['steps_per_call']} steps (first step discarded); "
        f"wall time {elapsed:.0f} s",
        "", "Raw per-step seconds: `step_time.json`.", ""]
    (RESULTS / "step_time.md").write_text("\n".join(md))


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(c.key for c in CASES),
                   help="comma-separated subset of: " + ", ".join(c.key for c in CASES))
    p.add_argument("--model", default="embedded:all-MiniLM-L6-v2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed steps per call (after 1 dropped)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions kept")
    p.add_argument("--warmup-reps", type=int, default=1)
    p.add_argument("--profile", default=None, help="profile this case against naive instead")
    p.add_argument("--top", type=int, default=20, help="operators shown by --profile")
    p.add_argument("--no-write", action="store_true", help="print only; keep results/ as is")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keys = ["naive", args.profile] if args.profile else args.cases.split(",")
    known = {c.key: c for c in CASES}
    unknown = [k for k in keys if k not in known]
    if unknown or "naive" not in keys:
        sys.exit(f"cases must include naive and be among {sorted(known)}; got {keys}")
    start = time.perf_counter()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    print(f"preparing {', '.join(keys)} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)", flush=True)
    cases = [prepare(known[k], args, accelerator) for k in keys]
    print(f"prepared in {time.perf_counter() - start:.0f} s", flush=True)
    if args.profile:
        print(profile(cases, accelerator, args.steps, args.top))
        return 0
    measure(cases, accelerator, args)
    rows = summarize(cases)
    elapsed = time.perf_counter() - start
    print(table(rows))
    print(f"wall time {elapsed:.0f} s")
    if not args.no_write:
        write_results(rows, environment(args, cases), elapsed)
        print(f"wrote {RESULTS / 'step_time.md'} and step_time.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
