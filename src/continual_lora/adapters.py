"""LoRA adapters through PEFT: attach, load, merge, read factors, write exact concatenations.

PEFT owns adapter state: adapters are created, loaded, merged and saved through its API. The one
thing PEFT does not do for us is the math on dense updates (`ΔW = s · B A`); where a strategy needs
it (Merge & Init's cumulative adapter), the factors are read here and written back as an ordinary
PEFT adapter that `PeftModel.from_pretrained` loads anywhere.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from continual_lora.adapter_check import check_values, read_checked
from continual_lora.config import ConfigError

# Default LoRA targets by `config.model_type`, for the models users fine-tune most.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "ernie": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "albert": ["query", "value"],
    "modernbert": ["Wqkv"],
    "vit": ["q_proj", "v_proj"],
    # Vision CNNs (seed 002 adapts ResNet-50's convolutions; PEFT has Conv2d LoRA): every
    # ResNet convolution (stem, 3x3 and 1x1 of each block, shortcuts); ConvNeXt's pointwise
    # layers (its depthwise convolutions are grouped, which a LoRA factorisation does not keep).
    "resnet": ["convolution"],
    "convnext": ["pwconv1", "pwconv2"],
    # Causal LMs: attention and MLP projections (seed 004 and QLoRA adapt every linear layer).
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    # diffusers denoisers (no `model_type`: keyed by class): the attention projections, as
    # diffusers' and kohya's LoRA scripts default to.
    "UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0"],
    # SD3's and FLUX's joint attention: the image stream's and the caption stream's projections
    # (diffusers' SD3 and FLUX DreamBooth LoRA scripts' attention targets).
    "SD3Transformer2DModel": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                              "add_v_proj", "to_add_out"],
    "FluxTransformer2DModel": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                               "add_v_proj", "to_add_out"],
}
# Tried in order when the architecture is not in the table.
FALLBACK_TARGETS = [["q_proj", "v_proj"], ["query", "value"], ["q", "v"], ["c_attn"], ["qkv"]]
ADAPTABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def candidate_modules(model: nn.Module) -> list[str]:
    """Short names of modules LoRA can adapt (Linear, Conv, Embedding), sorted."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, ADAPTABLE_TYPES) or type(module).__name__ == "Conv1D":
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(n for n in names if n)


def _matches(model: nn.Module, target: str) -> bool:
    return any(name == target or name.endswith("." + target) for name, _ in model.named_modules())


def resolve_targets(model: nn.Module, requested: list[str] | None) -> list[str]:
    """The requested targets, each checked to match a module, or the architecture's defaults."""
    if requested:
        missing = [t for t in requested if not _matches(model, t)]
        if missing:
            raise ConfigError(
                f"lora.target_modules: {missing} match no module of this model; "
                f"candidates: {candidate_modules(model)}"
            )
        return list(requested)
    model_type = (getattr(getattr(model, "config", None), "model_type", None)
                  or type(model).__name__)
    defaults = DEFAULT_TARGETS.get(model_type)
    if defaults and all(_matches(model, t) for t in defaults):
        return list(defaults)
    for targets in FALLBACK_TARGETS:
        if all(_matches(model, t) for t in targets):
            return targets
    raise ConfigError(
        f"no default LoRA targets for model type {model_type!r}; set lora.target_modules to some "
        f"of: {candidate_modules(model)}"
    )


def make_lora_config(r: int, alpha: float, dropout: float, targets: list[str],
                     layers: list[int] | None = None) -> LoraConfig:
    """`layers`: only these transformer layers (PEFT's `layers_to_transform`); None: all."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      bias="none", layers_to_transform=layers)


def resolve_layers(spec: list[int] | str | None, n_layers: int) -> list[int] | None:
    """`lora.layers` as layer indices: `last N`, `first N` or a list, checked against the
    model's `n_layers`; None when every layer is adapted."""
    if spec is None:
        return None
    if isinstance(spec, str):
        where, count = spec.split()
        count = int(count)
        if count > n_layers:
            raise ConfigError(f"lora.layers {spec!r}: the model has {n_layers} layers")
        indices = list(range(n_layers - count, n_layers)) if where == "last" \
            else list(range(count))
    else:
        indices = sorted(set(spec))
        if indices[-1] >= n_layers:
            raise ConfigError(f"lora.layers {spec}: the model's layers are 0..{n_layers - 1}")
    return None if indices == list(range(n_layers)) else indices


def count_layers(model: nn.Module) -> int:
    """The number of transformer layers (the config's `num_hidden_layers` or `n_layer`)."""
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ConfigError("lora.layers: this model's config names no number of layers "
                      "(num_hidden_layers); leave lora.layers out")


def attach_lora(backbone: nn.Module, config: LoraConfig, seed: int) -> PeftModel:
    """Wrap `backbone` with a fresh LoRA adapter (A random, B = 0), initialised from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(backbone, config)


class AdapterMismatch(ConfigError):
    """An adapter whose shapes do not fit the base it is loaded on; `detail` is PEFT's own
    account of the first mismatches, for callers that word the rest themselves."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def load_adapter(backbone: nn.Module, path: str | Path, what: str = "lora.init_adapter",
                 trainable: bool = True) -> PeftModel:
    """Load a user's PEFT adapter onto `backbone` (trainable unless told otherwise), refusing a
    silent partial load, a file that is not whole, NaN/Inf, an adapter that changes nothing and
    a pickle that is not plain tensors; `what` (the flag or command that named the adapter)
    starts each message."""
    path = Path(path)
    use = "train on it" if trainable else f"load it ({what})"
    config_file = path / "adapter_config.json"
    if not path.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    if not config_file.is_file():
        raise ConfigError(f"{what}: {path} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        saved = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: {config_file} is not valid JSON ({exc})") from None
    if saved.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{what}: {path} is a {saved.get('peft_type')} adapter, not LoRA")
    keys = check_weights_file(path, use)
    try:
        model = PeftModel.from_pretrained(backbone, str(path), is_trainable=trainable)
    except pickle.UnpicklingError as exc:
        raise ConfigError(unsafe_pickle_message(path / "adapter_model.bin", exc)) from None
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        trained_on = saved.get("base_model_name_or_path") or "an unnamed base"
        this_base = getattr(getattr(backbone, "config", None), "_name_or_path", "") or "?"
        detail = " ".join(str(exc).split())[:400]
        if keys is None and "size mismatch" not in detail:  # the .bin itself did not read
            raise ConfigError(f"{what}: {path / 'adapter_model.bin'} cannot be read by "
                              f"torch.load(weights_only=True) ({type(exc).__name__}: "
                              f"{detail}): truncated or corrupted? Copy it again, or use "
                              "another adapter") from None
        if isinstance(exc, OSError | EOFError):
            raise
        raise AdapterMismatch(
            f"{what}: {path} (trained on {trained_on}) does not fit this base model "
            f"({this_base}): {detail}. Load it on the base it was trained on.", detail) from None
    check_complete_load(model, path, keys)
    if keys is None:  # a .bin: its values are known only now that PEFT has read them
        check_values({name: p for name, p in model.named_parameters()
                      if "lora_" in name and ".default." in name},
                     path / "adapter_model.bin", use)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable and n_trainable == 0:
        raise ConfigError(f"{what}: {path} loaded with 0 trainable parameters")
    return model


def unsafe_pickle_message(file: Path, exc: Exception) -> str:
    """One line for a pickle that `torch.load(weights_only=True)` refused."""
    import re

    named = re.search(r"GLOBAL ([\w.]+)", str(exc))  # torch names the global it refused
    named = named.group(1) if named else None
    return (f"{file}: a pickle that holds more than tensors"
            + (f" (it names {named})" if named else "")
            + ": torch.load(weights_only=True) refused it and nothing in it was run. Convert "
            "the adapter to safetensors from a copy you trust, or use another adapter")


def check_weights_file(path: Path, use: str = "load it") -> set[str] | None:
    """The adapter's weights must be a whole safetensors file, finite and not all zero
    (`adapter_check.read_checked`; `use` says what for, in the message); returns its tensor
    names. A `.bin` alone is read by PEFT with `torch.load(weights_only=True)` (tensors only,
    no code), with a warning, and None is returned."""
    import warnings

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            warnings.warn(f"{path}: adapter_model.bin (a pickle) is loaded with "
                          "torch.load(weights_only=True); prefer safetensors", stacklevel=3)
            return None
        raise ConfigError(f"{path}: no adapter_model.safetensors (nor .bin) beside "
                          "adapter_config.json")
    return set(read_checked(weights, use)[0])


def check_complete_load(model: PeftModel, path: Path, keys: set[str] | None,
                        adapter: str = "default") -> None:
    """Refuse a silent partial load: PEFT only warns when the file (tensor names `keys`) lacks
    some of the LoRA tensors its config creates (those stay at their fresh init: B = 0, so the
    module does nothing) or holds tensors that match no module of this base (they are
    dropped)."""
    if keys is None:
        return  # a .bin: its names are not read without unpickling it
    weights = path / "adapter_model.safetensors"
    in_file = {k for k in keys if "lora_" in k}  # not modules_to_save, biases
    expected = {name.replace(f".{adapter}.", ".") for name, _ in model.named_parameters()
                if "lora_" in name and f".{adapter}." in name}
    missing, unmatched = sorted(expected - in_file), sorted(in_file - expected)
    if missing or unmatched:
        lora_modules = len({k.rsplit(".lora_", 1)[0] for k in expected})
        applied = len({k.rsplit(".lora_", 1)[0] for k in expected & in_file})
        detail = (f"; missing e.g. {missing[:2]}" if missing else "") + (
            f"; matching no module e.g. {unmatched[:2]}" if unmatched else "")
        raise ConfigError(
            f"{path}: applied {applied} of the {lora_modules} LoRA modules its "
            f"adapter_config.json creates ({len(missing)} tensors missing from "
            f"{weights.name}, {len(unmatched)} matching no module of this base){detail}. An "
            "empty or partial adapter file, or one written for another architecture: refusing "
            "a silent partial load")


@dataclass
class LoraFactors:
    """One adapted module's factors: ΔW = scaling · B @ A, in PEFT's shapes.

    For a Linear layer A is `[r, d_in]` and B `[d_out, r]`. For a convolution PEFT keeps the
    kernel in A (`[r, in, k, k]` for Conv2d) and a 1×1 kernel in B (`[out, r, 1, 1]`); the update
    is then the matrix product of the flattened factors, `[out, r] @ [r, in·k·k]`, reshaped to the
    weight's `[out, in, k, k]` (what PEFT's `get_delta_weight` computes, as a convolution of the
    factors). Everything that works on dense updates (merges, SVD exports, subspaces) works on
    the flattened matrices, and reshapes only where a weight or a factor file is written.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def a_matrix(self) -> torch.Tensor:
        """A as a matrix `[r, d_in]` (a convolution's kernel flattened into d_in)."""
        return self.A.flatten(1)

    @property
    def b_matrix(self) -> torch.Tensor:
        """B as a matrix `[d_out, r]` (a convolution's 1×1 kernel dropped)."""
        return self.B.flatten(1)

    @property
    def d_in(self) -> int:
        return self.A[0].numel()

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    def delta(self) -> torch.Tensor:
        """ΔW as a float32 matrix `[d_out, d_in]` (flattened for a convolution)."""
        return self.scaling * (self.b_matrix.float() @ self.a_matrix.float())

    def like(self, A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> LoraFactors:
        """Matrix factors `A [r', d_in]`, `B [d_out, r']` (an SVD export, a sum) in this
        module's layout: a convolution gets its kernel back in A and a 1×1 kernel in B."""
        rank = A.shape[0]
        return LoraFactors(A=A.reshape(rank, *self.A.shape[1:]),
                           B=B.reshape(self.B.shape[0], rank, *self.B.shape[2:]),
                           scaling=scaling)


def delta_as_weight(delta: torch.Tensor, weight: torch.Tensor,
                    fan_in_fan_out: bool = False) -> torch.Tensor:
    """A dense update matrix `[d_out, d_in]` in the layout of `weight`: transposed for a weight
    stored `[in, out]` (GPT-2's Conv1D), reshaped to a convolution's kernel."""
    delta = delta.T if fan_in_fan_out else delta
    return delta.reshape(weight.shape)


def lora_layers(model: PeftModel, adapter: str | None = None) -> list[tuple[str, nn.Module]]:
    """(module path inside the base model, layer) of every LoRA-wrapped layer (that holds
    `adapter`, when given)."""
    prefix = "base_model.model."
    return [(name.removeprefix(prefix), m) for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and (adapter is None or adapter in m.lora_A)]


@torch.no_grad()
def merge_in_float32(model: PeftModel, masters: dict[str, torch.Tensor]) -> nn.Module:
    """The base with the active adapters merged in and the LoRA layers removed:
    `W0 ← W0 + Σ ΔW`, added in float32 whatever the weights' dtype (ALGORITHMS.md).

    PEFT's `merge_and_unload` adds ΔW in the weight's own dtype: on a bf16 base most entries of
    a small update round away, and the loss compounds merge after merge. Here a weight stored
    in float32 is updated in place (the same sum PEFT computes); a weight stored in a lower
    precision gets a float32 master in `masters` (kept by the caller across merges, only for
    adapted modules), the update is added to the master and the weight is written as the master
    rounded once. After several merges the weight is `round(W0 + ΔW_1 + … + ΔW_t)`, not a chain
    of roundings.
    """
    for key, layer in lora_layers(model):
        weight = layer.get_base_layer().weight
        fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            factors = LoraFactors(layer.lora_A[adapter].weight.detach(),
                                  layer.lora_B[adapter].weight.detach(),
                                  float(layer.scaling[adapter]))
            delta = delta_as_weight(factors.delta().to(weight.device), weight, fan_in_fan_out)
            if weight.dtype == torch.float32:
                weight.add_(delta)
                continue
            master = masters.get(key)
            if master is None:
                master = masters[key] = weight.detach().float().clone()
            master.add_(delta)
            weight.copy_(master.to(weight.dtype))
    return model.unload()


def lora_factors(model: PeftModel, adapter: str = "default") -> dict[str, LoraFactors]:
    """Factors of every LoRA-wrapped Linear, keyed by the module path inside the base model."""
    out = {}
    prefix = "base_model.model."
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a:
            key = name[len(prefix):] if name.startswith(prefix) else name
            out[key] = LoraFactors(
                A=module.lora_A[adapter].weight.detach().float().clone(),
                B=module.lora_B[adapter].weight.detach().float().clone(),
                scaling=float(module.scaling[adapter]),
            )
    return out


def concatenate_factors(history: list[dict[str, LoraFactors]]) -> dict[str, LoraFactors]:
    """Exact sum of several adapters as one: Σ s_i B_i A_i = [s_1 B_1 … s_k B_k] [A_1; …; A_k].

    The result has rank Σ r_i and scaling 1 (the scalings are folded into B).
    """
    keys = sorted(set().union(*history))
    out = {}
    for key in keys:
        parts = [h[key] for h in history if key in h]
        A = torch.cat([p.A for p in parts], dim=0)
        B = torch.cat([p.scaling * p.B for p in parts], dim=1)
        out[key] = LoraFactors(A=A, B=B, scaling=1.0)
    return out


def save_factors_as_adapter(factors: dict[str, LoraFactors], fresh_backbone: nn.Module,
                            out_dir: Path, base_name: str) -> None:
    """Write `factors` (all of one rank, scaling 1) as a PEFT adapter, through PEFT's own save.

    `fresh_backbone` is an unmodified copy of the base; PEFT wraps it so that the saved keys and
    config are exactly what `PeftModel.from_pretrained` expects.
    """
    ranks = {f.A.shape[0] for f in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"all modules must share one rank to be saved together, got {ranks}")
    rank = ranks.pop()
    targets = sorted(factors)  # full module paths: exact, never matches more than intended
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, bias="none")
    config.base_model_name_or_path = base_name
    model = get_peft_model(fresh_backbone, config)
    with torch.no_grad():
        for name, module in model.named_modules():
            key = name[len("base_model.model."):]
            if key in factors and hasattr(module, "lora_A"):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(factors[key].A.reshape(a.shape))
                b.copy_(factors[key].B.reshape(b.shape))
    model.save_pretrained(str(out_dir))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
