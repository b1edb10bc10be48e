"""What we save is what we measured: a plain `PeftModel.from_pretrained` on the base reproduces
our logits, exactly for a live adapter and to float32 rounding for Merge & Init's concatenation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from continual_lora.config import load_run_config
from continual_lora.evaluate import evaluate_run, rows_match
from continual_lora.runner import run

TEXTS = ["a small furry animal with long ears", "a tall woody perennial plant",
         "food made from flour and water", "a machine for cutting grass"]


def _plain_logits(base_path, stage_dir, head_key: str) -> torch.Tensor:
    """What a user would write with transformers + PEFT + safetensors alone."""
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_path),
                                      str(stage_dir / "adapter")).eval()
    meta = json.loads((stage_dir / "heads.json").read_text())
    heads = load_file(str(stage_dir / "heads.safetensors"))
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=meta["max_length"],
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    logits = pooled @ heads[f"{head_key}.weight"].T + heads[f"{head_key}.bias"]
    return logits * meta["logit_scale"]


def _our_logits(family, head_key: str) -> torch.Tensor:
    family.module.eval()
    ids = family.tokenizer(TEXTS, truncation=True, max_length=family.cfg.max_length)["input_ids"]
    input_ids, mask = family._pad(ids)
    with torch.no_grad():
        return family.module.head_logits(head_key, family.module.features(input_ids, mask))


@pytest.mark.parametrize("strategy, exact", [("naive", True), ("merge_reinit", False)])
def test_plain_peft_load_reproduces_our_logits(strategy, exact, tiny_run_config, tiny_bert):
    result = run(load_run_config(None, data=tiny_run_config(strategy)), echo=lambda _: None)
    stage_dir = result.run_dir / "tasks" / "02-b"
    for head in ("task1", "task2"):
        ours = _our_logits(result.family, head)
        plain = _plain_logits(tiny_bert, stage_dir, head)
        if exact:
            assert torch.equal(ours, plain)
        else:  # W0 + ΔW1 merged, then + ΔW2, against W0·x + [B1 B2][A1; A2]·x
            torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)
    config = json.loads((stage_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == (2 if strategy == "naive" else 4)  # concatenation: rank 2 + 2

    # `continual-lora eval` path: reload and re-score gives the recorded row.
    row, recorded, stage = evaluate_run(result.run_dir)
    assert stage == 2 and rows_match(row, recorded)
