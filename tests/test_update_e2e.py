"""End to end on the embedded all-MiniLM-L6-v2 and real WordNet glosses (the README's worked
example, shortened): train a LoRA on `living`, then `update` it with `coarse`, whose classes
merge `living`'s, without old data, with old data, and with a forgetting budget."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from continual_lora.cli import main
from continual_lora.config import load_run_config
from continual_lora.runner import run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--steps", "40", "--eval-every", "10", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("make_data",
                                                  ROOT / "examples/update/make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    folder = tmp_path_factory.mktemp("example")
    make_data.write(folder / "data")  # the worked example's data: 150 + 50 glosses per class
    data = folder / "data"
    cfg = {"name": "stage1", "output_dir": str(folder / "runs"), "lora": {"r": 8},
           "train": {"lr": 1e-3, "batch_size": 32, "max_steps": 30},
           "upstream": {"size": 200},
           "tasks": [{"name": "living", "train": str(data / "living_train.csv"),
                      "eval": str(data / "living_eval.csv")}]}
    run_dir = run(load_run_config(None, data=cfg), echo=lambda _: None).run_dir
    return {"data": data, "run": run_dir, "folder": folder}


def _update(example, out: Path, *extra: str, capsys) -> tuple[dict, str]:
    data = example["data"]
    argv = ["update", "--adapter", str(example["run"]), "--new", str(data / "coarse_train.csv"),
            "--new-eval", str(data / "coarse_eval.csv"), "--new-name", "coarse", "--out",
            str(out), *extra]
    code = main(argv)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    printed = printed.out
    return json.loads((out / "update_report.json").read_text()), printed


def _check_adapter_folder(out: Path, parent: Path) -> dict:
    for name in ("adapter_config.json", "adapter_model.safetensors", "lineage.json",
                 "heads.safetensors", "update_plan.json", "update_report.md", "budget_curve.png",
                 "budget_curve.csv", "flips.jsonl"):
        assert (out / name).is_file(), name
    lineage = json.loads((out / "lineage.json").read_text())
    parent_lineage = json.loads((parent / "lineage.json").read_text())
    assert lineage["parent"]["sha256"] == parent_lineage["adapter"]["sha256"]
    assert [c["run"]["task"] for c in lineage["chain"]] == ["living"]
    assert [d["task"] for d in lineage["data"]] == ["living", "coarse"]
    assert lineage["base_model"]["fingerprint_sha256"] == \
        parent_lineage["base_model"]["fingerprint_sha256"]
    return lineage


def test_update_without_old_data(example, tmp_path, capsys):
    out = tmp_path / "v2"
    report, printed = _update(example, out, "--eval-every", "25", capsys=capsys)  # defaults
    assert "strategy      lwf (auto: no old data" in printed
    # 3 passes over 590 examples in batches of 32 = 56 steps, kept within 100-300.
    assert "steps         100 (3 passes over the 590 new examples" in printed
    assert "matches the old adapter's lineage" in printed
    assert "lr            0.0004 (0.4 × the first stage's lr 0.001" in printed
    lineage = _check_adapter_folder(out, example["run"] / "tasks/01-living/adapter")
    assert lineage["strategy"]["name"] == "lwf"
    assert report["old"][0]["scored_on"] == "probe" and report["old"][0]["before"] == 1.0
    assert report["new"]["after"] > report["new"]["before"], printed  # the new task improved
    assert 0.8 <= report["old"][0]["after"] <= 1.0  # agreement with the old model stays high
    assert report["upstream"]["before"] > 0.3  # the encoder's own skill, measured


def test_update_with_old_data_replays_and_measures_on_held_out(example, tmp_path, capsys):
    data = example["data"]
    out = tmp_path / "v2"
    report, printed = _update(example, out, "--old", str(data / "living_train.csv"), *SHORT,
                              capsys=capsys)
    plan = json.loads((out / "update_plan.json").read_text())
    assert plan["strategy"] == "replay" and "auto: old data is given" in plan["strategy_why"]
    assert abs(plan["repeats"]["new_share"] - 0.5) <= 0.02
    assert {m["role"] for m in plan["mix"]} == {"new", "replay"}
    assert plan["old_tasks"][0]["scored_on"] == "held-out"
    assert plan["old_tasks"][0]["held_out"] == 120  # 20 % of living_train.csv's 600 rows
    _check_adapter_folder(out, example["run"] / "tasks/01-living/adapter")
    assert report["new"]["after"] > report["new"]["before"], printed
    assert report["old_mean"]["drop"] <= 0.05, printed


def test_update_keeps_the_forgetting_budget(example, tmp_path, capsys):
    """naive with no old data forgets steadily on this pair; the budget must hold it at the last
    evaluation within 0.02, and the saved adapter must be the one measured there."""
    out = tmp_path / "v2"
    report, printed = _update(example, out, "--strategy", "naive", "--max-forgetting", "0.02",
                              "--steps", "40", "--eval-every", "5", capsys=capsys)
    budget = report["budget"]
    curve = budget["curve"]
    saved = next(p for p in curve if p["step"] == budget["saved_step"])
    assert saved["within"] and saved["drop"] <= 0.02
    assert report["old_mean"]["drop"] <= 0.02  # the saved model, measured again
    assert report["old"][0]["after"] == pytest.approx(saved["old"]["living"])
    assert report["new"]["after"] == pytest.approx(saved["new"])
    # It went over (deterministic on CPU): training stopped after two evaluations over the
    # budget, and the weights of the last step within it were put back.
    assert budget["restored"] and budget["stopped_at"] is not None, printed
    over = [p for p in curve if p["step"] > budget["saved_step"]]
    assert len(over) == 2 and not any(p["within"] for p in over)
    assert budget["stopped_at"] == over[-1]["step"] < 40
    assert "restored to step" in printed
    assert report["new"]["after"] > report["new"]["before"], printed
