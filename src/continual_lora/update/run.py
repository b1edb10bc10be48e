"""`continual-lora update`, top to bottom: plan (everything checked, nothing written), print the
plan, train one stage with the forgetting budget, save the adapter with its report and lineage.

The update is the engine's stage k+1 on a sequence whose stages 1..k were trained earlier: the
old adapter is loaded trainable on the base, its heads are put back, the strategy `adopt`s the
old adapter (as if it had trained it), and the new task then goes through the same hooks and
the same `train_task` as in a run. Continue vs resume: `update` always starts a new stage from
the old adapter's weights, with a fresh optimizer and schedule; `--resume OUT` continues an
interrupted stage exactly from its last good checkpoint, and refuses when the data or the
settings differ from those the stage was planned with.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from continual_lora.adapter_check import check_finite, read_weights
from continual_lora.adapters import (
    AdapterMismatch,
    count_parameters,
    load_adapter,
    make_lora_config,
)
from continual_lora.checkpoint import (
    clear_folder,
    create_run_dir,
    share_tree,
    write_json_atomic,
    write_text_atomic,
)
from continual_lora.config import (
    ConfigError,
    LoraConfigModel,
    ModelConfig,
    RunConfig,
    StrategyConfig,
    TrainConfig,
    validate_strategy_options,
)
from continual_lora.families.classifier import ClassifierFamily
from continual_lora.lineage import StageLineage, stage_facts
from continual_lora.monitor import RunLog, check_trackers
from continual_lora.output_dir import check_not_input, check_writable
from continual_lora.registry import get_strategy
from continual_lora.resume import CheckpointError, latest_checkpoint
from continual_lora.run_lock import FolderLock, is_only_lock
from continual_lora.runner import Row, run_lineage, score_row, seed_everything
from continual_lora.sequence import (
    RetrievalProbe,
    Source,
    TaskData,
    build_stream,
    describe_mix,
    format_mix,
    wordnet_upstream,
)
from continual_lora.strategies.base import AdapterError, Strategy, TaskContext
from continual_lora.trainer import TrainingError, TrainStats, make_accelerator, train_task
from continual_lora.update import recipe
from continual_lora.update.budget import BudgetError, BudgetHook
from continual_lora.update.config import UpdateConfig
from continual_lora.update.data import load_tasks, probe_manifest, probe_split
from continual_lora.update.old import OldAdapter, read_old_adapter
from continual_lora.update.report import build_report, format_report, write_report

CONFIG_FILE = "update_config.yaml"
PLAN_FILE = "update_plan.json"
REPORT_FILE = "update_report.json"
CHECKPOINTS = "checkpoints"
# The plan entries that define a stage: a resume must find every one unchanged.
STAGE_KEYS = ("base_fingerprint", "adapter_sha256", "strategy", "strategy_options", "lr",
              "steps", "batch_size", "warmup_ratio", "eval_every", "max_forgetting",
              "budget_patience", "repeats", "data", "lora", "seed")


class UpdateError(RuntimeError):
    """The update cannot go on; the message says why and what to do."""


@dataclass
class Prepared:
    """Everything set up for the stage: what the plan describes and training needs."""

    cfg: UpdateConfig
    old: OldAdapter
    family: ClassifierFamily
    strategy: Strategy
    ctx: TaskContext
    tasks: list[TaskData]
    probe_tasks: list[int]
    upstream: RetrievalProbe | None
    run_cfg: RunConfig
    row0: Row
    sources: list[Source]
    plan: dict
    plan_text: str


# -- planning: load, check, decide; nothing is written ---------------------------------------------


def _choose_strategy(cfg: UpdateConfig, has_old_data: bool, has_heads: bool
                     ) -> tuple[str, str]:
    if cfg.strategy == "auto":
        choice = recipe.auto_strategy(has_old_data, has_heads)
        return str(choice.value), f"auto: {choice.why}"
    return cfg.strategy, "given"


def _check_strategy(name: str, cls, has_old_data: bool) -> None:
    if cls.not_for_update:
        raise ConfigError(f"strategy: {name} cannot be used by update: {cls.not_for_update}")
    if cls.needs_old_data and not has_old_data:
        raise ConfigError(f"strategy: {name} trains on old data, and none was given; pass the "
                          "old data with --old FILE, or choose a strategy that needs none "
                          "(--strategy auto picks one)")


def _new_adapter_strategies() -> str:
    from continual_lora.registry import get_strategy, strategy_names

    return ", ".join(n for n in strategy_names() if get_strategy(n).new_adapter_per_task)


def _lora_settings(cfg: UpdateConfig, old: OldAdapter, fresh_adapter: bool) -> tuple[dict, str]:
    """The new adapter's rank/alpha/targets: the old adapter's unless asked to change them."""
    wanted = {"r": cfg.rank, "alpha": cfg.alpha,
              "target_modules": sorted(cfg.target_modules) if cfg.target_modules else None}
    have = {"r": old.rank, "alpha": old.alpha, "target_modules": old.targets}
    differs = {k: (have[k], v) for k, v in wanted.items() if v is not None and v != have[k]}
    if differs and not cfg.change_lora:
        shown = ", ".join(f"{k} {v!r} (old adapter: {h!r})" for k, (h, v) in differs.items())
        raise ConfigError(
            f"requested {shown} differs from the adapter being updated ({old.path}). Leave it "
            "out to keep the old adapter's value, or pass --change-lora to train a new adapter "
            f"with it (strategies {_new_adapter_strategies()})")
    if differs and not fresh_adapter:
        raise ConfigError(
            f"--change-lora: the chosen strategy continues training the old adapter itself, so "
            f"its {', '.join(differs)} cannot change; use one of {_new_adapter_strategies()}, "
            "which train a new adapter beside the old one")
    settings = {k: (wanted[k] if k in differs else have[k]) for k in have}
    return settings, ("changed: " + ", ".join(differs)) if differs else "the old adapter's"


def _model_config(cfg: UpdateConfig, old: OldAdapter, base: str) -> ModelConfig:
    meta = old.heads_meta or {}
    return ModelConfig(name_or_path=base, head=meta.get("mode", "per_task"),
                       pooling=meta.get("pooling", "mean"), normalize=meta.get("normalize", True),
                       logit_scale=meta.get("logit_scale", 16.0),
                       max_length=meta.get("max_length", 64))


def _load_old_heads(family: ClassifierFamily, old: OldAdapter, tasks: list[TaskData]) -> None:
    """The old heads, frozen, re-keyed to the update's task indices (1..k in heads.json order)."""
    if old.heads_dir is None:
        return
    # A torn or non-finite heads file is one line naming it, like an adapter's (exit 2).
    heads_file = old.heads_dir / "heads.safetensors"
    tensors, _ = read_weights(heads_file)
    check_finite(tensors, heads_file)
    module = family.module
    for position, saved in enumerate(old.head_tasks, start=1):
        key = "shared" if saved["head"] == "shared" else f"task{position}"
        weight, bias = tensors[f"{saved['head']}.weight"], tensors[f"{saved['head']}.bias"]
        head = nn.Linear(weight.shape[1], weight.shape[0]).to(family.device)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        module.heads[key] = head.requires_grad_(False)
        module.offsets[position] = saved.get("offset", 0)
        family._tasks[position] = tasks[position - 1]


@torch.no_grad()
def _old_predictions(family: ClassifierFamily, task: TaskData,
                     feats: torch.Tensor) -> torch.Tensor:
    """The old model's predictions for `task`'s head, from features of the new inputs."""
    module = family.module
    logits = module.head_logits(module.head_key(task.index), feats)
    if family.cfg.head == "shared":
        first = module.offsets[task.index]
        logits = logits[:, first:first + len(task.classes)]
    return logits.argmax(-1).cpu()


def _check_base(family: ClassifierFamily, old: OldAdapter, cfg: UpdateConfig,
                base: str) -> str:
    expected = old.base_fingerprint
    got = family.fingerprint()
    if expected is None:
        return f"{got[:12]} (the old adapter has no lineage: shapes are checked on load)"
    if expected == got:
        return f"{got[:12]}, matches the old adapter's lineage"
    message = (f"base {base} has fingerprint {got[:12]}, but the adapter {old.path} was trained "
               f"on {old.base_name} with fingerprint {expected[:12]}: another base (or other "
               "weights under the same name)")
    if not cfg.allow_base_mismatch:
        raise ConfigError(message + ". Give the base it was trained on with --base, or pass "
                          "--allow-base-mismatch if this is intended (a fine-tuned variant)")
    return f"{got[:12]}: MISMATCH allowed ({message})"


def _load_adapter(family: ClassifierFamily, old: OldAdapter, base: str) -> None:
    try:
        family.set_backbone(load_adapter(family.backbone, old.path, what="update --adapter"))
    except AdapterMismatch as exc:  # other load errors (a partial file, ...) pass unchanged
        trained_on = old.base_name or "an unknown base"
        raise ConfigError(f"adapter {old.path} (trained on {trained_on}) does not fit the base "
                          f"{base}: {exc.detail}") from None


def prepare(cfg: UpdateConfig, echo: Callable[[str], None] = print) -> Prepared:
    """Load and check everything, decide every default, build the plan. Writes nothing."""
    seed_everything(cfg.seed)  # the base's dropout draws from the global RNG while training
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("update runs in one process; `continual-lora run` trains in several "
                          "(torchrun / accelerate launch)")
    check_trackers(cfg.trackers)
    old = read_old_adapter(cfg.resolve_path(cfg.adapter))
    if old.lineage and old.lineage["base_model"].get("family") == "causal_lm":
        raise ConfigError(
            f"adapter: {old.path} adapts a causal LM; `update` handles classifier adapters in "
            "this version. Continue a causal-LM adapter with `continual-lora run` and "
            "`lora.init_adapter: PATH` (every strategy, with replay of old data if you have it)")
    tasks, probe_tasks = load_tasks(cfg, old.head_tasks)
    new = tasks[-1]
    has_old_data = any(len(t.train) > 0 for t in tasks[:-1])
    has_heads = bool(old.head_tasks)
    if cfg.max_forgetting is not None and len(tasks) == 1:
        raise ConfigError("max_forgetting: there is nothing old to measure: the adapter has no "
                          "saved heads and no old data was given (--old FILE)")
    name, why_strategy = _choose_strategy(cfg, has_old_data, has_heads)
    validate_strategy_options(StrategyConfig(name=name, options=cfg.strategy_options),
                              "strategy")  # an unknown name or option, named
    strategy_cls = get_strategy(name)
    _check_strategy(name, strategy_cls, has_old_data)
    strategy = strategy_cls(strategy_cls.Options.model_validate(cfg.strategy_options))
    lora, lora_why = _lora_settings(cfg, old, strategy_cls.new_adapter_per_task)

    base = cfg.base or old.base_name
    if not base:
        raise ConfigError("base: the adapter names no base model; give it with --base")
    model_cfg = _model_config(cfg, old, base)
    family = ClassifierFamily(model_cfg, cfg.seed)
    family.load()
    base_line = _check_base(family, old, cfg, base)
    family.to(make_accelerator().device)
    _load_adapter(family, old, base)
    _load_old_heads(family, old, tasks)

    # Old tasks without data are measured on a probe: the old model's own predictions.
    eval_batch = TrainConfig().eval_batch_size
    new_feats = family.encode_split(new, "eval", eval_batch).to(family.device) \
        if probe_tasks else None  # encoded once, read by every old head
    for index in probe_tasks:
        task = tasks[index - 1]
        predictions = _old_predictions(family, task, new_feats)
        task.eval = probe_split(new, predictions.numpy(), cfg.probe_size)
        task.manifest = probe_manifest(new, len(task.eval))
    for task in tasks[:-1]:  # old data that no saved head covers: a frozen prototype head
        if task.index > len(old.head_tasks):
            family.begin_task(task, tasks, [], [])
    # `auto` is a classifier's own probe here: update trains classifier adapters only
    upstream = wordnet_upstream(cfg.upstream.size)[0] \
        if cfg.upstream.kind in ("auto", "wordnet_retrieval") else None

    # The sizes that the recipe scales with, then the defaults.
    n_new = len(new.train)
    n_old = sum(len(t.train) for t in tasks[:-1])
    share = cfg.new_share if cfg.new_share is not None else (
        recipe.DEFAULT_NEW_SHARE if has_old_data else 1.0)
    r_new, r_old, achieved = recipe.repeats_for_share(n_new, n_old, share) \
        if has_old_data and strategy_cls.needs_old_data else (1, 1, 1.0)
    new.repeats = r_new
    for task in tasks[:-1]:
        task.repeats = r_old
    first = old.first_stage_train
    batch = recipe.batch_size(cfg.batch_size, first.get("batch_size"))
    lr = recipe.learning_rate(cfg.lr, first.get("lr"), cfg.lr_scale)
    steps = recipe.steps(cfg.steps, n_new, achieved, int(batch.value))
    every = recipe.eval_every(cfg.eval_every, int(steps.value))

    lora_cfg = LoraConfigModel(r=lora["r"], alpha=lora["alpha"],
                               target_modules=lora["target_modules"],
                               init_adapter=str(old.path))
    train_cfg = TrainConfig(lr=float(lr.value), batch_size=int(batch.value),
                            max_steps=int(steps.value), warmup_ratio=cfg.warmup_ratio,
                            eval_batch_size=eval_batch, trackers=cfg.trackers,
                            epochs=float(max(1, int(steps.value)) * int(batch.value) + 1))
    # The run settings the strategies read (model, lora, train); the tasks are loaded above
    # from the update's own data settings, so RunConfig's task list is not built.
    run_cfg = RunConfig.model_construct(
        name=Path(cfg.out).name, seed=cfg.seed, model=model_cfg, lora=lora_cfg, train=train_cfg,
        tasks=[], upstream=cfg.upstream, strategy=StrategyConfig(name=name,
                                                                 options=cfg.strategy_options),
        output_dir=str(Path(cfg.out).parent), overwrite=cfg.overwrite, base_dir=None)

    k = len(tasks) - 1
    row0 = score_row(family, tasks, upstream, k, eval_batch)
    if k:
        old_ctx = TaskContext(tasks[k - 1], tasks, family, run_cfg,
                              make_lora_config(old.rank, old.alpha, 0.0, old.targets),
                              seed=cfg.seed * 1000 + k)
        strategy.adopt(old_ctx)
    ctx = TaskContext(new, tasks, family, run_cfg,
                      make_lora_config(lora["r"], lora["alpha"], 0.0, lora["target_modules"]),
                      seed=cfg.seed * 1000 + new.index)
    strategy.before_task(ctx)
    trainable_heads, reinit_heads = strategy.heads(ctx)
    missing = [tasks[i - 1].name for i in reinit_heads if len(tasks[i - 1].train) == 0]
    if missing:
        raise ConfigError(f"strategy {name} retrains the heads of every task and needs the data "
                          f"of each; none was given for {missing} (--old FILE)")
    family.begin_task(new, tasks, trainable_heads, reinit_heads)
    sources = [s for s in strategy.sources(ctx) if len(s.indices) > 0]
    mix, warnings = describe_mix(sources)
    n_trainable, n_total = count_parameters(family.module)
    n_backbone = sum(p.numel() for p in family.backbone.parameters() if p.requires_grad)
    if n_backbone == 0:
        raise ConfigError(f"0 trainable adapter parameters after loading {old.path} for "
                          f"{name}: training would change nothing; refusing (was the adapter "
                          "saved for inference only, or do its target modules match nothing?)")

    plan = {
        "base": base, "base_fingerprint": family.fingerprint(),
        "adapter": str(old.path), "adapter_sha256": old.identity["sha256"],
        "lineage_stages": [s.get("run", {}).get("task") for s in old.stages],
        "old_tasks": [{"task": t.name, "classes": len(t.classes), "train": len(t.train),
                       "held_out": len(t.eval),
                       "scored_on": "probe" if t.index in probe_tasks else "held-out"}
                      for t in tasks[:-1]],
        "new_task": {"task": new.name, "classes": len(new.classes), "train": len(new.train),
                     "held_out": len(new.eval)},
        "strategy": name, "strategy_why": why_strategy, "strategy_options": cfg.strategy_options,
        "lora": lora, "lora_why": lora_why,
        "trainable_parameters": n_trainable, "total_parameters": n_total,
        "lr": float(lr.value), "lr_why": lr.why, "steps": int(steps.value),
        "steps_why": steps.why, "batch_size": int(batch.value), "batch_why": batch.why,
        "warmup_ratio": cfg.warmup_ratio, "eval_every": int(every.value),
        "eval_every_why": every.why, "max_forgetting": cfg.max_forgetting,
        "budget_patience": cfg.budget_patience,
        "repeats": {"new": r_new, "old": r_old, "new_share_requested": share,
                    "new_share": achieved},
        "mix": mix, "warnings": warnings,
        "data": {t.name: t.manifest for t in tasks},
        "upstream": None if upstream is None else upstream.manifest,
        "seed": cfg.seed, "out": str(cfg.resolve_path(cfg.out)),
    }
    prepared = Prepared(cfg, old, family, strategy, ctx, tasks, probe_tasks, upstream, run_cfg,
                        row0, sources, plan, "")
    prepared.plan_text = format_plan(plan, base_line, old)
    return prepared


def format_plan(plan: dict, base_line: str, old: OldAdapter) -> str:
    lora = plan["lora"]
    chain = " → ".join(str(s) for s in plan["lineage_stages"]) or "none (no lineage.json)"
    if old.lineage_matches is False:
        chain += (" (WARNING: the weights do not match lineage.json: they were changed after it "
                  "was written, so its LR, batch and base fingerprint may not describe them)")
    lines = [
        "update plan",
        f"  base          {plan['base']} (fingerprint {base_line})",
        f"  old adapter   {plan['adapter']}: rank {old.rank}, alpha {old.alpha:g}, targets "
        f"{', '.join(old.targets)}; sha256 {plan['adapter_sha256'][:12]}; lineage: {chain}",
        f"  strategy      {plan['strategy']} ({plan['strategy_why']})",
        f"  new adapter   rank {lora['r']}, alpha {lora['alpha']:g}, targets "
        f"{', '.join(lora['target_modules'])} ({plan['lora_why']})",
        f"  trainable     {plan['trainable_parameters']:,} of {plan['total_parameters']:,} "
        "parameters",
        f"  lr            {plan['lr']:g} ({plan['lr_why']})",
        f"  steps         {plan['steps']} ({plan['steps_why']}); batch {plan['batch_size']} "
        f"({plan['batch_why']}); warm-up {plan['warmup_ratio']:.0%}",
    ]
    for t in plan["old_tasks"]:
        how = ("the old model's predictions on new inputs (no old data)"
               if t["scored_on"] == "probe" else f"{t['held_out']} held-out examples")
        lines.append(f"  old task      {t['task']}: {t['classes']} classes, {t['train']} train "
                     f"examples; forgetting measured on {how}")
    n = plan["new_task"]
    lines.append(f"  new task      {n['task']}: {n['classes']} classes, {n['train']} train, "
                 f"{n['held_out']} held-out examples")
    rep = plan["repeats"]
    if rep["new_share"] < 1:
        asked = rep["new_share_requested"]
        lines.append(f"  repeats       new ×{rep['new']}, old ×{rep['old']}: new data "
                     f"{rep['new_share']:.1%} of the stream (asked {asked:.0%})")
    lines.append("  data mix\n" + format_mix(plan["mix"]))
    lines += [f"  warning: {w}" for w in plan["warnings"]]
    if plan["max_forgetting"] is not None:
        lines.append(f"  budget        old tasks' mean drop ≤ {plan['max_forgetting']:g}, "
                     f"evaluated every {plan['eval_every']} steps; stop after "
                     f"{plan['budget_patience']} evaluations over it and keep the last step "
                     "within it")
    else:
        lines.append(f"  evaluation    every {plan['eval_every']} steps ({plan['eval_every_why']});"
                     " no forgetting budget (--max-forgetting)")
    lines.append(f"  output        {plan['out']}")
    return "\n".join(lines)


# -- resume: the stage must be the one that was interrupted ---------------------------------------


def check_resume(out: Path, plan: dict) -> None:
    """Refuse to resume when anything that defines the stage differs from the stored plan."""
    stored_file = out / PLAN_FILE
    if not stored_file.is_file():
        raise ConfigError(f"--resume {out}: no {PLAN_FILE} there, so no update was started in "
                          "it. Start one with `continual-lora update ... --out` (no --resume)")
    if (out / REPORT_FILE).is_file():
        raise ConfigError(f"--resume {out}: that update finished (it has {REPORT_FILE}); "
                          "nothing to resume. To train further, update from it: "
                          f"--adapter {out} --out NEW_FOLDER")
    stored = json.loads(stored_file.read_text())
    changed = [k for k in STAGE_KEYS if json.dumps(stored.get(k), sort_keys=True)
               != json.dumps(plan.get(k), sort_keys=True)]
    if changed:
        detail = "; ".join(f"{k}: planned {_short(stored.get(k))}, now {_short(plan.get(k))}"
                           for k in changed)
        raise ConfigError(
            f"--resume {out}: the interrupted update was planned differently ({detail}). "
            "--resume continues that same stage exactly, with its data and settings (run it "
            f"with no other arguments: `continual-lora update --resume {out}`). To train on "
            "changed data or settings, start a new stage from a finished adapter into a new "
            "folder: `continual-lora update --adapter ... --out NEW_FOLDER`.")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


# -- the stage ------------------------------------------------------------------------------------


@dataclass
class UpdateResult:
    out: Path
    plan: dict
    report: dict
    stats: TrainStats
    files: list[str]


def _save_adapter(prep: Prepared, out: Path, info_extra: dict, row1: Row) -> dict:
    """Write the adapter (PEFT files), heads and lineage into `out`. The files are written into
    a temporary folder first and moved in with adapter_config.json last: until it is there,
    nothing in `out` loads as an adapter."""
    cfg, ctx, tasks = prep.cfg, prep.ctx, prep.tasks
    lineage = run_lineage(prep.run_cfg, prep.family, tasks, prep.upstream,
                          {"path": str(prep.old.path), **prep.old.identity}, type(prep.strategy))
    stage_lineage = StageLineage.start(lineage, Path(cfg.out).name, prep.old.path)
    facts = stage_facts(ctx.t, ctx.task.name, {"lr": prep.plan["lr"], "steps": prep.plan["steps"]},
                        prep.run_cfg.train, cfg.seed, [t.name for t in tasks], row1.scores,
                        row1.upstream)
    with tempfile.TemporaryDirectory(dir=out, prefix=".adapter.", suffix=".tmp") as staging:
        tmp = Path(staging)
        info = prep.strategy.export_adapter(ctx, tmp)
        info = {**info, "update": info_extra}
        record = stage_lineage.write(tmp, out, {**facts, "export": info})
        prep.family.save_task_parts(tmp)
        share_tree(tmp)  # safetensors writes 0600 files: give them a run's modes (umask)
        names = sorted(p.name for p in tmp.iterdir())
        names.remove("adapter_config.json")
        for name in [*names, "adapter_config.json"]:
            os.replace(tmp / name, out / name)
    return record


# Errors that a resume would meet again at the same step (the stage is deterministic): after
# one, the interrupted folder is worth nothing, and a retry must be able to start afresh.
REPEATING_ERRORS = (ConfigError, TrainingError, BudgetError, AdapterError, CheckpointError)


def run_update(prep: Prepared, resume: bool = False, echo: Callable[[str], None] = print,
               lock: FolderLock | None = None) -> UpdateResult:
    """Make (or, with `resume`, continue) OUT under its lock, train and save. A new update
    that fails removes what it wrote when there is nothing to resume: before its first
    checkpoint, or on an error a resume would repeat."""
    cfg, plan = prep.cfg, prep.plan
    out = cfg.resolve_path(cfg.out)
    lock = lock or FolderLock(out, "update", "update --resume" if resume else "update")
    try:
        if resume:
            lock.acquire(echo, create=False)
            check_resume(out, plan)
            return _log_and_train(prep, out, resume, echo)
        existed = out.is_dir()
        lock.acquire(echo)
        create_run_dir(out, cfg.overwrite, echo)
        try:
            write_text_atomic(out / CONFIG_FILE, _config_yaml(cfg))
            write_json_atomic(out / PLAN_FILE, plan)
            return _log_and_train(prep, out, resume, echo)
        except BaseException as exc:
            if isinstance(exc, REPEATING_ERRORS) or not list((out / CHECKPOINTS).glob("step-*")):
                _remove_written(out, existed)
                if isinstance(exc, TrainingError):
                    raise TrainingError(_nothing_kept(str(exc), out)) from None
            raise
    finally:
        lock.release()


def _log_and_train(prep: Prepared, out: Path, resume: bool,
                   echo: Callable[[str], None]) -> UpdateResult:
    cfg = prep.cfg
    log = RunLog(out, cfg.trackers, out.name, cfg.model_dump(mode="json", exclude={"base_dir"}),
                 [t.name for t in prep.tasks])
    try:
        return _train_and_save(prep, out, log, resume, echo)
    finally:
        log.close()


def _remove_written(out: Path, existed: bool) -> None:
    """Remove what this update wrote in `out`: the folder itself when this update made it, or
    only its contents when it was there before (an empty folder, or one --overwrite replaced)."""
    if existed:
        clear_folder(out)
    else:
        shutil.rmtree(out, ignore_errors=True)


def _nothing_kept(message: str, out: Path) -> str:
    """The trainer's message, told that an update keeps no checkpoint after a failed step."""
    message = message.replace(" (finished tasks and the last checkpoint are kept)", "")
    return (f"{message} Nothing of this update was kept ({out} was removed: --resume would "
            "repeat the same steps); run it again with other settings.")


def _train_and_save(prep: Prepared, out: Path, log: RunLog, resume: bool,
                    echo: Callable[[str], None]) -> UpdateResult:
    cfg, plan, family, strategy, ctx = prep.cfg, prep.plan, prep.family, prep.strategy, prep.ctx
    accelerator = make_accelerator()
    tasks, new = prep.tasks, ctx.task
    old_tasks = tasks[:-1]
    bs = prep.run_cfg.train.eval_batch_size
    before_old = {t.name: prep.row0.scores[t.index - 1] for t in old_tasks}
    hook = BudgetHook(
        plan["eval_every"],
        score_old=lambda: {t.name: family.score_task(t, True, bs).score for t in old_tasks},
        score_new=lambda: family.score_task(new, True, bs).score,
        before_old=before_old, before_new=prep.row0.scores[new.index - 1],
        max_forgetting=cfg.max_forgetting, patience=cfg.budget_patience,
        checkpoint_root=out / CHECKPOINTS, keep_last=cfg.keep_checkpoints, echo=echo, log=log)
    state = None
    if resume:
        state = latest_checkpoint(out / CHECKPOINTS, echo)
        if state is None:
            echo(f"no usable checkpoint in {out / CHECKPOINTS}: the stage starts at step 0")
        else:
            hook.resume_from(state)
            echo(f"resuming at step {state.steps_done} of {plan['steps']} from {state.folder}")
    stream = build_stream(prep.sources, plan["batch_size"], prep.run_cfg.train.epochs,
                          plan["steps"], seed=ctx.seed)
    log({"event": "start", "resume_step": state.steps_done if state else 0, "plan": PLAN_FILE})
    stats = train_task(family, strategy, new, tasks, stream, plan["lr"], prep.run_cfg.train,
                       accelerator, log, 0, hook, state)
    restored = hook.finish(family.module)
    strategy.after_task(ctx)
    row1 = score_row(family, tasks, prep.upstream, new.index, bs, strategy, ctx)
    budget = {"max_forgetting": cfg.max_forgetting, "eval_every": plan["eval_every"],
              "stopped_at": stats.stopped_at, "restored": restored is not None,
              "saved_step": restored if restored is not None else hook.curve[-1].step}
    report = build_report(tasks, prep.probe_tasks, prep.row0, row1, hook.curve, budget)
    if cfg.max_forgetting is not None and report["old_mean"] and \
            report["old_mean"]["drop"] > cfg.max_forgetting + 1e-12:
        report["budget"]["note"] = (
            f"the saved model's drop {report['old_mean']['drop']:.3f} exceeds the budget: "
            f"{strategy.name} transforms the model after training (merging), and the budget "
            "was kept on the model as trained")
    _save_adapter(prep, out, {"plan": PLAN_FILE, "budget": budget,
                              "strategy_why": plan["strategy_why"]}, row1)
    files = write_report(out, report, tasks, prep.row0, row1)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the stage is complete
    log({"event": "done", "report": REPORT_FILE})
    text = format_report(report)
    if "note" in report["budget"]:
        text += f"\n  note: {report['budget']['note']}"
    echo(text)
    echo(f"new adapter: {out} (PEFT; load with PeftModel.from_pretrained(base, '{out}')); "
         f"report: {out / 'update_report.md'}")
    return UpdateResult(out, plan, report, stats, files)


def _config_yaml(cfg: UpdateConfig) -> str:
    """The update's settings with every path made absolute, so `--resume` reads the same files
    from wherever it is run."""
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    for key in ("adapter", "out"):
        data[key] = str(cfg.resolve_path(data[key]))
    for source in [data["new"], *data["old"]]:
        for key in ("train", "eval"):
            if source.get(key):
                source[key] = str(cfg.resolve_path(source[key]))
    if data.get("base") and cfg.resolve_path(data["base"]).exists():
        data["base"] = str(cfg.resolve_path(data["base"]))
    return yaml.safe_dump(data, sort_keys=False)


def update(cfg: UpdateConfig, echo: Callable[[str], None] = print, dry_run: bool = False,
           resume: bool = False) -> UpdateResult | Prepared:
    """Plan, print the plan, and (unless `dry_run`) train and save. OUT is checked before
    anything loads (not an input, not in use, not existing unless --overwrite, writable) and
    locked while it is written (run_lock.py)."""
    out = cfg.resolve_path(cfg.out)
    lock = FolderLock(out, "update", "update --resume" if resume else "update",
                      enabled=not dry_run)
    try:
        lock.check()
        if resume:
            if out.is_dir() and not dry_run:
                check_writable(out, "--out folder")
        else:
            check_out(cfg, out, dry_run)
        prep = prepare(cfg, echo)
        echo(prep.plan_text)
        if dry_run:
            echo("dry run: nothing was trained or written")
            return prep
        return run_update(prep, resume, echo, lock)
    finally:
        lock.release()


def update_inputs(cfg: UpdateConfig) -> list[tuple[str, Path | None]]:
    """The local paths an update reads: the adapter, the base (when a folder), the data."""
    inputs: list[tuple[str, Path | None]] = [("adapter (--adapter)",
                                              cfg.resolve_path(cfg.adapter))]
    if cfg.base:
        inputs.append(("base model (--base)", cfg.resolve_path(cfg.base)))
    for flag, source in [("--new", cfg.new), *(("--old", s) for s in cfg.old)]:
        for key in ("train", "eval"):
            value = getattr(source, key)
            inputs.append((f"data ({flag})", cfg.resolve_path(value) if value else None))
    return inputs


def check_out(cfg: UpdateConfig, out: Path, dry_run: bool = False) -> None:
    """A new update's OUT, before anything loads: never an input (or a folder above one, or
    with --overwrite inside one), not an existing folder unless --overwrite, writable."""
    check_not_input(out, update_inputs(cfg), cfg.overwrite)
    if out.exists() and not (out.is_dir() and is_only_lock(out)) and not cfg.overwrite:
        hint = (f" It holds an interrupted update: continue it with `continual-lora update "
                f"--resume {out}`." if (out / PLAN_FILE).is_file()
                and not (out / REPORT_FILE).is_file() else "")
        raise ConfigError(f"out: {out} already exists and is not empty; nothing was "
                          f"changed.{hint} Otherwise choose another --out, or pass "
                          "--overwrite to replace it.")
    if not dry_run:
        check_writable(out, "--out folder")
