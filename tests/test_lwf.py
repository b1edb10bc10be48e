"""LwF: the distillation term against hand-computed KLs, the teacher computed once per example
before the task (never during its steps), no term on task 1, and α = 0 reproducing naive."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

import continual_lora.runner as runner_module
from continual_lora.config import load_run_config
from continual_lora.families.classifier import ClassifierModule
from continual_lora.runner import run
from continual_lora.strategies.lwf import LwfStrategy, distillation_loss

LN3 = math.log(3.0)
LN2 = math.log(2.0)


def test_distillation_loss_matches_hand_computed_kl():
    """Two old heads, a batch of two, α = 0.5, T = 2 (so logits are halved before softmax).

    Head 1 (2 classes):
      row 1: teacher [2 ln3, 0] → p_t = [3/4, 1/4]; student [0, 0] → p_s = [1/2, 1/2]
             KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.3040988 − 0.1732868 = 0.1308120
      row 2: teacher [0, 0] → [1/2, 1/2]; student [2 ln3, 0] → [3/4, 1/4]
             KL = 1/2 ln(2/3) + 1/2 ln(2) = −0.2027326 + 0.3465736 = 0.1438410
      batch mean = 0.1373265
    Head 2 (3 classes), both rows: teacher [0, 0, 0] → 1/3 each; student [2 ln2, 0, 0] →
      [1/2, 1/4, 1/4]; KL = 1/3 ln(2/3) + 2/3 ln(4/3) = −0.1351550 + 0.1917881 = 0.0566330
    Sum over heads 0.1939595; × T² = 4 → 0.7758382; × α = 0.5 → 0.3879191.
    """
    student = [torch.tensor([[0.0, 0.0], [2 * LN3, 0.0]]),
               torch.tensor([[2 * LN2, 0.0, 0.0], [2 * LN2, 0.0, 0.0]])]
    teacher = [torch.tensor([[2 * LN3, 0.0], [0.0, 0.0]]), torch.zeros(2, 3)]
    loss = distillation_loss(student, teacher, alpha=0.5, temperature=2.0)
    assert float(loss) == pytest.approx(0.3879191, abs=1e-6)
    # α and T² are plain factors: α = 1, T = 2 is twice that; identical outputs give zero.
    assert float(distillation_loss(student, teacher, 1.0, 2.0)) == pytest.approx(0.7758382,
                                                                                abs=1e-6)
    assert float(distillation_loss(teacher, teacher, 1.0, 2.0)) == pytest.approx(0.0, abs=1e-7)


def _config(tiny_run_config, strategy: str, options: dict | None = None, **model):
    cfg = tiny_run_config(strategy)
    cfg["train"] = {**cfg["train"], "max_steps": None, "epochs": 2}  # 2 × 48 / 8 = 12 steps
    cfg["model"] = {**cfg["model"], **model}
    if options:
        cfg["strategy"]["options"] = options
    return load_run_config(None, data=cfg)


@pytest.fixture
def traced(monkeypatch):
    """Record every call of the feature function (the backbone forward) with the phase it ran
    in: `before_task` (where LwF builds its cache), `train` (the task's steps), or elsewhere
    (prototype heads, scoring). Also keep each task's teacher cache and an independent reference:
    the old head on each training example encoded alone, just before the task's first step."""
    state = {"phase": ("other", 0)}
    calls, teachers, references = [], {}, {}
    real_features = ClassifierModule.features

    def features(self, input_ids, attention_mask, *ids):
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask,
                                                                       strict=True)]
        calls.append({"phase": state["phase"], "grad": torch.is_grad_enabled(),
                      "training": self.training, "rows": rows})
        return real_features(self, input_ids, attention_mask, *ids)

    real_before = LwfStrategy.before_task

    def before_task(self, ctx):
        state["phase"] = ("before_task", ctx.t)
        real_before(self, ctx)
        state["phase"] = ("other", ctx.t)
        teachers[ctx.t] = [t.clone() for t in self.teacher]

    real_train = runner_module.train_task

    def train_task(family, strategy, task, tasks, *args, **kwargs):
        state["phase"] = ("reference", task.index)
        references[task.index] = _reference_teacher(family, task)
        state["phase"] = ("train", task.index)
        stats = real_train(family, strategy, task, tasks, *args, **kwargs)
        state["phase"] = ("other", task.index)
        return stats

    monkeypatch.setattr(ClassifierModule, "features", features)
    monkeypatch.setattr(LwfStrategy, "before_task", before_task)
    monkeypatch.setattr(runner_module, "train_task", train_task)
    return calls, teachers, references


@torch.no_grad()
def _reference_teacher(family, task) -> list[torch.Tensor]:
    """Old outputs on each example encoded alone (no padding, no sorting), eval mode: the old
    per-task heads, or the shared head's rows of the old tasks' classes."""
    module = family.module
    module.eval()
    feats = torch.cat([module.features(torch.tensor([ids]), torch.ones(1, len(ids),
                                                                      dtype=torch.long))
                       for ids in family._tokens(task, "train")])
    module.train()
    if family.cfg.head == "shared":
        n_old = module.offsets.get(task.index, 0)  # old tasks' rows come first
        return [module.head_logits("shared", feats)[:, :n_old]] if n_old else []
    return [module.head_logits(f"task{i}", feats) for i in range(1, task.index)]


def test_teacher_runs_once_per_example_before_the_task_and_never_during_steps(
        tiny_run_config, traced):
    calls, teachers, references = traced
    result = run(_config(tiny_run_config, "lwf"), echo=lambda _: None)
    family = result.family
    task_b = family._tasks[2]
    steps = 12

    # Task 1: no old heads, no teacher pass, empty cache.
    assert not [c for c in calls if c["phase"] == ("before_task", 1)]
    assert teachers[1] == []

    # Task 2: one no-grad, eval-mode pass that encodes each training example exactly once
    # (with epochs = 2, a per-epoch or per-step teacher would encode each one 2+ times).
    teacher_calls = [c for c in calls if c["phase"] == ("before_task", 2)]
    assert teacher_calls and all(not c["grad"] and not c["training"] for c in teacher_calls)
    encoded = Counter(row for c in teacher_calls for row in c["rows"])
    assert encoded == Counter(tuple(ids) for ids in family._tokens(task_b, "train"))
    assert sum(encoded.values()) == len(task_b.train) == 48

    # During the steps the only forwards are the student's: one per step, with grad, in train
    # mode, each of one batch; no teacher forward happens there.
    for t in (1, 2):
        step_calls = [c for c in calls if c["phase"] == ("train", t)]
        assert len(step_calls) == steps
        assert all(c["grad"] and c["training"] and len(c["rows"]) == 8 for c in step_calls)

    # The cache is the model before the task: task 1's head on each example of task 2.
    assert len(teachers[2]) == 1 and teachers[2][0].shape == (48, 2)
    torch.testing.assert_close(teachers[2][0], references[2][0], rtol=0, atol=1e-5)

    # The term is absent on task 1 and present (positive) on task 2, in the logged steps.
    steps_logged = [json.loads(line) for line in (result.run_dir / "log.jsonl").open()]
    steps_logged = [e for e in steps_logged if e["event"] == "step"]
    assert all(e["extra_loss"] is None for e in steps_logged if e["task"] == "a")
    extra_b = [e["extra_loss"] for e in steps_logged if e["task"] == "b"]
    assert extra_b and all(x is not None and x >= 0 for x in extra_b) and max(extra_b) > 0


def test_alpha_zero_reproduces_naive_exactly(tiny_run_config):
    """With α = 0 the term is still computed (teacher pass included) but adds nothing: the
    trained weights are bit-identical to naive's with the same seed, so the teacher pass
    disturbs neither the random state nor the training mode."""
    naive = run(_config(tiny_run_config, "naive"), echo=lambda _: None)
    cfg = _config(tiny_run_config, "lwf", {"alpha": 0.0})
    cfg.name = "tiny-lwf-alpha0"
    lwf = run(cfg, echo=lambda _: None)
    a, b = naive.family.module.state_dict(), lwf.family.module.state_dict()
    assert a.keys() == b.keys()
    assert any("lora_B" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (naive.R == lwf.R).all()


def test_shared_head_distils_the_old_classes_columns(tiny_run_config, traced):
    """Class-incremental head: task 2's teacher is the shared head's rows of task 1's two
    classes (before task 2 adds its own), on each example of task 2."""
    _, teachers, references = traced
    result = run(_config(tiny_run_config, "lwf", head="shared"), echo=lambda _: None)
    assert result.family.module.offsets == {1: 0, 2: 2}
    assert teachers[1] == [] and len(teachers[2]) == 1
    assert teachers[2][0].shape == (48, 2)
    torch.testing.assert_close(teachers[2][0], references[2][0], rtol=0, atol=1e-5)
