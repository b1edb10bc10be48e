"""Every registered strategy on two tiny tasks: finite loss, only the intended parameters change,
hooks in order, and the run folder it leaves. Plus the math of Merge & Init and of replay's mix."""

from __future__ import annotations

import math

import pytest
import torch

import continual_lora.runner as runner_module
from continual_lora.config import load_run_config
from continual_lora.registry import get_strategy, strategy_names
from continual_lora.runner import run

HOOKS = ["before_task", "heads", "sources", "learning_rate", "extra_loss", "after_task",
         "export_adapter"]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _base_name(name: str) -> str:
    """Parameter name with PEFT's wrapping removed: backbone.base_model.model.x.base_layer.w →
    backbone.x.w, so base weights can be compared before and after an adapter is attached."""
    return (name.replace("base_model.model.", "").replace(".base_layer", ""))


@pytest.fixture
def recorded(monkeypatch):
    """Record hook calls and, around each task's training, which parameters changed."""
    calls: list[tuple[int | None, str]] = []
    changes: list[dict] = []

    def spy_hooks(cls):
        for hook in HOOKS:
            original = getattr(cls, hook)

            def wrapper(self, *args, _hook=hook, _original=original, **kwargs):
                ctx = args[0] if args and hasattr(args[0], "task") else None
                calls.append((ctx.t if ctx else None, _hook))
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, hook, wrapper)

    real_train = runner_module.train_task

    def spy_train(family, strategy, task, *args, **kwargs):
        before = _snapshot(family.module)
        stats = real_train(family, strategy, task, *args, **kwargs)
        after = _snapshot(family.module)
        changed = {n for n in after if n in before and not torch.equal(before[n], after[n])}
        changes.append({"task": task.index, "changed": changed,
                        "trainable": {n for n, p in family.module.named_parameters()
                                      if p.requires_grad}, "stats": stats})
        return stats

    monkeypatch.setattr(runner_module, "train_task", spy_train)
    return spy_hooks, calls, changes


# Every strategy on three bases: the tiny BERT (Linear LoRA), the same BERT stored in bfloat16
# (merges must add in float32; losses must stay finite), and a tiny ResNet whose LoRA targets
# are convolutions (PEFT's Conv2d factors: every strategy that reads ΔW must handle them).
BASES = ["bert", "bert-bf16", "resnet-conv"]
# Refused on a base by design, with the message that says so (checked below).
REFUSED = {("moe", "resnet-conv"): "image model"}


def _contract_config(base, name, tiny_run_config, tiny_resnet_run_config) -> dict:
    if base == "resnet-conv":
        return tiny_resnet_run_config(name)
    cfg = tiny_run_config(name)
    if base == "bert-bf16":
        cfg["model"]["dtype"] = "bfloat16"
    return cfg


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", strategy_names())
def test_strategy_contract(name, base, tiny_run_config, tiny_resnet_run_config, recorded):
    spy_hooks, calls, changes = recorded
    spy_hooks(get_strategy(name))
    cfg = load_run_config(None, data=_contract_config(base, name, tiny_run_config,
                                                      tiny_resnet_run_config))
    if (name, base) in REFUSED:
        from continual_lora.config import ConfigError

        with pytest.raises(ConfigError, match=REFUSED[name, base]):
            run(cfg, echo=lambda _: None)
        return
    result = run(cfg, echo=lambda _: None)

    # Hooks in order, per task; extra_loss once per step.
    for t in (1, 2):
        seq = [h for task, h in calls if task == t]
        assert seq[:4] == ["before_task", "heads", "sources", "learning_rate"]
        assert seq[-2:] == ["after_task", "export_adapter"]
    assert sum(1 for _, h in calls if h == "extra_loss") == 2 * 4  # 2 tasks × max_steps 4

    # Finite loss, something trainable, and what changed is what should change.
    for change in changes:
        stats = change["stats"]
        assert stats.steps == 4 and math.isfinite(stats.first_loss)
        assert math.isfinite(stats.last_loss) and stats.trainable_parameters > 0
        changed, t = change["changed"], change["task"]
        assert changed <= change["trainable"], "a frozen parameter changed"
        heads = {n for n in changed if n.startswith("heads.")}
        backbone = changed - heads
        assert backbone, "training did not change the backbone/adapter"
        if get_strategy(name).uses_lora:
            assert all("lora_" in n for n in backbone), f"base weights trained: {backbone}"
        else:
            assert any("lora_" not in n for n in backbone)
        if name == "joint":
            assert heads == {f"heads.task{i}.{w}" for i in range(1, t + 1)
                             for w in ("weight", "bias")}
        else:
            assert heads == {f"heads.task{t}.weight", f"heads.task{t}.bias"}

    assert result.R.shape == (3, 2) and ((result.R >= 0) & (result.R <= 1)).all()
    files = {p.relative_to(result.run_dir).as_posix() for p in result.run_dir.rglob("*")
             if p.is_file()}
    for stage in ("tasks/01-a", "tasks/02-b"):
        assert f"{stage}/heads.safetensors" in files and f"{stage}/stage.json" in files
    if get_strategy(name).uses_lora:
        assert "tasks/01-a/adapter/adapter_model.safetensors" in files
        assert {f"tasks/{s}/adapter/lineage.json" for s in ("01-a", "02-b")} <= files
    else:
        assert "tasks/02-b/model/model.safetensors" in files
        assert "tasks/02-b/model/lineage.json" in files


def test_merge_reinit_merges_exactly_delta_w(tiny_run_config, monkeypatch):
    """After a task, W0 ← W0 + s·B·A: the merged weight equals the old one plus the update."""
    from continual_lora.adapters import lora_factors
    from continual_lora.strategies.merge_reinit import MergeReinitStrategy

    seen = []
    original = MergeReinitStrategy.after_task

    def after_task(self, ctx):
        peft = ctx.family.backbone
        factors = lora_factors(peft)
        key = next(iter(factors))
        base_w = peft.get_submodule(f"base_model.model.{key}").base_layer.weight.detach().clone()
        original(self, ctx)
        merged = ctx.family.backbone.get_submodule(key).weight.detach().clone()
        seen.append((merged, base_w + factors[key].delta()))

    monkeypatch.setattr(MergeReinitStrategy, "after_task", after_task)
    run(load_run_config(None, data=tiny_run_config("merge_reinit")), echo=lambda _: None)
    assert len(seen) == 2
    for merged, expected in seen:
        torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_replay_stream_holds_buffer_of_old_task(tiny_run_config):
    cfg = load_run_config(None, ["strategy.options.buffer_size=6",
                                 "strategy.options.selection=class_balanced"],
                          data=tiny_run_config("replay"))
    result = run(cfg, echo=lambda _: None)
    import json

    plan = json.loads((result.run_dir / "plan.json").read_text())
    mix2 = {row["source"]: row for row in plan[1]["mix"]}
    assert mix2["a"]["role"] == "replay" and mix2["a"]["examples"] == 6
    assert mix2["b"]["role"] == "new" and mix2["b"]["examples"] == 48
    assert mix2["b"]["share"] == pytest.approx(48 / 54)


def test_zero_trainable_parameters_is_refused(tiny_run_config, monkeypatch):
    from continual_lora.strategies.naive import NaiveStrategy
    from continual_lora.trainer import TrainingError

    def freeze_everything(self, ctx):
        from continual_lora.strategies.base import ensure_adapter

        ensure_adapter(ctx)
        ctx.family.backbone.requires_grad_(False)

    monkeypatch.setattr(NaiveStrategy, "before_task", freeze_everything)
    with pytest.raises(TrainingError, match="0 trainable parameters"):
        run(load_run_config(None, data=tiny_run_config("naive")), echo=lambda _: None)
