"""O-LoRA: the penalty against hand-computed values and a naive loop, and on tiny_bert that the
earlier adapter is frozen (merged into the base by default, or kept active), that both paths train
the same model, that per-task λ1 is used, and that the export is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import continual_lora.runner as runner_module
from continual_lora.adapters import lora_factors
from continual_lora.config import ConfigError, load_run_config
from continual_lora.runner import run
from continual_lora.strategies.olora import (
    OloraStrategy,
    build_penalty_groups,
    group_by_shape,
    orthogonality_penalty,
    squared_l2,
)

T = torch.tensor


def _hand_groups():
    """Two layers, two earlier adapters of rank 1, a new adapter of rank 2, d_in = 3.

    layer l1: A_1 = [1 0 2], A_2 = [0 1 -1], A_t = [[1 1 1], [0 -1 3]]
        A_1 A_tᵀ = [3, 6], A_2 A_tᵀ = [0, -4]   → L1 13, squared 9+36+0+16 = 61
    layer l2: A_1 = [1 1 0], A_2 = [0 0 1], A_t = [[2 0 0], [0 0 -1]]
        A_1 A_tᵀ = [2, 0], A_2 A_tᵀ = [0, -1]   → L1 3, squared 4+1 = 5
    """
    old = {"l1": [T([[1.0, 0, 2]]), T([[0.0, 1, -1]])],
           "l2": [T([[1.0, 1, 0]]), T([[0.0, 0, 1]])]}
    new = {"l1": T([[1.0, 1, 1], [0, -1, 3]], requires_grad=True),
           "l2": T([[2.0, 0, 0], [0, 0, -1]], requires_grad=True)}
    return build_penalty_groups(old, new), new


def test_penalty_hand_computed_both_norms():
    groups, _ = _hand_groups()
    assert len(groups) == 1 and groups[0].old.shape == (2, 2, 3)  # one batched product
    assert float(orthogonality_penalty(groups, "l1").detach()) == 16.0  # 13 + 3
    assert float(orthogonality_penalty(groups, "squared").detach()) == 66.0  # 61 + 5


def test_penalty_gradient_reaches_only_the_new_a():
    groups, new = _hand_groups()
    orthogonality_penalty(groups, "squared").backward()
    # d/dA_t ‖S A_tᵀ‖² = 2 A_t SᵀS; layer l2: S = [[1 1 0], [0 0 1]],
    # SᵀS = [[1 1 0], [1 1 0], [0 0 1]]
    torch.testing.assert_close(new["l2"].grad, T([[4.0, 4, 0], [0, 0, -2]]))
    assert not groups[0].old.requires_grad


def test_lambda2_term_and_combination():
    # θ_t = A (1×2) twice and B (2×1): 1 + 4 + 0 + 1 + 9 + 0 = 15
    params = [T([[1.0, 2]]), T([[0.0, -1]]), T([[3.0], [0]])]
    l2_groups = group_by_shape(params)
    assert len(l2_groups) == 2
    assert float(squared_l2(l2_groups)) == 15.0

    strategy = OloraStrategy(OloraStrategy.Options(lambda1=0.5, lambda2=0.1))
    strategy.groups, _ = _hand_groups()
    strategy.l2_groups, strategy.lambda1_now = l2_groups, 0.5
    assert float(strategy.extra_loss(None, None)) == pytest.approx(0.5 * 16 + 0.1 * 15)
    strategy.lambda1_now = 0.0  # λ1 of this task is 0: only the λ2 term remains
    assert float(strategy.extra_loss(None, None)) == pytest.approx(0.1 * 15)
    strategy.options = OloraStrategy.Options(lambda1=0.0, lambda2=0.0)
    assert strategy.extra_loss(None, None) is None


def test_batched_penalty_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    shapes = {"layer0.q": (2, 5), "layer1.q": (2, 5), "layer0.ffn": (3, 7), "layer1.ffn": (3, 7)}
    old = {k: [torch.randn(s, generator=g) for _ in range(3)] for k, s in shapes.items()}
    new = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    new["fresh"] = torch.randn(4, 5, generator=g)  # a module with no earlier A: no term
    groups = build_penalty_groups(old, new)
    assert sorted(len(gr.new) for gr in groups) == [2, 2]
    for norm, f in (("l1", lambda m: m.abs().sum()), ("squared", lambda m: m.pow(2).sum())):
        naive = sum(f(a_s @ new[k].T) for k in old for a_s in old[k])
        torch.testing.assert_close(orthogonality_penalty(groups, norm), naive)


def _three_task_groups():
    """Task 3's new A against the kept A's of tasks 1 and 2 (d_in = 3, ranks 1, 1, then 2 or 1).

    layer l1: A_1 = [1 2 0], A_2 = [0 0 1], A_3 = [[1 1 0], [3 -1 0]]
        A_1 A_3ᵀ = [3, 1] (not orthogonal to task 1), A_2 A_3ᵀ = [0, 0] (orthogonal to task 2)
    layer l2: A_1 = [1 0 0], A_2 = [0 1 1], A_3 = [[0 2 -1]]
        A_1 A_3ᵀ = [0] (orthogonal to task 1), A_2 A_3ᵀ = [1] (not orthogonal to task 2)
    Against all earlier A's: L1 (3 + 1 + 0 + 0) + (0 + 1) = 5, squared (9 + 1) + 1 = 11.
    Against only the last (A_2): L1 1, squared 1; against only the first (A_1): L1 4, squared 10.
    """
    old = {"l1": [T([[1.0, 2, 0]]), T([[0.0, 0, 1]])],
           "l2": [T([[1.0, 0, 0]]), T([[0.0, 1, 1]])]}
    new = {"l1": T([[1.0, 1, 0], [3, -1, 0]], requires_grad=True),
           "l2": T([[0.0, 2, -1]], requires_grad=True)}
    return build_penalty_groups(old, new), new


def test_three_tasks_penalty_counts_every_earlier_adapter():
    """Task 3 is penalised against A_1 and A_2 both: 'only the last' (1) or 'only the first'
    (4 / 10) give other values than the hand-computed 5 (L1) and 11 (squared)."""
    groups, new = _three_task_groups()
    assert sorted(g.old.shape for g in groups) == [(1, 2, 3), (1, 2, 3)]  # A_1; A_2 stacked
    assert float(orthogonality_penalty(groups, "l1").detach()) == 5.0
    assert float(orthogonality_penalty(groups, "squared").detach()) == 11.0
    orthogonality_penalty(groups, "squared").backward()
    # layer l1: A_3 ⟂ A_2, so the whole gradient is task 1's pull: 2 A_3 SᵀS with
    # S = [A_1; A_2], SᵀS = [[1 2 0], [2 4 0], [0 0 1]]  ->  2 [[3 6 0], [1 2 0]].
    # Against the last adapter only it would be 2 A_3 A_2ᵀA_2 = 0.
    torch.testing.assert_close(new["l1"].grad, T([[6.0, 12, 0], [2, 4, 0]]))
    # layer l2: A_3 ⟂ A_1, the pull is task 2's: 2 (A_3 A_2ᵀ) A_2 = 2 · 1 · [0 1 1].
    torch.testing.assert_close(new["l2"].grad, T([[0.0, 2, 2]]))


@pytest.fixture
def three_task_config(tiny_run_config, tmp_path):
    """tiny_run_config with a third task `c` (person vs location glosses)."""
    from conftest import _write_task

    train, eval_ = _write_task(tmp_path, "c", ["noun.person", "noun.location"], 24, 8, "csv")

    def make(strategy: str) -> dict:
        data = tiny_run_config(strategy)
        data["tasks"].append({"name": "c", "train": str(train), "eval": str(eval_)})
        return data

    return make


@pytest.mark.parametrize("mode", ["merged", "active"])
def test_three_tasks_penalty_groups_hold_both_earlier_adapters(three_task_config, monkeypatch,
                                                               mode):
    """3 tiny tasks, λ1 = [0, 0, 2]: before task 3 every penalty group stacks the kept A_1 and
    A_2 of each module (in task order), and task 3's first step adds
    2 · Σ_modules (Σ|A_1 A_3ᵀ| + Σ|A_2 A_3ᵀ|), which is more than the last adapter's term."""
    expected = {}
    original = OloraStrategy.before_task

    def before_task(self, ctx):
        original(self, ctx)
        if ctx.t != 3:
            return
        f1, f2 = self.finished
        f3 = lora_factors(ctx.family.backbone, "task3")
        assert len(f3) == 4 and set(f1) == set(f2) == set(f3)  # query, value × 2 layers
        seen = []
        for group in self.groups:
            for j, key in enumerate(group.keys):
                torch.testing.assert_close(group.old[j], torch.cat([f1[key].A, f2[key].A]),
                                           rtol=0, atol=0)
                seen.append(key)
        assert sorted(seen) == sorted(f3)
        expected["all"] = 2.0 * float(sum((f[k].A @ f3[k].A.T).abs().sum()
                                          for k in f3 for f in (f1, f2)))
        expected["last"] = 2.0 * float(sum((f2[k].A @ f3[k].A.T).abs().sum() for k in f3))

    monkeypatch.setattr(OloraStrategy, "before_task", before_task)
    data = three_task_config("olora")
    data["strategy"]["options"] = {"lambda1": [0.0, 0.0, 2.0], "frozen_adapters": mode}
    result = run(load_run_config(None, data=data), echo=lambda _: None)
    steps = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    steps = [e for e in steps if e["event"] == "step"]
    assert all(e["extra_loss"] is None for e in steps if e["task"] in ("a", "b"))
    first = next(e for e in steps if e["task"] == "c" and e["step"] == 0)
    assert expected["all"] > 1.01 * expected["last"] > 0
    assert first["extra_loss"] == pytest.approx(expected["all"], rel=1e-5)


def test_lambda1_list_must_match_task_count():
    strategy = OloraStrategy(OloraStrategy.Options(lambda1=[0.0, 0.5, 5.0]))
    assert [strategy.lambda1_for(t, 3) for t in (1, 2, 3)] == [0.0, 0.5, 5.0]
    with pytest.raises(ConfigError, match=r"strategy\.options\.lambda1.*2 tasks.*3 entries"):
        strategy.lambda1_for(1, 2)


def test_wrong_length_list_stops_the_run(tiny_run_config):
    data = tiny_run_config("olora")
    data["strategy"]["options"] = {"lambda1": [0.5]}
    with pytest.raises(ConfigError, match=r"strategy\.options\.lambda1"):
        run(load_run_config(None, data=data), echo=lambda _: None)


def _param_snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


QUERY = "encoder.layer.0.attention.self.query"  # the Linear checked by hand


def _by_hand(x, W0, b, factors):
    """x (W0 + Σ s_i B_i A_i)ᵀ + b, from the original base weight and the given factors."""
    return x @ (W0 + sum(f.scaling * f.B @ f.A for f in factors)).T + b


def test_merged_task2_trains_only_its_adapter_on_the_merged_base(tiny_run_config, tiny_bert,
                                                                  monkeypatch):
    """Default `merged`: during task 2 the PeftModel holds only `task2`, only its LoRA weights
    change, task 1's kept factors do not, and the forward is x(W0 + s1B1A1 + s2B2A2)ᵀ + b."""
    changes, seen = {}, {}
    real_train = runner_module.train_task
    original = AutoModel.from_pretrained(tiny_bert).get_submodule(QUERY)
    W0, b = original.weight.detach(), original.bias.detach()
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))

    def spy_train(family, strategy, task, *args, **kwargs):
        before = _param_snapshot(family.module)
        kept = [{k: (f.A.clone(), f.B.clone()) for k, f in h.items()} for h in strategy.finished]
        stats = real_train(family, strategy, task, *args, **kwargs)
        after = _param_snapshot(family.module)
        changes[task.index] = {n for n in after if not torch.equal(before[n], after[n])}
        seen[task.index] = lora_factors(family.backbone, strategy.adapters[-1])
        if task.index == 2:
            assert kept and all(torch.equal(f.A, kept[0][k][0]) and torch.equal(f.B, kept[0][k][1])
                                for k, f in strategy.finished[0].items())
            layer = family.backbone.get_submodule(f"base_model.model.{QUERY}")
            assert list(layer.lora_A) == ["task2"]  # task 1 lives in the base weight now
            with torch.no_grad():
                torch.testing.assert_close(
                    layer(x), _by_hand(x, W0, b, [strategy.finished[0][QUERY], seen[2][QUERY]]),
                    rtol=0, atol=1e-5)
            seen["strategy"] = strategy
        return stats

    monkeypatch.setattr(runner_module, "train_task", spy_train)
    result = run(load_run_config(None, data=tiny_run_config("olora")), echo=lambda _: None)

    backbone_changed = {n for n in changes[2] if n.startswith("backbone.")}
    assert backbone_changed and all(".lora_" in n and ".task2." in n for n in backbone_changed)
    strategy = seen["strategy"]
    assert strategy.adapters == ["task1", "task2"] and len(strategy.finished) == 2
    for t in (1, 2):  # the kept factors are those trained, and both did train
        f, trained = strategy.finished[t - 1][QUERY], seen[t][QUERY]
        assert torch.equal(f.A, trained.A) and torch.equal(f.B, trained.B)
        assert float((f.B @ f.A).abs().max()) > 0

    # After task 2 both adapters are merged: the Linear is plain, W = W0 + ΔW_1 + ΔW_2.
    layer = result.family.backbone.get_submodule(QUERY)
    assert type(layer) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), _by_hand(x, W0, b, [f[QUERY] for f in strategy.finished]),
            rtol=0, atol=1e-5)

    # The export is one adapter of rank 2 + 2 that plain PEFT loads and that reproduces the model.
    adapter_dir = result.run_dir / "tasks" / "02-b" / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tokenizer(["a small furry animal", "food made from flour and water"],
                      padding=True, return_tensors="pt")
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(adapter_dir))
    with torch.no_grad():
        ours = result.family.backbone.eval()(**batch).last_hidden_state
        theirs = plain.eval()(**batch).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def _exported_deltas(adapter_dir) -> dict[str, torch.Tensor]:
    """s · B A of every module of an exported PEFT adapter folder, by module path."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k.removesuffix(".lora_A.weight"): scaling * tensors[k.replace("lora_A", "lora_B")]
            @ tensors[k] for k in tensors if k.endswith(".lora_A.weight")}


def test_merged_and_active_paths_train_the_same_model(tiny_run_config):
    """Same seed, 2 tiny tasks: `merged` and `active` give the same R and the same exported ΔW
    (up to the float32 rounding of the merge); `active` keeps both adapters on the PeftModel."""
    results = {}
    for mode in ("merged", "active"):
        data = tiny_run_config("olora", name=f"tiny-olora-{mode}")
        data["strategy"]["options"] = {"frozen_adapters": mode}
        results[mode] = run(load_run_config(None, data=data), echo=lambda _: None)

    merged, active = results["merged"], results["active"]
    np.testing.assert_array_equal(merged.R, active.R)
    assert not isinstance(merged.family.backbone, PeftModel)
    layer = active.family.backbone.get_submodule(f"base_model.model.{QUERY}")
    assert layer.active_adapters == ["task1", "task2"]
    for stage in ("01-a", "02-b"):
        ours = _exported_deltas(merged.run_dir / "tasks" / stage / "adapter")
        theirs = _exported_deltas(active.run_dir / "tasks" / stage / "adapter")
        assert ours.keys() == theirs.keys() and len(ours) == 4  # query, value × 2 layers
        for key in ours:
            assert float(ours[key].abs().max()) > 0
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["merged", "active"])
def test_per_task_lambda1_is_used(tiny_run_config, monkeypatch, mode):
    """λ1 = [0, 2]: task 1 adds nothing; task 2's first step adds 2 · Σ |A_1 A_2ᵀ| exactly, with
    A_1 the kept factor also when task 1 is merged into the base."""
    expected = {}
    original = OloraStrategy.before_task

    def before_task(self, ctx):
        original(self, ctx)
        if ctx.t == 2:
            peft = ctx.family.backbone
            assert ("task1" in peft.peft_config) == (mode == "active")
            f1, f2 = self.finished[0], lora_factors(peft, "task2")
            expected[2] = 2.0 * float(sum((f1[k].A @ f2[k].A.T).abs().sum() for k in f2))

    monkeypatch.setattr(OloraStrategy, "before_task", before_task)
    data = tiny_run_config("olora")
    data["strategy"]["options"] = {"lambda1": [0.0, 2.0], "frozen_adapters": mode}
    result = run(load_run_config(None, data=data), echo=lambda _: None)
    steps = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    steps = [e for e in steps if e["event"] == "step"]
    first = {e["task"]: e for e in steps if e["step"] == 0}
    assert all(e["extra_loss"] is None for e in steps if e["task"] == "a")
    assert expected[2] > 0
    assert first["b"]["extra_loss"] == pytest.approx(expected[2], rel=1e-5)
