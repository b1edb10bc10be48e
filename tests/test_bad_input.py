"""Every kind of bad input in one table: the command exits with status 2 and a message that names
the file, field or value and says what to do; and no file is written or overwritten.

Each case builds its own inputs in a fresh folder, runs the CLI, and checks that the folder's
files are exactly those that were there before (same names, same bytes), apart from the cases
that fail while training (non-finite loss, disk full), where what was written before stays
intact and nothing half-written is left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from continual_lora.cli import main


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Case:
    """`setup(env)` returns the CLI arguments; the error must contain every `expect` string."""

    name: str
    setup: Callable[[Env], list[str]]
    expect: list[str]
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


@dataclass
class Env:
    folder: Path
    tiny_bert: Path
    tasks: Path  # tiny task files a_*.csv, b_*.jsonl
    adapter: Path  # a trained PEFT adapter of tiny_bert
    other_base: Path  # a wider BERT: the adapter's shapes do not fit it
    cfg: dict = field(default_factory=dict)

    def config(self, **changes) -> Path:
        """A run config (two tiny tasks, 4 steps each) with `changes` applied, as a file."""
        cfg = json.loads(json.dumps(self.cfg))
        for dotted, value in changes.items():
            node, parts = cfg, dotted.split("__")
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            elif value is DELETE:
                node.pop(last)
            else:
                node[last] = value
        path = self.folder / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def csv(self, name: str, text: str) -> str:
        path = self.folder / name
        path.write_text(text)
        return str(path)


DELETE = object()


def _corrupt_adapter(env: Env, how: str) -> str:
    from safetensors.torch import load_file, save_file

    broken = env.folder / f"adapter-{how}"
    shutil.copytree(env.adapter, broken)
    weights = broken / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        tensors = load_file(str(weights))
        save_file(dict(sorted(tensors.items())[:2]), str(weights))
    return str(broken)


def _nan_from_step(step: int):
    def patch(monkeypatch):
        from continual_lora.families.classifier import ClassifierFamily

        real = ClassifierFamily.forward
        calls = {"n": 0}

        def forward(self, batch, module=None):
            out = real(self, batch, module)
            calls["n"] += 1
            if calls["n"] > step:
                out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(ClassifierFamily, "forward", forward)

    return patch


def _disk_full_at(kind: str):
    """ENOSPC from the filesystem when the runner writes `kind` the second time (stage 2)."""

    def patch(monkeypatch):
        import continual_lora.checkpoint as checkpoint

        real = checkpoint.write_bytes_atomic
        seen = {"n": 0}

        def write(path, data):
            if path.name == kind:
                seen["n"] += 1
                if seen["n"] == 2:
                    def full(*_):
                        raise OSError(errno.ENOSPC, "No space left on device")
                    monkeypatch.setattr(checkpoint.os, "fsync", full)
            return real(path, data)

        monkeypatch.setattr(checkpoint, "write_bytes_atomic", write)

    return patch


def _freeze_everything(monkeypatch):
    """A strategy setup that leaves nothing trainable (fault injected)."""
    from continual_lora.strategies.base import ensure_adapter
    from continual_lora.strategies.naive import NaiveStrategy

    def before_task(self, ctx):
        ensure_adapter(ctx)
        ctx.family.backbone.requires_grad_(False)

    monkeypatch.setattr(NaiveStrategy, "before_task", before_task)


def _run(env: Env, **changes) -> list[str]:
    return ["run", str(env.config(**changes))]


def _update(env: Env, *extra: str) -> list[str]:
    return ["update", "--adapter", str(env.adapter), "--new", str(env.tasks / "b_train.jsonl"),
            "--out", str(env.folder / "out"), "--steps", "4", *extra]


CASES = [
    # -- configuration ----------------------------------------------------------------------
    Case("yaml_not_a_mapping", lambda e: ["run", e.csv("list.yaml", "- a\n- b\n")],
         ["list.yaml", "top level must be a mapping", "found a list"]),
    Case("yaml_syntax", lambda e: ["run", e.csv("bad.yaml", "tasks: [\n")],
         ["bad.yaml", "not valid YAML"]),
    Case("unknown_key", lambda e: _run(e, train__lrr=0.1),
         ["train.lrr", "unknown key"]),
    Case("wrong_type", lambda e: _run(e, train__lr="fast"),
         ["train.lr", "got 'fast'"]),
    Case("conflicting_options", lambda e: _run(e, lora__alpha=4, lora__alpha_rule="r"),
         ["alpha=4 contradicts alpha_rule 'r'"]),
    Case("unknown_strategy", lambda e: _run(e, strategy__name="nope"),
         ["strategy.name", "unknown strategy 'nope'", "available"]),
    Case("bad_strategy_option", lambda e: _run(e, strategy={"name": "replay",
                                                            "options": {"buffer": 3}}),
         ["strategy.options.buffer", "unknown key"]),
    # -- data ---------------------------------------------------------------------------------
    Case("missing_split", lambda e: _run(e, tasks__0__eval=DELETE),
         ["`eval` is missing"]),
    Case("file_not_found", lambda e: _run(e, tasks__0__train="nowhere.csv"),
         ["tasks.0 (a)", "data file not found", "nowhere.csv"]),
    Case("empty_dataset", lambda e: _run(e, tasks__0__train=e.csv("empty.csv", "text,label\n")),
         ["tasks.0 (a)", "empty.csv holds no examples"]),
    Case("empty_held_out_split",
         lambda e: _run(e, tasks__1__eval=e.csv("empty_eval.jsonl", "\n")),
         ["tasks.1 (b)", "empty_eval.jsonl holds no examples"]),
    Case("label_column_missing",
         lambda e: _run(e, tasks__0__train=e.csv("nolabel.csv", "text,kind\nx,y\nz,w\n")),
         ["nolabel.csv has no column 'label'", "label_column"]),
    Case("held_out_label_unknown",
         lambda e: _run(e, tasks__0__eval=e.csv("odd.csv", "text,label\nx,noun.fish\n")),
         ["odd.csv", "noun.fish", "Every held-out label must occur in training"]),
    Case("path_escapes_data_dir",
         lambda e: _run(e, data_dir=str(e.folder / "data")),
         ["tasks.0 (a).train", "leads outside data_dir"]),
    Case("unsupported_file_type", lambda e: _run(e, tasks__0__train=e.csv("a.xlsx", "x")),
         ["a.xlsx", "unsupported file type '.xlsx'"]),
    # -- model and adapter -----------------------------------------------------------------------
    Case("target_modules_not_found", lambda e: _run(e, lora__target_modules=["attn_q"]),
         ["lora.target_modules", "['attn_q'] match no module", "candidates"]),
    Case("model_not_found", lambda e: _run(e, model__name_or_path=str(e.folder / "no-model")),
         ["model.name_or_path", "no-model"]),
    Case("adapter_shapes_do_not_fit_base",
         lambda e: _run(e, lora__init_adapter=str(e.adapter),
                        model__name_or_path=str(e.other_base)),
         ["lora.init_adapter", "does not fit this base model"]),
    Case("adapter_keys_match_only_some",
         lambda e: _run(e, lora__init_adapter=_corrupt_adapter(e, "partial")),
         ["applied 1 of the 4 LoRA modules", "refusing a silent partial load"]),
    Case("truncated_safetensors",
         lambda e: _run(e, lora__init_adapter=_corrupt_adapter(e, "truncated")),
         ["adapter_model.safetensors: not a complete safetensors file", "truncated"]),
    Case("zero_trainable_parameters", lambda e: _run(e), ["0 trainable parameters"],
         _freeze_everything),
    Case("update_rank_differs", lambda e: _update(e, "--rank", "4"),
         ["requested r 4 (old adapter: 2) differs", "--change-lora"]),
    Case("update_adapter_from_another_base",
         lambda e: _update(e, "--base", str(e.other_base), "--allow-base-mismatch"),
         ["does not fit the base"]),
    # -- while training and saving ------------------------------------------------------------
    Case("non_finite_loss", lambda e: _run(e), ["task b, step 2: loss is nan",
                                                "dtype torch.float32", "Lower train.lr"],
         _nan_from_step(6)),
    Case("disk_full_while_saving", lambda e: _run(e),
         ["no space left on the device while writing", "results.json", "--resume"],
         _disk_full_at("results.json")),
]


@pytest.fixture(scope="module")
def shared(tiny_bert, tiny_task_files, tmp_path_factory):
    """The trained adapter and the wider base, made once."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from continual_lora.config import load_run_config
    from continual_lora.runner import run

    folder = tmp_path_factory.mktemp("shared")
    cfg = {"name": "src", "model": {"name_or_path": str(tiny_bert), "max_length": 32},
           "lora": {"r": 2}, "upstream": {"kind": "none"}, "output_dir": str(folder),
           "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 2, "eval_batch_size": 16},
           "tasks": [{"name": "a", "train": str(tiny_task_files / "a_train.csv"),
                      "eval": str(tiny_task_files / "a_eval.csv")}]}
    adapter = run(load_run_config(None, data=cfg), echo=lambda _: None).run_dir / \
        "tasks" / "01-a" / "adapter"
    wider = folder / "wider-bert"
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128)).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    return adapter, wider


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_refused_clearly_and_loses_nothing(case, shared, tiny_bert, tiny_task_files,
                                                        tiny_run_config, tmp_path, capsys,
                                                        monkeypatch):
    adapter, wider = shared
    env = Env(tmp_path, tiny_bert, tiny_task_files, adapter, wider)
    env.cfg = tiny_run_config("naive")
    env.cfg["output_dir"] = str(tmp_path / "runs")
    argv = case.setup(env)
    before = _snapshot(tmp_path)
    inputs_before = _snapshot(tiny_task_files)
    if case.patch is not None:
        case.patch(monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err
    shown = " ".join(err[err.find("error:"):].split())  # the message, without progress bars
    print(f"\n[{case.name}] {shown}")  # `pytest -s` lists each case with what the user reads
    for expected in case.expect:
        assert expected in err, (case.name, err)
    assert "Traceback" not in err
    after = _snapshot(tmp_path)
    assert _snapshot(tiny_task_files) == inputs_before  # inputs are never touched
    assert not any(".tmp" in name for name in after), after  # nothing half-written
    if case.name in ("non_finite_loss", "disk_full_while_saving"):
        # Failed while training or saving stage 2: what was written before is whole and
        # unchanged, results.json still describes stage 1, and the run can be resumed.
        run_dir = tmp_path / "runs" / env.cfg["name"]
        results = json.loads((run_dir / "results.json").read_text())
        assert len(results["R"]) == 2  # row 0 and stage 1
        if case.name == "non_finite_loss":  # never an adapter from the broken task
            assert not (run_dir / "tasks" / "02-b").exists()
        assert list((run_dir / "checkpoints").glob("*/step-*"))  # resumable
        assert before == {k: after[k] for k in before}
    else:
        assert after == before, sorted(set(after) - set(before))
