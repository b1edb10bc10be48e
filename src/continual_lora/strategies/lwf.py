"""lwf (Learning without Forgetting): distil the model as it was before the task into itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from continual_lora.adapters import LoraFactors
from continual_lora.families.base import ForwardOutput
from continual_lora.registry import register_strategy
from continual_lora.strategies.base import (
    Strategy,
    TaskContext,
    ensure_adapter,
    export_concatenated,
    merge_into_base,
)


class LwfOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    alpha: float = Field(1.0, ge=0)
    """Weight α of the distillation term (the incremental-LoRA study used 5)."""
    temperature: float = Field(2.0, gt=0)
    """Softmax temperature T of teacher and student; the term is scaled by T²."""
    top_k: int = Field(32, ge=1)
    """Causal LM: vocabulary entries of the teacher's distribution cached per token (the rest
    is one bucket), so the cache is N_tokens × (8k + 4) bytes, not N_tokens × vocabulary."""
    first_task: bool = False
    """Causal LM and diffusion: distil the base model on task 1's data too (protects what the
    base knew; off: task 1 learns freely, as a classifier's task 1 has no old head)."""
    merge: bool = False
    """Merge the adapter into the base after each task and start a fresh one (seed 002's
    incremental low-rank updates, as `merge_reinit` does); off: one adapter throughout."""
    draws: int = Field(2, ge=1, le=64)
    """Diffusion: fixed (noise, timestep) draws per training image on which the teacher's
    prediction is cached."""


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], alpha: float,
                      temperature: float) -> torch.Tensor:
    """α · T² · Σ_heads KL(softmax(z_teacher / T) ‖ softmax(z_student / T)).

    One (batch × classes) logits pair per old head. Each head's KL is summed over its classes
    and averaged over the batch; the heads' KLs are summed (not averaged), so every old head
    weighs as much as it would alone.
    """
    total = student[0].new_zeros(())
    for z_student, z_teacher in zip(student, teacher, strict=True):
        log_p_student = F.log_softmax(z_student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(z_teacher.to(z_student.dtype) / temperature, dim=-1)
        total = total + F.kl_div(log_p_student, log_p_teacher, reduction="batchmean",
                                 log_target=True)
    return alpha * temperature**2 * total


def top_k_distillation_loss(student: torch.Tensor, teacher_index: torch.Tensor,
                            teacher_logp: torch.Tensor, teacher_rest: torch.Tensor, alpha: float,
                            temperature: float) -> torch.Tensor:
    """α · T² · mean over tokens of KL(p_teacher ‖ p_student) on k+1 outcomes: the teacher's
    top-k tokens and one bucket for every other token.

    `student`: (N, V) logits; the teacher: per token, the indices (N, k) and log-probabilities
    (N, k) at temperature T of its top-k tokens, and the log-probability of the rest (N,). The
    student's distribution at temperature T is grouped the same way (its top-k entries at the
    teacher's indices, the rest summed), so with k = V this is the full-vocabulary KL.
    """
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    index = teacher_index.long()
    q_top = log_q.gather(-1, index)
    q_rest = log_q.scatter(-1, index, float("-inf")).logsumexp(-1)
    p_top, p_rest = teacher_logp.float(), teacher_rest.float()
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)
    rest = p_rest.exp() * (p_rest - q_rest)
    kl = kl + torch.where(torch.isfinite(p_rest), rest, torch.zeros_like(rest))
    return alpha * temperature**2 * kl.mean()


@dataclass
class TokenCache:
    """The teacher's top-k next-token distribution on every loss token of the task's training
    examples (see `CausalLMFamily.token_top_k`)."""

    offsets: torch.Tensor
    indices: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.logp, self.rest))

    def rows(self, example_ids: torch.Tensor) -> torch.Tensor:
        """Cache rows of the examples' tokens, examples in the given order."""
        starts, ends = self.offsets[example_ids.cpu()], self.offsets[example_ids.cpu() + 1]
        return torch.cat([torch.arange(a, b) for a, b in zip(starts.tolist(), ends.tolist(),
                                                               strict=True)])


@dataclass
class DenoiserCache:
    """Diffusion's output preservation: for every training example of the task, `draws` fixed
    (noisy latent, timestep) pairs and the teacher's prediction on them, computed once."""

    noisy: torch.Tensor  # (n, draws, C, h, w)
    timesteps: torch.Tensor  # (n, draws)
    prediction: torch.Tensor  # (n, draws, C, h, w)
    captions: list[str]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.noisy, self.timesteps,
                                                          self.prediction))

    def loss(self, family, module, example_ids: torch.Tensor) -> torch.Tensor:
        """Mean squared distance of the student's prediction to the teacher's, on one random
        draw per example of the batch."""
        ids = example_ids.cpu()
        draw = torch.randint(0, self.noisy.shape[1], (len(ids),))
        student = family.predict(module, self.noisy[ids, draw], self.timesteps[ids, draw],
                                 [self.captions[i] for i in ids.tolist()])
        return F.mse_loss(student.float(), self.prediction[ids, draw].to(student.device))


@torch.no_grad()
def teacher_predictions(family, task, draws: int, seed: int, batch_size: int) -> DenoiserCache:
    """The model as it is before the task, on fixed noisy versions of the task's images (the
    diffusion analogue of LwF's cached old-head logits; no regularization images needed)."""
    family.complete_task_data(task)  # prior images are training examples too
    records = task.train.records
    family.cache_latents([r["image"] for r in records if not r.get("latent_only")])
    latents = torch.stack([family.latent(r["image"].key) for r in records])
    gen = torch.Generator().manual_seed(seed)
    n = len(records)
    noise = torch.randn((n, draws, *latents.shape[1:]), generator=gen)
    timesteps = torch.stack([family.draw_timesteps(n, generator=gen) for _ in range(draws)],
                            dim=1)
    noisy = torch.stack([family.add_noise(latents, noise[:, d], timesteps[:, d])
                         for d in range(draws)], dim=1)
    captions = [r["caption"] for r in records]
    prediction = torch.empty_like(noisy)
    with family._eval():
        for d in range(draws):
            for start in range(0, n, batch_size):
                rows = slice(start, start + batch_size)
                prediction[rows, d] = family.predict(family.module, noisy[rows, d],
                                                     timesteps[rows, d],
                                                     captions[rows]).float().cpu()
    return DenoiserCache(noisy, timesteps, prediction, captions)


@dataclass
class OldOutput:
    """One old output the student is distilled on: a head, and which of its columns."""

    head: str
    columns: torch.Tensor | None  # None: all of the head's columns (a per-task head)


@register_strategy
class LwfStrategy(Strategy):
    """One adapter trained sequentially (as `naive`), plus a distillation term on each batch of
    task t: `α · T² · KL(softmax(z_teacher/T) ‖ softmax(z_student/T))` over the old outputs.

    Old outputs: with per-task heads, the heads of tasks < t (one KL per head, each averaged
    over the batch, summed over heads); with the shared class-incremental head, its columns of
    the classes of tasks < t (one KL). An image model's own pretrained head (the upstream
    head) is an old output from task 1 on, as in LwF's original setting (Li & Hoiem: the
    ImageNet head is the old task); a text classifier's task 1 has no old outputs and no term.

    With `merge`, the adapter is merged into the base after each task and the next task starts
    a fresh one (seed 002's LoRA + LwF); its exported adapter is Σ ΔW as `merge_reinit`'s.

    The teacher is the model as it stands before task t's first step: the same network (no
    second copy), since the one adapter carries over from task t-1 and nothing has trained
    yet. Its outputs do not change during the task, so `before_task` computes them once per
    training example of task t (one no-grad, eval-mode pass, length-sorted batches) and keeps
    them in memory, indexed by example index: `n_examples × n_old_classes` floats (600 × 12
    for the demo, 29 KB). They would have to go to disk (a memory-mapped array indexed the same
    way) only at sizes like 10^6 examples × 10^3 classes (4 GB), or for a causal LM's vocabulary
    per token. Each step then costs a few head matmuls on the student's pooled features plus
    the KL. Computing in `before_task` is exact because `begin_task` only adds task t's own head
    (or rows) and leaves the old ones as they are.

    The stream holds only task t's examples (the default `sources`), so every batch row's
    `example_ids` indexes task t's training split, and the cache.

    Causal LM (no heads: the old output is the vocabulary): the term is the KL between the
    teacher's and the student's next-token distributions on every loss token of task t's
    examples (`top_k_distillation_loss`). The teacher's distribution is cached per token as its
    top-k entries plus one bucket for the rest (`top_k`, default 32: about 260 bytes per
    token), computed once in `before_task` like the heads' logits. From task 2 on, or from task
    1 with `first_task` (the base model as teacher).

    Diffusion (output preservation, no regularization images needed): the old output is the
    denoiser's prediction. Before task t, each training image gets `draws` fixed (noise,
    timestep) pairs and the teacher's prediction on them is cached (`teacher_predictions`);
    each step adds α · MSE(student, teacher) on one random draw per batch example. This costs
    one more student forward and backward per step; the teacher costs nothing per step.
    """

    name = "lwf"
    Options = LwfOptions
    summary = "distil the previous model's old-head outputs on the new data"

    def __init__(self, options=None):
        super().__init__(options)
        self.old_outputs: list[OldOutput] = []
        self.teacher: list[torch.Tensor] = []  # per old output: (n_train, n_columns) logits
        self._module = None  # the family's module (backbone + heads), whose heads we read
        self.tokens: TokenCache | None = None  # causal LM: the teacher's top-k per token
        self.denoised: DenoiserCache | None = None  # diffusion: the teacher's predictions
        self._family = None
        self.history: list[dict[str, LoraFactors]] = []  # with `merge`: each task's ΔW
        self.masters: dict = {}  # with `merge`: float32 copies of a low-precision base's weights

    def before_task(self, ctx: TaskContext) -> None:
        ensure_adapter(ctx)
        self._module = ctx.family.module
        self._family = ctx.family
        if ctx.family.name == "diffusion":
            self.denoised = None
            if ctx.t > 1 or self.options.first_task:
                self.denoised = teacher_predictions(ctx.family, ctx.task, self.options.draws,
                                                    ctx.seed, ctx.run.train.eval_batch_size)
            return
        if ctx.family.name == "causal_lm":
            self.tokens = None
            if ctx.t > 1 or self.options.first_task:
                o = self.options
                self.tokens = TokenCache(*ctx.family.token_top_k(
                    ctx.task, o.top_k, o.temperature, ctx.run.train.eval_batch_size))
            return
        self.old_outputs = self._old_outputs(ctx)
        self.teacher = self._teacher_logits(ctx) if self.old_outputs else []

    def extra_loss(self, batch, outputs: ForwardOutput) -> torch.Tensor | None:
        if self.denoised is not None:
            return self.options.alpha * self.denoised.loss(self._family, self._module,
                                                           batch["example_ids"])
        if self.tokens is not None:
            student = outputs.lm_logits[outputs.lm_targets != -100]  # row-major = cache order
            rows = self.tokens.rows(batch["example_ids"])
            device = student.device
            return top_k_distillation_loss(
                student, self.tokens.indices[rows].to(device), self.tokens.logp[rows].to(device),
                self.tokens.rest[rows].to(device), self.options.alpha, self.options.temperature)
        if not self.old_outputs:
            return None
        ids = batch["example_ids"]
        student = [self._logits(outputs.features, old) for old in self.old_outputs]
        teacher = [cached[ids] for cached in self.teacher]
        return distillation_loss(student, teacher, self.options.alpha, self.options.temperature)

    def after_task(self, ctx: TaskContext) -> None:
        # The next task's teacher is the model as it now stands: drop this one's outputs.
        self.old_outputs, self.teacher, self.tokens, self.denoised = [], [], None, None
        if self.options.merge:
            merge_into_base(ctx, self.history, self.masters)

    def export_adapter(self, ctx: TaskContext, out_dir) -> dict:
        if not self.options.merge:
            return super().export_adapter(ctx, out_dir)
        return {**export_concatenated(ctx, self.history, out_dir),
                "tasks_merged": len(self.history)}

    # -- helpers -------------------------------------------------------------------------------

    def _old_outputs(self, ctx: TaskContext) -> list[OldOutput]:
        module = ctx.family.module
        upstream = ([OldOutput("upstream", None)]
                    if getattr(module, "upstream_head", None) is not None else [])
        if ctx.family.cfg.head == "per_task":
            return upstream + [OldOutput(module.head_key(old.index), None)
                               for old in ctx.previous]
        columns = [torch.arange(module.offsets[old.index],
                                module.offsets[old.index] + len(old.classes))
                   for old in ctx.previous]
        if not columns:
            return upstream
        return upstream + [OldOutput("shared", torch.cat(columns).to(ctx.family.device))]

    def _logits(self, features: torch.Tensor, old: OldOutput) -> torch.Tensor:
        logits = self._module.head_logits(old.head, features)
        return logits if old.columns is None else logits[:, old.columns]

    @torch.no_grad()
    def _teacher_logits(self, ctx: TaskContext) -> list[torch.Tensor]:
        family = ctx.family
        features = family.encode_split(ctx.task, "train", ctx.run.train.eval_batch_size)
        features = features.to(family.device)
        return [self._logits(features, old).float() for old in self.old_outputs]
