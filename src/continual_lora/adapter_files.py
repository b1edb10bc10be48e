"""PEFT LoRA adapter folders read and written directly: `adapter_config.json` plus
`adapter_model.safetensors` (safetensors only: no pickle is ever loaded).

Reading needs no base model, so adapters can be checked and merged where the base is not at hand
(`continual-lora merge`). Writing produces exactly what PEFT's own `save_pretrained` writes for a
LoRA (the config through `LoraConfig.save_pretrained`, tensors under PEFT's key names), so
`PeftModel.from_pretrained(base, folder)` loads it; the tests check that it does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from continual_lora.adapter_check import AdapterFileError, read_checked
from continual_lora.adapters import LoraFactors, concatenate_factors
from continual_lora.config import ConfigError
from continual_lora.lineage import LineageError, merge_record
from continual_lora.merging import DENSE_METHODS, merge_dense, truncated_svd_factors
from continual_lora.output_dir import check_not_input

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."  # PEFT's prefix of every saved key, whatever the task type
METHODS = (*DENSE_METHODS, "cat")
DEFAULT_DROP_RATE = 0.5  # DARE's paper goes to 0.9 on large LMs; small models tolerate less


@dataclass
class AdapterFiles:
    """One adapter folder: its config and its factors per module (ΔW = scaling · B A)."""

    path: Path
    config: dict
    factors: dict[str, LoraFactors]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of each module's update."""
        return {k: (f.d_out, f.d_in) for k, f in self.factors.items()}


# -- reading --------------------------------------------------------------------------------------


def read_adapter(path: str | Path, use: str = "merge it") -> AdapterFiles:
    """Read a PEFT LoRA folder; refuses anything whose ΔW we could not compute exactly, and a
    file that is not whole, holds NaN/Inf or changes nothing (`adapter_check`; `use` says what
    it was read for, in that message)."""
    path = Path(path)
    config = _read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickled = " (it has adapter_model.bin: only safetensors are read, never pickle)" \
            if (path / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"{path}: no {WEIGHTS_FILE}{pickled}")
    tensors, _ = read_checked(weights, use)
    return AdapterFiles(path, config, _factors(path, config, tensors))


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise AdapterFileError(f"{path}: not a folder")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterFileError(f"{path}: not a PEFT adapter folder (no {CONFIG_FILE})")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{file}: not valid JSON ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{path}: a {config.get('peft_type')} adapter, not LoRA")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise AdapterFileError(f"{path}: {flag}=true is not supported (its update is not "
                                   "s·B·A)")
    return config


def _factors(path: Path, config: dict, tensors: dict[str, torch.Tensor]
             ) -> dict[str, LoraFactors]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            # Linear factors are 2-D; a convolution's are PEFT's [r, in, k, k] / [out, r, 1, 1].
            if key.startswith(PREFIX) and name.endswith(suffix) and 2 <= tensor.dim() <= 5:
                modules.setdefault(name.removesuffix(suffix), {})[part] = tensor
                break
        else:
            raise AdapterFileError(f"{path}: unsupported tensor {key} {tuple(tensor.shape)} "
                                   "(only LoRA on Linear and convolution layers, without "
                                   "modules_to_save, can be merged)")
    if not modules:
        raise AdapterFileError(f"{path}: {WEIGHTS_FILE} holds no LoRA weights")
    out = {}
    for module, parts in sorted(modules.items()):
        if set(parts) != {"A", "B"} or parts["B"].shape[1] != parts["A"].shape[0] \
                or parts["B"][0, 0].numel() != 1:  # a conv's B is a 1×1 kernel
            raise AdapterFileError(f"{path}: module {module} has mismatched or missing "
                                   "lora_A/lora_B")
        A, B = parts["A"].float(), parts["B"].float()
        out[module] = LoraFactors(A=A, B=B, scaling=_scaling(config, module, A.shape[0]))
    return out


def _scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of a module: alpha / r (alpha / sqrt(r) with rsLoRA); the module's rank is
    its tensor's (which honours `rank_pattern`) and `alpha_pattern` is matched as PEFT does."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    key = get_pattern_key(patterns.keys(), module)
    alpha = float(patterns.get(key, config.get("lora_alpha", 8)))
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def check_compatible(adapters: Sequence[AdapterFiles]) -> None:
    """Same base model, task type, modules and update shapes; the error names the folder."""
    first = adapters[0]
    for other in adapters[1:]:
        where = f"{other.path} does not match {first.path}"
        if other.base_model != first.base_model:
            raise AdapterFileError(f"{where}: base model {other.base_model!r} vs "
                                   f"{first.base_model!r}")
        for field in ("task_type", "fan_in_fan_out"):
            if other.config.get(field) != first.config.get(field):
                raise AdapterFileError(f"{where}: {field} {other.config.get(field)!r} vs "
                                       f"{first.config.get(field)!r}")
        if set(other.factors) != set(first.factors):
            only = sorted(set(other.factors) ^ set(first.factors))
            raise AdapterFileError(f"{where}: different target modules ({len(only)} not in "
                                   f"both, e.g. {only[0]})")
        for module, shape in other.shapes().items():
            if shape != first.shapes()[module]:
                raise AdapterFileError(f"{where}: module {module} has update shape {shape} vs "
                                       f"{first.shapes()[module]}")


# -- merging factor sets (shared by `continual-lora merge` and the strategies) --------------------


def iter_merged(method: str, adapters: Sequence[dict[str, LoraFactors]], seed: int = 0,
                **opts) -> Iterator[tuple[str, torch.Tensor]]:
    """(module, dense merged update), one module at a time (peak memory: one module's updates):
    `merging.merge_dense` over each module's ΔW_i. A module missing from an adapter counts as a
    zero update there. DARE's drops come from one generator seeded by `seed`, modules in sorted
    order, so a merge is reproducible. `cat` gives its dense equivalent, the weighted sum."""
    keys = sorted(set().union(*adapters))
    generator = torch.Generator().manual_seed(seed) if method.startswith("dare") else None
    dense_method = "task_arithmetic" if method == "cat" else method
    for key in keys:
        present = {i: a[key].delta() for i, a in enumerate(adapters) if key in a}
        ref = next(iter(present.values()))
        deltas = [present.get(i, torch.zeros_like(ref)) for i in range(len(adapters))]
        yield key, merge_dense(dense_method, deltas, generator=generator, **opts)


def merge_modules(method: str, adapters: Sequence[dict[str, LoraFactors]], seed: int = 0,
                  **opts) -> dict[str, torch.Tensor]:
    """Every module's dense merged update (see `iter_merged`)."""
    return dict(iter_merged(method, adapters, seed, **opts))


def weighted_concatenation(adapters: Sequence[dict[str, LoraFactors]],
                           weights: float | Sequence[float] | None) -> dict[str, LoraFactors]:
    """`cat`: the exact Σ w_i s_i B_i A_i as one adapter of rank Σ r_i (weights folded into the
    scalings, then `adapters.concatenate_factors`)."""
    if weights is None or isinstance(weights, int | float):
        weights = [1.0 if weights is None else float(weights)] * len(adapters)
    scaled = [{k: LoraFactors(f.A, f.B, f.scaling * wi) for k, f in a.items()}
              for a, wi in zip(adapters, weights, strict=True)]
    return concatenate_factors(scaled)


def cap_rank(rank: int, adapters: Sequence[dict[str, LoraFactors]]) -> int:
    """`rank` capped at the largest min(d_out, d_in) of the modules: beyond it the SVD is exact
    and extra rank would only be zeros."""
    dims = [min(f.d_out, f.d_in) for a in adapters for f in a.values()]
    return min(rank, max(dims))


def svd_factors(dense: Iterable[tuple[str, torch.Tensor]], rank: int,
                like: dict[str, LoraFactors] | None = None
                ) -> tuple[dict[str, LoraFactors], dict[str, float]]:
    """Each module's update (a `[d_out, d_in]` matrix) as rank-`rank` factors by truncated SVD,
    consumed one module at a time, and each relative error ‖ΔW − BA‖_F / ‖ΔW‖_F. A module in
    `like` gets its factors in that module's layout (a convolution's kernel in A)."""
    factors, errors = {}, {}
    like = like or {}
    for key, delta in dense:
        A, B, errors[key] = truncated_svd_factors(delta, rank)
        factors[key] = like[key].like(A, B) if key in like else LoraFactors(A=A, B=B, scaling=1.0)
    return factors, errors


def error_summary(errors: dict[str, float]) -> dict:
    """Mean and max of the per-module relative errors, and where the max is."""
    worst = max(errors, key=errors.get)
    return {"mean": sum(errors.values()) / len(errors), "max": errors[worst],
            "max_module": worst, "modules": len(errors)}


def export_error_report(errors: dict[str, float]) -> dict:
    """A stage report of an SVD export's relative error (mean and max over modules)."""
    summary = error_summary(errors)
    return {"export_error": {"mean": summary["mean"], "max": summary["max"]}}


# -- writing --------------------------------------------------------------------------------------


def write_adapter(factors: dict[str, LoraFactors], out_dir: Path, base_model: str | None,
                  task_type: str | None = None, fan_in_fan_out: bool = False) -> int:
    """Write `factors` (one shared rank) as a PEFT LoRA folder; returns the rank.

    Scalings are folded into B and the config says `lora_alpha = r` (scaling 1), so the saved
    factors are the update itself. Targets are the full module paths: exact, never matching more
    modules than were merged. Tensors are saved in float32.
    """
    from peft import LoraConfig

    ranks = {f.A.shape[0] for f in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"all modules must share one rank to be saved together, got {ranks}")
    rank = ranks.pop()
    bad = [k for k, f in factors.items()
           if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all())]
    if bad:
        raise ValueError(f"non-finite factors in {bad[:3]}: refusing to write the adapter")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(factors), bias="none",
                        task_type=task_type, fan_in_fan_out=fan_in_fan_out,
                        base_model_name_or_path=base_model)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    tensors = {}
    for key, f in sorted(factors.items()):
        tensors[f"{PREFIX}{key}.lora_A.weight"] = f.A.float().cpu().contiguous()
        tensors[f"{PREFIX}{key}.lora_B.weight"] = (f.scaling * f.B.float()).cpu().contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    return rank


# -- the `continual-lora merge` command's library side ---------------------------------------------


@dataclass
class MergeRequest:
    """What `continual-lora merge` asks for, as the command line gives it."""

    adapters: list[Path]
    out: Path
    method: str = "ties"
    weights: list[float] | None = None
    density: float | None = None
    drop_rate: float | None = None
    rank: int | None = None
    seed: int = 0
    overwrite: bool = False


def check_request(req: MergeRequest) -> None:
    """User errors before any file is read, each naming the flag and the value."""
    if req.method not in METHODS:
        raise ConfigError(f"--method {req.method}: unknown; choose from {', '.join(METHODS)}")
    uses = {"density": req.method in ("ties", "dare_ties"),
            "drop_rate": req.method.startswith("dare"), "rank": req.method != "cat"}
    for name, used in uses.items():
        if getattr(req, name) is not None and not used:
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to --method "
                              f"{req.method}")
    if req.density is not None and not 0 < req.density <= 1:
        raise ConfigError(f"--density {req.density}: must be in (0, 1]")
    if req.drop_rate is not None and not 0 <= req.drop_rate < 1:
        raise ConfigError(f"--drop-rate {req.drop_rate}: must be in [0, 1)")
    if req.rank is not None and req.rank < 1:
        raise ConfigError(f"--rank {req.rank}: must be at least 1")
    if req.weights is not None and len(req.weights) not in (1, len(req.adapters)):
        raise ConfigError(f"--weights: {len(req.weights)} values for {len(req.adapters)} "
                          "adapters (give one, or one per adapter)")
    check_not_input(req.out, [("input adapter", p) for p in req.adapters], req.overwrite)
    if req.out.exists() and not req.overwrite:
        raise ConfigError(f"--out {req.out} already exists; choose another folder or pass "
                          "--overwrite")


def merge_adapter_folders(req: MergeRequest) -> dict:
    """Read, check, merge and write (atomically); returns what was done, for printing and for
    `merge_info.json` beside the adapter."""
    from continual_lora.checkpoint import atomic_dir

    check_request(req)
    adapters = [read_adapter(p) for p in req.adapters]
    check_compatible(adapters)
    factor_sets = [a.factors for a in adapters]
    weights = None if req.weights is None else \
        (req.weights[0] if len(req.weights) == 1 else req.weights)
    if req.method == "cat":
        factors = weighted_concatenation(factor_sets, weights)
        errors = dict.fromkeys(factors, 0.0)
    else:
        if req.method.startswith("dare") and req.drop_rate is None:
            req.drop_rate = DEFAULT_DROP_RATE
        opts = {"weights": weights, "density": req.density, "drop_rate": req.drop_rate}
        # Σ r_i: the rank the weighted sum of the inputs spans (exact for task_arithmetic).
        default_rank = sum(max(f.A.shape[0] for f in a.factors.values()) for a in adapters)
        rank = cap_rank(req.rank or default_rank, factor_sets)
        factors, errors = svd_factors(iter_merged(req.method, factor_sets, req.seed, **opts),
                                      rank, like=factor_sets[0])
    first = adapters[0].config
    info = {"method": req.method, "inputs": [str(p) for p in req.adapters], "weights": weights,
            "density": req.density, "drop_rate": req.drop_rate, "seed": req.seed,
            "relative_error": error_summary(errors), "relative_error_per_module": errors}
    with atomic_dir(req.out) as tmp:
        info["rank"] = write_adapter(factors, tmp, adapters[0].base_model,
                                     first.get("task_type"), bool(first.get("fan_in_fan_out")))
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
        written = json.loads((tmp / CONFIG_FILE).read_text())
        options = {k: info[k] for k in ("weights", "density", "drop_rate", "seed")}
        lora = {"r": info["rank"], "alpha": written.get("lora_alpha"), "alpha_rule": None,
                "target_modules": written.get("target_modules")}
        export = {"kind": "peft_lora_merge", "method": req.method, "rank": info["rank"],
                  "relative_error": info["relative_error"]}
        try:
            merge_record(list(req.adapters), tmp, req.method, options, lora, export,
                         adapters[0].base_model)
        except LineageError as exc:
            raise AdapterFileError(f"merge: {exc}") from None
    return info
