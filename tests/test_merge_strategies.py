"""The `merge` and `magmax` strategies on two tiny tasks: the model scored after each task is
exactly W0 + merge(ΔW...) (merge) or W0 + λ·magmax(τ...) (magmax), training starts where it
should (the original base / the sequential adapter), and the exported adapter loads with plain
PEFT and reproduces the merged update within the error recorded in stage.json."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, BertConfig, BertModel

from continual_lora.adapters import lora_factors
from continual_lora.config import ConfigError, load_run_config
from continual_lora.merging import ties
from continual_lora.runner import run
from continual_lora.strategies.magmax import MagmaxStrategy
from continual_lora.strategies.merge import MergeStrategy, refuse_quantised

KEY = "encoder.layer.0.attention.self.query"  # one adapted module, checked in detail


def _weight(backbone, key: str = KEY) -> torch.Tensor:
    if isinstance(backbone, PeftModel):
        return backbone.get_submodule(f"base_model.model.{key}").base_layer.weight.detach().clone()
    return backbone.get_submodule(key).weight.detach().clone()


def _spy(monkeypatch, cls, seen: dict) -> None:
    """Record, per task: the weight and the LoRA factors at the start of training, the trained
    update just before `after_task`, and the weight that will be scored just after it."""
    before, after = cls.before_task, cls.after_task

    def before_task(self, ctx):
        before(self, ctx)
        seen.setdefault("start", []).append((_weight(ctx.family.backbone),
                                             lora_factors(ctx.family.backbone)[KEY]))

    def after_task(self, ctx):
        seen.setdefault("trained", []).append(
            {k: f.delta() for k, f in lora_factors(ctx.family.backbone).items()})
        after(self, ctx)
        seen.setdefault("scored", []).append(ctx.family.backbone)
        seen.setdefault("scored_w", []).append(_weight(ctx.family.backbone))

    monkeypatch.setattr(cls, "before_task", before_task)
    monkeypatch.setattr(cls, "after_task", after_task)


def _loaded_delta(base_path, adapter_dir, key: str = KEY) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), str(adapter_dir))
    return lora_factors(model)[key].delta()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_merge_ties_scores_w0_plus_ties_of_independent_adapters(tiny_run_config, tiny_bert,
                                                                 monkeypatch):
    seen: dict = {}
    _spy(monkeypatch, MergeStrategy, seen)
    cfg = load_run_config(None, data=tiny_run_config("merge"))  # default: ties, density 0.2
    lines: list[str] = []
    result = run(cfg, echo=lines.append)
    # The export's relative error (SVD) is on the runner's line for each stage.
    assert sum("export_error mean=" in line for line in lines) == 2
    w0 = _weight(AutoModel.from_pretrained(tiny_bert))

    # Each task starts from the original base with a fresh adapter (B = 0).
    for weight, factors in seen["start"]:
        assert torch.equal(weight, w0) and not factors.B.any()
    d1, d2 = seen["trained"][0][KEY], seen["trained"][1][KEY]
    assert not torch.equal(d1, d2)
    # Scored after task 1: W0 + TIES(ΔW1); after task 2: W0 + TIES(ΔW1, ΔW2) (density 0.2).
    torch.testing.assert_close(seen["scored_w"][0], w0 + ties([d1], 0.2), atol=1e-7, rtol=0)
    torch.testing.assert_close(seen["scored_w"][1], w0 + ties([d1, d2], 0.2), atol=1e-7, rtol=0)
    assert not isinstance(seen["scored"][1], PeftModel)

    # The stage-2 export: rank 2 + 2 by SVD, its error recorded, and loadable by plain PEFT.
    stage = json.loads((result.run_dir / "tasks/02-b/stage.json").read_text())["export"]
    assert stage["kind"] == "peft_lora_svd" and stage["rank"] == 4
    assert stage["method"] == "ties" and stage["adapters_merged"] == 2
    loaded = _loaded_delta(tiny_bert, result.run_dir / "tasks/02-b/adapter")
    error = _relative(loaded, ties([d1, d2], 0.2))
    assert 0 < error <= stage["relative_error"]["max"] + 1e-6  # trimmed: not low rank


def test_merge_cat_exports_the_exact_sum(tiny_run_config, tiny_bert, monkeypatch):
    seen: dict = {}
    _spy(monkeypatch, MergeStrategy, seen)
    cfg = load_run_config(None, ["strategy.options.method=cat",
                                 "strategy.options.weights=[0.5, 2.0]"],
                          data=tiny_run_config("merge"))
    result = run(cfg, echo=lambda _: None)
    w0 = _weight(AutoModel.from_pretrained(tiny_bert))
    d1, d2 = seen["trained"][0][KEY], seen["trained"][1][KEY]
    expected = 0.5 * d1 + 2.0 * d2
    torch.testing.assert_close(seen["scored_w"][1], w0 + expected, atol=1e-7, rtol=0)
    stage = json.loads((result.run_dir / "tasks/02-b/stage.json").read_text())["export"]
    assert stage["kind"] == "peft_lora_concatenated" and stage["rank"] == 4
    assert stage["relative_error"]["max"] == 0.0
    loaded = _loaded_delta(tiny_bert, result.run_dir / "tasks/02-b/adapter")
    torch.testing.assert_close(loaded, expected, atol=1e-6, rtol=1e-6)


def test_magmax_scores_the_selection_and_trains_on_from_the_sequential_adapter(
        tiny_run_config, tiny_bert, monkeypatch):
    seen: dict = {}
    _spy(monkeypatch, MagmaxStrategy, seen)
    result = run(load_run_config(None, data=tiny_run_config("magmax")), echo=lambda _: None)
    w0 = _weight(AutoModel.from_pretrained(tiny_bert))
    tau1, tau2 = seen["trained"][0][KEY], seen["trained"][1][KEY]

    # Task 2 starts on W0 with the adapter exactly as task 1 left it (not the merged model).
    weight2, factors2 = seen["start"][1]
    assert torch.equal(weight2, w0)
    assert torch.equal(factors2.delta(), tau1)
    # τ2 is the cumulative update (task 1 + task 2 training), so it differs from τ1.
    assert not torch.equal(tau1, tau2)

    # Scored: W0 + 0.5·τ1, then W0 + 0.5·magmax(τ1, τ2), with the adapter layers disabled.
    torch.testing.assert_close(seen["scored_w"][0], w0 + 0.5 * tau1, atol=1e-7, rtol=0)
    by_hand = torch.where(tau2.abs() > tau1.abs(), tau2, tau1)  # ties → the earlier τ
    torch.testing.assert_close(seen["scored_w"][1], w0 + 0.5 * by_hand, atol=1e-7, rtol=0)
    scored = seen["scored"][1]
    layer = scored.get_submodule(f"base_model.model.{KEY}")
    x = torch.randn(3, w0.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x))  # LoRA branch is off

    stage = json.loads((result.run_dir / "tasks/02-b/stage.json").read_text())["export"]
    assert stage["kind"] == "peft_lora_svd" and stage["rank"] == 4 and stage["lam"] == 0.5
    loaded = _loaded_delta(tiny_bert, result.run_dir / "tasks/02-b/adapter")
    error = _relative(loaded, 0.5 * by_hand)
    assert error <= stage["relative_error"]["max"] + 1e-6


def test_merge_options_must_fit_the_method(tiny_run_config):
    with pytest.raises(ConfigError, match="`density` does not apply to method 'task_arithmetic'"):
        load_run_config(None, ["strategy.options.method=task_arithmetic",
                               "strategy.options.density=0.5"], data=tiny_run_config("merge"))
    with pytest.raises(ConfigError, match="export_rank"):
        load_run_config(None, ["strategy.options.method=cat", "strategy.options.export_rank=2"],
                        data=tiny_run_config("merge"))


def test_merge_weights_list_must_match_the_adapters(tiny_run_config):
    cfg = load_run_config(None, ["strategy.options.weights=[1.0, 1.0, 1.0]"],
                          data=tiny_run_config("merge"))
    with pytest.raises(ConfigError, match="3 weights for 2 adapters"):
        run(cfg, echo=lambda _: None)


def test_merging_into_a_quantised_base_is_refused():
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16)
    model = BertModel(config)
    refuse_quantised(model)  # a float model is fine
    # transformers records how a model was quantised in its config when it loads one.
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ConfigError, match="quantised"):
        refuse_quantised(model)


def test_merge_takes_the_users_adapter_as_the_first_update(tiny_run_config, tiny_bert,
                                                            tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)  # a "user's adapter" with random A and B, saved by PEFT
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                        init_lora_weights=False)
    get_peft_model(AutoModel.from_pretrained(tiny_bert), config).save_pretrained(tmp_path / "u")
    user = _loaded_delta(tiny_bert, tmp_path / "u")
    seen: dict = {}
    _spy(monkeypatch, MergeStrategy, seen)
    cfg = load_run_config(None, ["strategy.options.method=task_arithmetic",
                                 f"lora.init_adapter={tmp_path / 'u'}"],
                          data=tiny_run_config("merge"))
    run(cfg, echo=lambda _: None)
    w0 = _weight(AutoModel.from_pretrained(tiny_bert))
    weight1, factors1 = seen["start"][0]
    assert torch.equal(weight1, w0) and not factors1.B.any()  # task 1: fresh, from the base
    d1, d2 = seen["trained"][0][KEY], seen["trained"][1][KEY]
    torch.testing.assert_close(seen["scored_w"][0], w0 + user + d1, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["scored_w"][1], w0 + user + d1 + d2, atol=1e-6, rtol=0)
