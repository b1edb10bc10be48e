"""The embedded ViT end to end (slow: builds the model on first use, about a minute on 2 cores,
then cached): a short merged-LoRA run, its upstream score against the build's own measurement,
and `continual-lora report` on the run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from continual_lora.cli import main
from continual_lora.config import load_run_config

pytestmark = pytest.mark.slow


def test_embedded_vit_run_and_forgetting_report(tmp_path, capsys):
    from continual_lora.embedded_vision import embedded_vision_path
    from continual_lora.runner import run

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "name": "vit", "model": {"name_or_path": "embedded:vit"}, "lora": {"r": 4},
        "strategy": {"name": "merge_reinit"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.002, "eval_batch_size": 256},
        "tasks": [{"name": "hoofed", "image_classes": ["cow", "giraffe", "horse", "zebra"],
                   "train_per_class": 64, "eval_per_class": 40},
                  {"name": "digits", "image_classes": ["five", "six", "seven"],
                   "train_per_class": 40, "eval_per_class": 30}],
        "output_dir": str(tmp_path / "runs")}))
    result = run(load_run_config(config), echo=lambda *_: None)
    build = json.loads((embedded_vision_path("vit") / "recipe.json").read_text())
    # row 0 scores the pretrained head on the build's own held-out images
    assert result.U[0] == pytest.approx(build["probe_accuracy"], abs=0.005)
    assert result.R.shape == (3, 2) and np.all((result.R >= 0) & (result.R <= 1))
    assert result.R[1, 0] > 0.5  # four new classes learned above chance (0.25)
    assert main(["report", str(result.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "during task 1 (hoofed): most forgotten upstream classes" in out
    figures = result.run_dir / "figures"
    for name in ("class_forgetting.png", "contextual_forgetting.png", "forgetting.json"):
        assert (figures / name).stat().st_size > 1000
    numbers = json.loads((figures / "forgetting.json").read_text())
    assert {c["name"] for c in numbers["class_forgetting"][0]["classes"]} == set(
        build["upstream_classes"])
    assert 0 < numbers["contextual"][0]["similarity_all"] < 1
