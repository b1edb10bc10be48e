"""The interface every model family implements, and what the engine expects of it.

A *family* is the glue between the engine (trainer, strategies, run folder) and one kind of model:

    family             backbone (what PEFT wraps)     per-task parts        task score
    ------------------ ------------------------------ --------------------- -----------------------
    classifier         transformers encoder (BERT,    a classification      accuracy on held-out
                       ...) or image model (ViT,      head per task/shared  labels
                       ResNet, ...; image_classifier.py)
    causal_lm          transformers causal LM         none (shared vocab)   exact match / perplexity
    diffusion          diffusers UNet (SD 1.x, SDXL)  none (captions)       image similarity

The engine only talks to a family through the methods below. Adapter operations are the same for
every family because they act on `backbone`, the module PEFT wraps; what differs is how data
becomes batches, how a batch becomes a loss, and how a task is scored.

Lifecycle, as the runner calls it:

    family.load()                          # base model and tokenizer/processor, frozen
    family.score(task, fresh=True)         # row 0 of the accuracy matrix, upstream score
    for task in tasks:
        strategy.before_task(ctx)          # may attach/reset/merge adapters via the family
        family.begin_task(task, ...)       # per-task parts (heads), which of them train
        for batch in stream: loss = family.loss(batch) + strategy.extra_loss(batch, outputs)
        strategy.after_task(ctx)
        family.score(...)                  # row t
        family.save_task_parts(dir)        # heads etc., beside the PEFT adapter
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from continual_lora.sequence import RetrievalProbe, TaskData


@dataclass
class TaskScore:
    """A task's score at one stage, with the per-example correctness behind it."""

    score: float
    correct: np.ndarray  # bool, one per held-out example (per held-out token for perplexity)
    how: str  # "head", "prototype" (nearest class mean), "exact_match" or "perplexity"
    details: dict | None = None  # e.g. the perplexity behind a perplexity score


@dataclass
class ForwardOutput:
    """What `family.forward` returns; strategies' `extra_loss` read it."""

    loss: torch.Tensor  # mean task loss of the batch
    per_example_loss: torch.Tensor  # one value per example (for per-source logging)
    logits: dict[int, torch.Tensor]  # task index → logits of the examples of that task
    features: torch.Tensor  # pooled features of the whole batch (empty for a causal LM)
    #: causal LM: next-token logits (rows × positions × vocab) and their targets (-100: no loss)
    lm_logits: torch.Tensor | None = None
    lm_targets: torch.Tensor | None = None
    #: diffusion: the denoiser's prediction (ε or v) for the batch's noisy latents
    prediction: torch.Tensor | None = None


class ModelFamily(ABC):
    """Base of model families. Subclasses implement every abstract method; `load` sets
    `module` (whose `.backbone` is what PEFT wraps), `device` and `_fingerprint`."""

    name: str = ""
    #: What the model reads: "text" or "image" (strategies that route on inputs check it).
    modality: str = "text"
    #: What R and U hold for this family, written into results.json as `definition`.
    score_definition: str = ""

    #: The trainable module handed to the optimizer and to accelerate (backbone + task parts).
    module: nn.Module
    device: torch.device
    _fingerprint: str

    @abstractmethod
    def load(self) -> None:
        """Load the base model (frozen) and its tokenizer/processor."""

    @abstractmethod
    def _load_backbone(self) -> nn.Module:
        """The base model as stored, frozen."""

    @property
    def backbone(self) -> nn.Module:
        """The module PEFT wraps (a plain model, or a PeftModel once an adapter is attached)."""
        return self.module.backbone

    def fresh_backbone(self) -> nn.Module:
        """A new, unmodified copy of the base model (for `joint` resets and adapter exports)."""
        return self._load_backbone().to(self.device)

    def set_backbone(self, backbone: nn.Module) -> None:
        """Replace the backbone (after attaching, merging or resetting an adapter)."""
        self.module.backbone = backbone.to(self.device)

    def to(self, device: torch.device) -> None:
        self.device = device
        self.module.to(device)

    @contextmanager
    def _eval(self) -> Iterator[None]:
        """Eval mode for the duration (scoring, teacher passes), then the mode the module had."""
        was_training = self.module.training
        self.module.eval()
        try:
            yield
        finally:
            self.module.train(was_training)

    def fingerprint(self) -> str:
        """A stable identity of the base weights (`common.fingerprint_module`)."""
        return self._fingerprint

    @abstractmethod
    def begin_task(self, task: TaskData, tasks: list[TaskData], trainable_tasks: list[int],
                   reinit_tasks: list[int]) -> None:
        """Create the task's own parts; (re)initialise those of `reinit_tasks`; make only the
        parts of `trainable_tasks` trainable."""

    @abstractmethod
    def collate(self, examples: list[tuple[int, int]], tasks: dict[int, TaskData]) -> Any:
        """Turn (task index, example index) pairs into a batch."""

    @abstractmethod
    def forward(self, batch: Any, module: nn.Module | None = None) -> ForwardOutput:
        """Task loss and outputs of a batch, computed by calling `module` (the module as
        accelerate prepared it; default `self.module`). Training mode is set by the caller."""

    @abstractmethod
    def score_task(self, task: TaskData, trained: bool, batch_size: int) -> TaskScore:
        """Score a task's held-out split; `trained` says whether its parts have been trained."""

    @abstractmethod
    def score_upstream(self, probe: RetrievalProbe, batch_size: int) -> TaskScore:
        """Score the upstream probe (what the base could do before training)."""

    @abstractmethod
    def save_task_parts(self, out_dir: Path) -> None:
        """Save the family's per-task parts (heads) beside the adapter."""

    @abstractmethod
    def encode_split(self, task: TaskData, split: str, batch_size: int) -> torch.Tensor:
        """One pooled feature vector per example of a task's split (moe's router sees these)."""

    @abstractmethod
    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled features of a last hidden state, as `encode_split` computes them."""

    @abstractmethod
    def load_saved_backbone(self, folder: Path) -> nn.Module:
        """A full model saved by `save_pretrained` (full fine-tuning's `model/` folder)."""

    def prepare_training(self, stream, tasks: dict[int, TaskData], train_cfg) -> str | None:
        """Before a task's training loop: precompute what its steps can share (the classifier's
        lower-layer cache). Returns a line worth logging, or None. Nothing by default."""
        return None

    def attach_sequence(self, tasks: list[TaskData], probe: Any) -> None:  # noqa: B027
        """Told every task and the probe before row 0 (a family that scores a task against
        the others needs them); nothing by default."""

    def write_stage_media(self, folder: Path, stage: int) -> Path | None:
        """Write what a stage's scoring produced for people to look at (sample grids) under
        `folder`; returns the file, or None when the family has nothing to show."""
        return None

