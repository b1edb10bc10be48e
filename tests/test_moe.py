"""moe: prototype routing and top-k weights against hand-computed values, the mixture's exact
equality with the chosen adapter, only task t's adapter training, the oracle's routing accuracy,
the routing accuracy and router state in the run folder, and a learned gate above chance."""

from __future__ import annotations

import csv
import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import continual_lora.runner as runner_module
from continual_lora.adapters import make_lora_config
from continual_lora.config import ModelConfig, load_run_config
from continual_lora.families.classifier import ClassifierModule, pool_hidden
from continual_lora.runner import run
from continual_lora.sequence import load_sequence
from continual_lora.strategies.moe import (
    AdapterMixture,
    Router,
    cosine_scores,
    router_embedding,
    routing_accuracy,
    top_k_weights,
    train_gate,
)

# -- routing math ---------------------------------------------------------------------------------


def test_prototype_routing_on_hand_built_embeddings():
    """Prototypes p1 = (1, 0), p2 = (3, 4), p3 = (0, 1), p4 = (-1, 0) (unnormalised on purpose:
    cosine ignores length).
    x1 = (2, 0): cosines 1, 0.6, 0, -1 → nearest p1; top-2 {p1, p2}.
    x2 = (0, 5): cosines 0, 0.8, 1, 0 → nearest p3; top-2 {p3, p2}.
    T = 0.4 / ln 3: for x1 the odds p1 : p2 are e^{(1-0.6)/T} = 3 → weights 3/4, 1/4;
    for x2 the odds p3 : p2 are e^{(1-0.8)/T} = √3 → weights √3/(1+√3), 1/(1+√3)."""
    prototypes = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    scores = cosine_scores(x, prototypes)
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.6, 0.0, -1.0],
                                                     [0.0, 0.8, 1.0, 0.0]]))
    nearest = top_k_weights(scores, top_k=1, temperature=0.1)
    assert torch.equal(nearest, torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]]))

    t = 0.4 / math.log(3.0)
    s3 = math.sqrt(3.0)
    expected = torch.tensor([[0.75, 0.25, 0.0, 0.0], [0.0, 1 / (1 + s3), s3 / (1 + s3), 0.0]])
    torch.testing.assert_close(top_k_weights(scores, 2, t), expected, rtol=0, atol=1e-6)
    router = Router("prototype", top_k=2, temperature=t, prototypes=prototypes)
    torch.testing.assert_close(router.weights(x), expected, rtol=0, atol=1e-6)
    # k larger than the number of adapters mixes all of them; weights always sum to 1
    assert torch.allclose(top_k_weights(scores, 9, t).sum(-1), torch.ones(2))


def test_routing_accuracy_counts_own_adapter():
    """3 of 4 examples of task index 1 routed to adapter 1; -1 (base) counts as wrong."""
    assert routing_accuracy(torch.tensor([1, 1, 0, 1]), own=1) == 0.75
    assert routing_accuracy(torch.tensor([-1, 0]), own=0) == 0.5


def test_learned_gate_separates_two_clusters():
    """Two tasks whose features sit around e1 and e2 (noise 0.1): a linear gate trained on 32
    buffered features per task routes fresh ones far above chance (0.5)."""
    gen = torch.Generator().manual_seed(0)

    def cluster(axis: int, n: int) -> torch.Tensor:
        centre = F.one_hot(torch.tensor(axis), 8).float()
        return F.normalize(centre + 0.1 * torch.randn(n, 8, generator=gen), dim=-1)

    feats = torch.cat([cluster(0, 32), cluster(1, 32)])
    labels = torch.cat([torch.zeros(32), torch.ones(32)]).long()
    gate = train_gate(feats, labels, n_tasks=2, hidden=0, epochs=30, lr=1e-2, seed=0)
    router = Router("learned", top_k=1, temperature=1.0, gate=gate)
    for own, axis in ((0, 0), (1, 1)):
        choices = router.weights(cluster(axis, 50)).argmax(-1)
        assert routing_accuracy(choices, own) >= 0.95


# -- the mixture on a real PeftModel --------------------------------------------------------------


TEXTS = ["a small dog", "the red car drives fast", "tea", "an old oak tree in the park",
         "she sings", "boiled rice with beans and salt"]


@pytest.fixture(scope="module")
def two_adapters(tiny_bert):
    """tiny_bert with adapters task1 and task2, B filled with random values so they differ."""
    base = AutoModel.from_pretrained(tiny_bert).eval()
    config = make_lora_config(2, 4, 0.0, ["query", "value"])
    torch.manual_seed(1)
    peft_model = get_peft_model(base, config, adapter_name="task1")
    peft_model.add_adapter("task2", make_lora_config(2, 4, 0.0, ["query", "value"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return peft_model.eval(), enc["input_ids"], enc["attention_mask"]


def _hidden(peft_model, adapter, ids, mask):
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
        peft_model.set_adapter(adapter)
        return peft_model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_mixture_top1_features_equal_the_chosen_adapter_exactly(two_adapters):
    peft_model, ids, mask = two_adapters
    cfg = ModelConfig(name_or_path="unused")
    pool = partial(pool_hidden, cfg=cfg)
    emb = router_embedding(_hidden(peft_model, None, ids, mask), mask, pool)
    prototypes = emb[[0, 3]]  # example 0 is nearest to adapter 0, example 3 to adapter 1
    mixture = AdapterMixture(peft_model, ["task1", "task2"], pool,
                             Router("prototype", 1, 0.1, prototypes))
    with torch.no_grad():
        mixed = mixture(input_ids=ids, attention_mask=mask).last_hidden_state
        mixed_feats = ClassifierModule(mixture, cfg).features(ids, mask)
    assert len(mixture.choices) == 2  # one record per forward call (hidden, then features)
    choices = mixture.choices[0]
    assert torch.equal(mixture.choices[1], choices)
    assert torch.equal(choices, cosine_scores(emb, prototypes).argmax(-1))
    assert choices[0] == 0 and choices[3] == 1
    for j, name in enumerate(["task1", "task2"]):
        rows = torch.nonzero(choices == j).squeeze(-1)
        own = _hidden(peft_model, name, ids[rows], mask[rows])
        assert torch.equal(mixed[rows], own)
        with torch.no_grad():
            own_feats = ClassifierModule(peft_model, cfg).features(ids[rows], mask[rows])
        assert torch.equal(mixed_feats[rows], own_feats)
    # not vacuous: the two adapters really compute different features
    assert not torch.allclose(_hidden(peft_model, "task1", ids, mask),
                              _hidden(peft_model, "task2", ids, mask))


def test_mixture_top2_is_the_weighted_sum_and_oracle_none_is_the_base(two_adapters):
    peft_model, ids, mask = two_adapters
    pool = partial(pool_hidden, cfg=ModelConfig(name_or_path="unused"))
    emb = router_embedding(_hidden(peft_model, None, ids, mask), mask, pool)
    router = Router("prototype", 2, 0.5, emb[[1, 4]])
    w = router.weights(emb)
    with torch.no_grad():
        mixed = AdapterMixture(peft_model, ["task1", "task2"], pool, router)(
            input_ids=ids, attention_mask=mask).last_hidden_state
    expected = (w[:, 0, None, None] * _hidden(peft_model, "task1", ids, mask)
                + w[:, 1, None, None] * _hidden(peft_model, "task2", ids, mask))
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)

    oracle = AdapterMixture(peft_model, ["task1", "task2"], pool, router=None, oracle=None)
    with torch.no_grad():
        base = oracle(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(base, _hidden(peft_model, None, ids, mask))
    assert torch.equal(torch.cat(oracle.choices), torch.full((len(ids),), -1))


# -- whole runs -----------------------------------------------------------------------------------


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.fixture
def prototype_run(tiny_run_config, monkeypatch):
    """A prototype-routed top-2 run of the two tiny tasks, recording what each task changed."""
    changes = {}
    real_train = runner_module.train_task

    def spy_train(family, strategy, task, *args, **kwargs):
        before = _snapshot(family.module)
        stats = real_train(family, strategy, task, *args, **kwargs)
        after = _snapshot(family.module)
        changes[task.index] = (
            {n for n in after if n in before and not torch.equal(before[n], after[n])},
            {n for n, p in family.module.named_parameters() if p.requires_grad},
            {n for n in after if n not in before})
        return stats

    monkeypatch.setattr(runner_module, "train_task", spy_train)
    data = tiny_run_config("moe")
    data["strategy"]["options"] = {"router": "prototype", "top_k": 2}
    cfg = load_run_config(None, data=data)
    lines: list[str] = []
    result = run(cfg, echo=lines.append)
    return cfg, result, changes, lines


def test_task2_trains_only_its_adapter_and_head(prototype_run):
    _, result, changes, _ = prototype_run
    for t in (1, 2):
        changed, trainable, _ = changes[t]
        lora_t = {n for n in trainable if "lora_" in n}
        assert lora_t and all(f".task{t}." in n for n in lora_t), "another adapter trained"
        assert trainable - lora_t == {f"heads.task{t}.weight", f"heads.task{t}.bias"}
        assert changed <= trainable and any("lora_" in n for n in changed)
    # task 1's adapter as saved after task 1 is bit-identical to the one saved after task 2
    stage1 = load_file(str(result.run_dir / "tasks/01-a/adapter/task1/adapter_model.safetensors"))
    stage2 = load_file(str(result.run_dir / "tasks/02-b/adapter/task1/adapter_model.safetensors"))
    assert stage1.keys() == stage2.keys() and all(torch.equal(stage1[k], stage2[k]) for k in stage1)


def test_routing_accuracy_and_router_land_in_the_run_folder(prototype_run, tiny_bert):
    cfg, result, _, lines = prototype_run
    run_dir = result.run_dir
    rows = json.loads((run_dir / "strategy_report.json").read_text())
    assert [(r["stage"], r["task"], sorted(r["routing_accuracy"])) for r in rows] == [
        (1, "a", ["a"]), (2, "b", ["a", "b"])]
    for r in rows:
        assert all(0.0 <= v <= 1.0 for v in r["routing_accuracy"].values())
        assert r["routing_accuracy_mean"] == pytest.approx(
            sum(r["routing_accuracy"].values()) / len(r["routing_accuracy"]))
    assert rows[0]["routing_accuracy"] == {"a": 1.0}  # one adapter: everything goes to it
    results = json.loads((run_dir / "results.json").read_text())
    assert results["strategy_report"][0] is None
    assert [{k: r[k] for k in r if k not in ("stage", "task")} for r in rows] == \
        results["strategy_report"][1:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["strategy_report"] == results["strategy_report"][2]
    echoed = next(x for x in lines if x.startswith("  R[2]"))
    acc = rows[1]["routing_accuracy"]
    assert echoed.endswith(f"| router prototype, routing_accuracy a={acc['a']:.3f} "
                           f"b={acc['b']:.3f}, routing_accuracy_mean "
                           f"{rows[1]['routing_accuracy_mean']:.3f}")

    # The saved prototypes are the mean normalised base embeddings of each task's train split,
    # and the recorded routing accuracy is what they give on the held-out splits.
    tasks, _ = load_sequence(cfg)
    family = result.family
    with family.backbone.disable_adapter():
        train = [F.normalize(family.encode_split(t, "train", 16), dim=-1) for t in tasks]
        held_out = [F.normalize(family.encode_split(t, "eval", 16), dim=-1) for t in tasks]
    saved = load_file(str(run_dir / "tasks/02-b/adapter/router.safetensors"))["prototypes"]
    torch.testing.assert_close(saved, torch.stack([x.mean(0) for x in train]), rtol=0,
                               atol=1e-6)
    for i, (task, feats) in enumerate(zip(tasks, held_out, strict=True)):
        acc = routing_accuracy(cosine_scores(feats, saved).argmax(-1), i)
        assert acc == pytest.approx(rows[1]["routing_accuracy"][task.name])
    router = json.loads((run_dir / "tasks/02-b/adapter/router.json").read_text())
    assert router["adapters"] == ["task1", "task2"] and router["top_k"] == 2

    # The mixture rebuilds from the files with plain PEFT: every adapter bit-identical.
    adapter_dir = run_dir / "tasks/02-b/adapter"
    rebuilt = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert),
                                        str(adapter_dir / "task1"), adapter_name="task1")
    rebuilt.load_adapter(str(adapter_dir / "task2"), adapter_name="task2")
    trained = dict(family.backbone.named_parameters())
    for name, p in rebuilt.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, trained[name]), name
    assert ((adapter_dir / "adapter_model.safetensors").read_bytes()
            == (adapter_dir / "task2" / "adapter_model.safetensors").read_bytes())


def test_oracle_routing_accuracy_is_one(tiny_run_config):
    data = tiny_run_config("moe")
    data["strategy"]["options"] = {"router": "oracle"}
    result = run(load_run_config(None, data=data), echo=lambda _: None)
    rows = json.loads((result.run_dir / "strategy_report.json").read_text())
    assert [r["routing_accuracy"] for r in rows] == [{"a": 1.0}, {"a": 1.0, "b": 1.0}]
    assert result.metrics["strategy_report"]["routing_accuracy_mean"] == 1.0
    assert not (result.run_dir / "tasks/02-b/adapter/router.safetensors").exists()


WORDS = {  # two tasks whose texts share no word: clearly separable from the base embeddings
    "x": (["cat", "dog", "horse", "cow"], ["red", "blue", "green", "yellow"]),
    "y": (["one", "two", "three", "four"], ["monday", "tuesday", "friday", "sunday"]),
}


def _word_task(folder, name: str) -> dict:
    gen = torch.Generator().manual_seed(len(name))
    paths = {}
    for split, n in (("train", 24), ("eval", 8)):
        path = folder / f"{name}_{split}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for label, words in enumerate(WORDS[name]):
                for _ in range(n):
                    picks = torch.randint(0, len(words), (4,), generator=gen).tolist()
                    writer.writerow([" ".join(words[i] for i in picks), f"{name}{label}"])
        paths[split] = str(path)
    return {"name": name, **paths}


def test_learned_gate_routes_two_separable_tasks_above_chance(tiny_run_config, tmp_path):
    data = tiny_run_config("moe")
    data["tasks"] = [_word_task(tmp_path, "x"), _word_task(tmp_path, "y")]
    data["strategy"]["options"] = {"router": "learned", "gate_epochs": 30}
    result = run(load_run_config(None, data=data), echo=lambda _: None)
    report = result.metrics["strategy_report"]
    assert report["router"] == "learned"
    assert all(v > 0.5 for v in report["routing_accuracy"].values())  # chance is 1/2
    assert report["routing_accuracy_mean"] >= 0.9  # measured 0.969 (x 0.9375, y 1.0)
    gate = load_file(str(result.run_dir / "tasks/02-y/adapter/router.safetensors"))
    assert gate["gate.weight"].shape == (2, 32)


@pytest.mark.parametrize("router", ["prototype", "learned", "oracle"])
def test_eval_rebuilds_the_mixture_from_the_files(router, tiny_run_config):
    """`continual-lora eval` on a moe run reloads every task adapter and the router with plain
    PEFT and safetensors, and scores through the mixture: the recorded row, exactly."""
    from continual_lora.evaluate import evaluate_run, rows_match

    data = tiny_run_config("moe")
    data["strategy"]["options"] = {"router": router}
    result = run(load_run_config(None, data=data), echo=lambda _: None)
    for stage in (1, 2):
        row, recorded, _ = evaluate_run(result.run_dir, stage)
        assert rows_match(row, recorded), (stage, row.scores, recorded)
