"""Per-step training cost of each strategy, side by side in one process: against a plain PEFT +
torch loop written here as a user would write it, and against `naive`.

Cases: `plain` (the hand-written loop below: `AutoModel` + `get_peft_model`, a linear head, mean
pooling, AdamW, the same schedule and gradient clipping, `pad_sequence` per batch), and our
trainer with `naive`, `replay`, `merge_reinit`, `lwf` and `olora`, each in the state it reaches
after some earlier tasks (O-LoRA with 2 or 8 frozen adapters, LwF with 8 old heads, replay with
a buffer of 2 earlier tasks), built by driving the strategy's own hooks in the runner's order on
small WordNet tasks, one real training step each. Every case then trains on the timed task with
the same model settings (each case has its own copy of the base, loaded from the same weights):
ours through the real trainer (`trainer.train_task`) and the real `extra_loss`. All cases train
on the same batches except `replay`, whose batches are its real mix of new and replayed
examples (its padded widths are in the JSON).

Timing: repetitions are interleaved (each repetition runs every case once, in a rotated order).
Each run of a case is one training call of 1 + `--steps` steps; a step's time is the time
between two consecutive step ends (our trainer: its step hook, called after every optimizer
step; the plain loop: after its `optimizer.zero_grad`); the first step of each call (AdamW's
lazy state) and the whole first `--warmup-reps` repetitions are discarded. A case's time in a
repetition is the median of its steps; its ratio is that time over the reference's (naive, or
plain) in the same repetition; the reported ratio is the median over repetitions.

Memory: after timing, one more call of 2 steps per case under `PeakTensorMemory` (every tensor
the step creates, counted until it is freed; see tensor_memory.py), plus the weights, gradients
and optimizer state that existed before: the peak bytes the case's tensors hold.

    python benchmarks/step_time.py                    # all cases; writes benchmarks/results/
    python benchmarks/step_time.py --cases plain,naive,lwf-8 --reps 3 --no-write
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

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: its sibling modules
from tensor_memory import PeakTensorMemory, resident_bytes  # noqa: E402

from continual_lora.adapters import (
    count_layers,
    make_lora_config,
    resolve_layers,
    resolve_targets,
)
from continual_lora.config import RunConfig, load_run_config
from continual_lora.families.classifier import ClassifierFamily
from continual_lora.registry import get_strategy
from continual_lora.sequence import Stream, TaskData, build_stream, load_sequence
from continual_lora.strategies.base import Strategy, TaskContext
from continual_lora.trainer import train_task

RESULTS = Path(__file__).parent / "results"
# Earlier tasks: small 2-class WordNet tasks (their content does not matter for the timing).
EARLIER = [["noun.act", "noun.event"], ["noun.group", "noun.location"],
           ["noun.state", "noun.time"], ["noun.quantity", "noun.possession"],
           ["verb.motion", "verb.contact"], ["verb.change", "verb.social"],
           ["verb.creation", "verb.stative"], ["noun.process", "noun.phenomenon"],
           # more, for the scaling benchmark's 16 tasks
           ["noun.artifact", "noun.food"], ["noun.cognition", "noun.communication"],
           ["noun.feeling", "noun.attribute"], ["noun.substance", "noun.object"],
           ["verb.communication", "verb.cognition"], ["verb.perception", "verb.emotion"],
           ["verb.consumption", "verb.competition"]]
# The timed task: the demo's first task (4 classes of real glosses).
TIMED = ["noun.animal", "noun.plant", "noun.person", "noun.body"]


@dataclass
class Case:
    key: str
    strategy: str  # "plain": the hand-written PEFT loop, not our trainer
    earlier: int  # tasks trained before the timed one
    options: dict = field(default_factory=dict)
    target: tuple[str, float] | None = None  # (reference case, largest ratio to it)
    run: dict = field(default_factory=dict)  # run-config sections merged over the demo's


# LoRA on the last 2 of the 6 layers, base dropout off (so the 4 frozen layers below are
# deterministic): without and with the lower-layer cache.
UPPER2 = {"lora": {"layers": "last 2"}, "model": {"dropout": 0.0}}


CASES = [Case("plain", "plain", 0),
         # Our trainer doing the plain loop's work (padded batches): what the tool itself costs.
         Case("naive-padded", "naive", 0, target=("plain", 1.05),
              run={"train": {"pack_sequences": False}}),
         # The default: the same batches, packed (packing.py), so less work than the plain loop.
         Case("naive", "naive", 0, target=("plain", 1.0)),
         Case("replay-2", "replay", 2, {"buffer_size": 16}, target=("naive", 1.10)),
         Case("merge_reinit-2", "merge_reinit", 2, target=("naive", 1.10)),
         Case("lwf-8", "lwf", 8, target=("naive", 1.10)),
         Case("olora-2", "olora", 2, target=("naive", 1.10)),
         Case("olora-8", "olora", 8, target=("naive", 1.10)),
         Case("upper2", "naive", 0, run={**UPPER2, "train": {"cache_lower_layers": False}}),
         Case("upper2-cached", "naive", 0, target=("upper2", 0.50), run=UPPER2)]


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
    peak_bytes: int = 0

    def train(self, accelerator: Accelerator, steps: int, on_step) -> None:
        """One training call of 1 + `steps` steps on the timed batches, `on_step()` after
        each optimizer step (through the trainer's step hook)."""
        cfg = self.cfg
        stream = timed_stream(self, steps, cfg.train.batch_size)
        quietly(train_task, self.family, self.strategy, self.task, self.tasks, stream,
                self.strategy.learning_rate(self.ctx), cfg.train, accelerator, lambda _: None,
                hook=_EveryStep(on_step))

    def memory_state(self):
        return self.family.module, None

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.family.module.parameters() if p.requires_grad)


class _EveryStep:
    """A trainer step hook that only calls back (the trainer calls it after every step)."""

    every = 1

    def __init__(self, on_step):
        self.on_step = on_step

    def __call__(self, state) -> bool:
        self.on_step()
        return False


class PlainLoop:
    """The baseline: a LoRA training loop as a user writes it with PEFT and torch, on the same
    model, LoRA settings, batches, schedule and clipping as the `naive` case."""

    def __init__(self, case: Case, args: argparse.Namespace, accelerator: Accelerator):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoTokenizer

        from continual_lora.families.common import resolve_model_path

        self.case = case
        self.cfg = case_config(case, args)
        tasks, _ = load_sequence(self.cfg)
        self.task = tasks[-1]
        self.tasks = tasks
        path = resolve_model_path(self.cfg.model.name_or_path)
        self.device = accelerator.device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModel.from_pretrained(path).to(self.device)
        lora = self.cfg.lora
        self.model = get_peft_model(base, LoraConfig(
            r=lora.r, lora_alpha=lora.effective_alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules))
        self.head = torch.nn.Linear(base.config.hidden_size, len(self.task.classes)).to(
            self.device)
        self.pad_id = self.tokenizer.pad_token_id or 0
        # Tokenised once up front, as `dataset.map(tokenize)` would; padded per batch with
        # torch (`pad_sequence`), not `tokenizer.pad`, whose Python loop would flatter us.
        self.ids = self.tokenizer(self.task.train.texts, truncation=True,
                                  max_length=self.cfg.model.max_length)["input_ids"]
        self.labels = torch.as_tensor(self.task.train.labels)
        self.times: list[list[float]] = []
        self.peak_bytes = 0

    def train(self, accelerator: Accelerator, steps: int, on_step) -> None:
        import torch.nn.functional as F
        from torch.nn.utils.rnn import pad_sequence

        from continual_lora.trainer import linear_warmup_decay

        train = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += list(self.head.parameters())
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        total = steps + 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_warmup_decay(int(train.warmup_ratio * total), total))
        self.model.train()
        bs = train.batch_size
        for step in range(total):
            rows = list(range(step * bs, (step + 1) * bs))
            input_ids = pad_sequence([torch.tensor(self.ids[i]) for i in rows],
                                     batch_first=True, padding_value=self.pad_id)
            attention = pad_sequence([torch.ones(len(self.ids[i]), dtype=torch.long)
                                      for i in rows], batch_first=True)
            hidden = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=attention.to(self.device)).last_hidden_state
            mask = attention.to(self.device).unsqueeze(-1).to(hidden.dtype)
            pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            logits = self.head(pooled) * self.cfg.model.logit_scale
            loss = F.cross_entropy(logits, self.labels[rows].to(self.device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            on_step()

    def memory_state(self):
        return torch.nn.ModuleList([self.model, self.head]), None

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.memory_state()[0].parameters() if p.requires_grad)


# -- configuration --------------------------------------------------------------------------------


def demo_run_mapping() -> dict:
    """The demo preset's run settings (model, LoRA, batch size), as a mapping, with LoRA on
    every layer and the checkpoint's own dropout: the usual fine-tuning step, which the plain
    loop also runs. (The demo itself adapts the last 2 layers; the `upper2` cases time that.)"""
    preset = files("continual_lora") / "presets" / "demo.yaml"
    run = yaml.safe_load(preset.read_text(encoding="utf-8"))["run"]
    run["lora"].pop("layers", None)
    run["model"].pop("dropout", None)
    return run


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
                strategy={"name": "naive" if case.strategy == "plain" else case.strategy,
                          "options": case.options})
    data["model"] = {**data["model"], "name_or_path": args.model}
    data["train"] = {**data["train"], "batch_size": args.batch_size}
    for section, values in case.run.items():
        data[section] = {**data.get(section, {}), **values}
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
    layers = resolve_layers(cfg.lora.layers, count_layers(family.backbone)) \
        if cfg.lora.layers is not None else None
    lora_config = make_lora_config(cfg.lora.r, cfg.lora.effective_alpha, cfg.lora.dropout,
                                   targets, layers)
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
    """The same batches for every case (the timed task's examples in index order), except
    replay's: its own mix of new and replayed examples, as it trains."""
    if prepared.case.strategy == "replay":
        return build_stream(prepared.strategy.sources(prepared.ctx), batch_size, 1, steps + 1,
                            prepared.ctx.seed)
    order = [(prepared.task.index, i) for i in range((steps + 1) * batch_size)]
    return Stream(order, batch_size, steps + 1)


def time_steps(prepared, accelerator: Accelerator, steps: int) -> list[float]:
    """Seconds of each step but the first: the time between consecutive step ends."""
    stamps: list[float] = []
    prepared.train(accelerator, steps, lambda: stamps.append(time.perf_counter()))
    assert len(stamps) == steps + 1, "the case must call back after every step"
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def measure_memory(prepared, accelerator: Accelerator) -> None:
    """Peak bytes held by the case's tensors over a call of 2 steps (untimed)."""
    import gc

    gc.collect()
    module, optimizer = prepared.memory_state()
    before = resident_bytes(module, optimizer)
    with PeakTensorMemory() as tracker:
        prepared.train(accelerator, 1, lambda: None)
    prepared.peak_bytes = before + tracker.peak


def measure(cases: list[Prepared], accelerator: Accelerator, args: argparse.Namespace) -> None:
    for rep in range(args.warmup_reps + args.reps):
        shift = rep % len(cases)
        for prepared in cases[shift:] + cases[:shift]:  # rotate: no case always runs first
            seconds = time_steps(prepared, accelerator, args.steps)
            if rep >= args.warmup_reps:
                prepared.times.append(seconds)
        print(f"  repetition {rep + 1}/{args.warmup_reps + args.reps}"
              f"{' (warm-up, discarded)' if rep < args.warmup_reps else ''}", flush=True)


def summarize(cases: list, batch_size: int) -> list[dict]:
    """Per case: median step, examples per second, ratios to naive and to plain (median over
    repetitions of the paired ratios), peak tensor memory, and the case's target."""
    by_key = {p.case.key: p for p in cases}

    def paired(p, reference: str) -> list[float] | None:
        if reference not in by_key:
            return None
        base = [statistics.median(t) for t in by_key[reference].times]
        return [statistics.median(t) / b for t, b in zip(p.times, base, strict=True)]

    rows = []
    for p in cases:
        median_step = statistics.median(statistics.median(t) for t in p.times)
        row = {"case": p.case.key, "strategy": p.case.strategy, "earlier_tasks": p.case.earlier,
               "median_step_ms": 1000 * median_step,
               "examples_per_second": batch_size / median_step,
               "peak_tensor_mb": p.peak_bytes / 2**20,
               "trainable_parameters": p.trainable_parameters, "step_seconds": p.times}
        for reference in ("plain", "naive"):
            ratios = paired(p, reference)
            if ratios is not None:
                row[f"ratio_to_{reference}"] = statistics.median(ratios)
                row[f"ratio_to_{reference}_range"] = [min(ratios), max(ratios)]
        if p.case.target is not None and p.case.target[0] in by_key:
            reference, limit = p.case.target
            ratio = statistics.median(paired(p, reference))
            row["target"] = f"≤ {limit:.2f}× {reference}"
            row["target_ratio"] = ratio
            row["meets_target"] = ratio <= limit
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | strategy | earlier tasks | median step (ms) | examples/s | ratio to plain "
             "loop | ratio to naive (range) | peak tensor memory (MiB) | target | met (ratio) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|:-:|"]
    for r in rows:
        to_plain = f"{r['ratio_to_plain']:.3f}" if "ratio_to_plain" in r else "–"
        to_naive = "–"
        if "ratio_to_naive" in r:
            low, high = r["ratio_to_naive_range"]
            to_naive = f"{r['ratio_to_naive']:.3f} ({low:.3f}–{high:.3f})"
        met = "" if "meets_target" not in r else (
            f"{'yes' if r['meets_target'] else '**no**'} ({r['target_ratio']:.3f})")
        lines.append(f"| {r['case']} | {r['strategy']} | {r['earlier_tasks']} | "
                     f"{r['median_step_ms']:.0f} | {r['examples_per_second']:.1f} | {to_plain} | "
                     f"{to_naive} | {r['peak_tensor_mb']:.0f} | {r.get('target', '')} | {met} |")
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

    trainer_case = next(p for p in cases if isinstance(p, Prepared))
    widths = {p.case.key: batch_widths(p, args) for p in cases if isinstance(p, Prepared)}
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
        "device": str(trainer_case.family.device),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "model": args.model, "batch_size": args.batch_size,
        "max_length": trainer_case.cfg.model.max_length, "lora_r": trainer_case.cfg.lora.r,
        "lora_alpha": trainer_case.cfg.lora.effective_alpha,
        "lora_targets": trainer_case.cfg.lora.target_modules,
        "padded_widths_of_timed_batches": widths["naive"][1:] if "naive" in widths else None,
        "padded_widths_by_case": widths,
        "steps_per_call": args.steps, "reps": args.reps, "warmup_reps": args.warmup_reps,
    }


def batch_widths(prepared: Prepared, args: argparse.Namespace) -> list[int]:
    stream = timed_stream(prepared, args.steps, args.batch_size)
    by_index = {t.index: t for t in prepared.tasks}
    return [prepared.family.collate(ex, by_index)["input_ids"].shape[1]
            for _, ex in stream.batches()]


RESULTS_MD = Path(__file__).parent / "RESULTS.md"


def write_results(rows: list[dict], env: dict, elapsed: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_time.json").write_text(json.dumps(
        {"environment": env, "wall_seconds": elapsed, "cases": rows}, indent=2) + "\n")
    section = [
        "## Training step: our trainer against a plain PEFT loop, and strategies against naive",
        "", f"Measured {env['date']} by `{env['command']}` (from the repository root, "
        f"OMP_NUM_THREADS {env['OMP_NUM_THREADS']}); how it measures: `benchmarks/README.md`.",
        "", table(rows), "",
        f"- machine: {env['machine']}; device {env['device']}; {env['torch_threads']} torch "
        "threads",
        f"- software: Python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}",
        f"- model `{env['model']}`, batch {env['batch_size']}, max_length {env['max_length']} "
        f"(timed batches padded to {env['padded_widths_of_timed_batches']} tokens; replay's "
        f"own mix: {env['padded_widths_by_case'].get('replay-2', ['–'])[1:]}), LoRA "
        f"r={env['lora_r']} alpha={env['lora_alpha']:g} on {env['lora_targets']}",
        f"- {env['reps']} interleaved repetitions after {env['warmup_reps']} warm-up; each a "
        f"training call of 1 + {env['steps_per_call']} steps (first step discarded); wall "
        f"time {elapsed:.0f} s",
        "- peak tensor memory: weights, gradients and optimizer state, plus the peak of the "
        "tensors a step creates (counted by `benchmarks/tensor_memory.py`); LwF's teacher "
        "outputs, kept by the strategy outside the module, are not in it",
        "", "Raw per-step seconds: `results/step_time.json`."]
    write_section(RESULTS_MD, "step_time", "\n".join(section))


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or add) the section between `<!-- name:start -->` and `<!-- name:end -->`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = path.read_text() if path.is_file() else "# Benchmark results\n"
    block = f"{start}\n{text}\n{end}"
    if start in body and end in body:
        body = body[:body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    path.write_text(body)


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
    cases = [PlainLoop(known[k], args, accelerator) if known[k].strategy == "plain"
             else prepare(known[k], args, accelerator) for k in keys]
    print(f"prepared in {time.perf_counter() - start:.0f} s", flush=True)
    if args.profile:
        print(profile(cases, accelerator, args.steps, args.top))
        return 0
    measure(cases, accelerator, args)
    for prepared in cases:
        measure_memory(prepared, accelerator)
    rows = summarize(cases, args.batch_size)
    elapsed = time.perf_counter() - start
    print(table(rows))
    print(f"wall time {elapsed:.0f} s")
    if not args.no_write:
        write_results(rows, environment(args, cases), elapsed)
        print(f"wrote {RESULTS_MD} (section step_time) and {RESULTS / 'step_time.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
