"""Representation drift on the upstream task: linear CKA between the base's and the adapted
model's pooled representations of the upstream probe's texts, per layer, after each task.

The adapted model is the base plus the stage's adapter, loaded with PEFT's own
`PeftModel.from_pretrained` (the file checked complete first, safetensors only), exactly as a
user would load it. Each layer's hidden states are pooled as the classifier family pools its
features (`model.pooling`, `model.normalize`), so the last layer's CKA is about what the heads
and the retrieval probe see.

Measured for text classifiers with the WordNet retrieval probe (the embedded default): the
probe's glosses and words, 2 × `upstream.size` texts. Other families and probes are skipped
with the reason in the diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from continual_lora.diagnose.measures import linear_cka

#: Exports whose stage adapter is not the scored model itself, and what that means for drift.
APPROXIMATE = {
    "peft_lora_svd": "the stage adapters are truncated SVDs of the scored models' updates, so "
                     "this is the drift of that approximation",
}


@dataclass
class DriftCache:
    """The base's representations, computed once per base and probe for a whole bench."""

    base: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)


def skip_reason(config) -> str | None:
    """Why drift cannot be measured for this run's config (a RunConfig), or None."""
    if config.model.family != "classifier":
        return (f"model.family {config.model.family}: drift is measured for text classifiers "
                "(pooled encoder representations)")
    if config.upstream.kind != "wordnet_retrieval":
        return (f"upstream.kind {config.upstream.kind}: drift is measured on the WordNet "
                "retrieval probe's texts")
    return None


def upstream_texts(config) -> tuple[list[str], str]:
    """The upstream probe's texts (its glosses, then its words) and the probe's name."""
    from continual_lora.sequence import wordnet_upstream

    probe, _ = wordnet_upstream(config.upstream.size)
    return list(probe.queries) + list(probe.keys), probe.name


@torch.no_grad()
def pooled_layers(model: torch.nn.Module, tokenizer, texts: list[str], model_cfg,
                  batch_size: int = 64) -> list[torch.Tensor]:
    """Per transformer layer (hidden_states[1:]), the pooled representation of every text
    (rows in the texts' order), in length-sorted batches."""
    from continual_lora.families.classifier import pool_hidden

    model.eval()
    ids = tokenizer(texts, truncation=True, max_length=model_cfg.max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = tokenizer.pad_token_id or 0
    out: list[torch.Tensor] | None = None
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        hidden = model(input_ids=input_ids, attention_mask=mask,
                       output_hidden_states=True).hidden_states[1:]
        if out is None:
            out = [torch.empty(len(ids), h.shape[-1], dtype=torch.float64) for h in hidden]
        for layer, h in enumerate(hidden):
            out[layer][rows] = pool_hidden(h.float(), mask, model_cfg).double()
    return out or []


def _base_model(model_cfg) -> torch.nn.Module:
    """A fresh copy of the base (PEFT wraps the module it is given in place)."""
    from transformers import AutoModel

    from continual_lora.families.common import load_pretrained, resolve_model_path

    return load_pretrained(AutoModel, resolve_model_path(model_cfg.name_or_path), model_cfg)


def _with_adapter(base: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """base + the stage adapter through PEFT, refusing a partial or damaged file."""
    from peft import PeftModel

    from continual_lora.adapters import check_complete_load, check_weights_file

    keys = check_weights_file(adapter)
    model = PeftModel.from_pretrained(base, str(adapter))
    check_complete_load(model, adapter, keys)
    return model


def representation_drift(config, tasks: list[str], adapters: list[Path], export_kind: str,
                         cache: DriftCache, batch_size: int = 64) -> dict:
    """CKA(base, base + adapter of stage t) per layer, for each stage t; `config` is the run's
    RunConfig, `adapters` each stage's adapter folder."""
    from continual_lora.families.common import load_tokenizer, resolve_model_path

    texts, probe = upstream_texts(config)
    path = resolve_model_path(config.model.name_or_path)
    tokenizer = load_tokenizer(path, config.model)
    key = (str(path), config.model.dtype, probe, len(texts), config.model.max_length,
           config.model.pooling, config.model.normalize)
    if key not in cache.base:
        cache.base[key] = pooled_layers(_base_model(config.model), tokenizer, texts,
                                        config.model, batch_size)
    reference = cache.base[key]
    cka = []
    for adapter in adapters:
        adapted = pooled_layers(_with_adapter(_base_model(config.model), adapter), tokenizer,
                                texts, config.model, batch_size)
        cka.append([linear_cka(x, y) for x, y in zip(reference, adapted, strict=True)])
    result = {"probe": probe, "texts": len(texts), "layers": [str(i) for i in
                                                              range(len(reference))],
              "stages": [f"after {t}" for t in tasks], "cka": cka}
    if export_kind in APPROXIMATE:
        result["note"] = APPROXIMATE[export_kind]
    return result
