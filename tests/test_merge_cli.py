"""`continual-lora merge` on two PEFT adapters of the tiny BERT: the output loads with plain
`PeftModel.from_pretrained` and its ΔW is the expected merge (exactly for cat, within the
recorded SVD error otherwise); user errors exit 2 naming the bad folder or value."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel

from continual_lora.adapters import lora_factors
from continual_lora.cli import main
from continual_lora.merging import dare, task_arithmetic, ties


def _make_adapter(base_path, folder, seed: int, r: int, alpha: float, targets, **extra):
    """A PEFT adapter with random A and B (init_lora_weights=False), saved by PEFT itself."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                        init_lora_weights=False, **extra)
    config.base_model_name_or_path = str(base_path)
    get_peft_model(AutoModel.from_pretrained(base_path), config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def two_adapters(tiny_bert, tmp_path_factory):
    """Rank 2 (alpha 4, scaling 2) and rank 3 with rsLoRA (alpha 3, scaling 3/√3): the reader
    must reproduce PEFT's own scalings for the merge to be right."""
    root = tmp_path_factory.mktemp("adapters")
    a = _make_adapter(tiny_bert, root / "a", 1, 2, 4, ["query", "value"])
    b = _make_adapter(tiny_bert, root / "b", 2, 3, 3, ["query", "value"], use_rslora=True)
    return a, b


def _deltas(base_path, adapter_dir) -> dict[str, torch.Tensor]:
    """ΔW per module as PEFT itself loads the adapter (scaling from PEFT's layers)."""
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), str(adapter_dir))
    return {k: f.delta() for k, f in lora_factors(model).items()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_ties_merge_loads_and_matches_within_svd_error(two_adapters, tiny_bert, tmp_path,
                                                       capsys):
    a, b = two_adapters
    out = tmp_path / "ties"
    rc = main(["merge", str(a), str(b), "--method", "ties", "--density", "0.5",
               "--rank", "3", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rank 3" in printed and "mean" in printed and "max" in printed

    da, db = _deltas(tiny_bert, a), _deltas(tiny_bert, b)
    merged = _deltas(tiny_bert, out)
    config = json.loads((out / "adapter_config.json").read_text())
    info = json.loads((out / "merge_info.json").read_text())
    assert config["r"] == 3 and config["base_model_name_or_path"] == str(tiny_bert)
    assert set(merged) == set(da) and len(merged) == 4  # query and value, 2 layers
    for key, got in merged.items():
        expected = ties([da[key], db[key]], density=0.5)
        # The loaded ΔW is the rank-3 SVD of the expected merge: its error is the recorded one.
        error = _relative(got, expected)
        assert error == pytest.approx(info["relative_error_per_module"][key], abs=1e-5)
        assert 0 < error < 1  # TIES' trim makes the merge full rank: rank 3 is lossy
    assert info["relative_error"]["max"] == max(info["relative_error_per_module"].values())


def test_task_arithmetic_at_default_rank_is_exact(two_adapters, tiny_bert, tmp_path):
    a, b = two_adapters
    out = tmp_path / "ta"
    assert main(["merge", str(a), str(b), "--method", "task_arithmetic", "--weights", "0.5",
                 "1.5", "--out", str(out)]) == 0
    da, db = _deltas(tiny_bert, a), _deltas(tiny_bert, b)
    # Default rank 2 + 3 = 5 spans 0.5·ΔW_a + 1.5·ΔW_b: the SVD loses nothing.
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 5
    for key, got in _deltas(tiny_bert, out).items():
        expected = task_arithmetic([da[key], db[key]], [0.5, 1.5])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_rank_above_the_module_size_is_capped_and_exact(two_adapters, tiny_bert, tmp_path):
    a, b = two_adapters
    out = tmp_path / "full"
    assert main(["merge", str(a), str(b), "--method", "ties", "--density", "0.5", "--rank", "100",
                 "--out", str(out)]) == 0
    # The modules are 32×32: rank 32 is a full SVD, so even the full-rank TIES merge is exact.
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 32
    da, db = _deltas(tiny_bert, a), _deltas(tiny_bert, b)
    for key, got in _deltas(tiny_bert, out).items():
        torch.testing.assert_close(got, ties([da[key], db[key]], 0.5), atol=1e-5, rtol=1e-4)


def test_cat_is_exact_concatenation(two_adapters, tiny_bert, tmp_path):
    a, b = two_adapters
    out = tmp_path / "cat"
    assert main(["merge", str(a), str(b), "--method", "cat", "--out", str(out)]) == 0
    da, db = _deltas(tiny_bert, a), _deltas(tiny_bert, b)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 5
    for key, got in _deltas(tiny_bert, out).items():
        torch.testing.assert_close(got, da[key] + db[key], atol=1e-6, rtol=1e-6)


def test_dare_is_reproducible_from_its_seed(two_adapters, tiny_bert, tmp_path):
    a, b = two_adapters
    for name in ("x", "y"):
        assert main(["merge", str(a), str(b), "--method", "dare_linear", "--drop-rate", "0.3",
                     "--seed", "4", "--out", str(tmp_path / name)]) == 0
    x, y = (_deltas(tiny_bert, tmp_path / n) for n in ("x", "y"))
    assert all(torch.equal(x[k], y[k]) for k in x)
    # One generator seeded by --seed draws the modules' masks in sorted order.
    da, db = _deltas(tiny_bert, a), _deltas(tiny_bert, b)
    gen = torch.Generator().manual_seed(4)
    info = json.loads((tmp_path / "x" / "merge_info.json").read_text())
    for key in sorted(da):
        expected = dare([da[key], db[key]], 0.3, gen, then="linear")
        error = _relative(x[key], expected)
        assert error == pytest.approx(info["relative_error_per_module"][key], abs=1e-5)


def test_existing_out_is_refused_unless_overwrite(two_adapters, tmp_path, capsys):
    a, b = two_adapters
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(a), str(b), "--out", str(out)]) == 2
    assert f"--out {out} already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    assert main(["merge", str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_user_errors_exit_2_naming_the_problem(two_adapters, tiny_bert, tmp_path, capsys):
    a, b = two_adapters
    query_only = _make_adapter(tiny_bert, tmp_path / "q", 3, 2, 4, ["query"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    cases = [
        ([str(a), str(query_only)], f"{query_only} does not match {a}: different target"),
        ([str(a), str(pickled)], f"{pickled}: no adapter_model.safetensors (it has "
                                 "adapter_model.bin: only safetensors are read"),
        ([str(a), str(tmp_path / "missing")], f"{tmp_path / 'missing'}: not a folder"),
        ([str(a), str(b), "--method", "task_arithmetic", "--density", "0.5"],
         "--density does not apply to --method task_arithmetic"),
        ([str(a), str(b), "--method", "cat", "--rank", "2"], "--rank does not apply"),
        ([str(a), str(b), "--density", "1.5"], "--density 1.5: must be in (0, 1]"),
        ([str(a), str(b), "--weights", "1", "2", "3"], "--weights: 3 values for 2 adapters"),
        ([str(a), str(b), "--method", "mean"], "--method mean: unknown"),
    ]
    for args, message in cases:
        out = tmp_path / "never"
        assert main(["merge", *args, "--out", str(out)]) == 2, args
        assert message in capsys.readouterr().err, args
        assert not out.exists()


def test_a_merged_adapter_carries_the_lineage_of_its_inputs(tiny_run_config, tmp_path, capsys):
    """Two runs' adapters merged: lineage.json names both parents by hash, holds both chains,
    matches the written weights, and `inspect` shows it; inputs of different bases are
    refused."""
    from continual_lora.config import load_run_config
    from continual_lora.lineage import verify
    from continual_lora.runner import run

    stages = []
    for seed, name in enumerate(("one", "two")):  # two seeds: two different adapters
        cfg = tiny_run_config("naive", name=name, seed=seed)
        run_dir = run(load_run_config(None, data=cfg), echo=lambda _: None).run_dir
        stages.append(run_dir / "tasks" / "02-b" / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", *map(str, stages), "--method", "ties", "--out", str(out)]) == 0
    record = json.loads((out / "lineage.json").read_text())
    parents = [json.loads((s / "lineage.json").read_text()) for s in stages]
    assert [p["sha256"] for p in record["parents"]] == [p["adapter"]["sha256"] for p in parents]
    assert all(p["lineage_matches"] for p in record["parents"])
    # Each input's two stages, each once: a then b of run one, a then b of run two.
    assert [(c["run"]["name"], c["run"]["task"]) for c in record["chain"]] == [
        ("one", "a"), ("one", "b"), ("two", "a"), ("two", "b")]
    assert record["strategy"]["name"] == "merge:ties" and record["run"]["task"] == "merge"
    assert record["base_model"] == parents[0]["base_model"]
    assert verify(out, record)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "matches lineage.json" in shown and "5 stage(s)" in shown
    assert f"merge:ties of adapters {record['parents'][0]['sha256'][:8]}" in shown
    # An input whose lineage names another base is refused, and nothing is written.
    other = tmp_path / "other"
    import shutil

    shutil.copytree(stages[1], other)
    lineage = json.loads((other / "lineage.json").read_text())
    lineage["base_model"]["fingerprint_sha256"] = "0" * 64
    (other / "lineage.json").write_text(json.dumps(lineage))
    assert main(["merge", str(stages[0]), str(other), "--out", str(tmp_path / "bad")]) == 2
    assert "different base models" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", ["cat", "task_arithmetic"])
def test_conv_adapters_merge_and_load(tiny_resnet_tasks, tmp_path, method):
    """A ResNet's LoRA factors are convolutions (A [r, in, k, k], B [out, r, 1, 1]): merged on
    their flattened ΔW, written back in PEFT's layout, loaded by plain PEFT."""
    resnet, _ = tiny_resnet_tasks
    a = _make_adapter(resnet, tmp_path / "a", 1, 2, 2, ["convolution"])
    b = _make_adapter(resnet, tmp_path / "b", 2, 2, 4, ["convolution"])
    out = tmp_path / method
    assert main(["merge", str(a), str(b), "--method", method, "--out", str(out)]) == 0
    da, db = _deltas(resnet, a), _deltas(resnet, b)
    merged = _deltas(resnet, out)
    assert set(merged) == set(da)
    for key, got in merged.items():
        torch.testing.assert_close(got, da[key] + db[key], atol=1e-5, rtol=1e-5)
