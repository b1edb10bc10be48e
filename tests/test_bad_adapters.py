"""Every bad adapter through every command that reads adapters: exit status 2, a one-line
message that names the file, and nothing written (the folder each case runs in has exactly the
files it had before, byte for byte, so no output folder is left, and no input is touched).

Bad adapters (made once per module, from small PEFT adapters of the tiny BERT and the tiny
Llama, and a hand-made kohya file): `wrong_base` (trained on a wider base), `truncated` (the
last 100 bytes of its safetensors cut), `nan` (one lora_A entry NaN), `zero` (every lora_B /
lora_up zero: an adapter that changes nothing), `pickle` (only an `adapter_model.bin`, or a
`.pt` kohya file, whose pickle would call `os.mkdir` when unpickled: it must never run), and
`missing` (a path that does not exist).

Commands: run (`lora.init_adapter`), update (`--adapter`), eval (a run whose stage adapter is
the bad one), merge, convert (PEFT → kohya, and kohya → PEFT), inspect (PEFT folder and kohya
file), diagnose (adapter folders, `--no-drift`) and generate (`--adapter`, on the tiny Llama).
`inspect` reads without refusing what it can describe: on an all-zero adapter it exits 0 and
says loudly that the adapter changes nothing. A good adapter through every command exits 0
(the control column), so each refusal is the bad adapter's doing.

Matrix: 10 commands × 7 adapters (6 bad + the good control) = 70 cells, of which 4 are skipped
with their reason (`wrong_base` where no base is involved: inspect of a PEFT folder and of a
kohya file, and convert in both directions, whose only base is a diffusers pipeline), so 66 run:
54 refusals (exit 2), 2 warnings (inspect on an all-zero adapter, exit 0) and 10 controls
(exit 0). Below the matrix: a checkpoint that passes its checksum but is not one (6 ways), the
safetensors header check, and `.bin` adapters read by PEFT.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from continual_lora.cli import main

KINDS = ("good", "wrong_base", "truncated", "nan", "zero", "pickle", "missing")
COMMANDS = ("run", "update", "eval", "merge", "convert", "convert_kohya", "inspect",
            "inspect_kohya", "diagnose", "generate")
SKIP = {
    ("inspect", "wrong_base"): "inspect takes no base: it reads the adapter alone",
    ("inspect_kohya", "wrong_base"): "inspect takes no base: it reads the file alone",
    ("convert", "wrong_base"): "convert checks a base only with --base, a diffusers pipeline; "
                               "a BERT adapter has none",
    ("convert_kohya", "wrong_base"): "convert checks a base only with --base, a diffusers "
                                     "pipeline; none is given here",
}
# The tensor made NaN in the `nan` adapters, and the word each refusal must use.
NAN_PEFT = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
NAN_LLAMA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KOHYA_MODULES = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v")
NAN_KOHYA = f"{KOHYA_MODULES[0]}.lora_down.weight"
# Words each refusal must use (one of them): what is wrong, as the user reads it.
EXPECT = {"wrong_base": ("does not fit", "different base", "base model"),
          "truncated": ("not a complete safetensors file",), "nan": ("non-finite",),
          "zero": ("is all zero",), "pickle": ("pickle",),
          "missing": ("does not exist", "no such file", "not a folder", "no adapter/")}


class Unpickled:
    """A pickle that would create a folder (`os.mkdir`) when unpickled: weights_only refuses
    the global, and the formats that never unpickle do not even open it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _make_adapter(base: Path, folder: Path, model_cls, targets: list[str]) -> Path:
    """A PEFT adapter with random A and B (init_lora_weights=False), saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    config.base_model_name_or_path = str(base)
    get_peft_model(model_cls.from_pretrained(base), config).save_pretrained(str(folder))
    return folder


def _rewrite(file: Path, change) -> None:
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _bad_peft(good: Path, wrong: Path, kind: str, nan_key: str, dest: Path, marker: Path) -> Path:
    """`kind` of bad adapter made from the `good` one (`wrong`: one of another base)."""
    if kind == "missing":
        return dest
    shutil.copytree(wrong if kind == "wrong_base" else good, dest)
    weights = dest / "adapter_model.safetensors"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif kind == "nan":
        _rewrite(weights, lambda t: t[nan_key].view(-1).__setitem__(0, float("nan")))
    elif kind == "zero":
        _rewrite(weights, lambda t: [v.zero_() for k, v in t.items() if ".lora_B." in k])
    elif kind == "pickle":
        tensors = load_file(str(weights))
        weights.unlink()
        torch.save({**tensors, "payload": Unpickled(marker)}, dest / "adapter_model.bin")
    return dest


def _bad_kohya(good: Path, kind: str, root: Path, marker: Path) -> Path:
    if kind == "missing":
        return root / "no-such-lora.safetensors"
    if kind == "pickle":
        file = root / "lora-pickle.pt"
        torch.save({**load_file(str(good)), "payload": Unpickled(marker)}, file)
        return file
    file = root / f"lora-{kind}.safetensors"
    shutil.copy(good, file)
    if kind == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
    elif kind == "nan":
        _rewrite(file, lambda t: t[NAN_KOHYA].view(-1).__setitem__(0, float("nan")))
    elif kind == "zero":
        _rewrite(file, lambda t: [v.zero_() for k, v in t.items() if ".lora_up." in k])
    return file


def _write_kohya(file: Path) -> Path:
    """Two attention modules of an SD UNet in kohya's layout (names diffusers' converter maps
    without a base), rank 2, alpha 1."""
    torch.manual_seed(4)
    tensors = {}
    for module in KOHYA_MODULES:
        tensors[f"{module}.lora_down.weight"] = torch.randn(2, 32)
        tensors[f"{module}.lora_up.weight"] = torch.randn(32, 2)
        tensors[f"{module}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(file))
    return file


def _wider(base: Path, folder: Path, kind: str) -> Path:
    """The same architecture, 48 wide instead of 32: an adapter of one does not fit the other."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    config.hidden_size = 48
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if kind == "llama" else AutoModel
    cls.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


@dataclass
class Shared:
    root: Path
    marker: Path  # created only if a pickle ran
    bert: Path
    llama: Path
    tasks: Path
    peft: dict[str, Path]  # kind -> adapter of the tiny BERT
    llama_adapters: dict[str, Path]  # kind -> adapter of the tiny Llama
    kohya: dict[str, Path]  # kind -> kohya file
    run_dir: Path  # a finished one-task run of the tiny BERT (eval's source)
    run_config: dict


@pytest.fixture(scope="module")
def shared(tiny_bert, tiny_llama, tiny_task_files, tmp_path_factory) -> Shared:
    from transformers import AutoModel, AutoModelForCausalLM

    from continual_lora.config import load_run_config
    from continual_lora.runner import run

    root = tmp_path_factory.mktemp("bad-adapters")
    marker = root / "the-pickle-ran"
    good = _make_adapter(tiny_bert, root / "bert-good", AutoModel, ["query", "value"])
    wrong = _make_adapter(_wider(tiny_bert, root / "wide-bert", "bert"), root / "bert-wrong",
                          AutoModel, ["query", "value"])
    llama_good = _make_adapter(tiny_llama, root / "llama-good", AutoModelForCausalLM,
                               ["q_proj", "v_proj"])
    llama_wrong = _make_adapter(_wider(tiny_llama, root / "wide-llama", "llama"),
                                root / "llama-wrong", AutoModelForCausalLM, ["q_proj", "v_proj"])
    kohya_good = _write_kohya(root / "lora-good.safetensors")
    peft = {k: good if k == "good" else
            _bad_peft(good, wrong, k, NAN_PEFT, root / f"bert-{k}", marker) for k in KINDS}
    llama = {k: llama_good if k == "good" else
             _bad_peft(llama_good, llama_wrong, k, NAN_LLAMA, root / f"llama-{k}", marker)
             for k in KINDS}
    kohya = {k: kohya_good if k == "good" else _bad_kohya(kohya_good, k, root, marker)
             for k in KINDS if k != "wrong_base"}
    cfg = {"name": "src", "model": {"name_or_path": str(tiny_bert), "max_length": 32},
           "lora": {"r": 2}, "upstream": {"kind": "none"}, "output_dir": str(root / "runs"),
           "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 1, "eval_batch_size": 16},
           "tasks": [{"name": "a", "train": str(tiny_task_files / "a_train.csv"),
                      "eval": str(tiny_task_files / "a_eval.csv")}]}
    run_dir = run(load_run_config(None, data=cfg), echo=lambda _: None).run_dir
    return Shared(root, marker, tiny_bert, tiny_llama, tiny_task_files, peft, llama, kohya,
                  run_dir, cfg)


def _argv(s: Shared, command: str, kind: str, here: Path) -> tuple[list[str], Path]:
    """The command line of one cell, run in the empty folder `here`, and the adapter path its
    message must name."""
    adapter = s.peft[kind]
    out = here / "out"
    if command == "run":
        cfg = json.loads(json.dumps(s.run_config))
        cfg.update(name="cell", output_dir=str(here / "runs"))
        cfg["lora"]["init_adapter"] = str(adapter)
        (here / "run.yaml").write_text(yaml.safe_dump(cfg))
        return ["run", str(here / "run.yaml")], adapter
    if command == "update":
        return ["update", "--adapter", str(adapter), "--base", str(s.bert), "--new",
                str(s.tasks / "b_train.jsonl"), "--out", str(out), "--steps", "1"], adapter
    if command == "eval":
        run_dir = here / "run"
        shutil.copytree(s.run_dir, run_dir)
        stage = run_dir / "tasks" / "01-a"
        if kind != "good":
            shutil.rmtree(stage / "adapter")
            if kind != "missing":
                shutil.copytree(adapter, stage / "adapter")
        return ["eval", str(run_dir)], stage if kind == "missing" else stage / "adapter"
    if command == "merge":
        return ["merge", str(s.peft["good"]), str(adapter), "--out", str(out)], adapter
    if command == "convert":
        return ["convert", str(adapter), "--to", "kohya", "--out",
                str(here / "out.safetensors")], adapter
    if command == "convert_kohya":
        return ["convert", str(s.kohya[kind]), "--to", "peft", "--out", str(out)], s.kohya[kind]
    if command == "inspect":
        return ["inspect", str(adapter)], adapter
    if command == "inspect_kohya":
        return ["inspect", str(s.kohya[kind])], s.kohya[kind]
    if command == "diagnose":
        return ["diagnose", str(s.peft["good"]), str(adapter), "--out", str(out),
                "--no-drift"], adapter
    assert command == "generate"
    adapter = s.llama_adapters[kind]
    return ["generate", "--adapter", str(adapter), "--base", str(s.llama), "--prompt", "a dog",
            "--max-new-tokens", "2"], adapter


def _cells():
    for command in COMMANDS:
        for kind in KINDS:
            marks = [pytest.mark.skip(reason=SKIP[command, kind])] if (command, kind) in SKIP \
                else []
            yield pytest.param(command, kind, id=f"{command}-{kind}", marks=marks)


@pytest.mark.parametrize(("command", "kind"), list(_cells()))
def test_bad_adapter_is_refused_with_one_line_naming_it(shared, command, kind, tmp_path,
                                                        capsys):
    argv, adapter = _argv(shared, command, kind, tmp_path)
    before, inputs = _snapshot(tmp_path), _snapshot(shared.root)
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("error:")]
    print(f"\n[{command}-{kind}] rc {rc}: {error[-1] if error else out.splitlines()[-1:]}")
    assert "Traceback" not in err
    assert not shared.marker.exists()  # no pickle was ever executed
    assert _snapshot(shared.root) == inputs  # inputs untouched
    if kind == "good":
        assert rc == 0, err
        return
    if (command, kind) in (("inspect", "zero"), ("inspect_kohya", "zero")):
        assert rc == 0, err
        warning = [line for line in out.splitlines() if line.startswith("WARNING")]
        assert len(warning) == 1 and "is all zero" in warning[0], out
        assert out.strip().splitlines()[-1] == warning[0]  # last, where it is read
        assert "changes nothing" in warning[0], out
        print(f"[{command}-{kind}] {warning[0]}")
        assert _snapshot(tmp_path) == before
        return
    assert rc == 2, err
    assert len(error) == 1 and lines[-1] == error[0], err  # one line, the last one
    message = error[0]
    assert str(adapter) in message, message
    assert any(words in message for words in EXPECT[kind]), message
    if kind == "pickle" and command in ("run", "eval", "generate"):  # PEFT reads a .bin
        assert "weights_only" in message and "mkdir" in message, message
    if kind == "nan":
        nan_key = NAN_KOHYA if "kohya" in command else \
            NAN_LLAMA if command == "generate" else NAN_PEFT
        assert nan_key in message, message
    assert _snapshot(tmp_path) == before, sorted(set(_snapshot(tmp_path)) - set(before))


# -- a checkpoint that passes its checksum but is not one (issue 23, item 5) ------------------


def _tamper(folder: Path, payload) -> None:
    """Replace state.pt by `payload` (torch.save'd, or raw bytes) and meta.json's sha256 by the
    new file's: the checksum passes, as after a deliberate replacement."""
    import io

    if isinstance(payload, bytes):
        data = payload
    else:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
    (folder / "state.pt").write_bytes(data)
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / "meta.json").write_text(json.dumps(meta))


def _good_payload(folder: Path) -> dict:
    return torch.load(folder / "state.pt", weights_only=True)


TAMPERED = {
    "a pickle that runs code": lambda p, m: {**p, "rng": Unpickled(m)},
    "not a zip of tensors": lambda p, m: b"\x80\x04K\x01.",  # pickle of the int 1
    "a payload without its keys": lambda p, m: {"params": p["params"]},
    "non-finite parameters": lambda p, m: {**p, "params": {k: torch.full_like(v, float("nan"))
                                                          for k, v in p["params"].items()}},
    "a torch RNG state that is not one": lambda p, m: {**p, "rng": {**p["rng"],
                                                                    "torch": torch.zeros(3)}},
    "params that are not tensors": lambda p, m: {**p, "params": {"weight": [1.0, 2.0]}},
}


@pytest.mark.parametrize("how", list(TAMPERED))
def test_a_tampered_checkpoint_is_skipped_by_name_not_a_traceback(how, tmp_path):
    """Before: torch.load's UnpicklingError, a KeyError, or a resume from NaN weights. Now a
    CheckpointError naming the folder, which `latest_checkpoint` reports and skips for the
    newest good checkpoint, as it does for a torn one."""
    from torch import nn

    from continual_lora.resume import (
        CheckpointError,
        latest_checkpoint,
        read_checkpoint,
        save_checkpoint,
    )

    torch.manual_seed(0)
    module = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    good = save_checkpoint(tmp_path, 1, module, optimizer, scheduler, 0.5)
    bad = save_checkpoint(tmp_path, 2, module, optimizer, scheduler, 0.5)
    marker = tmp_path / "the-pickle-ran"
    _tamper(bad, TAMPERED[how](_good_payload(bad), marker))
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(bad)
    message = str(caught.value)
    assert str(bad) in message and "\n" not in message, message
    said = []
    state = latest_checkpoint(tmp_path, said.append)
    assert state is not None and state.folder == good and state.steps_done == 1
    assert len(said) == 1 and said[0].startswith("skipping checkpoint: ") and str(bad) in said[0]
    assert not marker.exists()


# -- a safetensors file is whole when its header says so (issue 23, item 6) -------------------


def test_the_header_is_checked_against_the_file_size(tmp_path):
    """Two float32 tensors of 4 and 2 entries: 16 + 8 = 24 bytes after the header. One byte cut
    or added, or a header length beyond the file, is named with the sizes."""
    from continual_lora.adapter_check import AdapterFileError, read_header, read_weights

    file = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(2)}, str(file))
    data = file.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert len(data) == 8 + header + 24
    assert read_header(file)[0] == {"a": {"dtype": "F32", "shape": [4]},
                                    "b": {"dtype": "F32", "shape": [2]}}
    cases = {data[:-1]: "its header describes 24 bytes of tensors, the file holds 23",
             data + b"\0": "its header describes 24 bytes of tensors, the file holds 25",
             data[:8 + header - 1]: f"a header of {header} bytes in a file of {8 + header - 1}",
             data[:5]: "5 bytes, shorter than the 8-byte header length"}
    for damaged, words in cases.items():
        file.write_bytes(damaged)
        for reader in (read_header, read_weights):
            with pytest.raises(AdapterFileError) as caught:
                reader(file)
            assert str(caught.value).startswith(f"{file}: not a complete safetensors file "
                                                f"({words})"), caught.value


def test_a_bin_adapter_is_checked_once_peft_has_read_it(shared, tmp_path):
    """A `.bin` of plain tensors loads (README: with a warning); a truncated one and an all-zero
    one are refused naming the file, after PEFT's torch.load(weights_only=True) read it."""
    from transformers import AutoModel

    from continual_lora.adapters import load_adapter
    from continual_lora.config import ConfigError

    tensors = load_file(str(shared.peft["good"] / "adapter_model.safetensors"))
    folders = {}
    for how in ("plain", "truncated", "zero"):
        folder = folders[how] = tmp_path / how
        shutil.copy(shared.peft["good"] / "adapter_config.json", folder.mkdir() or folder)
        saved = {k: torch.zeros_like(v) if how == "zero" and ".lora_B." in k else v
                 for k, v in tensors.items()}
        torch.save(saved, folder / "adapter_model.bin")
        if how == "truncated":
            data = (folder / "adapter_model.bin").read_bytes()
            (folder / "adapter_model.bin").write_bytes(data[:-50])
    with pytest.warns(UserWarning, match="adapter_model.bin .a pickle. is loaded"):
        model = load_adapter(AutoModel.from_pretrained(shared.bert), folders["plain"])
    loaded = {k.replace(".default.", "."): p for k, p in model.named_parameters() if "lora_" in k}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    for how, words in (("truncated", "cannot be read by torch.load(weights_only=True)"),
                       ("zero", "every lora_B (4 tensors) is all zero")):
        with pytest.raises(ConfigError) as caught, pytest.warns(UserWarning):
            load_adapter(AutoModel.from_pretrained(shared.bert), folders[how])
        assert f"{folders[how] / 'adapter_model.bin'}" in str(caught.value), caught.value
        assert words in str(caught.value), caught.value


def test_saving_refuses_what_loading_refuses(tiny_bert):
    """A run's own save is checked with the same tests and words: a fresh adapter (B = 0, PEFT's
    init) and a NaN one are refused before anything is written."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from continual_lora.strategies.base import AdapterError, check_adapter_tensors

    model = get_peft_model(AutoModel.from_pretrained(tiny_bert),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    with pytest.raises(AdapterError, match=r"^every lora_B \(4 tensors\) is all zero: the "
                                           r"adapter changes nothing .*refusing to save it$"):
        check_adapter_tensors(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
        check_adapter_tensors(model)  # a real update passes
        model.base_model.model.encoder.layer[1].attention.self.value.lora_A["default"] \
            .weight[0, 0] = float("inf")
    with pytest.raises(AdapterError, match=r"non-finite values in \['base_model.model.encoder."
                                           r"layer.1.attention.self.value.lora_A.default.weight"):
        check_adapter_tensors(model)
