"""Text classifiers: any transformers encoder, pooled, with a classification head per task.

Heads come in two modes:
- `per_task` (task-incremental): one head per task, over that task's classes; a task's head
  trains with its task and is frozen afterwards (unless a strategy retrains it, as `joint` does).
- `shared` (class-incremental): one head over every class seen so far; new classes append rows.

A head starts as the task's class prototypes (nearest-class-mean on the current features), so a
task that has not been trained yet can still be scored: its score is the accuracy of the
prototype classifier, the same head its training will start from. That makes forward transfer
(R[i-1, i] − R[0, i]) measure how much the earlier tasks helped the starting point of task i.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from continual_lora.config import ModelConfig
from continual_lora.families.base import ForwardOutput, ModelFamily, TaskScore
from continual_lora.families.common import (
    fingerprint_module,
    load_pretrained,
    load_tokenizer,
    resolve_model_path,
)
from continual_lora.families.packing import (
    PackedLayout,
    additive_mask_dtype,
    packed_layout,
    packing_check,
    position_offsets,
)
from continual_lora.sequence import RetrievalProbe, TaskData

PROTOTYPE_EXAMPLES_PER_CLASS = 64


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor,
                cfg: ModelConfig) -> torch.Tensor:
    """Pooled features from a backbone's last hidden state, as the heads see them (also used by
    strategies that pool hidden states themselves, such as moe's router)."""
    if cfg.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return finish_pooled(pooled, cfg)


def finish_pooled(pooled: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Pooled features in float32 whatever the base's dtype: the heads are float32 parameters
    (as LoRA's are), and a bf16 feature would round their logits and gradients."""
    pooled = pooled.float()
    return F.normalize(pooled, dim=-1) if cfg.normalize else pooled


def _padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Tokens a padded batch of the stream's order would hold (each batch at its longest)."""
    return sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
               for i in range(0, len(lengths), batch_size))


class ClassifierModule(nn.Module):
    """Backbone (possibly PEFT-wrapped) + heads. This is what the optimizer and accelerate see."""

    def __init__(self, backbone: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict()
        self.cfg = cfg
        self.offsets: dict[int, int] = {}  # shared head: first row of each task's classes
        self.lower_cache = None  # a LowerLayerCache, set by ClassifierFamily.prepare_training
        self.pack = False  # train on packed rows (packing.py); set by prepare_training
        self.position_offset = 0  # the model's first position id (RoBERTa: padding_idx + 1)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 task_ids: torch.Tensor | None = None,
                 example_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features. In training, a batch runs packed (`packing.py`, when the model
        passed the check). With the lower-layer cache on (`lower_cache.py`), a batch runs only
        the layers above it: the states of a text, keyed by its token ids, are computed before
        the task trains (training examples) or the first time it is scored (held-out texts).
        `task_ids` and `example_ids` ride in the batch for strategies; not used here."""
        cache, states = self.lower_cache, None
        if cache is not None and cache.active:
            states = (cache.training_states(input_ids, attention_mask) if self.training
                      else cache.evaluation_states(self.backbone, input_ids, attention_mask))
        layout = packed_layout(attention_mask) if self.training and self.pack else None
        return self.pooled(input_ids, attention_mask, layout, states)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               layout: PackedLayout | None = None,
               lower_states: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's pooled output for a padded batch, run padded or in `layout`'s packed
        rows, from the embeddings or from the lower-layer cache's `lower_states`."""
        if layout is not None:
            inputs = {"input_ids": layout.pack(input_ids),
                      "attention_mask": layout.attention_mask(additive_mask_dtype(self.backbone)),
                      "position_ids": layout.position_ids + self.position_offset}
            if lower_states is not None:
                lower_states = layout.pack(lower_states)
        else:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if lower_states is not None:
            with self.lower_cache.skipping_lower_layers(lower_states):
                hidden = self.backbone(**inputs).last_hidden_state
        else:
            hidden = self.backbone(**inputs).last_hidden_state
        if layout is not None:
            return finish_pooled(layout.pool(hidden, self.cfg.pooling), self.cfg)
        return pool_hidden(hidden, attention_mask, self.cfg)

    def head_input(self, feats: torch.Tensor) -> torch.Tensor:
        """What the task heads read from `features`: the same here (the pooling already
        normalised them); an image model's features stay raw for its upstream head."""
        return feats

    def head_logits(self, key: str, feats: torch.Tensor) -> torch.Tensor:
        logits = self.heads[key](self.head_input(feats))
        return logits * self.cfg.logit_scale if self.cfg.normalize else logits

    def head_key(self, task_index: int) -> str:
        return "shared" if self.cfg.head == "shared" else f"task{task_index}"

    def forward(self, input_ids, attention_mask, labels, task_ids, example_ids=None):
        """Per-example loss, logits per task and features. The whole computation (heads
        included) runs here, so a DDP wrapper from accelerate synchronises every gradient.
        `example_ids` is not used here: it rides in the batch for strategies' per-example
        caches (LwF's teacher outputs)."""
        feats = self.features(input_ids, attention_mask, task_ids, example_ids)
        return self.task_losses(feats, labels, task_ids)

    def task_losses(self, feats: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor):
        """(per-example loss, logits per task, features) of a batch's features.

        One head product for the whole batch, whatever the number of tasks in it (a replay
        batch mixes up to T): the heads are stacked, padded to the most classes with logits of
        -inf (zero probability, no gradient), and each row reads its own task's."""
        tasks = torch.unique(task_ids).tolist()
        if len(tasks) == 1 or self.cfg.head == "shared":
            key = self.head_key(tasks[0])  # one head serves every row
            logits = self.head_logits(key, feats)
            offsets = torch.tensor([self.offsets.get(t, 0) for t in tasks], device=feats.device)
            row_task = torch.searchsorted(torch.tensor(tasks, device=feats.device), task_ids)
            per_example = F.cross_entropy(logits, labels + offsets[row_task], reduction="none")
            return per_example, {t: logits[task_ids == t] for t in tasks}, feats
        heads = [self.heads[self.head_key(t)] for t in tasks]
        classes = [h.out_features for h in heads]
        width = max(classes)
        weight = torch.stack([F.pad(h.weight, (0, 0, 0, width - h.out_features))
                              for h in heads])
        bias = torch.stack([F.pad(h.bias, (0, width - h.out_features), value=float("-inf"))
                            for h in heads])
        row_task = torch.searchsorted(torch.tensor(tasks, device=feats.device), task_ids)
        x = self.head_input(feats)
        logits = torch.einsum("bd,bcd->bc", x, weight[row_task]) + bias[row_task]
        if self.cfg.normalize:
            logits = logits * self.cfg.logit_scale
        per_example = F.cross_entropy(logits, labels, reduction="none")
        by_task = {t: logits[task_ids == t, :n] for t, n in zip(tasks, classes, strict=True)}
        return per_example, by_task, feats


class ClassifierFamily(ModelFamily):
    """Any transformers encoder (hub id or local folder) with per-task or shared heads."""

    name = "classifier"
    score_definition = (
        "R[t][i]: accuracy on task i's held-out split after training through task t (row 0: "
        "before training). Tasks not trained yet are scored with their nearest-class-mean "
        "(prototype) head. U[t]: upstream score.")

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.path = resolve_model_path(cfg.name_or_path)
        self.tokenizer = None
        self.hidden_size = 0
        self._token_cache: dict[tuple[int, str], list[list[int]]] = {}
        self._tasks: dict[int, TaskData] = {}
        self.device = torch.device("cpu")
        self.accelerator = None  # set by the runner: evaluation is then sharded and gathered
        self._packing_refused: str | None = None  # None: not checked yet; "": packing works

    # -- loading -------------------------------------------------------------------------------

    def _load_backbone(self) -> nn.Module:
        from transformers import AutoModel

        return load_pretrained(AutoModel, self.path, self.cfg)

    def load(self) -> None:
        self.tokenizer = load_tokenizer(self.path, self.cfg)
        backbone = self._load_backbone()
        self.hidden_size = int(backbone.config.hidden_size)
        self._fingerprint = fingerprint_module(backbone)
        self.module = ClassifierModule(backbone, self.cfg)

    def load_saved_backbone(self, folder: Path) -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(folder)).to(self.device)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool_hidden(hidden, attention_mask, self.cfg)

    # -- data ----------------------------------------------------------------------------------

    def _inputs(self, task: TaskData, split: str):
        """What `_encode` and `collate` read for a split's examples (token ids here)."""
        return self._tokens(task, split)

    def _tokens(self, task: TaskData, split: str) -> list[list[int]]:
        """Token ids of a split, computed once per example and cached."""
        key = (task.index, split)
        if key not in self._token_cache:
            texts = getattr(task, split).texts
            enc = self.tokenizer(texts, truncation=True, max_length=self.cfg.max_length)
            self._token_cache[key] = enc["input_ids"]
        return self._token_cache[key]

    def _pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def collate(self, examples: list[tuple[int, int]], tasks: dict[int, TaskData]) -> dict:
        ids = [self._tokens(tasks[t], "train")[i] for t, i in examples]
        input_ids, mask = self._pad(ids)
        return {"input_ids": input_ids, "attention_mask": mask,
                **self._targets(examples, tasks)}

    def _targets(self, examples: list[tuple[int, int]], tasks: dict[int, TaskData]) -> dict:
        """A batch's labels, task ids and example ids (index in its task's train split)."""
        labels = torch.tensor([int(tasks[t].train.labels[i]) for t, i in examples])
        task_ids = torch.tensor([t for t, _ in examples])
        example_ids = torch.tensor([i for _, i in examples])
        return {"labels": labels.to(self.device), "task_ids": task_ids.to(self.device),
                "example_ids": example_ids.to(self.device)}

    def _batch_features(self, items: list) -> torch.Tensor:
        """Features of one batch of `_inputs` items (token id lists here)."""
        return self.module.features(*self._pad(items))

    @torch.no_grad()
    def _encode(self, ids: list[list[int]], batch_size: int) -> torch.Tensor:
        """Features of many texts, no grad, in length-sorted batches (little padding). With
        several processes (`self.accelerator`), each encodes every world-th text of the
        length order and the features are gathered, so every process returns all of them:
        every process must call this together (all callers are on the common path)."""
        was_training = self.module.training
        self.module.eval()
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # equal for images
        world = self.accelerator_world()
        mine = order[self.accelerator.process_index::world] if world > 1 else order
        local = torch.empty((len(mine), self.hidden_size))
        for start in range(0, len(mine), batch_size):
            chunk = [ids[i] for i in mine[start:start + batch_size]]
            local[start:start + len(chunk)] = self._batch_features(chunk).float().cpu()
        self.module.train(was_training)
        if world == 1:
            out = torch.empty((len(ids), self.hidden_size))
            out[order] = local
            return out
        return self._gather(local, order, world)

    def _gather(self, local: torch.Tensor, order: list[int], world: int) -> torch.Tensor:
        """Every process's features, back in the texts' order (shards padded to one size)."""
        rows = -(-len(order) // world)
        padded = torch.zeros((rows, self.hidden_size))
        padded[:len(local)] = local
        gathered = self.accelerator.gather(padded.to(self.device)).cpu()
        out = torch.empty((len(order), self.hidden_size))
        for rank in range(world):
            shard = order[rank::world]
            out[shard] = gathered[rank * rows: rank * rows + len(shard)]
        return out

    def encode_split(self, task: TaskData, split: str, batch_size: int) -> torch.Tensor:
        """Features of every example of a task's split, in index order (CPU, float32): one
        no-grad pass in eval mode, each example encoded once."""
        return self._encode(self._inputs(task, split), batch_size)

    def prepare_training(self, stream, tasks: dict[int, TaskData], train_cfg) -> str | None:
        """Decide how this task's steps skip work: packed rows instead of padding, and the
        lower-layer cache when LoRA adapts only upper layers. The line says what is on, and
        for what was asked for but is off, why."""
        token_ids = lambda t, i: self._tokens(tasks[t], "train")[i]  # noqa: E731
        lines = [self._prepare_packing(stream, token_ids, train_cfg),
                 self._prepare_lower_cache(stream, token_ids, train_cfg)]
        return "; ".join(line for line in lines if line) or None

    def _prepare_packing(self, stream, token_ids, train_cfg) -> str | None:
        module = self.module
        if not train_cfg.pack_sequences:
            module.pack = False
            return None
        if self._packing_refused is None:  # the model's behaviour does not change: check once
            sample = [token_ids(*key) for key in stream.order[:8]]
            self._packing_refused = self._check_packing(sample)
        module.pack = not self._packing_refused
        if self._packing_refused:
            return f"packing off: {self._packing_refused}"
        lengths = [len(token_ids(*key)) for key in stream.order]
        return (f"packed batches: {sum(lengths)} tokens in this task's steps instead of "
                f"{_padded_tokens(lengths, stream.batch_size)} padded")

    def _check_packing(self, sample: list[list[int]]) -> str:
        """Why packing must stay off for this model ("" when packed equals padded). Run in
        eval mode, where dropout does not make the two differ. Positions are tried from 0 and,
        for models that number them after the padding index (RoBERTa, XLM-R), from there."""
        module = self.module
        if len({len(ids) for ids in sample}) < 2:  # the check needs padding to remove
            sample = sample + [sample[0][: max(2, len(sample[0]) // 2)]]
        was_training = module.training
        module.eval()
        reason = ""
        try:
            for offset in position_offsets(module.backbone):
                module.position_offset = offset
                reason = packing_check(
                    module.pooled,
                    lambda ids, mask: module.pooled(ids, mask, packed_layout(mask)),
                    *self._pad(sample))
                if not reason:
                    break
        finally:
            module.train(was_training)
        return reason

    def _prepare_lower_cache(self, stream, token_ids, train_cfg) -> str | None:
        from continual_lora.families.lower_cache import LowerLayerCache

        module = self.module
        if not train_cfg.cache_lower_layers or self.accelerator_world() > 1:
            module.lower_cache = None
            return None
        if module.lower_cache is None:
            module.lower_cache = LowerLayerCache(train_cfg.lower_cache_mb * 2**20)
        cache = module.lower_cache
        on = cache.prepare(module.backbone, stream, token_ids, self._pad,
                           train_cfg.eval_batch_size)
        if on:
            return (f"lower-layer cache: layers 0-{cache.start - 1} run once per text "
                    f"({cache.filled} computed for this task, {len(cache.states)} held, "
                    f"{cache.bytes / 2**20:.1f} MiB); each step runs layers {cache.start}+")
        if cache.reason.startswith("the first layer trains"):
            return None  # LoRA on every layer: nothing to cache, nothing to say
        return f"lower-layer cache off: {cache.reason}"

    def accelerator_world(self) -> int:
        """Processes training together (1 without an accelerator)."""
        return self.accelerator.num_processes if self.accelerator is not None else 1

    # -- heads ---------------------------------------------------------------------------------

    def _prototype_head(self, task: TaskData, batch_size: int = 128) -> tuple[torch.Tensor, ...]:
        """(weight, bias) of the nearest-class-mean classifier on the current features."""
        rng = random.Random(f"{self.seed}:{task.name}:prototypes")
        labels = task.train.labels
        picked = []
        for c in range(len(task.classes)):
            members = np.flatnonzero(labels == c).tolist()
            picked += sorted(rng.sample(members, min(len(members), PROTOTYPE_EXAMPLES_PER_CLASS)))
        inputs = self._inputs(task, "train")
        feats = self.module.head_input(self._encode([inputs[i] for i in picked], batch_size))
        picked_labels = torch.as_tensor(labels[picked])
        means = torch.stack([feats[picked_labels == c].mean(0) for c in range(len(task.classes))])
        if self.cfg.normalize:
            weight = F.normalize(means, dim=-1)
            bias = torch.zeros(len(task.classes))
        else:  # argmin ‖x − m‖² = argmax (x·m − ½‖m‖²)
            weight, bias = means, -0.5 * (means**2).sum(-1)
        return weight, bias

    def begin_task(self, task: TaskData, tasks: list[TaskData], trainable_tasks: list[int],
                   reinit_tasks: list[int]) -> None:
        by_index = {t.index: t for t in tasks}
        self._tasks[task.index] = task
        for index in sorted(set(reinit_tasks) | {task.index}):
            t = by_index[index]
            self._tasks[index] = t
            weight, bias = self._prototype_head(t)
            if self.cfg.head == "per_task":
                head = nn.Linear(self.hidden_size, len(t.classes)).to(self.device)
                with torch.no_grad():
                    head.weight.copy_(weight)
                    head.bias.copy_(bias)
                self.module.heads[f"task{index}"] = head
            else:
                self._grow_shared_head(t, weight, bias)
        for key, head in self.module.heads.items():
            train = key == "shared" or int(key.removeprefix("task")) in trainable_tasks
            head.requires_grad_(train)

    def _grow_shared_head(self, task: TaskData, weight: torch.Tensor, bias: torch.Tensor) -> None:
        old = self.module.heads["shared"] if "shared" in self.module.heads else None
        if task.index in self.module.offsets and old is not None:  # re-initialise its rows in place
            first = self.module.offsets[task.index]
            rows = slice(first, first + len(task.classes))
            with torch.no_grad():
                old.weight[rows] = weight.to(self.device)
                old.bias[rows] = bias.to(self.device)
            return
        n_old = 0 if old is None else old.out_features
        head = nn.Linear(self.hidden_size, n_old + len(task.classes)).to(self.device)
        with torch.no_grad():
            if old is not None:
                head.weight[:n_old] = old.weight
                head.bias[:n_old] = old.bias
            head.weight[n_old:] = weight.to(self.device)
            head.bias[n_old:] = bias.to(self.device)
        self.module.offsets[task.index] = n_old
        self.module.heads["shared"] = head

    # -- training ------------------------------------------------------------------------------

    def forward(self, batch: dict, module: nn.Module | None = None) -> ForwardOutput:
        """`module` is the (possibly accelerate-wrapped) module to call; default: our own."""
        per_example, logits, feats = (module or self.module)(**batch)
        return ForwardOutput(per_example.mean(), per_example.detach(), logits, feats)

    # -- scoring -------------------------------------------------------------------------------

    def score_task(self, task: TaskData, trained: bool, batch_size: int) -> TaskScore:
        feats = self._encode(self._inputs(task, "eval"), batch_size).to(self.device)
        labels = torch.as_tensor(task.eval.labels, device=self.device)
        key = self.module.head_key(task.index)
        with torch.no_grad():
            if trained and key in self.module.heads:
                logits = self.module.head_logits(key, feats)
                if self.cfg.head == "shared":
                    labels = labels + self.module.offsets[task.index]
                how = "head"
            else:
                weight, bias = self._prototype_head(task, batch_size)
                logits = (self.module.head_input(feats) @ weight.to(self.device).T
                          + bias.to(self.device))
                how = "prototype"
            correct = (logits.argmax(-1) == labels).cpu().numpy()
        return TaskScore(float(correct.mean()), correct, how)

    def score_upstream(self, probe: RetrievalProbe, batch_size: int) -> TaskScore:
        """Top-1 retrieval: each query must be nearest (cosine) to its own key among all keys."""
        tok = self.tokenizer
        q_ids = tok(probe.queries, truncation=True, max_length=self.cfg.max_length)["input_ids"]
        k_ids = tok(probe.keys, truncation=True, max_length=self.cfg.max_length)["input_ids"]
        q = F.normalize(self._encode(q_ids, batch_size), dim=-1)
        k = F.normalize(self._encode(k_ids, batch_size), dim=-1)
        correct = ((q @ k.T).argmax(-1) == torch.arange(len(q))).numpy()
        return TaskScore(float(correct.mean()), correct, "retrieval")

    # -- saving --------------------------------------------------------------------------------

    def save_task_parts(self, out_dir: Path) -> None:
        tensors, tasks = {}, []
        for key, head in self.module.heads.items():
            tensors[f"{key}.weight"] = head.weight.detach().float().cpu().contiguous()
            tensors[f"{key}.bias"] = head.bias.detach().float().cpu().contiguous()
        for index in sorted(self._tasks):
            t = self._tasks[index]
            tasks.append({"index": index, "name": t.name, "classes": t.classes,
                          "head": self.module.head_key(index),
                          "offset": self.module.offsets.get(index, 0)})
        save_file(tensors, str(out_dir / "heads.safetensors"))
        meta = {"mode": self.cfg.head, "pooling": self.cfg.pooling,
                "normalize": self.cfg.normalize, "logit_scale": self.cfg.logit_scale,
                "max_length": self.cfg.max_length, "tasks": tasks}
        (out_dir / "heads.json").write_text(json.dumps(meta, indent=2))
