"""`continual-lora update` on the tiny BERT: the recipe's defaults against hand-computed values,
the plan, the files, the lineage, the forgetting budget's stop-and-restore, exact resume after
SIGKILL, and the errors that must leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from continual_lora.cli import main
from continual_lora.config import load_run_config
from continual_lora.lineage import verify
from continual_lora.resume import checkpoints, latest_checkpoint, read_checkpoint, save_checkpoint
from continual_lora.runner import run
from continual_lora.trainer import LoopState
from continual_lora.update import recipe
from continual_lora.update.budget import BudgetError, BudgetHook
from continual_lora.update.config import load_update_config
from continual_lora.update.run import update

# -- the recipe, by hand ---------------------------------------------------------------------------


def test_repeats_give_the_asked_share():
    # 10 new, 20 old, half and half: new ×2, old ×1 → 20 / 40.
    assert recipe.repeats_for_share(10, 20, 0.5) == (2, 1, 0.5)
    # 10 and 10 at 75 % new: ×3 and ×1 → 30 / 40.
    assert recipe.repeats_for_share(10, 10, 0.75) == (3, 1, 0.75)
    # Seed 000's "20 old + 10 new, double the repeats of the new": share 20 / 40.
    r_new, r_old, share = recipe.repeats_for_share(10, 20, 0.5)
    assert (r_new, r_old) == (2, 1) and share == pytest.approx(0.5)
    # 590 new and 480 old at one half: ×1/×1 gives 55.1 % and ×3/×4 gives 1770 / 3690 =
    # 47.97 %, both outside 2 points; the smallest pair within is ×4/×5: 2360 / 4760 = 49.6 %.
    r_new, r_old, share = recipe.repeats_for_share(590, 480, 0.5)
    assert (r_new, r_old) == (4, 5) and share == pytest.approx(2360 / 4760)
    # No old data: everything is new.
    assert recipe.repeats_for_share(10, 0, 0.5) == (1, 1, 1.0)
    # An unreachable share is approached as closely as 16 repeats allow: 10·16 / (10·16 + 1000).
    r_new, r_old, share = recipe.repeats_for_share(10, 1000, 0.5)
    assert (r_new, r_old) == (16, 1) and share == pytest.approx(160 / 1160)


def test_steps_lr_and_auto_defaults():
    # 3 passes over 600 new examples at 50 % of batches of 32: ceil(1800 / 16) = 113.
    assert recipe.steps(None, 600, 0.5, 32).value == 113
    assert recipe.steps(None, 40, 1.0, 32).value == 100  # clamped up to 100
    assert recipe.steps(None, 10_000, 0.5, 32).value == 300  # clamped down to 300
    assert recipe.steps(7, 600, 0.5, 32).value == 7
    assert recipe.learning_rate(None, 2e-4, 0.4).value == pytest.approx(8e-5)
    unknown = recipe.learning_rate(None, None, 0.5)
    assert unknown.value == pytest.approx(5e-4) and "no lineage" in unknown.why
    assert recipe.auto_strategy(True, True).value == "replay"
    assert recipe.auto_strategy(False, True).value == "lwf"
    assert recipe.auto_strategy(False, False).value == "merge_reinit"
    assert recipe.eval_every(None, 113).value == 11 and recipe.eval_every(None, 40).value == 10


# -- the budget hook on a real module, optimizer and checkpoint files ------------------------------


def _loop_state(module, optimizer, scheduler, step: int) -> LoopState:
    return LoopState(step, 100, module, optimizer, scheduler, 1.0, 1.0)


def test_budget_stops_after_patience_and_restores_the_last_step_within(tmp_path):
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    # Old score before: 0.90. Drops: 0.01 (in), 0.02 (in, the edge), 0.03 (out), 0.05 (out).
    old_scores = iter([0.89, 0.88, 0.87, 0.85])
    new_scores = iter([0.5, 0.6, 0.7, 0.8])
    lines = []
    hook = BudgetHook(10, lambda: {"a": next(old_scores)}, lambda: next(new_scores),
                      {"a": 0.90}, 0.4, max_forgetting=0.02, patience=2,
                      checkpoint_root=tmp_path / "ck", keep_last=1, echo=lines.append,
                      log=lambda e: None)
    weights_at = {}
    stops = []
    for step in (10, 20, 30, 40):
        with torch.no_grad():
            module.weight.fill_(float(step))  # stands for training between evaluations
        weights_at[step] = module.weight.detach().clone()
        stops.append(hook(_loop_state(module, optimizer, scheduler, step)))
    assert stops == [False, False, False, True]  # two evaluations in a row over the budget
    assert [p.within for p in hook.curve] == [True, True, True, False, False]
    assert hook.best_step == 20
    # Kept: the newest checkpoint (keep_last=1) and the budget's best.
    assert [p.name for p in checkpoints(tmp_path / "ck")] == ["step-000020", "step-000040"]
    assert hook.finish(module) == 20
    assert torch.equal(module.weight, weights_at[20])
    assert "over budget 0.02" in lines[-1] and "drop +0.050" in lines[-1]


def test_budget_refuses_when_only_the_start_is_within(tmp_path):
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    hook = BudgetHook(5, lambda: {"a": 0.5}, lambda: 0.9, {"a": 0.9}, 0.5, max_forgetting=0.01,
                      patience=1, checkpoint_root=tmp_path / "ck", keep_last=2,
                      echo=lambda _: None, log=lambda e: None)
    assert hook(_loop_state(module, optimizer, scheduler, 5)) is True
    with pytest.raises(BudgetError, match="dropped 0.400 at step 5. Nothing was saved"):
        hook.finish(module)


def test_a_corrupted_checkpoint_is_skipped_with_its_name(tmp_path):
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    module(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path, 4, module, optimizer, scheduler, 0.7, {"k": 1})
    newest = save_checkpoint(tmp_path, 8, module, optimizer, scheduler, 0.7)
    good = read_checkpoint(tmp_path / "step-000004")
    assert good.steps_done == 4 and good.extra == {"k": 1} and good.first_loss == 0.7
    assert torch.equal(good.params["weight"], module.weight.detach())
    data = bytearray((newest / "state.pt").read_bytes())
    data[-10] ^= 0xFF  # one flipped byte
    (newest / "state.pt").write_bytes(bytes(data))
    messages = []
    state = latest_checkpoint(tmp_path, messages.append)
    assert state.steps_done == 4
    assert "step-000008" in messages[0] and "sha256" in messages[0]


# -- update on the tiny BERT -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def old_run(tiny_bert, tiny_task_files, tmp_path_factory) -> Path:
    """A run that trained task `a` (animal vs plant): the adapter to update."""
    cfg = {"name": "old", "model": {"name_or_path": str(tiny_bert), "max_length": 32},
           "lora": {"r": 2}, "upstream": {"kind": "none"},
           "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 6, "eval_batch_size": 16},
           "tasks": [{"name": "a", "train": str(tiny_task_files / "a_train.csv"),
                      "eval": str(tiny_task_files / "a_eval.csv")}],
           "output_dir": str(tmp_path_factory.mktemp("old"))}
    return run(load_run_config(None, data=cfg), echo=lambda _: None).run_dir


def _settings(old_run, tiny_task_files, out, **extra) -> dict:
    return {"adapter": str(old_run / "tasks" / "01-a" / "adapter"),
            "new": {"train": str(tiny_task_files / "b_train.jsonl"), "name": "b"},
            "out": str(out), "steps": 8, "eval_every": 4, "upstream": {"kind": "none"},
            **extra}


def test_update_without_old_data_writes_adapter_report_and_lineage(old_run, tiny_task_files,
                                                                   tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    out = tmp_path / "v2"
    lines: list[str] = []
    result = update(load_update_config(None, _settings(old_run, tiny_task_files, out)),
                    echo=lines.append)
    text = "\n".join(lines)
    plan = result.plan
    assert plan["strategy"] == "lwf" and plan["strategy_why"].startswith("auto: no old data")
    assert plan["lr"] == pytest.approx(0.4 * 1e-2)  # 0.4 × the first stage's lr, from lineage
    assert plan["batch_size"] == 8 and plan["steps"] == 8
    assert plan["lora"] == {"r": 2, "alpha": 4.0, "target_modules": ["query", "value"]}
    assert plan["trainable_parameters"] > 0
    assert plan["old_tasks"] == [{"task": "a", "classes": 2, "train": 0, "held_out": 10,
                                  "scored_on": "probe"}]
    assert "matches the old adapter's lineage" in text and "update plan" in text
    assert "before/after:" in text
    for name in ("adapter_config.json", "adapter_model.safetensors", "lineage.json",
                 "heads.json", "heads.safetensors", "update_plan.json", "update_config.yaml",
                 "update_report.json", "update_report.md", "budget_curve.csv",
                 "budget_curve.png", "flips.jsonl", "log.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists() and not list(out.glob(".adapter*"))
    report = json.loads((out / "update_report.json").read_text())
    # The probe is the old model's own predictions: 1.0 before by construction.
    assert report["old"][0]["scored_on"] == "probe" and report["old"][0]["before"] == 1.0
    assert [p["step"] for p in report["budget"]["curve"]] == [0, 4, 8]
    lineage = json.loads((out / "lineage.json").read_text())
    old_lineage = json.loads((old_run / "tasks/01-a/adapter/lineage.json").read_text())
    assert lineage["parent"]["sha256"] == old_lineage["adapter"]["sha256"]
    assert [c["run"]["task"] for c in lineage["chain"]] == ["a"]
    assert lineage["strategy"]["name"] == "lwf" and lineage["run"]["task"] == "b"
    assert lineage["export"]["update"]["strategy_why"].startswith("auto")
    assert verify(out, lineage)  # the heads beside the adapter files are not part of its hash
    # The folder is a plain PEFT adapter: it loads on the base and changes its output.
    base = AutoModel.from_pretrained(old_lineage["base_model"]["resolved_path"])
    ids = torch.tensor([[101, 2023, 2003, 102]])
    plain = base(input_ids=ids).last_hidden_state.clone()
    adapted = PeftModel.from_pretrained(base, str(out))(input_ids=ids).last_hidden_state
    assert not torch.allclose(plain, adapted)


def test_update_with_old_data_replays_it_at_the_asked_share(old_run, tiny_task_files, tmp_path):
    settings = _settings(old_run, tiny_task_files, tmp_path / "v2",
                         old=[{"train": str(tiny_task_files / "a_train.csv")}], new_share=0.75)
    result = update(load_update_config(None, settings), echo=lambda _: None)
    plan = result.plan
    assert plan["strategy"] == "replay"
    # 38 new and 38 old training examples (10 of a's 48 held out): ×3 and ×1 → 75 %.
    assert plan["repeats"] == {"new": 3, "old": 1, "new_share_requested": 0.75,
                               "new_share": 0.75}
    assert [(m["source"], m["role"], m["share"]) for m in plan["mix"]] == [
        ("b", "new", 0.75), ("a", "replay", 0.25)]
    # a_train.csv's 48 rows: 10 held out to measure forgetting, never trained on; 38 replayed.
    assert plan["old_tasks"][0] == {"task": "a", "classes": 2, "train": 38, "held_out": 10,
                                    "scored_on": "held-out"}
    assert result.report["old"][0]["flips"]["examples"] == 10


def test_dry_run_prints_the_plan_and_writes_nothing(old_run, tiny_task_files, tmp_path, capsys):
    out = tmp_path / "v2"
    code = main(["update", "--adapter", str(old_run), "--new",
                 str(tiny_task_files / "b_train.jsonl"), "--out", str(out), "--dry-run",
                 "--steps", "8"])
    printed = capsys.readouterr().out
    assert code == 0 and "update plan" in printed and "dry run" in printed
    assert "old adapter" in printed and "01-a/adapter" in printed  # a run folder → last stage
    assert not out.exists()


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    """The tiny BERT's architecture with other weights, and a wider one (other shapes)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    out = {}
    for name, hidden, seed in (("same_shapes", 32, 1), ("wider", 48, 0)):
        folder = tmp_path_factory.mktemp(name)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=128)
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        out[name] = folder
    return out


def test_bad_updates_are_refused_with_nothing_written(old_run, tiny_task_files, other_bases,
                                                      tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    new = str(tiny_task_files / "b_train.jsonl")
    adapter = str(old_run / "tasks" / "01-a" / "adapter")
    cases = [
        (["--base", str(other_bases["same_shapes"])], "fingerprint"),
        (["--base", str(other_bases["wider"]), "--allow-base-mismatch"], "does not fit the base"),
        (["--rank", "4"], "requested r 4 (old adapter: 2) differs"),
        (["--rank", "4", "--change-lora"], "continues training the old adapter itself"),
        (["--new", str(empty)], "holds no examples"),
        (["--strategy", "replay"], "trains on old data, and none was given"),
        (["--strategy", "moe"], "cannot be used by update"),
        (["--max-forgetting", "0.02", "--new-share", "0.5"], "needs old data to mix with"),
        (["--adapter", str(tmp_path)], "is not a PEFT adapter folder"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        argv = ["update", "--adapter", adapter, "--new", new, "--out", str(out), "--steps", "4",
                *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
        assert not out.exists(), extra


def test_an_existing_out_is_never_overwritten(old_run, tiny_task_files, tmp_path, capsys):
    out = tmp_path / "v2"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["update", "--adapter", str(old_run), "--new", str(tiny_task_files / "b_train.jsonl"),
            "--out", str(out), "--steps", "4"]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def _adapter_bytes(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(old_run, tiny_task_files,
                                                             tmp_path, capsys):
    """Kill an update with SIGKILL after a checkpoint, resume it: the adapter and the report's
    scores are bit-identical to an uninterrupted update (CPU, deterministic math)."""
    common = ["--adapter", str(old_run), "--new", str(tiny_task_files / "b_train.jsonl"),
              "--new-name", "b", "--old", str(tiny_task_files / "a_train.csv"),
              "--steps", "400", "--eval-every", "4", "--lr", "5e-3"]
    whole = tmp_path / "whole"
    assert main(["update", *common, "--out", str(whole)]) == 0
    assert f"report: {whole / 'report.html'}" in capsys.readouterr().out
    page = (whole / "report.html").read_text()
    assert "Before and after the update" in page and 'data-file="budget_curve.png"' in page
    assert 'data-file="figures/training_loss.png"' in page and "Lineage" in page
    assert list((whole / "tensorboard").rglob("events.out.tfevents.*"))
    killed = tmp_path / "killed"
    # The same thread count as this process: a different one changes float summation order.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "continual_lora.cli", "update", *common,
                             "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000040").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the update ended before the kill"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "update_report.json").exists()  # it really was interrupted
    capsys.readouterr()
    # Resuming with other settings or data is refused, naming what changed.
    assert main(["update", "--resume", str(killed), "--steps", "500"]) == 2
    err = capsys.readouterr().err
    assert "steps: planned 400, now 500" in err and "start a new stage" in err
    assert main(["update", "--resume", str(killed), "--new",
                 str(tiny_task_files / "a_train.csv")]) == 2
    assert "data: planned" in capsys.readouterr().err
    # The exact resume.
    assert main(["update", "--resume", str(killed)]) == 0
    assert "resuming at step" in capsys.readouterr().out
    a, b = _adapter_bytes(whole), _adapter_bytes(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report_a = json.loads((whole / "update_report.json").read_text())
    report_b = json.loads((killed / "update_report.json").read_text())
    assert report_a["old"] == report_b["old"] and report_a["new"] == report_b["new"]
    assert report_a["budget"]["curve"] == report_b["budget"]["curve"]
    # A finished update cannot be resumed; it can be updated from.
    assert main(["update", "--resume", str(killed)]) == 2
    assert "that update finished" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["naive", "replay", "joint", "lwf", "olora", "merge_reinit",
                                      "ortho_init", "magmax", "merge"])
def test_every_updatable_strategy_writes_a_loadable_adapter(strategy, old_run, tiny_task_files,
                                                            tmp_path):
    """Each strategy adopts the old adapter and trains the new stage; the exported adapter loads
    on the base as a plain PEFT adapter and gives the scores the report recorded."""
    from peft import PeftModel

    from continual_lora.config import ModelConfig
    from continual_lora.evaluate import load_heads
    from continual_lora.families.classifier import ClassifierFamily

    out = tmp_path / strategy
    settings = _settings(old_run, tiny_task_files, out, strategy=strategy, steps=4,
                         old=[{"train": str(tiny_task_files / "a_train.csv")}])
    result = update(load_update_config(None, settings), echo=lambda _: None)
    assert result.plan["strategy"] == strategy
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["strategy"]["name"] == strategy and lineage["parent"] is not None
    # Reload base + adapter + heads as a user would, and score the new task's held-out split.
    family = ClassifierFamily(ModelConfig(name_or_path=lineage["base_model"]["name_or_path"],
                                          max_length=32))
    family.load()
    family.set_backbone(PeftModel.from_pretrained(family.backbone, str(out)))
    family.module.eval()
    meta = load_heads(family, out)
    assert [t["name"] for t in meta["tasks"]] == ["a", "b"]
    exact = strategy not in ("magmax", "merge")  # those export an SVD approximation
    if exact:
        from continual_lora.update.data import load_tasks
        from continual_lora.update.old import read_old_adapter

        cfg = load_update_config(None, settings)
        tasks, _ = load_tasks(cfg, read_old_adapter(old_run).head_tasks)
        for t in tasks:
            family._tasks[t.index] = t
        scores = [family.score_task(t, True, 16).score for t in tasks]
        report = result.report
        assert scores == pytest.approx([report["old"][0]["after"], report["new"]["after"]])


@pytest.mark.parametrize("kept", [0, 2])
def test_an_empty_or_partial_adapter_file_is_refused(kept, old_run, tiny_task_files, tmp_path,
                                                     capsys):
    """PEFT only warns when an adapter file lacks tensors (they stay B = 0: a silent no-op)."""
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(old_run / "tasks" / "01-a" / "adapter", broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    save_file(dict(list(sorted(tensors.items()))[:kept]), str(broken / "adapter_model.safetensors"))
    out = tmp_path / "out"
    assert main(["update", "--adapter", str(broken), "--new",
                 str(tiny_task_files / "b_train.jsonl"), "--out", str(out), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    applied = {0: 0, 2: 1}[kept]  # the first two sorted keys are one module's A and B
    assert f"applied {applied} of the 4 LoRA modules" in err and "partial load" in err
    assert not out.exists()


def test_zero_trainable_parameters_is_refused_before_anything_is_written(
        old_run, tiny_task_files, tmp_path, capsys, monkeypatch):
    """A strategy setup that leaves nothing trainable (fault injected: the adapter frozen)."""
    from continual_lora.strategies.naive import NaiveStrategy

    monkeypatch.setattr(NaiveStrategy, "before_task",
                        lambda self, ctx: ctx.family.backbone.requires_grad_(False))
    out = tmp_path / "out"
    assert main(["update", "--adapter", str(old_run), "--new",
                 str(tiny_task_files / "b_train.jsonl"), "--out", str(out), "--steps", "4",
                 "--strategy", "naive"]) == 2
    assert "0 trainable adapter parameters" in capsys.readouterr().err
    assert not out.exists()
