"""Output folders are safe to write: no command's --overwrite deletes what it reads, a failed
update leaves no half-made --out, an unwritable output is refused before the model loads, one
writer at a time holds a run folder's lock, and an update's files get a run's modes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from continual_lora import output_dir
from continual_lora.cli import main
from continual_lora.config import ConfigError, load_run_config
from continual_lora.run_lock import LOCK_NAME, FolderLock, FolderLocked
from continual_lora.runner import run


@pytest.fixture(scope="module")
def old_run(tiny_bert, tiny_task_files, tmp_path_factory) -> Path:
    """A finished one-task run (task `a`): the adapter the updates start from."""
    cfg = {"name": "old", "model": {"name_or_path": str(tiny_bert), "max_length": 32},
           "lora": {"r": 2}, "upstream": {"kind": "none"},
           "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 4, "eval_batch_size": 16},
           "tasks": [{"name": "a", "train": str(tiny_task_files / "a_train.csv"),
                      "eval": str(tiny_task_files / "a_eval.csv")}],
           "output_dir": str(tmp_path_factory.mktemp("old"))}
    return run(load_run_config(None, data=cfg), echo=lambda _: None).run_dir


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any command gets as far as loading the model."""
    from continual_lora.families.classifier import ClassifierFamily

    def loaded(self):
        raise AssertionError("the model was loaded before the output was refused")

    monkeypatch.setattr(ClassifierFamily, "load", loaded)


def _update_argv(adapter, out, new: Path, *extra: str) -> list[str]:
    return ["update", "--adapter", str(adapter), "--new", str(new), "--new-name", "b",
            "--out", str(out), "--steps", "4", "--eval-every", "2", *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# -- item 2: --overwrite never removes what a command reads ---------------------------------------


def test_update_never_overwrites_its_own_inputs(old_run, tiny_task_files, tmp_path, capsys,
                                                no_model_load):
    good = tmp_path / "out" / "good"
    shutil.copytree(old_run, good)
    data = tmp_path / "data"
    data.mkdir()
    new = Path(shutil.copy(tiny_task_files / "b_train.jsonl", data))
    before, data_before = _snapshot(good), _snapshot(data)
    cases = [
        (good, good, "is or holds the adapter (--adapter)"),  # the command
        (good / "tasks" / "01-a" / "adapter", good, "is or holds the adapter"),
        (good, tmp_path / "out", "is or holds the adapter"),
        (good, good / "tasks", "lies inside the adapter (--adapter)"),
        (good, data, "is or holds the data (--new)"),
    ]
    for adapter, out, message in cases:
        assert main(_update_argv(adapter, out, new, "--overwrite")) == 2, out
        err = capsys.readouterr().err
        assert message in err and str(out) in err, err
        assert err.count("\n") == 1  # one line
    assert _snapshot(good) == before and _snapshot(data) == data_before


def test_run_bench_and_merge_never_overwrite_their_inputs(old_run, tiny_run_config, tmp_path,
                                                          capsys, no_model_load):
    good = tmp_path / "good"
    shutil.copytree(old_run, good)
    before = _snapshot(good)
    adapter = good / "tasks" / "01-a" / "adapter"
    # A run whose folder would be the one its init_adapter lives in.
    cfg = tiny_run_config("naive", name="good", output_dir=str(tmp_path), overwrite=True,
                          lora={"r": 2, "init_adapter": str(adapter)})
    with pytest.raises(ConfigError, match=r"run folder .*good is or holds the adapter "
                                          r"\(lora\.init_adapter\)"):
        run(load_run_config(None, data=cfg), echo=lambda _: None)
    # A run and a bench whose folder holds a task's data file.
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a_train.csv", "a_eval.csv"):
        shutil.copy(Path(cfg["tasks"][0]["train"]).parent / name, data)
    cfg = tiny_run_config("naive", name="data", output_dir=str(tmp_path), overwrite=True)
    cfg["tasks"][0].update(train=str(data / "a_train.csv"), eval=str(data / "a_eval.csv"))
    with pytest.raises(ConfigError, match=r"holds the data \(task a train\)"):
        run(load_run_config(None, data=cfg), echo=lambda _: None)
    bench = {"name": "data", "strategies": [{"name": "naive"}],
             "run": {k: v for k, v in cfg.items() if k not in ("name", "strategy")}}
    bench_file = _write_yaml(tmp_path / "bench.yaml", bench)
    assert main(["bench", str(bench_file)]) == 2
    assert "bench folder" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["a_eval.csv", "a_train.csv"]
    # merge --overwrite into the folder that holds its inputs (it checked only equality).
    merged = tmp_path / "m"
    for name in ("x", "y"):
        shutil.copytree(adapter, merged / name)
    assert main(["merge", str(merged / "x"), str(merged / "y"), "--method", "cat",
                 "--out", str(merged), "--overwrite"]) == 2
    assert "is or holds the input adapter" in capsys.readouterr().err
    assert (merged / "x" / "adapter_model.safetensors").is_file()
    assert _snapshot(good) == before


# -- item 3: a failed update leaves no half-made --out ----------------------------------------


def test_a_failed_update_leaves_nothing_and_the_retry_works(old_run, tiny_task_files, tmp_path,
                                                            capsys, monkeypatch):
    from continual_lora.update import run as update_run
    from continual_lora.update.budget import BudgetError, BudgetHook

    new = tiny_task_files / "b_train.jsonl"
    out = tmp_path / "v2"
    seen = {}

    def over_budget(self, module):  # after the evaluations, each of which checkpointed
        seen["checkpoints"] = sorted(p.name for p in (out / "checkpoints").iterdir())
        raise BudgetError("injected: no evaluated step stayed within the budget")

    with monkeypatch.context() as patch:
        patch.setattr(BudgetHook, "finish", over_budget)
        assert main(_update_argv(old_run, out, new)) == 2
    assert seen["checkpoints"] == ["step-000002", "step-000004"]  # a resume would repeat it
    assert "injected" in capsys.readouterr().err
    assert not out.exists()

    # Interrupted before its first checkpoint, into a folder that existed (empty) before:
    # what it wrote is removed, the folder is kept.
    out.mkdir()

    def interrupted(*args, **kwargs):
        assert (out / "update_plan.json").is_file()  # it had written the plan and the log
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(update_run, "train_task", interrupted)
        assert main(_update_argv(old_run, out, new)) == 130
    assert out.is_dir() and list(out.iterdir()) == []

    # The retry is a normal update (not "an interrupted update: continue it with --resume").
    capsys.readouterr()
    assert main(_update_argv(old_run, out, new)) == 0
    assert (out / "update_report.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()  # released


# -- item 9: an update's files have the modes of a run's --------------------------------------


def test_update_files_get_the_modes_of_an_ordinary_write(old_run, tiny_task_files, tmp_path,
                                                         capsys):
    out = tmp_path / "v2"
    previous = os.umask(0o027)
    try:
        assert main(_update_argv(old_run, out, tiny_task_files / "b_train.jsonl")) == 0
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    # safetensors writes 0600 files; everything here is what open() gives under umask 027.
    assert modes["adapter_model.safetensors"] == 0o640 and modes["heads.safetensors"] == 0o640
    expected = {name: 0o750 if (out / name).is_dir() else 0o640 for name in modes}
    assert modes == expected


# -- item 5: an unwritable output is refused before the model loads ----------------------------


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


PROBE_SCRIPT = """
import sys
from continual_lora.output_dir import OutputNotWritable, check_writable
try:
    check_writable(sys.argv[1], "run folder")
except OutputNotWritable as exc:
    print(exc)
    sys.exit(2)
"""


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare (a private mount namespace)")
def test_the_probe_finds_a_real_read_only_disk(tmp_path):
    """A real read-only tmpfs, mounted in a private namespace of the child process only (the
    CLI's import is too slow for a subprocess; the commands are checked with the probe's
    os.open failing, below)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount -t tmpfs -o ro,size=1m tmpfs {ro} && exec {sys.executable} -c "
              f"'{PROBE_SCRIPT}' {ro}/runs/tiny-naive")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == (
        f"cannot write the run folder {ro}/runs/tiny-naive: it is on a read-only file system "
        f"(checked in {ro}, where it would be made). Nothing was changed; choose a writable "
        "location")


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES])
def test_an_unwritable_output_is_refused_before_the_model_loads(
        error, old_run, tiny_run_config, tiny_task_files, tmp_path, capsys, monkeypatch,
        no_model_load):
    """Tests run as root, whom chmod does not stop: the probe's os.open is made to fail as a
    read-only disk or a folder without permission would make it."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if Path(path).name.startswith(output_dir.PROBE_PREFIX):
            raise (PermissionError if error == errno.EACCES else OSError)(
                error, os.strerror(error), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(output_dir.os, "open", refusing_open)
    why = {errno.EROFS: "it is on a read-only file system",
           errno.EACCES: "this user has no permission to write there"}[error]
    run_cfg = tiny_run_config("naive")
    commands = {
        "run": ["run", str(_write_yaml(tmp_path / "run.yaml", run_cfg))],
        "bench": ["bench", str(_write_yaml(tmp_path / "bench.yaml", {
            "name": "b", "strategies": [{"name": "naive"}],
            "run": {k: v for k, v in run_cfg.items() if k not in ("name", "strategy")}}))],
        "update": _update_argv(old_run, tmp_path / "v2", tiny_task_files / "b_train.jsonl"),
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: cannot write the ") and why in err, (name, err)
        assert err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "v2").exists()


def test_a_path_that_becomes_unwritable_later_is_one_line_and_exit_2(monkeypatch, capsys,
                                                                     tmp_path):
    from continual_lora import cli

    def late(args):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "results.json"))

    monkeypatch.setattr(cli, "cmd_validate", late)
    assert main(["validate", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'results.json'}: read-only file system.")
    assert err.count("\n") == 1


# -- item 8: one writer per folder -----------------------------------------------------------


def test_the_lock_refuses_a_second_holder_and_is_released_on_exceptions(tmp_path):
    folder = tmp_path / "run"
    first = FolderLock(folder, "run")
    with pytest.raises(RuntimeError, match="boom"), first:
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        refused = []

        def second():  # another open file description: flock conflicts as across processes
            try:
                FolderLock(folder, "run").acquire()
            except FolderLocked as exc:
                refused.append(str(exc))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert len(refused) == 1 and f"pid {os.getpid()}" in refused[0]
        assert str(folder) in refused[0]
        raise RuntimeError("boom")
    assert not (folder / LOCK_NAME).exists()  # released and removed on the exception
    again = FolderLock(folder, "run")
    assert again.acquire() and again.taken_over is None
    again.release()


def test_a_live_process_holding_the_lock_refuses_run_update_bench_and_resume(
        old_run, tiny_run_config, tiny_task_files, tmp_path, capsys, no_model_load):
    run_cfg = tiny_run_config("naive")
    run_dir = Path(run_cfg["output_dir"]) / run_cfg["name"]
    bench_dir, update_dir = Path(run_cfg["output_dir"]) / "b", tmp_path / "v2"
    folders = [run_dir, bench_dir, update_dir]
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom continual_lora.run_lock import FolderLock\n"
         "locks = [FolderLock(p, 'run') for p in sys.argv[1:]]\n"
         "[lock.acquire() for lock in locks]\nprint('held', flush=True)\nsys.stdin.read()",
         *map(str, folders)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = _write_yaml(tmp_path / "run.yaml", run_cfg)
        bench = _write_yaml(tmp_path / "bench.yaml", {
            "name": "b", "strategies": [{"name": "naive"}],
            "run": {k: v for k, v in run_cfg.items() if k not in ("name", "strategy")}})
        shutil.copy(config, run_dir / "config.yaml")  # as an interrupted run has it
        commands = [(["run", str(config)], run_dir), (["run", "--resume", str(run_dir)], run_dir),
                    (["bench", str(bench)], bench_dir),
                    (_update_argv(old_run, update_dir, tiny_task_files / "b_train.jsonl"),
                     update_dir)]
        for argv, folder in commands:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"{folder} is in use by pid {holder.pid}" in err, (argv, err)
            assert err.count("\n") == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    for folder in folders:  # its exit released them (the kernel drops a dead process's flock)
        lock = FolderLock(folder, "run")
        assert lock.acquire() and lock.taken_over["pid"] == holder.pid
        lock.release()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_run_config, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_cfg = tiny_run_config("naive")
    run_dir = Path(run_cfg["output_dir"]) / run_cfg["name"]
    run_dir.mkdir(parents=True)  # killed after taking its lock: the folder holds only that
    (run_dir / LOCK_NAME).write_text(json.dumps({
        "pid": dead.pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00+00:00",
        "command": "run"}))
    assert main(["run", str(_write_yaml(tmp_path / "run.yaml", run_cfg))]) == 0
    printed = capsys.readouterr().out
    assert f"taking over the lock of {run_dir} left by pid {dead.pid}" in printed
    assert (run_dir / "metrics.json").is_file() and not (run_dir / LOCK_NAME).exists()
