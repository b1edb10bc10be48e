"""The embedded causal LM: a tiny recipe built into a temporary cache, loaded like a hub model."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from continual_lora.embedded_lm import (
    CHAT_TEMPLATE,
    EMBEDDED_LM,
    LmRecipe,
    default_cache_root,
    embedded_lm_path,
    train_tokenizer,
)
from continual_lora.families.common import resolve_model_path

TEXTS = [
    "dog: a member of the genus Canis.",
    "To run means to move fast by using one's feet.",
    "Cat means a small domesticated carnivorous mammal.",
] * 20


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lm-cache")
    messages: list[str] = []
    start = time.perf_counter()
    path = embedded_lm_path(LmRecipe.tiny(), cache_dir=cache, echo=messages.append)
    return cache, path, messages, time.perf_counter() - start


def test_folder_holds_a_loadable_llama(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _, path, messages, _ = built
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "recipe.json"):  # fmt: skip
        assert (path / name).is_file(), name
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert (path / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others
    assert any("step 20/20 loss" in m for m in messages)

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    names = {n.rsplit(".", 2)[-2] for n, _ in model.named_parameters() if n.endswith("weight")}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert len(tokenizer) == model.config.vocab_size == LmRecipe.tiny().vocab_size

    ids = tokenizer(["a dog is", "to run"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, ids["input_ids"].shape[1] + 3)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, end_id]


def test_recipe_json_records_the_build(built):
    _, path, _, _ = built
    meta = json.loads((path / "recipe.json").read_text())
    recipe = LmRecipe.tiny()
    assert meta["recipe"] == dataclasses.asdict(recipe)
    assert meta["sha256"] == recipe.sha256() and path.name.endswith(recipe.key())
    assert meta["pretrain_seconds"] > 0 and meta["final_train_loss"] > 0
    assert meta["heldout_perplexity"] > 1 and meta["heldout_unigram_perplexity"] > 1


def test_second_call_reuses_the_cache(built):
    cache, path, _, first_seconds = built
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    messages: list[str] = []
    start = time.perf_counter()
    again = embedded_lm_path(LmRecipe.tiny(), cache_dir=cache, echo=messages.append)
    assert again == path and messages == []
    assert time.perf_counter() - start < min(0.5, first_seconds)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_damaged_or_different_recipe_folder_is_never_reused(built, tmp_path):
    cache, path, _, _ = built
    other = dataclasses.replace(LmRecipe.tiny(), steps=2, seed=1)
    other_path = embedded_lm_path(other, cache_dir=cache, echo=lambda _: None)
    assert other_path != path and other_path.parent == path.parent
    # A folder whose recipe.json does not match is rebuilt, not trusted.
    meta = json.loads((other_path / "recipe.json").read_text())
    (other_path / "recipe.json").write_text(json.dumps({**meta, "recipe": {"steps": 99}}))
    messages: list[str] = []
    assert embedded_lm_path(other, cache_dir=cache, echo=messages.append) == other_path
    assert any("building" in m for m in messages)
    assert json.loads((other_path / "recipe.json").read_text())["recipe"] == meta["recipe"]


def test_chat_template_renders_turns(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[1])
    messages = [
        {"role": "user", "content": "What is a dog a kind of?"},
        {"role": "assistant", "content": "canine"},
    ]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|user|>\nWhat is a dog a kind of?<|end|>\n<|assistant|>\ncanine<|end|>\n"
    )
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False,
                                         add_generation_prompt=True) == (
        "<|user|>\nWhat is a dog a kind of?<|end|>\n<|assistant|>\n"
    )  # fmt: skip
    ids = tokenizer("<|user|>\nhi<|end|>\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    assert tokenizer.convert_tokens_to_ids("<|end|>") in ids


def test_tokenizer_round_trips_and_adds_bos(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[1])
    text = "A dachshund: a small dog (German: Dackel)  with  short legs\n\tand ünïcode — 42."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token == "<|bos|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|eos|>", "<|pad|>")


def test_train_tokenizer_is_fast_and_deterministic():
    start = time.perf_counter()
    a = train_tokenizer(TEXTS, 300)
    b = train_tokenizer(TEXTS, 300)
    assert time.perf_counter() - start < 2.0
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) <= 300
    for token in ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|end|>"):  # fmt: skip
        assert len(a(token, add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, 100)


def test_recipe_keys_and_cache_root(monkeypatch, tmp_path):
    base = LmRecipe()
    assert base.key() == LmRecipe().key() and len(base.key()) == 16
    assert len({base.key(), LmRecipe.tiny().key(), dataclasses.replace(base, lr=1e-3).key()}) == 3
    monkeypatch.setenv("CONTINUAL_LORA_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path
    monkeypatch.delenv("CONTINUAL_LORA_CACHE")
    assert default_cache_root().parts[-2:] == (".cache", "continual-lora")
    assert resolve_model_path("some/hub-model") == "some/hub-model"
    assert EMBEDDED_LM == "embedded:wordnet-llama"
