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


def test_cached_lower_layers_train_the_same_adapter(tiny_run_config, monkeypatch):
    from continual_lora.families import lower_cache

    injected = []
    real = lower_cache._Inject.forward
    monkeypatch.setattr(lower_cache._Inject, "forward",
                        lambda self, *a, **k: injected.append(1) or real(self, *a, **k))
    cached = run(_upper_only(tiny_run_config, "cached"), echo=lambda _: None)
    assert len(injected) == 12  # every training step started from the cache
    plain = run(_upper_only(tiny_run_config, "uncached", cache_lower_layers=False),
                echo=lambda _: None)
    notes = _notes(cached.run_dir)
    assert len(notes) == 2 and notes[0].startswith("lower-layer cache: layers 0-0 computed once")
    assert _notes(plain.run_dir) == []
    for stage in ("01-a", "02-b"):
        a = load_file(str(cached.run_dir / "tasks" / stage / "adapter/adapter_model.safetensors"))
        b = load_file(str(plain.run_dir / "tasks" / stage / "adapter/adapter_model.safetensors"))
        assert a.keys() == b.keys() and a
        assert all(".layer.1." in k for k in a)  # lora.layers: last 1 of 2
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
        # the update really moved: B starts at 0
        assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    assert torch.allclose(torch.tensor(cached.R), torch.tensor(plain.R), atol=1e-6)
    losses = [[e["loss"] for e in map(json.loads, (r.run_dir / "log.jsonl").open())
               if e["event"] == "step"] for r in (cached, plain)]
    assert len(losses[0]) == 12 and torch.allclose(torch.tensor(losses[0]),
                                                   torch.tensor(losses[1]), atol=1e-5)


def test_the_cache_stays_off_when_the_lower_layers_use_dropout(tiny_run_config):
    data = tiny_run_config("naive", train={"lr": 1e-2, "batch_size": 8, "max_steps": 2})
    data["lora"] = {"r": 2, "layers": [1]}
    result = run(load_run_config(None, data=data), echo=lambda _: None)  # tiny BERT: p = 0.1
    notes = _notes(result.run_dir)
    assert notes and all("model.dropout: 0" in n and n.startswith("lower-layer cache off")
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
