"""Fault injection: a real training run killed with SIGKILL (mid-task, between tasks, during a
checkpoint write) and resumed with `continual-lora run --resume` ends with the same adapter,
heads and accuracy matrix as the uninterrupted run, bit for bit (CPU, deterministic math, the
same thread count)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from continual_lora.cli import main
from continual_lora.config import load_run_config
from continual_lora.runner import run

STEPS = 120

# Runs the CLI in a child process that kills itself with SIGKILL just before the Nth
# checkpoint folder is renamed into place (the write is then half done: a hidden temp folder).
KILL_DURING_WRITE = """
import os, signal, sys
real_replace = os.replace
count = 0
def replace(src, dst):
    global count
    if "checkpoints" in str(dst) and os.path.basename(str(dst)).startswith("step-"):
        count += 1
        if count == int(os.environ["KILL_AT_WRITE"]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
from continual_lora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _config(tiny_run_config, tmp_path: Path, strategy: str, name: str) -> Path:
    cfg = tiny_run_config(strategy, name=name)
    cfg["train"].update({"max_steps": STEPS, "epochs": 100, "checkpoint_every": 10})
    cfg["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _child(args: list[str], **env) -> subprocess.Popen:
    # The same thread count as this process: another would change float summation order.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **env}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 300
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _outcome(run_dir: Path) -> dict:
    stage = run_dir / "tasks" / "02-b"
    tensors = {f"{f.relative_to(stage)}:{k}": v for f in sorted(stage.rglob("*.safetensors"))
               for k, v in load_file(str(f)).items()}  # adapter(s), heads, moe's router
    results = json.loads((run_dir / "results.json").read_text())
    return {"tensors": tensors, "R": results["R"], "U": results["U"]}


def _assert_same(a: dict, b: dict) -> None:
    assert a["R"] == b["R"] and a["U"] == b["U"]
    assert a["tensors"].keys() == b["tensors"].keys()
    different = [k for k in a["tensors"] if not torch.equal(a["tensors"][k], b["tensors"][k])]
    assert not different, different[:3]


def _steps(folder: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in folder.glob("step-[0-9]*")]


KILL_POINTS = {
    "mid_task_1": lambda run_dir: any(s >= 40 for s in _steps(run_dir / "checkpoints/01-a")),
    "between_tasks": lambda run_dir: (run_dir / "results.json").is_file(),
    "mid_task_2": lambda run_dir: any(s >= 50 for s in _steps(run_dir / "checkpoints/02-b")),
}


@pytest.mark.parametrize("strategy,point", [
    ("naive", "mid_task_1"), ("naive", "between_tasks"), ("naive", "mid_task_2"),
    ("replay", "mid_task_2"), ("merge_reinit", "mid_task_2"), ("olora", "mid_task_2"),
    ("lwf", "mid_task_2"), ("magmax", "mid_task_2"), ("moe", "mid_task_2"),
])
def test_sigkill_then_resume_equals_the_uninterrupted_run(strategy, point, tiny_run_config,
                                                          tmp_path):
    whole = run(load_run_config(_config(tiny_run_config, tmp_path, strategy, "whole")),
                echo=lambda _: None).run_dir
    config = _config(tiny_run_config, tmp_path, strategy, "killed")
    killed = tmp_path / "runs" / "killed"
    proc = _child(["-m", "continual_lora.cli", "run", str(config)])
    _kill_when(proc, lambda: KILL_POINTS[point](killed), point)
    assert not (killed / "metrics.json").exists()  # it really was interrupted
    assert main(["run", "--resume", str(killed)]) == 0
    _assert_same(_outcome(whole), _outcome(killed))
    assert not (killed / "checkpoints").exists()  # removed once the run is complete
    assert json.loads((killed / "metrics.json").read_text())["acc"] == \
        json.loads((whole / "metrics.json").read_text())["acc"]


@pytest.mark.parametrize("write", [3, 13])  # in task 1; in task 2 (after its last step's)
def test_a_kill_during_a_checkpoint_write_resumes_from_the_one_before(write, tiny_run_config,
                                                                      tmp_path):
    whole = run(load_run_config(_config(tiny_run_config, tmp_path, "naive", "whole")),
                echo=lambda _: None).run_dir
    config = _config(tiny_run_config, tmp_path, "naive", "killed")
    killed = tmp_path / "runs" / "killed"
    proc = _child(["-c", KILL_DURING_WRITE, "run", str(config)], KILL_AT_WRITE=str(write))
    assert proc.wait() == -signal.SIGKILL
    half_written = list((killed / "checkpoints").rglob(".step-*.tmp"))
    assert half_written, "the kill did not land inside a checkpoint write"
    assert main(["run", "--resume", str(killed)]) == 0
    assert not any(folder.exists() for folder in half_written)  # cleaned up
    _assert_same(_outcome(whole), _outcome(killed))


def test_resume_refuses_another_config_and_a_finished_run(tiny_run_config, tmp_path, capsys):
    config = _config(tiny_run_config, tmp_path, "naive", "killed")
    killed = tmp_path / "runs" / "killed"
    proc = _child(["-m", "continual_lora.cli", "run", str(config)])
    _kill_when(proc, lambda: KILL_POINTS["mid_task_1"](killed), "mid_task_1")
    capsys.readouterr()
    assert main(["run", "--resume", str(killed), "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "changed: train.lr" in err and "start a new run" in err
    assert main(["run", "--resume", str(killed)]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(killed)]) == 2
    assert "finished all 2 tasks" in capsys.readouterr().err


def test_an_interrupted_bench_resumes_row_by_row(tiny_run_config, tmp_path, capsys):
    """A bench killed inside its second row: `bench --resume` keeps the finished row, resumes
    the interrupted one from its checkpoints, and ends with the uninterrupted bench's table."""
    import csv

    from continual_lora.bench import run_bench
    from continual_lora.config import load_bench_config

    def bench(name: str) -> Path:
        run_cfg = tiny_run_config("naive")
        run_cfg["train"].update({"max_steps": STEPS, "epochs": 100, "checkpoint_every": 10})
        run_cfg["output_dir"] = str(tmp_path / "benches")
        data = {"name": name, "strategies": [{"name": "naive"}, {"name": "replay"}],
                "include_joint": False, "run": run_cfg}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    whole_dir, _ = run_bench(load_bench_config(bench("whole")), echo=lambda _: None)
    killed = tmp_path / "benches" / "killed"
    proc = _child(["-m", "continual_lora.cli", "bench", str(bench("killed"))])
    _kill_when(proc, lambda: any(s >= 40 for s in _steps(
        killed / "runs" / "replay-r2" / "checkpoints" / "01-a")), "the replay row's task 1")
    assert (killed / "runs" / "naive-r2" / "metrics.json").is_file()
    assert not (killed / "runs" / "replay-r2" / "metrics.json").exists()
    capsys.readouterr()
    assert main(["bench", "--resume", str(killed)]) == 0
    printed = capsys.readouterr().out
    assert "naive-r2 (finished before)" in printed and "resuming task a at step" in printed

    def table(folder: Path) -> list[dict]:
        with (folder / "comparison.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        return [{k: v for k, v in r.items() if k not in ("wall_seconds", "run_dir")}
                for r in rows]

    assert table(killed) == table(whole_dir)
    row = Path("runs") / "replay-r2"
    _assert_same(_outcome(whole_dir / row), _outcome(killed / row))
