"""Shortcuts that skip work change no result: training with the lower layers cached equals
training without the cache, and length-bucketed evaluation equals evaluating one example at a
time. Plus `lora.layers` itself: the adapter only touches the chosen layers and loads in PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from continual_lora.config import ConfigError, load_run_config
from continual_lora.runner import run


def _upper_only(tiny_run_config, name: str, **train):
    data = tiny_run_config("naive", train={"lr": 1e-2, "batch_size": 8, "max_steps": 6,
                                           "eval_batch_size": 16, "log_every": 1, **train})
    data["name"] = name
    data["lora"] = {"r": 2, "layers": "last 1"}
    data["model"]["dropout"] = 0.0
    return load_run_config(None, data=data)


def _notes(run_dir) -> list[str]:
    return [e["text"] for e in map(json.loads, (run_dir / "log.jsonl").open())
            if e["event"] == "note"]


def _assert_same_training(first, second) -> dict:
    """Two runs of the tiny two-task config (6 steps a task) that must compute the same thing:
    the same adapter after each task, the same 12 losses and the same scores, to float
    rounding; and the update really moved (B starts at 0). Returns the last adapter."""
    for stage in ("01-a", "02-b"):
        a = load_file(str(first.run_dir / "tasks" / stage / "adapter/adapter_model.safetensors"))
        b = load_file(str(second.run_dir / "tasks" / stage / "adapter/adapter_model.safetensors"))
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
        assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    assert torch.allclose(torch.tensor(first.R), torch.tensor(second.R), atol=1e-6)
    losses = [[e["loss"] for e in map(json.loads, (r.run_dir / "log.jsonl").open())
               if e["event"] == "step"] for r in (first, second)]
    assert len(losses[0]) == 12 and torch.allclose(torch.tensor(losses[0]),
                                                   torch.tensor(losses[1]), atol=1e-5)
    return a


def test_cached_lower_layers_train_and_score_the_same(tiny_run_config, monkeypatch):
    """Training from cached lower-layer states, and scoring from the states kept for each
    evaluated text, give the adapters, losses and scores of the uncached run."""
    from continual_lora.families import lower_cache

    monkeypatch.setattr(lower_cache, "_SHARED", {})  # no states from an earlier test's runs

    injected, evaluated = [], []
    real = lower_cache._Inject.forward
    monkeypatch.setattr(lower_cache._Inject, "forward",
                        lambda self, *a, **k: injected.append(1) or real(self, *a, **k))
    real_eval = lower_cache.LowerLayerCache.evaluation_states
    monkeypatch.setattr(lower_cache.LowerLayerCache, "evaluation_states",
                        lambda self, *a: evaluated.append(real_eval(self, *a)) or evaluated[-1])
    cached = run(_upper_only(tiny_run_config, "cached"), echo=lambda _: None)
    served = [states for states in evaluated if states is not None]
    assert served and len(injected) == 12 + len(served)  # every step, then scoring batches
    plain = run(_upper_only(tiny_run_config, "uncached", cache_lower_layers=False),
                echo=lambda _: None)
    notes = _notes(cached.run_dir)
    assert len(notes) == 2 and "; lower-layer cache: layers 0-0 run once per text" in notes[0]
    assert not any("lower-layer cache" in note for note in _notes(plain.run_dir))
    adapters = _assert_same_training(cached, plain)
    assert all(".layer.1." in k for k in adapters)  # lora.layers: last 1 of 2


def test_the_cache_stays_off_when_the_lower_layers_use_dropout(tiny_run_config):
    data = tiny_run_config("naive", train={"lr": 1e-2, "batch_size": 8, "max_steps": 2})
    data["lora"] = {"r": 2, "layers": [1]}
    result = run(load_run_config(None, data=data), echo=lambda _: None)  # tiny BERT: p = 0.1
    notes = _notes(result.run_dir)
    assert notes and all("; lower-layer cache off: " in n and "model.dropout: 0" in n
                         for n in notes)


def test_lora_layers_adapter_loads_with_plain_peft(tiny_run_config, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModel

    result = run(_upper_only(tiny_run_config, "peft-load", max_steps=2), echo=lambda _: None)
    adapter = result.run_dir / "tasks/02-b/adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert), str(adapter))
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert names and all(".layer.1." in n for n in names)


@pytest.mark.parametrize("spec, message", [
    ("last 3", "the model has 2 layers"), ([0, 5], "layers are 0..1")])
def test_lora_layers_out_of_range_are_refused(tiny_run_config, spec, message, tmp_path):
    data = tiny_run_config("naive")
    data["lora"] = {"r": 2, "layers": spec}
    with pytest.raises(ConfigError, match=message):
        run(load_run_config(None, data=data), echo=lambda _: None)
    assert not (tmp_path / "runs" / "tiny-naive").exists()


def test_lora_layers_spelling_is_checked():
    with pytest.raises(ConfigError, match="write `last N`, `first N`"):
        load_run_config(None, data={"tasks": [{"name": "a", "wordnet": ["noun.animal"]}],
                                    "lora": {"layers": "top 2"}})


def test_bucketed_evaluation_equals_one_example_at_a_time(tiny_run_config):
    """Evaluation sorts examples by length and pads each batch to its longest: the features
    (and so every score) equal those of each example encoded alone, without padding."""
    from continual_lora.families import make_family
    from continual_lora.sequence import load_sequence

    cfg = load_run_config(None, data=tiny_run_config("naive"))
    tasks, _ = load_sequence(cfg)
    family = make_family(cfg.model, cfg.seed)
    family.load()
    task = tasks[0]
    ids = family._tokens(task, "eval")
    assert len({len(x) for x in ids}) > 1  # lengths differ: padding is at stake
    bucketed = family.encode_split(task, "eval", batch_size=3)
    with torch.no_grad():
        family.module.eval()
        alone = torch.cat([family._batch_features([x]) for x in ids])
        one_batch = family._batch_features(ids)  # index order, all padded to the longest
    assert torch.allclose(bucketed, alone, atol=1e-5)
    assert torch.allclose(bucketed, one_batch, atol=1e-5)
    family.begin_task(task, tasks, [task.index], [])
    a = family.score_task(task, True, batch_size=3)
    b = family.score_task(task, True, batch_size=1000)
    assert (a.correct == b.correct).all() and a.score == b.score


# -- packed batches ---------------------------------------------------------------------------


def test_rows_are_filled_first_fit_longest_first():
    from continual_lora.families.packing import plan_rows

    # 5 opens row 0 (1 left), 4 opens row 1 (2 left), 3 opens row 2, 2 fills row 1
    assert plan_rows([5, 3, 4, 2], 6) == [[0], [2, 3], [1]]
    assert plan_rows([2, 2, 2], 6) == [[0, 1, 2]]


def test_packed_layout_by_hand(monkeypatch):
    """Three sequences of 3, 1 and 2 tokens padded to 3, packed into one row of 6."""
    from continual_lora.families import packing

    monkeypatch.setattr(packing, "MIN_ROW_TOKENS", 6)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    ids = torch.tensor([[10, 11, 12], [20, 0, 0], [30, 31, 0]])
    layout = packing.packed_layout(mask)
    assert (layout.rows, layout.row_len) == (1, 6)
    assert layout.pack(ids).tolist() == [[10, 11, 12, 30, 31, 20]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert layout.segment.tolist() == [0, 0, 0, 2, 2, 1]
    allowed = layout.attention_mask()[0, 0]
    assert allowed[3].tolist() == [False, False, False, True, True, False]  # token 30 sees 30, 31
    additive = layout.attention_mask(torch.float32)[0, 0]
    assert additive[5, 5] == 0 and additive[5, 0] == torch.finfo(torch.float32).min
    hidden = torch.arange(6.0).view(1, 6, 1)  # each slot's state is its packed position
    assert layout.pool(hidden, "mean").flatten().tolist() == [1.0, 5.0, 3.5]
    assert layout.pool(hidden, "cls").flatten().tolist() == [0.0, 5.0, 3.0]


def test_a_padding_slot_never_makes_a_softmax_row_empty(monkeypatch):
    from continual_lora.families import packing

    monkeypatch.setattr(packing, "MIN_ROW_TOKENS", 8)
    layout = packing.packed_layout(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert layout.segment.tolist()[3:] == [2] * 5  # 5 padding slots, segment = batch size
    assert layout.attention_mask()[0, 0].any(-1).all()


def test_packing_check_names_what_went_wrong():
    from continual_lora.families.packing import packing_check

    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    same = lambda i, m: torch.ones(2, 4)  # noqa: E731
    assert packing_check(same, same, ids, mask) == ""
    assert "differ from padded ones by 0.5" in packing_check(
        same, lambda i, m: torch.full((2, 4), 1.5), ids, mask)

    def refuses(i, m):
        raise TypeError("forward() got an unexpected keyword argument 'position_ids'")

    assert "does not take packed rows (TypeError" in packing_check(same, refuses, ids, mask)


def _no_dropout(tiny_run_config, name: str, **train):
    data = tiny_run_config("naive", train={"lr": 1e-2, "batch_size": 8, "max_steps": 6,
                                           "eval_batch_size": 16, "log_every": 1, **train})
    data["name"] = name
    data["lora"] = {"r": 2, "dropout": 0.0}
    data["model"]["dropout"] = 0.0
    return load_run_config(None, data=data)


def test_packed_batches_train_the_same_adapter(tiny_run_config, monkeypatch):
    """Same batches, with and without their padding: the same losses and adapters, to float
    rounding (dropout off, so both runs compute the same function)."""
    from continual_lora.families import classifier, packing

    layouts = []
    real = packing.packed_layout
    monkeypatch.setattr(classifier, "packed_layout",
                        lambda mask: layouts.append(mask.shape) or real(mask))
    packed = run(_no_dropout(tiny_run_config, "packed"), echo=lambda _: None)
    training_layouts = len(layouts)
    padded = run(_no_dropout(tiny_run_config, "padded", pack_sequences=False),
                 echo=lambda _: None)
    assert len(layouts) == training_layouts  # the padded run packed nothing
    assert training_layouts >= 12  # the check, then every one of the 12 steps
    notes = _notes(packed.run_dir)
    assert len(notes) == 2 and all(n.startswith("packed batches: ") for n in notes)
    assert _notes(padded.run_dir) == []
    _assert_same_training(packed, padded)


def _tiny_encoder(kind: str):
    """A 2-layer, 32-wide encoder of a real transformers architecture, random weights."""
    import transformers as tf

    vocab = 30522
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    builders = {
        "bert": lambda: tf.BertModel(tf.BertConfig(vocab_size=vocab, hidden_size=32, **small)),
        "albert": lambda: tf.AlbertModel(tf.AlbertConfig(vocab_size=vocab, hidden_size=32,
                                                         embedding_size=16, **small)),
        "distilbert": lambda: tf.DistilBertModel(tf.DistilBertConfig(
            vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
        # positions numbered after the padding index; relative position buckets from them
        "mpnet": lambda: tf.MPNetModel(tf.MPNetConfig(vocab_size=vocab, hidden_size=32, **small)),
        "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(vocab_size=vocab, hidden_size=32,
                                                            pad_token_id=0, **small)),
        "electra": lambda: tf.ElectraModel(tf.ElectraConfig(vocab_size=vocab, hidden_size=32,
                                                            embedding_size=32, **small)),
        # a convolution over neighbouring tokens, which packing would make cross sequences
        "convbert": lambda: tf.ConvBertModel(tf.ConvBertConfig(
            vocab_size=vocab, hidden_size=32, embedding_size=32, **small)),
        # builds its own mask and relative positions from a 2-D mask
        "deberta": lambda: tf.DebertaV2Model(tf.DebertaV2Config(
            vocab_size=vocab, hidden_size=32, relative_attention=True,
            position_biased_input=False, **small)),
    }
    torch.manual_seed(0)
    return builders[kind]().eval()


@pytest.mark.parametrize("kind, refused", [
    ("bert", ""), ("albert", ""), ("distilbert", ""), ("electra", ""), ("mpnet", ""),
    ("roberta", ""),
    ("convbert", "does not honour position_ids"), ("deberta", "does not take packed rows")])
def test_the_packing_check_tells_real_architectures_apart(kind, refused):
    """The check runs each model itself, with each first position id the family tries:
    packing is on only where it computes what padding computes."""
    from continual_lora.families.packing import (
        additive_mask_dtype,
        packed_layout,
        packing_check,
        position_offsets,
    )

    model = _tiny_encoder(kind)
    ids = torch.tensor([[101, 1037, 2235, 3899, 2008, 102], [101, 4937, 102, 0, 0, 0],
                        [101, 2019, 4111, 2007, 1037, 102]])
    mask = (ids != 0).long()

    def padded(i, m):
        hidden = model(input_ids=i, attention_mask=m).last_hidden_state
        return (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)

    def packed_from(offset):
        def packed(i, m):
            layout = packed_layout(m)
            hidden = model(input_ids=layout.pack(i),
                           attention_mask=layout.attention_mask(additive_mask_dtype(model)),
                           position_ids=layout.position_ids + offset).last_hidden_state
            return layout.pool(hidden, "mean")
        return packed

    reasons = [packing_check(padded, packed_from(offset), ids, mask)
               for offset in position_offsets(model)]
    if refused:
        assert all(refused in reason for reason in reasons)
    else:
        assert "" in reasons
    if kind == "roberta":  # only from padding_idx + 1
        assert reasons[0] != "" and reasons[1] == ""


def test_a_model_that_cannot_pack_trains_padded_and_says_why(tiny_run_config, tiny_bert,
                                                             tmp_path):
    """ConvBERT mixes neighbouring tokens with a convolution, which in a packed row would
    reach across sequences: the check refuses packing, the run trains padded and logs why."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tiny-convbert"
    _tiny_encoder("convbert").save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    data = tiny_run_config("naive", train={"lr": 1e-2, "batch_size": 8, "max_steps": 2})
    data["model"]["name_or_path"] = str(folder)
    data["lora"] = {"r": 2, "target_modules": ["query", "value"]}
    result = run(load_run_config(None, data=data), echo=lambda _: None)
    notes = _notes(result.run_dir)
    assert len(notes) == 2 and all(
        n.startswith("packing off: this model's forward does not honour position_ids")
        for n in notes)
    assert result.R[-1][0] > 0  # it trained and scored all the same


def test_roberta_packs_with_its_positions_after_the_padding_index(tiny_run_config, tiny_bert,
                                                                  tmp_path):
    """RoBERTa numbers positions from padding_idx + 1: packing is checked from there and
    stays on, with packed position ids shifted the same way."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    folder = tmp_path / "tiny-roberta"
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, pad_token_id=0,
                               max_position_embeddings=130)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    data = tiny_run_config("naive", train={"lr": 1e-2, "batch_size": 8, "max_steps": 2})
    data["model"]["name_or_path"] = str(folder)
    data["lora"] = {"r": 2}
    result = run(load_run_config(None, data=data), echo=lambda _: None)
    assert all(n.startswith("packed batches: ") for n in _notes(result.run_dir))


# -- one head product for a batch that mixes tasks ----------------------------------------------


def _loop_task_losses(module, feats, labels, task_ids):
    """The per-task loop task_losses replaced: one head call and one cross-entropy per task."""
    import torch.nn.functional as F

    per_example = torch.empty(len(feats))
    by_task = {}
    for t in torch.unique(task_ids).tolist():
        rows = task_ids == t
        logits = module.head_logits(module.head_key(t), feats[rows])
        by_task[t] = logits
        per_example[rows] = F.cross_entropy(logits, labels[rows] + module.offsets.get(t, 0),
                                            reduction="none")
    return per_example, by_task


@pytest.mark.parametrize("head, normalize", [("per_task", True), ("per_task", False),
                                             ("shared", True)])
def test_mixed_task_batches_score_as_the_per_task_loop(head, normalize):
    """Tasks of 2, 4 and 3 classes in one batch: the stacked heads give each row the loss,
    logits and gradients the per-task loop gave."""
    from torch import nn

    from continual_lora.config import ModelConfig
    from continual_lora.families.classifier import ClassifierModule

    torch.manual_seed(0)
    module = ClassifierModule(nn.Identity(), ModelConfig(head=head, normalize=normalize))
    classes = {1: 2, 2: 4, 3: 3}
    if head == "shared":
        module.heads["shared"] = nn.Linear(5, sum(classes.values()))
        module.offsets = {1: 0, 2: 2, 3: 6}
    else:
        for t, n in classes.items():
            module.heads[f"task{t}"] = nn.Linear(5, n)
        module.heads["task1"].requires_grad_(False)  # an old, frozen head
    task_ids = torch.tensor([2, 1, 3, 3, 2, 1, 2])
    labels = torch.tensor([3, 1, 2, 0, 0, 0, 1])
    results = []
    for fn in (lambda f: module.task_losses(f, labels, task_ids)[:2],
               lambda f: _loop_task_losses(module, f, labels, task_ids)):
        feats = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
        module.zero_grad()
        loss, by_task = fn(feats)
        loss.sum().backward()
        grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
        results.append((loss.detach(), {t: v.detach() for t, v in by_task.items()}, feats.grad,
                        grads))
    (loss_a, logits_a, feat_grad_a, grads_a), (loss_b, logits_b, feat_grad_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert logits_a.keys() == logits_b.keys() == {1, 2, 3}
    assert all(torch.allclose(logits_a[t], logits_b[t], atol=1e-6) for t in logits_a)
    assert torch.allclose(feat_grad_a, feat_grad_b, atol=1e-6)
    assert len(grads_a) == len(grads_b) == (2 if head == "shared" else 4)  # frozen head: none
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))


def test_the_cache_outlives_new_tensors_with_the_same_weights(tiny_bert, monkeypatch):
    """`joint` reloads the base for every task, and each run of a bench loads it again: new
    tensors, same contents. The cached states are kept (a new cache finds them too); lower
    weights whose contents changed start an empty store."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from continual_lora.families import lower_cache
    from continual_lora.families.lower_cache import LowerLayerCache
    from continual_lora.sequence import Stream

    monkeypatch.setattr(lower_cache, "_SHARED", {})

    def upper_only():
        base = AutoModel.from_pretrained(tiny_bert, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        base.requires_grad_(False)
        return get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"],
                                               layers_to_transform=[1]))

    ids = {(1, 0): [101, 2023, 102], (1, 1): [101, 2023, 2003, 1037, 102]}

    def pad(batch):
        width = max(map(len, batch))
        return (torch.tensor([x + [0] * (width - len(x)) for x in batch]),
                torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch]))

    cache = LowerLayerCache(2**30)
    stream = Stream(order=list(ids), batch_size=2, steps=1)
    computed = []
    real = cache._compute
    cache._compute = lambda *a: computed.append(len(a[1])) or real(*a)
    assert cache.prepare(upper_only(), stream, lambda t, i: ids[(t, i)], pad, 8)
    first = {k: v.clone() for k, v in cache.states.items()}
    assert computed == [2]
    assert cache.prepare(upper_only(), stream, lambda t, i: ids[(t, i)], pad, 8)  # reloaded
    assert computed == [2] and all(torch.equal(first[k], cache.states[k]) for k in first)
    next_run = LowerLayerCache(2**30)  # the next run of a bench, same process
    assert next_run.prepare(upper_only(), stream, lambda t, i: ids[(t, i)], pad, 8)
    assert next_run.filled == 0 and next_run.states.keys() == first.keys()
    changed = upper_only()
    with torch.no_grad():
        changed.get_base_model().embeddings.word_embeddings.weight.mul_(2.0)
    assert cache.prepare(changed, stream, lambda t, i: ids[(t, i)], pad, 8)
    assert computed == [2, 2] and cache.filled == 2  # recomputed from the changed weights
    assert not torch.equal(first[(101, 2023, 102)], cache.states[(101, 2023, 102)])


@pytest.mark.parametrize("strategy", ["moe", "joint", "olora"])
def test_strategies_that_swap_the_backbone_run_with_the_cache_on(tiny_run_config, strategy):
    """moe scores through a mixture of adapters (not a layer stack the cache knows: it runs
    uncached there), joint reloads the base for each task, olora stacks adapters: each runs
    with the cache on and scores what it scores with the cache off."""
    results = []
    for cache in (True, False):
        data = tiny_run_config(strategy, train={"lr": 1e-2, "batch_size": 8, "max_steps": 3,
                                                "eval_batch_size": 16,
                                                "cache_lower_layers": cache})
        data["name"] = f"{strategy}-{cache}"
        data["lora"] = {"r": 2, "layers": "last 1"}
        data["model"]["dropout"] = 0.0
        results.append(run(load_run_config(None, data=data), echo=lambda _: None))
    assert any("lower-layer cache: layers 0-0" in n for n in _notes(results[0].run_dir))
    assert torch.allclose(torch.tensor(results[0].R), torch.tensor(results[1].R), atol=1e-6)
