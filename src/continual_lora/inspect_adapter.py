"""`continual-lora inspect`: what an adapter folder (or file) is, read without the base model.

Formats recognised: PEFT LoRA (`adapter_config.json` + `adapter_model.safetensors`), kohya LoRA
(a `.safetensors` file, or a folder holding one, with `lora_down`/`lora_up`/`.alpha` keys, which
`continual-lora convert` turns into PEFT or diffusers and diffusers' `load_lora_weights` loads)
and full weights (`config.json` + `*.safetensors`). Tensor shapes and dtypes come from the
safetensors header, which is checked to describe the whole file (`adapter_check.read_header`:
a truncated file is an error). An adapter's tensors are all read (adapters are small): a NaN or
Inf is an error naming the tensor, and an adapter whose every up factor is zero is reported
with a warning (it changes nothing). Full weights are not read beyond their headers. Pickle
files are never opened.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from continual_lora.adapter_check import (
    check_finite,
    read_header,
    read_weights,
    up_factors,
    zero_update_note,
)
from continual_lora.adapter_files import CONFIG_FILE, WEIGHTS_FILE, AdapterFileError
from continual_lora.lineage import LineageError, read_lineage, verify, weights_identity

KOHYA_NOTE = ("kohya LoRA (.safetensors with lora_down / lora_up / alpha; `continual-lora "
              "convert` writes it as PEFT or diffusers, diffusers' load_lora_weights loads it)")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _read_values(file: Path) -> tuple[dict[str, dict], dict, dict, list[str]]:
    """The header (checked whole), the metadata, the tensors and the warnings of an adapter
    file, every tensor read: NaN/Inf is an error naming the tensor, all-zero up factors a
    warning."""
    tensors, metadata = read_header(file)
    values, _ = read_weights(file)
    check_finite(values, file)
    note = zero_update_note(up_factors(values))
    return tensors, metadata, values, [note] if note else []


def _count(tensors: dict[str, dict]) -> tuple[int, list[str]]:
    return (sum(math.prod(t["shape"]) for t in tensors.values()),
            sorted({t["dtype"] for t in tensors.values()}))


def _is_kohya(tensors: dict[str, dict]) -> bool:
    return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in tensors)


# -- per format -----------------------------------------------------------------------------------


def _peft(folder: Path) -> dict:
    from continual_lora.adapter_files import _scaling

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = " (it has adapter_model.bin: only safetensors are read, never pickle)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"{folder}: PEFT config but no {WEIGHTS_FILE}{pickled}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{folder / CONFIG_FILE}: not valid JSON ({exc})") from None
    tensors, _, _, warnings = _read_values(weights)
    ranks = {k.removesuffix(".lora_A.weight").removeprefix("base_model.model."): t["shape"][0]
             for k, t in tensors.items() if k.endswith(".lora_A.weight")}
    alpha_of = {m: _scaling(config, m, r) * (r**0.5 if config.get("use_rslora") else r)
                for m, r in ranks.items()}
    targets = config.get("target_modules")
    if isinstance(targets, str):  # PEFT allows one regex
        targets = [targets]
    return {
        "format": "peft_lora", "format_text": "PEFT LoRA (adapter_config.json + "
        f"{WEIGHTS_FILE})", "base_model": config.get("base_model_name_or_path"),
        "ranks": sorted(set(ranks.values())), "alphas": sorted(set(alpha_of.values())),
        "scalings": sorted({_scaling(config, m, r) for m, r in ranks.items()}),
        "target_modules": sorted(targets or {m.rsplit(".", 1)[-1] for m in ranks}),
        "adapted_modules": len(ranks), "tensors": tensors, "files": [weights],
        "warnings": warnings,
    }


def _kohya(file: Path) -> dict:
    """kohya keys: `<module>.lora_down.weight` (r × in), `.lora_up.weight`, `.alpha` (a scalar;
    absent means alpha = r, kohya's default). Targets are the module prefixes (`lora_unet`,
    `lora_te`, ...)."""
    tensors, metadata, values, warnings = _read_values(file)
    ranks = {k.removesuffix(".lora_down.weight"): t["shape"][0]
             for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    alphas = {m: float(values[f"{m}.alpha"].item()) if f"{m}.alpha" in values else float(r)
              for m, r in ranks.items()}
    return {
        "format": "kohya", "format_text": KOHYA_NOTE,
        "base_model": metadata.get("ss_sd_model_name") or metadata.get("ss_base_model_version"),
        "ranks": sorted(set(ranks.values())), "alphas": sorted(set(alphas.values())),
        "scalings": sorted({alphas[m] / r for m, r in ranks.items()}),
        "target_modules": sorted({"_".join(m.split("_")[:2]) for m in ranks}),
        "adapted_modules": len(ranks), "tensors": tensors, "files": [file],
        "warnings": warnings,
    }


def _full(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AdapterFileError(f"{folder}: config.json but no *.safetensors weights (only "
                               "safetensors are read, never pickle)")
    config = json.loads((folder / "config.json").read_text())
    tensors = {}
    for file in files:
        tensors.update(read_header(file)[0])
    base = config.get("_name_or_path") or ", ".join(config.get("architectures") or []) or None
    return {"format": "full_weights", "format_text": "full weights (config.json + "
            f"{', '.join(f.name for f in files)})", "base_model": base, "ranks": [],
            "alphas": [], "scalings": [], "target_modules": [], "adapted_modules": 0,
            "tensors": tensors, "files": files, "warnings": []}


def _detect(path: Path) -> tuple[dict, Path | None]:
    """The format's facts, and the folder whose lineage.json applies (None for a lone file)."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise AdapterFileError(f"{path}: a pickle file; inspect reads safetensors only, "
                                   "never pickle (loading one can run code)")
        if path.suffix == ".safetensors" and _is_kohya(read_header(path)[0]):
            return _kohya(path), None
        raise AdapterFileError(f"{path}: not an adapter (a kohya LoRA .safetensors file, or a "
                               "PEFT / full-weights folder)")
    if not path.is_dir():
        raise AdapterFileError(f"{path}: no such file or folder")
    if (path / CONFIG_FILE).is_file():
        return _peft(path), path
    if (path / "config.json").is_file():
        return _full(path), path
    kohya = [f for f in sorted(path.glob("*.safetensors")) if _is_kohya(read_header(f)[0])]
    if len(kohya) == 1:
        return _kohya(kohya[0]), path
    found = ", ".join(sorted(p.name for p in path.iterdir())[:8])
    many = (f"{len(kohya)} kohya files, give one" if kohya
            else f"found: {found}" if found else "the folder is empty")
    raise AdapterFileError(f"{path}: not a PEFT LoRA (adapter_config.json + {WEIGHTS_FILE}), "
                           f"kohya LoRA or full-weights (config.json + model.safetensors) "
                           f"folder ({many})")


# -- the report -----------------------------------------------------------------------------------


def _stage_summary(record: dict) -> dict:
    """One line's worth of a lineage record: where, how, on what data, with what result."""
    task = record["run"]["task"]
    data = [d for d in record.get("data", []) if d.get("task") == task]
    short = []
    for d in data:
        if d.get("source") == "files":
            short.append(f"{Path(d['train']['path']).name}@{d['train']['sha256'][:8]}")
        else:
            short.append(f"{d.get('source')}:{task}@{str(d.get('train_sha256'))[:8]}")
    m = record.get("metrics") or {}
    train = record.get("train") or {}
    return {"run": record["run"]["name"], "stage": record["run"]["stage"], "task": task,
            "strategy": record["strategy"]["name"], "data": short,
            "parents": [p["sha256"][:8] for p in record.get("parents") or []],
            "lr": train.get("lr"), "steps": train.get("steps"),
            "acc_so_far": m.get("acc_so_far"), "R_row": m.get("R_row"),
            "upstream": m.get("upstream"), "sha256": record["adapter"]["sha256"],
            "created": record.get("created")}


def inspect_adapter(path: str | Path) -> dict:
    """Everything `continual-lora inspect` prints, as one JSON-able dict."""
    path = Path(path)
    facts, folder = _detect(path)
    tensors = facts.pop("tensors")
    files = facts.pop("files")
    facts["parameters"], facts["dtypes"] = _count(tensors)
    try:
        record = read_lineage(folder) if folder is not None else None
    except LineageError as exc:
        raise AdapterFileError(str(exc)) from None
    lineage = None
    if record is not None:
        lineage = {"matches": verify(folder, record), "created": record.get("created"),
                   "recorded_sha256": record["adapter"]["sha256"],
                   "base_fingerprint": record["base_model"]["fingerprint_sha256"],
                   "base_model": record["base_model"]["name_or_path"],
                   "chain": [_stage_summary(r) for r in [*record.get("chain", []), record]]}
    identity = weights_identity(folder) if folder is not None else weights_identity_of(files)
    return {"path": str(path), **facts, "sha256": identity["sha256"],
            "weights_files": identity["files"], "lineage": lineage}


def weights_identity_of(files: list[Path]) -> dict:
    """`weights_identity` for a lone file."""
    import hashlib

    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return {"sha256": digest.hexdigest(), "files": [f.name for f in files]}


def _nums(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values) or "-"


def format_report(info: dict) -> str:
    """The human-readable report (the JSON form is `inspect_adapter`'s dict as is), its
    warnings last, where they are read."""
    return "\n".join([_report(info), *(f"WARNING     {w}" for w in info.get("warnings", []))])


def _report(info: dict) -> str:
    lin = info["lineage"]
    base = info["base_model"] or (lin or {}).get("base_model") or "unknown"
    if lin and lin["base_fingerprint"]:
        base += f" (fingerprint {lin['base_fingerprint'][:16]}…, from lineage.json)"
    lines = [f"adapter     {info['path']}", f"format      {info['format_text']}",
             f"base        {base}"]
    if info["format"] != "full_weights":
        targets = info["target_modules"]
        shown = ", ".join(targets[:8]) + (f", … ({len(targets)} in all)" if len(targets) > 8
                                          else "")
        lines += [f"rank        {_nums(info['ranks'])}   alpha {_nums(info['alphas'])}   "
                  f"scaling {_nums(info['scalings'])}",
                  f"targets     {shown} ({info['adapted_modules']} modules adapted)"]
    lines.append(f"parameters  {info['parameters']:,} ({', '.join(info['dtypes'])})")
    sha = info["sha256"][:16]
    if lin is None:
        lines.append(f"weights     sha256 {sha}… (no lineage.json: origin unknown)")
        return "\n".join(lines)
    if lin["matches"]:
        lines.append(f"weights     sha256 {sha}… matches lineage.json (written {lin['created']})")
    else:
        lines.append(f"weights     sha256 {sha}… DOES NOT MATCH lineage.json (recorded "
                     f"{lin['recorded_sha256'][:16]}…): the weights were modified after "
                     "writing")
    lines.append(f"lineage     {len(lin['chain'])} stage(s), oldest first:")
    for i, s in enumerate(lin["chain"], start=1):
        if s["task"] == "merge":  # written by `continual-lora merge`: no training of its own
            lines.append(f"  {i}. {s['run']}: {s['strategy']} of adapters "
                         f"{', '.join(s['parents'])}, adapter {s['sha256'][:8]}")
            continue
        acc = "-" if s["acc_so_far"] is None else f"{s['acc_so_far']:.3f}"
        row = " ".join("-" if v is None else f"{v:.3f}" for v in s["R_row"] or [])
        up = "" if s["upstream"] is None else f", upstream {s['upstream']:.3f}"
        lines.append(f"  {i}. {s['run']} stage {s['stage']} ({s['task']}): {s['strategy']}, "
                     f"data {' '.join(s['data']) or '-'}, lr {s['lr']:g} × {s['steps']} steps, "
                     f"ACC {acc}, R [{row}]{up}, adapter {s['sha256'][:8]}")
    return "\n".join(lines)
