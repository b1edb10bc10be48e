"""moe: one adapter per task, mixed at inference by a router (seed 004 "MoE mixing").

Training: task t adds a new PEFT adapter `task{t}` to the base (through `add_adapter`, seeded by
the task) and makes it the only active and trainable one, so task t trains from the base and no
earlier adapter moves. Only task t's head trains with it.

Inference (while a task is scored, through the `scoring` hook), every input goes through
`AdapterMixture`: its *router embedding* is computed on the base model (adapters disabled), a
router turns it into weights over the adapters, and the output hidden state is the weighted sum
of the hidden states of the selected adapters, each computed by the PeftModel with that adapter
set. Routers:

- `oracle`: the task id is given: all weight on the scored task's adapter (task-incremental upper
  bound). A task that has no adapter yet, and the upstream probe (task 0), use the base model
  (our choice: the oracle knows they belong to no trained adapter).
- `prototype` (default): prototype of task i = mean router embedding of its training data; scores
  are cosine similarities to the prototypes.
- `learned`: scores are the logits of a small gate (linear, or one hidden ReLU layer) trained after
  each task on a per-task buffer of router embeddings (features, never raw text), so no old data
  is kept. The gate is re-trained from scratch on all buffers after each task (our choice: its
  output grows by one task each time, and the buffers are small).

Weights (`top_k_weights`): keep the top-k scores, softmax(score / temperature) over them, zero
elsewhere; with `top_k = 1` the chosen adapter gets weight exactly 1.

The router embedding (our choice, the document leaves it open) is the family's own pooling of
the base model's last hidden state (`family.pool`: the classifier's pooling; a causal LM's mean
over the prompt's tokens), L2-normalised. A causal LM answering a question keeps the route its
prompt chose for every generated token (`pinned_routes`), so each question is routed once.

Routing accuracy of task i = fraction of its held-out examples whose top-weighted adapter is
task i's own, taken from the routing decisions of the scoring pass itself; reported per stage
for the tasks trained so far, and their mean (`stage_report`).

Export (per stage, under `adapter/`): every task adapter through PEFT's `save_pretrained`, one
subfolder per adapter (`task1/`, `task2/`, ...); a copy of the newest task's adapter at the root,
so the folder is also a plain PEFT adapter (the model that task t's head was trained with); and
`router.json` + `router.safetensors` (prototypes, or the gate's weights) to rebuild the mixture.
A user's `lora.init_adapter` is merged into the base before task 1: it is the base every task
adapter starts from (and must be merged again to rebuild the mixture; `router.json` says so).

Cost: scoring runs the base once per input for routing, then each selected adapter on its rows.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from continual_lora.adapters import merge_in_float32
from continual_lora.config import ConfigError
from continual_lora.registry import register_strategy
from continual_lora.sequence import TaskData, reservoir_sample
from continual_lora.strategies.base import Strategy, TaskContext, check_adapter_tensors

GATE_BATCH_SIZE = 64


class MoeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    router: Literal["oracle", "prototype", "learned"] = "prototype"
    """How an input picks adapters: the given task id (`oracle`), the nearest task prototype by
    cosine (`prototype`), or a small gate trained on buffered base features (`learned`)."""
    top_k: int = Field(1, ge=1)
    """Number of adapters mixed per input (softmax-weighted); 1 routes to a single adapter."""
    temperature: float | None = Field(None, gt=0)
    """Softmax temperature over the top-k scores; null: 0.1 for cosine scores (`prototype`),
    1.0 for gate logits (`learned`)."""
    gate_hidden: int = Field(0, ge=0)
    """Hidden width of the learned gate; 0 makes it linear."""
    gate_buffer_per_task: int = Field(256, ge=1)
    """Router embeddings of training examples kept per task for the learned gate (reservoir)."""
    gate_epochs: int = Field(100, ge=1)
    """Epochs of gate training (Adam, batches of 64) over all buffers, after each task."""
    gate_lr: float = Field(1e-2, gt=0)
    """Learning rate of the learned gate."""


# -- routing: pure tensor functions -----------------------------------------------------------


def router_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor,
                     pool: Callable) -> torch.Tensor:
    """What the router sees: the family's pooling of a hidden state, L2-normalised."""
    return F.normalize(pool(hidden, attention_mask).float(), dim=-1)


def cosine_scores(embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarity of each embedding to each prototype."""
    return F.normalize(embeddings, dim=-1) @ F.normalize(prototypes, dim=-1).T


def top_k_weights(scores: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """(n, m) weights: softmax(score / temperature) over each row's top-k scores, 0 elsewhere."""
    k = min(top_k, scores.shape[-1])
    top, index = scores.topk(k, dim=-1)
    return torch.zeros_like(scores).scatter(-1, index, torch.softmax(top / temperature, dim=-1))


def make_gate(dim: int, n_tasks: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(dim, n_tasks)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n_tasks))


def train_gate(features: torch.Tensor, labels: torch.Tensor, n_tasks: int, hidden: int,
               epochs: int, lr: float, seed: int) -> nn.Module:
    """A fresh gate trained by cross-entropy to predict each feature's task (0-based)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gate = make_gate(features.shape[1], n_tasks, hidden)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(order), GATE_BATCH_SIZE):
            rows = order[start:start + GATE_BATCH_SIZE]
            loss = F.cross_entropy(gate(features[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return gate.eval().requires_grad_(False)


@dataclass
class Router:
    """Prototype or learned-gate router over `m` adapters (index i-1 = task i's adapter)."""

    kind: Literal["prototype", "learned"]
    top_k: int
    temperature: float
    prototypes: torch.Tensor | None = None  # (m, d)
    gate: nn.Module | None = None

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        embeddings = embeddings.float().cpu()  # the router state lives on the CPU: it is tiny
        if self.kind == "prototype":
            return cosine_scores(embeddings, self.prototypes)
        with torch.no_grad():
            return self.gate(embeddings)

    def weights(self, embeddings: torch.Tensor) -> torch.Tensor:
        return top_k_weights(self.scores(embeddings), self.top_k, self.temperature)


def routing_accuracy(choices: torch.Tensor, own: int) -> float:
    """Fraction of examples whose top-weighted adapter is their task's own (index `own`)."""
    return float((choices == own).float().mean())


# -- the mixture: a backbone stand-in used while scoring -----------------------------------------


class AdapterMixture(nn.Module):
    """Runs a PeftModel holding one adapter per task as a weighted mixture of its adapters.

    With a `router`, each input's weights come from its base-model embedding (`pool`: the
    family's pooling of the last hidden state); else all weight goes to adapter `oracle`
    (None: the base model, adapters disabled). The output is the weighted sum of the adapters'
    first outputs (a classifier's hidden states, a causal LM's logits). `choices` keeps, per
    routed call, the top-weighted adapter index of each row (-1: the base model).
    """

    def __init__(self, peft_model: PeftModel, adapters: list[str], pool: Callable,
                 router: Router | None = None, oracle: int | None = None):
        super().__init__()
        self.peft = peft_model
        self.adapters = adapters
        self.pool = pool
        self.router = router
        self.oracle = oracle
        self.choices: list[torch.Tensor] = []
        self._pinning = False
        self._pinned: torch.Tensor | None = None

    @contextmanager
    def pinned_routes(self) -> Iterator[None]:
        """Within: the weights of the first call are kept for the following calls on the same
        rows (token-by-token generation routes each answer once), until `release_routes`."""
        self._pinning, self._pinned = True, None
        try:
            yield
        finally:
            self._pinning, self._pinned = False, None

    def release_routes(self) -> None:
        self._pinned = None

    def _output(self, adapter: str | None, input_ids, attention_mask, **kwargs):
        """The model's output with one adapter set (None: the base model, adapters disabled)."""
        if adapter is None:
            with self.peft.disable_adapter():
                return self.peft(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        self.peft.set_adapter(adapter, inference_mode=True)
        return self.peft(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _weights(self, input_ids, attention_mask, **kwargs
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, m) weights on the inputs' device, and the base output if it was computed."""
        if self.router is None:
            weights = torch.zeros(len(input_ids), len(self.adapters))
            if self.oracle is not None:
                weights[:, self.oracle] = 1.0
            return weights.to(input_ids.device), None
        out = self._output(None, input_ids, attention_mask, output_hidden_states=True, **kwargs)
        embeddings = router_embedding(out.hidden_states[-1], attention_mask, self.pool)
        return self.router.weights(embeddings).to(input_ids.device), out[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **kwargs) -> BaseModelOutput:
        if self._pinned is not None:
            weights, base = self._pinned, None
        else:
            weights, base = self._weights(input_ids, attention_mask, **kwargs)
            routed = weights.sum(-1) > 0
            self.choices.append(torch.where(routed, weights.argmax(-1), -1).cpu())
            if self._pinning:
                self._pinned = weights
        routed = weights.sum(-1) > 0
        out = None
        for j, name in enumerate(self.adapters):
            rows = torch.nonzero(weights[:, j] > 0).squeeze(-1)
            if len(rows) == 0:
                continue  # an adapter no row selected is not run at all
            row_kwargs = {k: v[rows] if torch.is_tensor(v) else v for k, v in kwargs.items()}
            first = self._output(name, input_ids[rows], attention_mask[rows], **row_kwargs)[0]
            if out is None:
                out = first.new_zeros((len(input_ids), *first.shape[1:]))
            scale = weights[rows, j].view(-1, *[1] * (first.dim() - 1)).to(first.dtype)
            out[rows] = out[rows] + scale * first
        if not bool(routed.all()):
            if base is None:
                base = self._output(None, input_ids, attention_mask, **kwargs)[0]
            keep = routed.view(-1, *[1] * (base.dim() - 1))
            out = base if out is None else torch.where(keep, out, base)
        return BaseModelOutput(last_hidden_state=out)


class SavedMixture:
    """A moe stage reloaded from its files alone (`adapter/task*/`, `router.json`,
    `router.safetensors`) with plain PEFT, scoring as the strategy did: each task through the
    mixture (oracle: its own adapter). `continual-lora eval` passes it to `score_row` in place
    of the strategy, whose `scoring` hook it mirrors."""

    def __init__(self, family, adapter_dir: Path, init_adapter: Path | None = None):
        import json

        meta = json.loads((adapter_dir / "router.json").read_text())
        self.family, self.adapters = family, list(meta["adapters"])
        backbone = family.backbone
        if meta.get("parent_adapter_merged_into_base") and init_adapter is not None:
            backbone = merge_in_float32(PeftModel.from_pretrained(backbone, str(init_adapter)), {})
        peft = PeftModel.from_pretrained(backbone, str(adapter_dir / self.adapters[0]),
                                         adapter_name=self.adapters[0])
        for name in self.adapters[1:]:
            peft.load_adapter(str(adapter_dir / name), adapter_name=name)
        family.set_backbone(peft)
        self.peft = peft
        self.router = self._router(meta, adapter_dir)

    def _router(self, meta: dict, adapter_dir: Path) -> Router | None:
        if meta["router"] == "oracle":
            return None
        tensors = load_file(str(adapter_dir / "router.safetensors"))
        if meta["router"] == "prototype":
            return Router("prototype", meta["top_k"], meta["temperature"],
                          prototypes=tensors["prototypes"])
        state = {k.removeprefix("gate."): v for k, v in tensors.items()}
        first = state.get("weight", state.get("0.weight"))
        gate = make_gate(first.shape[1], len(self.adapters), meta["gate_hidden"])
        gate.load_state_dict(state)
        return Router("learned", meta["top_k"], meta["temperature"], gate=gate.eval())

    @contextmanager
    def scoring(self, ctx, task: TaskData | None) -> Iterator[None]:
        own = task.index - 1 if task is not None and task.index <= len(self.adapters) else None
        self.family.set_backbone(AdapterMixture(self.peft, self.adapters, self.family.pool,
                                                self.router, oracle=own))
        try:
            yield
        finally:
            self.family.set_backbone(self.peft)


# -- the strategy ---------------------------------------------------------------------------------


@register_strategy
class MoeStrategy(Strategy):
    """Keep one adapter per task; mix them at inference with a router (see the module doc)."""

    name = "moe"
    Options = MoeOptions
    summary = "one adapter per task, mixed at inference by a router (oracle/prototype/learned)"
    not_multiprocess = ("its router records each held-out example's route while it is scored, "
                        "and with several processes each scores only its share; run moe in one "
                        "process")
    not_for_update = ("its output is a set of adapters and a router, not one adapter; train the "
                      "sequence with `continual-lora run` instead")

    def __init__(self, options=None):
        super().__init__(options)
        self.adapters: list[str] = []  # index i-1: task i's adapter
        self.prototypes: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self.gate: nn.Module | None = None
        self.choices: dict[int, torch.Tensor] = {}  # task index → decisions of the last scoring
        self.parent_merged = False

    @property
    def temperature(self) -> float:
        if self.options.temperature is not None:
            return self.options.temperature
        return 0.1 if self.options.router == "prototype" else 1.0

    # -- training ----------------------------------------------------------------------------

    def before_task(self, ctx: TaskContext) -> None:
        if ctx.family.name == "diffusion":
            raise ConfigError("strategy moe routes text or token inputs; it does not run on a "
                              "diffusion model yet: use merge (adapter merging) to combine "
                              "concept LoRAs")
        if ctx.family.modality != "text":
            raise ConfigError("strategy moe routes text or token inputs; it does not route an "
                              "image model yet: use merge (adapter merging) or lwf")
        backbone = ctx.family.backbone
        if ctx.t == 1 and isinstance(backbone, PeftModel):
            backbone = merge_in_float32(backbone, {})  # the user's adapter becomes the base
            self.parent_merged = True
        name = f"task{ctx.t}"
        config = copy.deepcopy(ctx.lora_config)  # PEFT keeps and edits one config per adapter
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)  # the same init as attach_lora would give this task
            if isinstance(backbone, PeftModel):
                backbone.add_adapter(name, config)
            else:
                backbone = get_peft_model(backbone, config, adapter_name=name)
        backbone.set_adapter(name)  # PEFT: only the active adapter requires grad
        ctx.family.set_backbone(backbone)
        self.adapters.append(name)

    def after_task(self, ctx: TaskContext) -> None:
        if self.options.router == "oracle":
            return
        family = ctx.family
        with family.backbone.disable_adapter():
            feats = family.encode_split(ctx.task, "train", ctx.run.train.eval_batch_size)
        feats = F.normalize(feats.float(), dim=-1)  # = router_embedding of each example
        if self.options.router == "prototype":
            self.prototypes.append(feats.mean(0))
            return
        keep = reservoir_sample(len(feats), self.options.gate_buffer_per_task, ctx.seed)
        self.buffers.append(feats[torch.as_tensor(keep)])
        labels = torch.cat([torch.full((len(b),), i) for i, b in enumerate(self.buffers)])
        o = self.options
        self.gate = train_gate(torch.cat(self.buffers), labels, len(self.buffers), o.gate_hidden,
                               o.gate_epochs, o.gate_lr, ctx.seed)

    # -- scoring -----------------------------------------------------------------------------

    def router(self) -> Router | None:
        o = self.options
        if o.router == "oracle":
            return None
        prototypes = torch.stack(self.prototypes) if o.router == "prototype" else None
        return Router(o.router, o.top_k, self.temperature, prototypes, self.gate)

    def scoring(self, ctx: TaskContext | None, task: TaskData | None):
        if ctx is None or not self.adapters:
            return nullcontext()
        return self._routed(ctx, task)

    @contextmanager
    def _routed(self, ctx: TaskContext, task: TaskData | None) -> Iterator[None]:
        """Swap the backbone for the mixture while `task` is scored, then restore the PeftModel
        exactly (active adapter and requires_grad flags: `set_adapter` changes them)."""
        family, peft_model = ctx.family, ctx.family.backbone
        active = peft_model.active_adapter
        grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
        own = task.index - 1 if task is not None and task.index <= len(self.adapters) else None
        mixture = AdapterMixture(peft_model, list(self.adapters), family.pool, self.router(),
                                 oracle=own)
        family.set_backbone(mixture)
        try:
            yield
        finally:
            family.set_backbone(peft_model)
            peft_model.set_adapter(active)
            for n, p in peft_model.named_parameters():
                p.requires_grad_(grads[n])
        if own is not None and mixture.choices:
            self.choices[task.index] = torch.cat(mixture.choices)

    def routing(self, ctx: TaskContext) -> dict[str, float]:
        """Routing accuracy of each task trained so far, from the last scoring pass."""
        out = {}
        for task in ctx.seen:
            choices = self.choices.get(task.index)
            if choices is None or len(choices) != len(task.eval):
                raise RuntimeError(f"moe: task {task.name} was not scored on exactly its "
                                   f"{len(task.eval)} held-out examples through the router")
            out[task.name] = routing_accuracy(choices, task.index - 1)
        return out

    def stage_report(self, ctx: TaskContext) -> dict:
        per_task = self.routing(ctx)
        return {"router": self.options.router, "routing_accuracy": per_task,
                "routing_accuracy_mean": float(np.mean(list(per_task.values())))}

    # -- export ------------------------------------------------------------------------------

    def export_adapter(self, ctx: TaskContext, out_dir: Path) -> dict:
        peft_model = ctx.family.backbone
        check_adapter_tensors(peft_model)
        peft_model.save_pretrained(str(out_dir), selected_adapters=list(self.adapters))
        newest = out_dir / self.adapters[-1]
        for file in newest.iterdir():  # the root is a plain PEFT adapter too: the newest task's
            if file.is_file():
                shutil.copy2(file, out_dir / file.name)
        self._save_router(ctx, out_dir)
        return {"kind": "peft_lora_mixture", "rank": ctx.lora_config.r,
                "adapters": {name: f"{name}/" for name in self.adapters},
                "root_adapter": self.adapters[-1], "router": self.options.router}

    def _save_router(self, ctx: TaskContext, out_dir: Path) -> None:
        import json

        o = self.options
        tensors = {}
        if o.router == "prototype":
            tensors["prototypes"] = torch.stack(self.prototypes).contiguous()
        elif o.router == "learned":
            tensors = {f"gate.{k}": v.contiguous() for k, v in self.gate.state_dict().items()}
        if tensors:
            save_file(tensors, str(out_dir / "router.safetensors"))
        meta = {
            "router": o.router, "top_k": o.top_k,
            "temperature": None if o.router == "oracle" else self.temperature,
            "gate_hidden": o.gate_hidden if o.router == "learned" else None,
            "adapters": list(self.adapters), "tasks": [t.name for t in ctx.seen],
            "embedding": "L2-normalised pooling of the base model's last hidden state, adapters "
                         "disabled (classifier: model.pooling; causal LM: mean over the prompt)",
            "weights": "softmax(score / temperature) over the top_k scores (cosine to the "
                       "prototypes, or gate logits); oracle: the task's own adapter",
            "parent_adapter_merged_into_base": self.parent_merged,
            "routing_accuracy": self.routing(ctx),
        }
        (out_dir / "router.json").write_text(json.dumps(meta, indent=2))
