"""The forgetting budget: a step hook that scores the old tasks and the new one every N steps,
writes a checkpoint there, and stops the update once the old tasks' drop leaves the budget.

The drop at a step is the mean over old tasks of (score before the update − score now), on
their held-out data (or the no-old-data probe). The "honey spot" of seed 000 is the last
evaluated step whose drop stays within `max_forgetting`: training stops after `patience`
evaluations in a row over the budget, and the trainable weights of that last good step are
put back before the stage is finished and saved. Step 0 (the old adapter as it was) is the
first point of the curve and is always within the budget; if it is the only one, the update
is refused rather than saving an adapter that learned nothing.

Each evaluation also writes a training checkpoint (`resume.py`) whose `extra` holds the curve
so far, so `--resume` continues with the budget's state as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from continual_lora.resume import (
    ResumeState,
    load_trainable_state,
    prune,
    read_checkpoint,
    save_checkpoint,
)
from continual_lora.trainer import LoopState


class BudgetError(RuntimeError):
    """No evaluated step stayed within the forgetting budget."""


@dataclass
class CurvePoint:
    step: int
    old: dict[str, float]  # old task name → score
    old_mean: float | None  # None when there are no old tasks
    drop: float  # old_mean before − old_mean now
    new: float
    gain: float  # new − new before
    within: bool


def drop_of(before: dict[str, float], now: dict[str, float]) -> tuple[float | None, float]:
    """(mean score now, mean drop) over the old tasks; (None, 0) when there are none."""
    if not before:
        return None, 0.0
    names = list(before)
    now_mean = float(np.mean([now[n] for n in names]))
    return now_mean, float(np.mean([before[n] for n in names])) - now_mean


class BudgetHook:
    """Evaluate, checkpoint, and keep the forgetting budget (see the module docstring)."""

    def __init__(self, every: int, score_old: Callable[[], dict[str, float]],
                 score_new: Callable[[], float], before_old: dict[str, float], before_new: float,
                 max_forgetting: float | None, patience: int, checkpoint_root: Path,
                 keep_last: int, echo: Callable[[str], None], log: Callable[[dict], None]):
        self.every = every
        self.score_old, self.score_new = score_old, score_new
        self.before_old, self.before_new = before_old, before_new
        self.max_forgetting, self.patience = max_forgetting, patience
        self.root, self.keep_last = checkpoint_root, keep_last
        self.echo, self.log = echo, log
        old_mean, _ = drop_of(before_old, before_old)
        self.curve = [CurvePoint(0, dict(before_old), old_mean, 0.0, before_new, 0.0, True)]
        self.best_step = 0
        self.over = 0

    def resume_from(self, resume: ResumeState) -> None:
        """Take the budget's state (curve, best step, evaluations over) from a checkpoint."""
        extra = resume.extra
        self.curve = [CurvePoint(**p) for p in extra["curve"]]
        self.best_step, self.over = extra["best_step"], extra["over"]

    def within(self, drop: float) -> bool:
        return self.max_forgetting is None or drop <= self.max_forgetting + 1e-12

    def __call__(self, state: LoopState) -> bool:
        old = self.score_old()
        new = self.score_new()
        old_mean, drop = drop_of(self.before_old, old)
        point = CurvePoint(state.steps_done, old, old_mean, drop, new, new - self.before_new,
                           self.within(drop))
        self.curve.append(point)
        if point.within:
            self.best_step, self.over = point.step, 0
        else:
            self.over += 1
        extra = {"curve": [asdict(p) for p in self.curve], "best_step": self.best_step,
                 "over": self.over}
        save_checkpoint(self.root, state.steps_done, state.module, state.optimizer,
                        state.scheduler, state.first_loss, extra)
        keep = {self.root / f"step-{self.best_step:06d}"}
        prune(self.root, self.keep_last, keep)
        self.log({"event": "budget", **asdict(point)})
        self.echo(self._line(point, state.total_steps))
        return self.max_forgetting is not None and self.over >= self.patience

    def _line(self, p: CurvePoint, total: int) -> str:
        old = "" if p.old_mean is None else f", old {p.old_mean:.3f} (drop {p.drop:+.3f})"
        mark = "" if self.max_forgetting is None else (
            "  within budget" if p.within else f"  over budget {self.max_forgetting:g}")
        return f"  step {p.step}/{total}: new {p.new:.3f} ({p.gain:+.3f}){old}{mark}"

    def finish(self, module: torch.nn.Module) -> int | None:
        """Put back the weights of the last step within the budget when the final point is not
        (returns that step), or None when the final weights stand. Refuses when no step after
        the start stayed within the budget."""
        if self.curve[-1].within:
            return None
        if self.best_step == 0:
            first = self.curve[1] if len(self.curve) > 1 else self.curve[-1]
            raise BudgetError(
                f"no evaluated step stayed within the forgetting budget {self.max_forgetting:g}: "
                f"the old tasks already dropped {first.drop:.3f} at step {first.step}. Nothing "
                "was saved. Lower the LR (--lr), evaluate more often (--eval-every), give old "
                "data to replay (--old), or allow more forgetting (--max-forgetting).")
        best = read_checkpoint(self.root / f"step-{self.best_step:06d}")
        load_trainable_state(module, best.params)
        return self.best_step
