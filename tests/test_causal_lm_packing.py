"""Packed causal-LM batches on the tiny Llama (issue 22, defect 6): examples laid end to end in
a row must not see each other. Each keeps its own position ids and a block-diagonal causal
mask, so a packed batch gives every example the logits of the padded batch, packed training
the loss and adapter of padded training, and LwF's teacher (computed padded) the student's
distribution at step 0. A model whose forward does not honour the mask trains padded."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from continual_lora.config import ModelConfig, load_run_config
from continual_lora.families import causal_lm
from continual_lora.families.causal_lm import IGNORE, CausalLMFamily
from continual_lora.lm_data import split_of
from continual_lora.sequence import Stream, TaskData

RECORDS = [{"prompt": "a dog is", "completion": " an animal"}, {"text": "rain falls on the hill"},
           {"question": "what is a cat?", "answer": "a small animal"},
           {"prompt": "oak", "completion": " tree"}]
_names = itertools.count(1)


def _family(tiny_llama, dtype: str = "float32") -> CausalLMFamily:
    fam = CausalLMFamily(ModelConfig(family="causal_lm", name_or_path=str(tiny_llama),
                                     max_length=64, packing=True, dtype=dtype))
    fam.load()
    return fam


@pytest.fixture
def family(tiny_llama):
    """A fresh family each test: the packing check's verdict is kept per family."""
    return _family(tiny_llama)


def _task() -> TaskData:
    return TaskData(1, f"p{next(_names)}", [], split_of(RECORDS), split_of(RECORDS))


def _batches(family, task):
    examples = [(1, i) for i in range(len(RECORDS))]
    family.cfg.packing = False
    padded = family.collate(examples, {1: task})
    family.cfg.packing = True
    return padded, family.collate(examples, {1: task})


def test_a_packed_row_keeps_its_examples_apart(family):
    task = _task()
    padded, packed = _batches(family, task)
    lengths = [len(family.encode(r)[0]) for r in RECORDS]
    assert packed["input_ids"].shape == (1, sum(lengths))  # all four share one 64-token row
    # Each example's logits are the padded batch's, on every loss token, in the same order
    # (the old code: one span over the row, so the 2nd-4th examples attended to the 1st).
    with torch.no_grad():
        out_padded, out_packed = family.forward(padded), family.forward(packed)
    keep_padded, keep_packed = padded["targets"] != IGNORE, packed["targets"] != IGNORE
    assert torch.equal(padded["targets"][keep_padded], packed["targets"][keep_packed])
    torch.testing.assert_close(out_packed.lm_logits[keep_packed],
                               out_padded.lm_logits[keep_padded], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_packed.loss, out_padded.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out_packed.per_example_loss, out_padded.per_example_loss,
                               rtol=1e-6, atol=0)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    # Positions restart at 0 on each example (the old code ran them on: 0..n-1 over the row).
    assert packed["position_ids"][0].tolist() == [j for n in lengths for j in range(n)]
    mask = packed["attention_mask"][0, 0]
    assert mask.dtype == torch.bool  # SDPA, the tiny Llama's attention, takes a boolean mask
    second, third = starts[1], starts[2]
    assert not mask[second, second - 1]  # the second example's first token: not the first's
    assert mask[third - 1, second] and mask[third - 1, third - 1]  # its own earlier tokens
    assert not mask[second, second + 1]  # causal: not the next token
    assert int(mask.sum()) == sum(n * (n + 1) // 2 for n in lengths)  # nothing else
    # No target crosses a boundary: an example's last token predicts nothing.
    assert all(int(packed["targets"][0, s - 1]) == IGNORE for s in starts[1:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_check_turns_packing_off_for_a_model_that_ignores_the_mask(tiny_llama, dtype,
                                                                        monkeypatch):
    """Eager attention adds its mask to the scores: handed a boolean one (as if the model's
    attention were misread), True/False add 1/0 and nothing is masked. The check must see the
    logits move, say so, and leave the batches padded (bfloat16's looser tolerance too)."""
    family, task = _family(tiny_llama, dtype), _task()
    stream = Stream([(1, i) for i in range(len(RECORDS))], 4, 1)
    family.backbone.config._attn_implementation = "eager"
    monkeypatch.setattr(causal_lm, "additive_mask_dtype", lambda backbone: None)
    note = family.prepare_training(stream, {1: task}, None)
    assert note.startswith("packing off: this model's forward does not honour position_ids")
    batch = family.collate([(1, i) for i in range(len(RECORDS))], {1: task})
    assert "position_ids" not in batch and batch["input_ids"].shape[0] == len(RECORDS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_check_keeps_packing_on_for_llama_in_both_attention_forms(tiny_llama, dtype):
    """SDPA (boolean mask) and eager attention (additive mask in the weights' dtype) both
    pass; so does a bfloat16 model, whose packed rows round differently (gap 0.002 here,
    within 4 bfloat16 rounding units; 1e-4 would have refused it)."""
    family, task = _family(tiny_llama, dtype), _task()
    stream = Stream([(1, i) for i in range(len(RECORDS))], 4, 1)
    assert family.prepare_training(stream, {1: task}, None).startswith("packed batches")
    family._packing_refused = None  # check again, with eager attention's additive mask
    family.backbone.config._attn_implementation = "eager"
    assert family.prepare_training(stream, {1: task}, None).startswith("packed batches")
    mask = family.collate([(1, 0), (1, 1)], {1: task})["attention_mask"]
    weights = getattr(torch, dtype)
    assert mask.dtype == weights and float(mask.min()) == torch.finfo(weights).min


def _lwf_run(tiny_llama, tmp_path, packing: bool):
    """LwF distilling the base model on task 1 (`first_task`): its KL starts at 0 exactly
    when the student computes what the teacher computed (padded). Most of the vocabulary
    (top 256 of 400) at temperature 1, so the KL is not blunted by grouping or softening.
    `max_length` 128 puts two or three of these 32-45-token questions in a row."""
    lwf = {"first_task": True, "top_k": 256, "temperature": 1.0}
    from continual_lora.runner import run

    cfg = {"name": f"pack-{packing}", "seed": 0,
           "model": {"family": "causal_lm", "name_or_path": str(tiny_llama),
                     "max_length": 128, "packing": packing},
           "lora": {"r": 2}, "strategy": {"name": "lwf", "options": lwf},
           "train": {"lr": 1e-2, "batch_size": 4, "max_steps": 3, "eval_batch_size": 8,
                     "log_every": 1},
           "upstream": {"kind": "none"},
           "tasks": [{"name": "r1", "facts": 1, "facts_per_round": 6}],
           "output_dir": str(tmp_path / "runs")}
    run_dir = run(load_run_config(None, data=cfg), echo=lambda _: None).run_dir
    steps = [json.loads(line) for line in (run_dir / "log.jsonl").open() if '"step"' in line]
    notes = [json.loads(line)["text"] for line in (run_dir / "log.jsonl").open()
             if '"note"' in line]
    return steps, notes, load_file(run_dir / "tasks" / "01-r1" / "adapter" /
                                   "adapter_model.safetensors")


def test_packed_training_equals_padded_training_and_lwf_starts_at_zero(tiny_llama, tmp_path):
    """Tolerances (float32 rounding: packed rows sum the same terms in other shapes): task
    losses within 1e-5 relative, the KL within 1e-7 absolute, adapter entries within 1e-5
    absolute (AdamW moves each entry by about lr = 1e-2 a step: 1e-5 is a thousandth of
    one; measured: 2e-7). The KL at step 0 is a difference of equal distributions: measured
    2e-8 packed (0 padded), against 6e-6 with the old code's cross-example attention and
    6e-5 one step later."""
    padded_steps, padded_notes, padded = _lwf_run(tiny_llama, tmp_path / "padded", False)
    packed_steps, packed_notes, packed = _lwf_run(tiny_llama, tmp_path / "packed", True)
    assert [s["step"] for s in packed_steps] == [0, 1, 2]
    # The teacher is the model at step 0: the KL of the student to it is 0 up to rounding.
    assert abs(packed_steps[0]["extra_loss"]) < 2e-7
    assert abs(padded_steps[0]["extra_loss"]) < 2e-7
    for a, b in zip(packed_steps, padded_steps, strict=True):
        assert a["task_loss"] == pytest.approx(b["task_loss"], rel=1e-5)
        assert a["extra_loss"] == pytest.approx(b["extra_loss"], rel=0, abs=1e-7)
    assert packed.keys() == padded.keys() and packed
    for name, value in packed.items():
        torch.testing.assert_close(value, padded[name], rtol=0, atol=1e-5, msg=name)
    assert any(float(v.abs().max()) > 1e-3 for k, v in packed.items() if "lora_B" in k)
    assert padded_notes == [] and packed_notes[0].startswith("packed batches")
