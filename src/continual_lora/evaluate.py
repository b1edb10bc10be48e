"""Reload a saved stage of a run folder (base + PEFT adapter + heads) and score it again.

The adapter is loaded with `PeftModel.from_pretrained`, exactly as a user would load it
anywhere else, so `continual-lora eval` also checks that what we saved is what we measured. Its
file is checked first, before the model loads (`adapters.check_weights_file`: whole, finite, not
all zero), and the load must apply every module (no silent partial load).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from continual_lora.adapter_check import check_finite, read_weights
from continual_lora.adapters import check_weights_file, load_adapter
from continual_lora.config import ConfigError, load_run_config
from continual_lora.families import make_family
from continual_lora.families.classifier import ClassifierFamily
from continual_lora.runner import Row, score_row
from continual_lora.sequence import load_sequence


def stage_dirs(run_dir: Path) -> list[Path]:
    stages = sorted(p for p in (run_dir / "tasks").glob("[0-9][0-9]-*") if p.is_dir())
    if not stages:
        raise ConfigError(f"{run_dir}: no saved stages under tasks/ (is this a run folder?)")
    return stages


def load_heads(family: ClassifierFamily, stage_dir: Path) -> dict:
    """Put the heads saved in `stage_dir` into the family's module; returns heads.json. The
    heads file is checked like an adapter's: whole and finite."""
    meta = json.loads((stage_dir / "heads.json").read_text())
    tensors, _ = read_weights(stage_dir / "heads.safetensors")
    check_finite(tensors, stage_dir / "heads.safetensors")
    family.module.heads = nn.ModuleDict()
    for key in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        weight, bias = tensors[f"{key}.weight"], tensors[f"{key}.bias"]
        head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        family.module.heads[key] = head.requires_grad_(False)
    family.module.offsets = {t["index"]: t["offset"] for t in meta["tasks"]}
    return meta


def load_stage(run_dir: Path, stage: int | None = None):
    """(config, tasks, probe, family, stage index, scorer) with the stage's adapter and heads
    loaded; `scorer` is None, or for a moe stage the mixture to score through."""
    cfg = load_run_config(run_dir / "config.yaml")
    stages = stage_dirs(run_dir)
    stage = len(stages) if stage is None else stage
    if not 1 <= stage <= len(stages):
        raise ConfigError(f"--stage must be between 1 and {len(stages)}, got {stage}")
    stage_dir = stages[stage - 1]
    check_stage_adapters(stage_dir)
    tasks, probe = load_sequence(cfg)
    family = make_family(cfg.model, cfg.seed)
    family.load()
    family.attach_sequence(tasks, probe)
    scorer = None  # what score_row enters around each task (moe: the mixture)
    if (stage_dir / "adapter" / "router.json").is_file():
        from continual_lora.strategies.moe import SavedMixture

        init = cfg.resolve_path(cfg.lora.init_adapter) if cfg.lora.init_adapter else None
        scorer = SavedMixture(family, stage_dir / "adapter", init)
    elif (stage_dir / "adapter").is_dir():
        family.set_backbone(load_adapter(family.backbone, stage_dir / "adapter", what="eval",
                                         trainable=False))
    elif (stage_dir / "model").is_dir():
        family.set_backbone(family.load_saved_backbone(stage_dir / "model"))
    else:
        raise ConfigError(f"{stage_dir}: no adapter/ or model/ saved at this stage "
                          "(full_ft saves weights after the last task only)")
    family.module.eval()
    if (stage_dir / "heads.json").is_file():  # a classifier's heads; a causal LM has none
        meta = load_heads(family, stage_dir)
        for t in meta["tasks"]:
            family._tasks[t["index"]] = tasks[t["index"] - 1]
    return cfg, tasks, probe, family, stage, scorer


def check_stage_adapters(stage_dir: Path) -> None:
    """The stage's adapter files (a mixture's: each task's), checked before any model loads:
    a damaged, non-finite or empty adapter is named at once."""
    adapter = stage_dir / "adapter"
    if (adapter / "router.json").is_file():
        folders = sorted(p for p in adapter.iterdir() if (p / "adapter_config.json").is_file())
    elif (adapter / "adapter_config.json").is_file():
        folders = [adapter]
    elif adapter.is_dir():
        raise ConfigError(f"eval: {adapter} is not a PEFT adapter folder (no "
                          "adapter_config.json): the stage's adapter is missing or damaged")
    else:
        folders = []
    for folder in folders:
        check_weights_file(folder, "score it (eval)")


def evaluate_run(run_dir: Path, stage: int | None = None) -> tuple[Row, list[float], int]:
    """Scores of the reloaded stage and the scores the run recorded for it."""
    cfg, tasks, probe, family, stage, scorer = load_stage(run_dir, stage)
    row = score_row(family, tasks, probe, stage, cfg.train.eval_batch_size, scorer)
    recorded = json.loads((run_dir / "results.json").read_text())["R"][stage]
    return row, recorded, stage


def rows_match(row: Row, recorded: list[float], tol: float = 1e-9) -> bool:
    return bool(np.allclose(row.scores, recorded, atol=tol))
