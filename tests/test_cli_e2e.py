"""End to end through the command line: the exact files of a run folder, metric ranges, the
refusal to overwrite, `eval` reproducing the recorded scores, and a bench's table."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from continual_lora.cli import main

RUN_FILES = {
    "config.yaml", "lineage.json", "plan.json", "accuracy_matrix.csv", "results.json",
    "predictions.npz", "metrics.json", "log.jsonl",
}
STAGE_FILES = {"heads.safetensors", "heads.json", "stage.json", "adapter/adapter_config.json",
               "adapter/adapter_model.safetensors", "adapter/README.md", "adapter/lineage.json"}


def _files(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_run_on_the_embedded_model(tmp_path, capsys):
    """The real MiniLM and real WordNet data, two small tasks, a few steps each."""
    config = {
        "name": "e2e",
        "tasks": [
            {"name": "living", "wordnet": ["noun.animal", "noun.plant"], "train_per_class": 16,
             "eval_per_class": 10},
            {"name": "verbs", "wordnet": ["verb.motion", "verb.communication"],
             "train_per_class": 16, "eval_per_class": 10},
        ],
        "train": {"max_steps": 3, "batch_size": 8},
        "upstream": {"size": 40},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "strategy.name=naive"]) == 0
    run_dir = tmp_path / "runs" / "e2e"
    expected = RUN_FILES | {f"tasks/{stage}/{f}" for stage in ("01-living", "02-verbs")
                            for f in STAGE_FILES}
    files = _files(run_dir)
    assert expected <= files
    # besides: the HTML report with its figures, and the tensorboard event files
    extra = files - expected
    assert {f for f in extra if not f.startswith(("figures/", "tensorboard/"))} == {"report.html"}
    assert {"figures/accuracy_matrix.png", "figures/task_curves.png",
            "figures/training_loss.png", "figures/class_forgetting.png"} <= extra
    assert any(f.startswith("tensorboard/") and "tfevents" in f for f in extra)

    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("acc", "plasticity", "upstream_before", "upstream_after"):
        assert 0.0 <= m[key] <= 1.0, key
    for key in ("forgetting", "bwt", "fwt", "upstream_drop"):
        assert -1.0 <= m[key] <= 1.0, key
    assert m["upstream_before"] > 0.3  # the pretrained encoder can retrieve words: real weights
    assert m["trainable_parameters"] > 0 and m["strategy"] == "naive"
    rows = list(csv.reader((run_dir / "accuracy_matrix.csv").open()))
    assert rows[0] == ["stage", "living", "verbs", "upstream"] and len(rows) == 4
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert len(lineage["base_model"]["fingerprint_sha256"]) == 64
    assert [d["task"] for d in lineage["data"]] == ["living", "verbs"]
    assert all(len(d["train_sha256"]) == 64 for d in lineage["data"])
    steps = [json.loads(line) for line in (run_dir / "log.jsonl").open()]
    assert sum(1 for e in steps if e["event"] == "step") >= 2
    out = capsys.readouterr().out
    assert "ACC" in out and str(run_dir) in out
    assert f"report: {run_dir / 'report.html'}" in out

    # Never overwrite: a second run into the same folder is refused and changes nothing.
    before = {f: (run_dir / f).read_bytes() for f in _files(run_dir)}
    assert main(["run", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {f: (run_dir / f).read_bytes() for f in _files(run_dir)} == before

    # eval reloads the saved adapter with plain PEFT and reproduces the recorded row.
    assert main(["eval", str(run_dir)]) == 0
    assert "recorded" in capsys.readouterr().out


def test_bench_table_has_a_row_per_strategy_and_joint(tiny_bench_config, tmp_path, capsys):
    assert main(["bench", str(tiny_bench_config("tinybench"))]) == 0
    bench_dir = tmp_path / "runs" / "tinybench"
    assert {"bench.yaml", "comparison.md", "comparison.csv"} <= _files(bench_dir)
    rows = list(csv.DictReader((bench_dir / "comparison.csv").open()))
    assert [r["strategy"] for r in rows] == ["naive", "replay", "joint"]
    for r in rows:
        assert 0.0 <= float(r["acc"]) <= 1.0 and int(r["trainable_parameters"]) > 0
    md = (bench_dir / "comparison.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 4  # header + 3 rows
    assert "Forgetting = (1/(T-1))" in md
    # every row's run folder was written, and the starting point was shared
    r0 = [json.loads((bench_dir / "runs" / s / "results.json").read_text())["R"][0]
          for s in ("naive-r2", "replay-r2", "joint-r2")]
    assert r0[0] == r0[1] == r0[2]


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("tasks: [{name: a, wordnet: [noun.animal, noun.plant]}]\ntrain: {lr: -1}\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_strategies_command_lists_the_registry(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("naive", "replay", "joint", "merge_reinit", "full_ft"):
        assert name in out


@pytest.mark.parametrize("strategy, code, words", [
    ("naive", 1, "does not reproduce"),  # exact export: a mismatch is an error
    ("magmax", 0, "truncated SVD"),  # stated approximation: a note, not an error
])
def test_eval_tells_an_approximate_export_from_a_broken_one(strategy, code, words,
                                                            tiny_run_config, tmp_path, capsys):
    cfg = tiny_run_config(strategy)
    cfg["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / cfg["name"]
    # Pretend the recorded scores differ from what the reloaded adapter gives.
    results = json.loads((run_dir / "results.json").read_text())
    results["R"][-1] = [s + 0.25 for s in results["R"][-1]]
    (run_dir / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == code
    captured = capsys.readouterr()
    assert words in captured.out + captured.err
