"""Adapters that carry their lineage (`adapter/lineage.json`), and `continual-lora inspect`."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from continual_lora.cli import main
from continual_lora.config import load_run_config
from continual_lora.lineage import SCHEMA
from continual_lora.runner import run

STAGES = ("01-a", "02-b")


def _run(cfg: dict):
    return run(load_run_config(None, data=cfg), echo=lambda _: None).run_dir


def _record(run_dir, stage):
    return json.loads((run_dir / "tasks" / stage / "adapter" / "lineage.json").read_text())


def _sha(file) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _inspect_json(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_stage_adapter_carries_its_lineage(tiny_run_config):
    run_dir = _run(tiny_run_config("naive"))
    run_lineage = json.loads((run_dir / "lineage.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    first, second = (_record(run_dir, s) for s in STAGES)

    for t, (stage, record) in enumerate(zip(STAGES, (first, second), strict=True), start=1):
        adapter = run_dir / "tasks" / stage / "adapter"
        assert record["schema"] == SCHEMA
        # This folder's own hash: the sha256 of its single safetensors file's bytes.
        assert record["adapter"] == {"sha256": _sha(adapter / "adapter_model.safetensors"),
                                     "files": ["adapter_model.safetensors"]}
        assert record["base_model"]["fingerprint_sha256"] == \
            run_lineage["base_model"]["fingerprint_sha256"]
        assert record["data"] == run_lineage["data"][:t]  # the tasks trained so far, same hashes
        assert record["metrics"]["R_row"] == results["R"][t]
        assert record["metrics"]["acc_so_far"] == sum(results["R"][t][:t]) / t
        assert record["metrics"]["upstream"] is None  # no probe in the tiny run: null, not NaN
        assert record["train"]["lr"] == plan[t - 1]["lr"] == 1e-2
        assert record["train"]["steps"] == plan[t - 1]["steps"] == 4
        assert record["train"]["batch_size"] == 8
        assert record["lora"]["r"] == 2 and record["lora"]["alpha"] == 4  # alpha_rule 2r
        assert record["strategy"]["name"] == "naive"
        stage_json = json.loads((run_dir / "tasks" / stage / "stage.json").read_text())
        assert record["export"] == stage_json["export"]
        assert record["run"] == {"name": "tiny-naive", "stage": t, "task": stage[3:]}

    assert first["parent"] is None and first["chain"] == []  # no init_adapter
    assert second["parent"]["sha256"] == first["adapter"]["sha256"]
    assert second["parent"]["path"] == str(run_dir / "tasks" / "01-a" / "adapter")
    assert second["chain"] == [{k: v for k, v in first.items() if k != "chain"}]


def test_a_run_from_an_adapter_carries_the_earlier_chain(tiny_run_config, capsys):
    run1 = _run(tiny_run_config("naive"))
    old = run1 / "tasks" / "02-b" / "adapter"
    cfg = tiny_run_config("naive", name="second")
    cfg["lora"] = {"r": 2, "init_adapter": str(old)}
    run2 = _run(cfg)
    r1 = [_record(run1, s) for s in STAGES]
    first = _record(run2, "01-a")

    assert first["parent"]["sha256"] == r1[1]["adapter"]["sha256"]
    assert first["parent"]["lineage_matches"] is True
    no_chain = [{k: v for k, v in r.items() if k != "chain"} for r in r1]
    assert first["chain"] == no_chain  # run 1's two stages, oldest first
    assert _record(run2, "02-b")["chain"][:2] == no_chain

    info = _inspect_json(run2 / "tasks" / "02-b" / "adapter", capsys)
    chain = info["lineage"]["chain"]
    assert [(s["run"], s["task"]) for s in chain] == [
        ("tiny-naive", "a"), ("tiny-naive", "b"), ("second", "a"), ("second", "b")]
    assert chain[0]["data"] == [f"a_train.csv@{r1[0]['data'][0]['train']['sha256'][:8]}"]
    assert chain[1]["acc_so_far"] == r1[1]["metrics"]["acc_so_far"]


def test_inspect_a_peft_adapter_and_a_tampered_one(tiny_run_config, tmp_path, capsys):
    run_dir = _run(tiny_run_config("naive"))
    adapter = run_dir / "tasks" / "01-a" / "adapter"
    weights = adapter / "adapter_model.safetensors"
    # Independently: rank from lora_A's rows, parameters from every tensor's size.
    with safe_open(str(weights), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    ranks = {s[0] for k, s in shapes.items() if k.endswith("lora_A.weight")}
    n_params = sum(math.prod(s) for s in shapes.values())
    # 2 layers × (query, value), each A 2×32 and B 32×2: 4 modules × 128 = 512.
    assert ranks == {2} and n_params == 512

    info = _inspect_json(adapter, capsys)
    assert info["format"] == "peft_lora" and info["ranks"] == [2] and info["alphas"] == [4]
    assert info["scalings"] == [2] and info["target_modules"] == ["query", "value"]
    assert info["adapted_modules"] == 4 and info["parameters"] == n_params
    assert info["dtypes"] == ["F32"] and info["lineage"]["matches"] is True
    assert main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "PEFT LoRA" in text and "512 (F32)" in text and "matches lineage.json" in text
    assert "1. tiny-naive stage 1 (a): naive" in text

    tampered = tmp_path / "tampered"
    shutil.copytree(adapter, tampered)
    data = bytearray((tampered / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor's data
    (tampered / "adapter_model.safetensors").write_bytes(bytes(data))
    info = _inspect_json(tampered, capsys)
    assert info["lineage"]["matches"] is False
    assert info["sha256"] != info["lineage"]["recorded_sha256"]
    assert main(["inspect", str(tampered)]) == 0
    assert "DOES NOT MATCH lineage.json" in capsys.readouterr().out


def test_inspect_a_kohya_file(tmp_path, capsys):
    unet, te = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_q_proj"
    tensors = {
        f"{unet}.lora_down.weight": torch.zeros(4, 16),
        f"{unet}.lora_up.weight": torch.zeros(16, 4),
        f"{unet}.alpha": torch.tensor(8.0),
        f"{te}.lora_down.weight": torch.zeros(4, 8), f"{te}.lora_up.weight": torch.zeros(8, 4),
        f"{te}.alpha": torch.tensor(8.0),
    }
    file = tmp_path / "style.safetensors"
    save_file(tensors, str(file), metadata={"ss_sd_model_name": "sd15.safetensors"})
    for path in (file, tmp_path):  # the file, and the folder holding it
        info = _inspect_json(path, capsys)
        # Loadable: `convert` writes it as PEFT or diffusers (issue 23, item 9).
        assert info["format"] == "kohya" and "not yet loadable" not in info["format_text"]
        assert "continual-lora convert" in info["format_text"]
        # Its factors are zeros: it changes nothing, which inspect says (exit 0 still).
        assert info["warnings"] == ["every lora_up (2 tensors) is all zero: the adapter changes "
                                    "nothing (ΔW = s·B·A = 0): saved before any training step, "
                                    "or an empty save"]
        assert info["ranks"] == [4] and info["alphas"] == [8] and info["scalings"] == [2]
        assert info["adapted_modules"] == 2 and info["target_modules"] == ["lora_te", "lora_unet"]
        assert info["parameters"] == 4 * 16 * 2 + 4 * 8 * 2 + 2  # the two alphas are scalars
        assert info["base_model"] == "sd15.safetensors" and info["lineage"] is None


def test_inspect_full_weights(tiny_bert, capsys):
    info = _inspect_json(tiny_bert, capsys)
    with safe_open(str(tiny_bert / "model.safetensors"), framework="pt") as fh:
        n = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118
    assert info["format"] == "full_weights" and info["parameters"] == n
    assert info["lineage"] is None and info["ranks"] == []


def test_inspect_refuses_what_it_does_not_recognise(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not an adapter")
    for path in (folder, tmp_path / "missing", folder / "readme.txt"):
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err
