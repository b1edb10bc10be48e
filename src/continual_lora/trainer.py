"""The one training loop: setup, loop, log. Read it top to bottom.

Every strategy trains through this function; strategies only add a loss term (`extra_loss`) and
choose the data (`sources`). Runs on accelerate: one process on CPU or GPU, or several with
`accelerate launch` / `torchrun`, without changes here.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from accelerate import Accelerator
from torch import nn

from continual_lora.families.base import ModelFamily
from continual_lora.resume import ResumeState, load_trainable_state, set_rng_state
from continual_lora.sequence import Stream, TaskData
from continual_lora.strategies.base import Strategy


class TrainingError(RuntimeError):
    """Training cannot go on (no trainable parameters, non-finite loss)."""


@dataclass
class TrainStats:
    steps: int
    trainable_parameters: int
    first_loss: float
    last_loss: float
    seconds: float
    stopped_at: int | None = None  # steps done when a step hook stopped the task early
    resumed_from: int | None = None  # steps already done when this call started (a resume)


@dataclass
class LoopState:
    """The loop's live objects, as a step hook sees them after an optimizer step."""

    steps_done: int
    total_steps: int
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    first_loss: float
    last_loss: float


class StepHook(Protocol):
    """Called after every `every`-th optimizer step and after the last one; returning True
    stops the task there (a forgetting budget does). It may evaluate or save a checkpoint."""

    every: int

    def __call__(self, state: LoopState) -> bool: ...


def make_accelerator() -> Accelerator:
    """One process on CPU or GPU, or one of several under `accelerate launch` / `torchrun`
    (DDP; gloo on CPU). Unused parameters are allowed: a batch of a joint or replay stream
    may hold no example of some task, whose head then gets no gradient in that step."""
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           find_unused_parameters=True)])


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def train_task(family: ModelFamily, strategy: Strategy, task: TaskData, tasks: list[TaskData],
               stream: Stream, lr: float, train_cfg, accelerator: Accelerator,
               log: Callable[[dict], None], global_step: int = 0, hook: StepHook | None = None,
               resume: ResumeState | None = None) -> TrainStats:
    """Train `task` for `stream.steps` steps. With `resume`, the optimizer, scheduler,
    trainable weights and RNG states are those of the checkpoint and the loop starts at its
    step: the rest of the task is what the uninterrupted run would have done."""
    # --- setup: what trains, with which optimizer and schedule --------------------------------
    module = family.module
    backbone_params = [p for p in module.backbone.parameters() if p.requires_grad]
    head_params = [p for n, p in module.named_parameters()
                   if p.requires_grad and not n.startswith("backbone.")]
    n_trainable = sum(p.numel() for p in backbone_params + head_params)
    if sum(p.numel() for p in backbone_params) == 0:
        # Heads alone would "train" while the adapter stays as it was: a silent no-op for LoRA.
        raise TrainingError(
            f"task {task.name}: the backbone has 0 trainable parameters (is the adapter loaded "
            "with is_trainable=True? do lora.target_modules match?); refusing to train"
        )
    groups = [{"params": backbone_params, "lr": lr}]
    if head_params:
        groups.append({"params": head_params, "lr": train_cfg.head_lr or lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay)
    warmup = int(train_cfg.warmup_ratio * stream.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(warmup, stream.steps))
    model, optimizer = accelerator.prepare(module, optimizer)
    start_step, first_loss = 0, math.nan
    if resume is not None:
        load_trainable_state(module, resume.params)
        if resume.optimizer:  # empty in a finished task's stripped last checkpoint
            optimizer.load_state_dict(resume.optimizer)
            scheduler.load_state_dict(resume.scheduler)
        set_rng_state(resume.rng)
        start_step, first_loss = resume.steps_done, resume.first_loss
    by_index = {t.index: t for t in tasks}
    names = {t.index: t.name for t in tasks}

    # --- loop --------------------------------------------------------------------------------
    model.train()
    last_loss, stopped_at = math.nan, None
    start = time.perf_counter()  # the task's training time includes filling any cache
    note = family.prepare_training(stream, by_index, train_cfg)
    if note:
        log({"event": "note", "task": task.name, "text": note})
        if accelerator.is_main_process:
            print(f"  {note}", file=sys.stderr, flush=True)
    progress = _progress(stream.steps, f"task {task.index} {task.name}", accelerator,
                         start_step)
    world, rank = accelerator.num_processes, accelerator.process_index
    for step, examples in stream.batches(start_step):
        # Several processes: each takes every world-th example of the global batch, and DDP
        # averages their gradients, which is the gradient of the global batch's mean loss
        # when the batch divides evenly (the runner warns when it does not).
        examples = examples[rank::world] if world > 1 else examples
        batch = family.collate(examples, by_index)
        outputs = family.forward(batch, model)
        loss = outputs.loss
        extra = strategy.extra_loss(batch, outputs)
        total = loss if extra is None else loss + extra
        if not torch.isfinite(total):
            raise TrainingError(
                f"task {task.name}, step {step}: loss is {float(total)} "
                f"(dtype {total.dtype}); training stopped and nothing from this task was "
                "saved as an adapter (finished tasks and the last checkpoint are kept). Lower "
                "train.lr (or use float32 if this is half precision), or check the data for "
                "empty or extreme examples."
            )
        accelerator.backward(total)
        if train_cfg.grad_clip:
            accelerator.clip_grad_norm_(backbone_params + head_params, train_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        last_loss = float(total.detach())
        first_loss = last_loss if step == 0 else first_loss
        progress.update(last_loss)
        if step % train_cfg.log_every == 0 or step == stream.steps - 1:
            per_source = {}
            for t in torch.unique(batch["task_ids"]).tolist():
                rows = batch["task_ids"] == t
                per_source[names[t]] = float(outputs.per_example_loss[rows].mean())
            log({"event": "step", "task": task.name, "step": step,
                 "global_step": global_step + step, "loss": last_loss,
                 "task_loss": float(loss.detach()),
                 "extra_loss": None if extra is None else float(extra.detach()),
                 "lr": scheduler.get_last_lr()[0], "loss_by_source": per_source})
        done = step + 1
        if hook is not None and (done % hook.every == 0 or done == stream.steps):
            state = LoopState(done, stream.steps, module, optimizer, scheduler, first_loss,
                              last_loss)
            if hook(state) and done < stream.steps:
                stopped_at = done
                log({"event": "stopped", "task": task.name, "step": done})
                break
    progress.close()
    model.eval()
    accelerator.free_memory()  # drop accelerate's references to this task's model/optimizer
    steps = stopped_at or stream.steps
    return TrainStats(steps, n_trainable, first_loss, last_loss, time.perf_counter() - start,
                      stopped_at, start_step or None)


class _progress:
    """tqdm on a terminal; on redirected output, a plain line every ~10% of the steps."""

    def __init__(self, total: int, desc: str, accelerator: Accelerator, done: int = 0):
        self.total, self.desc, self.n = total, desc, done
        self.first = done
        self.enabled = accelerator.is_main_process
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, leave=False,
                            dynamic_ncols=True)
        self.every = max(1, total // 10)
        self.start = time.perf_counter()

    def update(self, loss: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            elapsed = time.perf_counter() - self.start
            eta = elapsed / (self.n - self.first) * (self.total - self.n)
            print(f"  {self.desc}: step {self.n}/{self.total} loss {loss:.4f} "
                  f"({elapsed:.0f}s, eta {eta:.0f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
