"""`continual-lora update`'s default LR across a chain of updates: every update scales the LR
of the lineage's *first* stage, never the previous update's already-scaled one (issue 22,
defect 4: a second update trained at 0.4 × 0.4 of the first stage's LR, a third at 0.064 ×)."""

from __future__ import annotations

from pathlib import Path

import pytest

from continual_lora.config import load_run_config
from continual_lora.runner import run
from continual_lora.update.config import load_update_config
from continual_lora.update.old import OldAdapter
from continual_lora.update.run import update

FIRST_LR, FIRST_BATCH = 1e-2, 8

# -- which stage is "the first", on hand-made lineage records -----------------------------------


def _stage(task: str, lr: float | None, batch: int = 8, update: bool = False) -> dict:
    """A lineage record's fields that `first_stage_train` reads (a merge has train null)."""
    return {"run": {"task": task},
            "train": None if lr is None else {"lr": lr, "batch_size": batch},
            "export": {"kind": "peft_lora", **({"update": {"plan": "x"}} if update else {})}}


def _old(chain: list[dict], record: dict) -> OldAdapter:
    return OldAdapter(path=Path("."), config={}, rank=2, alpha=4.0, targets=["query"],
                      identity={}, lineage={**record, "chain": chain}, lineage_matches=True,
                      heads_dir=None, heads_meta=None)


def test_first_stage_is_the_oldest_trained_stage_that_is_not_an_update():
    run_a, run_b = _stage("a", 2e-3, 16), _stage("b", 3e-3, 16)
    up1, up2 = _stage("c", 8e-4, 4, update=True), _stage("d", 8e-4, 4, update=True)
    # A run's stage 2 (b), updated twice: the first stage is a, not the newest record.
    assert _old([run_a, run_b, up1], up2).first_stage_train == {"lr": 2e-3, "batch_size": 16}
    # A merge (train null) of runs, then an update: the first input's first stage.
    merge = _stage("merge", None)
    assert _old([run_a, run_b], merge).first_stage_train["lr"] == 2e-3
    assert _old([merge, run_a], up1).first_stage_train["lr"] == 2e-3
    # The adapter's own record when it is the only stage (a run's task 1).
    assert _old([], run_a).first_stage_train["lr"] == 2e-3
    # Only updates (of an adapter without lineage): the first stage is unknown, so the recipe
    # assumes the tool's default again instead of scaling the first update's 8e-4.
    assert _old([up1], up2).first_stage_train == {}
    assert _old([], up1).first_stage_train == {}


# -- a real chain: a run, two updates trained, a third planned ------------------------------------


@pytest.fixture(scope="module")
def first_run(tiny_bert, tiny_task_files, tmp_path_factory) -> Path:
    """A run that trained task `a` at lr 1e-2 in batches of 8: the chain's first stage."""
    cfg = {"name": "first", "model": {"name_or_path": str(tiny_bert), "max_length": 32},
           "lora": {"r": 2}, "upstream": {"kind": "none"},
           "train": {"lr": FIRST_LR, "batch_size": FIRST_BATCH, "max_steps": 2,
                     "eval_batch_size": 16},
           "tasks": [{"name": "a", "train": str(tiny_task_files / "a_train.csv"),
                      "eval": str(tiny_task_files / "a_eval.csv")}],
           "output_dir": str(tmp_path_factory.mktemp("first"))}
    return run(load_run_config(None, data=cfg), echo=lambda _: None).run_dir


def _update(adapter: Path, new_train: Path, name: str, out: Path, dry_run: bool = False,
            **extra):
    settings = {"adapter": str(adapter), "new": {"train": str(new_train), "name": name},
                "out": str(out), "steps": 2, "eval_every": 2, "upstream": {"kind": "none"},
                "strategy": "naive", **extra}
    lines: list[str] = []
    result = update(load_update_config(None, settings), echo=lines.append, dry_run=dry_run)
    return result.plan, "\n".join(lines)


def _lr_line(lr: float, scale: float) -> str:
    return (f"  lr            {lr:g} ({scale:g} × the first stage's lr {FIRST_LR:g} (from the "
            "old adapter's lineage))")


def test_every_update_of_a_chain_scales_the_first_stages_lr(first_run, tiny_task_files,
                                                              tmp_path):
    data = tiny_task_files
    # Update 1: default scale 0.4 of the run's 1e-2; its batch is set to 4 by hand.
    plan1, text1 = _update(first_run / "tasks/01-a/adapter", data / "b_train.jsonl", "b",
                           tmp_path / "v2", batch_size=4)
    assert plan1["lr"] == pytest.approx(0.4 * FIRST_LR) and plan1["batch_size"] == 4
    assert _lr_line(0.004, 0.4) in text1
    # Update 2, of update 1's output, at scale 0.5: 0.5 × 1e-2 (not 0.5 × update 1's 4e-3),
    # and the batch is the first stage's 8 again (not update 1's 4).
    plan2, text2 = _update(tmp_path / "v2", data / "a_train.csv", "c", tmp_path / "v3",
                           lr_scale=0.5)
    assert plan2["lineage_stages"] == ["a", "b"]
    assert plan2["lr"] == pytest.approx(0.5 * FIRST_LR)  # the old code: 0.5 × 4e-3 = 2e-3
    assert plan2["batch_size"] == FIRST_BATCH
    assert _lr_line(0.005, 0.5) in text2
    # Update 3, of update 2's output, planned only (planning reads the files that update 2
    # wrote): 0.4 × 1e-2 again (the old code: 0.4 × 2e-3 = 8e-4).
    plan3, text3 = _update(tmp_path / "v3", data / "b_train.jsonl", "d", tmp_path / "v4",
                           dry_run=True)
    assert plan3["lineage_stages"] == ["a", "b", "c"]
    assert plan3["lr"] == pytest.approx(0.4 * FIRST_LR)
    assert plan3["batch_size"] == FIRST_BATCH
    assert _lr_line(0.004, 0.4) in text3
