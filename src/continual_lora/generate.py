"""`continual-lora generate`: what a causal-LM adapter says, for inspection.

The adapter is loaded onto its base with PEFT (the same checks as everywhere: safetensors only,
no partial load), the base being `--base` or the one its lineage (or `adapter_config.json`)
names. `--adapter` may be a PEFT adapter folder, a run's stage folder or run folder (its last
stage), or a full model folder (`full_ft`'s `model/`), which is then the model itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from continual_lora.config import ModelConfig
from continual_lora.families.common import load_pretrained, load_tokenizer, resolve_model_path

DEFAULT_QA_TEMPLATE = ModelConfig().qa_template


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    base: str
    adapter: Path | None
    qa_template: str


def _run_qa_template(folder: Path) -> str | None:
    """The qa_template of the run an adapter was trained in, when its config is found."""
    for parent in (folder, *folder.parents[:4]):
        config = parent / "config.yaml"
        if config.is_file():
            import yaml

            data = yaml.safe_load(config.read_text()) or {}
            return ((data.get("model") or {}).get("qa_template")
                    if isinstance(data, dict) else None)
    return None


def load_for_generation(adapter: Path | None, base: str | None,
                        trust_remote_code: bool = False) -> Loaded:
    from transformers import AutoModelForCausalLM

    from continual_lora.adapters import check_weights_file, load_adapter
    from continual_lora.config import ConfigError
    from continual_lora.lineage import read_lineage
    from continual_lora.update.old import locate_adapter

    folder = None
    if adapter is not None and (Path(adapter) / "config.json").is_file() \
            and not (Path(adapter) / "adapter_config.json").is_file():
        base = str(adapter)  # a full model folder (full fine-tuning's `model/`)
    elif adapter is not None:
        folder = locate_adapter(Path(adapter))
        check_weights_file(folder, "generate with it")  # before the base loads
        if base is None:
            lineage = read_lineage(folder)
            config = json.loads((folder / "adapter_config.json").read_text())
            base = (lineage["base_model"]["name_or_path"] if lineage
                    else config.get("base_model_name_or_path"))
    if not base:
        raise ConfigError("generate: no base model: give --base (a hub id or a local folder), "
                          "or an adapter whose lineage names its base")
    cfg = ModelConfig(family="causal_lm", name_or_path=base, trust_remote_code=trust_remote_code)
    path = resolve_model_path(base)
    tokenizer = load_tokenizer(path, cfg)
    model = load_pretrained(AutoModelForCausalLM, path, cfg, "causal LM")
    if folder is not None:
        model = load_adapter(model, folder, what="generate --adapter", trainable=False)
    template = (_run_qa_template(folder) if folder else None) or DEFAULT_QA_TEMPLATE
    return Loaded(model.eval(), tokenizer, base, folder, template)


@torch.no_grad()
def generate(loaded: Loaded, prompts: list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, chat: bool = False, qa: bool = False,
             seed: int = 0) -> list[str]:
    """Continuations of `prompts` (greedy when temperature is 0), batched with left padding.
    `qa` wraps each prompt in the run's question template; `chat` renders it as a user turn
    with the tokenizer's chat template."""
    from continual_lora.config import ConfigError

    tok = loaded.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ConfigError(f"generate --chat: the tokenizer of {loaded.base} has no chat "
                              "template")
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in prompts]
        special = False  # the template writes its own special tokens
    else:
        texts = [loaded.qa_template.format(question=p) if qa else p for p in prompts]
        special = True
    tok.padding_side = "left"
    if tok.pad_token_id is None:  # GPT-2 and others: padding is masked out anyway
        tok.pad_token = tok.eos_token
    pad = tok.pad_token_id
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
        "do_sample": False}
    out = loaded.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                max_new_tokens=max_new_tokens, pad_token_id=pad,
                                eos_token_id=tok.eos_token_id, **sampling)
    new = out[:, enc["input_ids"].shape[1]:]
    return tok.batch_decode(new, skip_special_tokens=True)
