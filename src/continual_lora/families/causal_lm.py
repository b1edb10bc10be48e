"""Causal language models: any transformers causal LM (hub id or local folder), no per-task parts.

Every task shares the vocabulary, so there are no heads: the backbone PEFT wraps is the whole
`AutoModelForCausalLM` (LoRA may then target any projection, the LM head included).

Examples become token ids and a loss mask (`encode`):

    text                ids(text) + eos                      loss on every token
    prompt_completion   ids(prompt) + ids(completion) + eos  loss on completion + eos
    qa                  as prompt_completion with prompt = `qa_template` and completion
                        ` {answer}`; with `model.chat_template`, a user/assistant chat
    chat                the tokenizer's chat template        loss on each assistant turn

A chat's assistant turns are found by rendering the conversation up to each turn twice, with the
generation prompt and with the turn, and taking the difference; a template whose renderings are
not prefixes of each other is an error (we would not know which tokens to learn).

Training loss: the mean next-token cross-entropy over the batch's loss tokens (what
transformers computes), and per example the mean over its own tokens (logs). With
`model.packing`, a batch's examples are laid end to end in rows of at most `max_length` tokens
(in batch order: a new row when the next one does not fit; `packing.py`'s layout), each keeping
its own loss mask and targets (an example's first token is never a target of the previous
example's last), its own position ids from 0, and a block-diagonal causal attention mask: a
token sees only the earlier tokens of its own example. Every example then gets the logits it
gets in the padded batch, so the loss, gradients and adapter are those of padded training up
to float rounding, and LwF's teacher (computed padded) matches the student at step 0. That is
checked once on the model (`packing_check`: packed logits within 1e-4 of padded ones); a model
whose forward does not honour position ids and 4-D masks trains padded, and the log says why.
Packing in batch order keeps the loss tokens in row-major order = examples in batch order,
tokens in order: the order of LwF's teacher cache.

Scores (one number per task, higher is better, as the accuracy matrix wants):

- `exact_match`: greedy answers (batched, left-padded, `max_new_tokens`, cut at the first end
  token or newline) compared with the reference after SQuAD normalisation (lower case, no
  punctuation, no articles, single spaces). `correct` is per question.
- `perplexity`: the score is exp(−mean token loss) = 1/perplexity over the held-out loss tokens
  (so retention U_t/U_0 = ppl_0/ppl_t); `details` holds the perplexity and mean loss, and
  `correct` is per held-out token (top-1 prediction right), so per-sample forgetting counts
  tokens. The upstream probe is scored the same way on general text.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from continual_lora.config import ConfigError, ModelConfig
from continual_lora.families.base import ForwardOutput, ModelFamily, TaskScore
from continual_lora.families.common import (
    fingerprint_module,
    load_pretrained,
    load_tokenizer,
    resolve_model_path,
)
from continual_lora.families.packing import additive_mask_dtype, packed_layout, packing_check
from continual_lora.sequence import TaskData, TextProbe

IGNORE = -100  # target of positions without loss (the value transformers uses)


# -- text normalisation and token bookkeeping: pure functions --------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, spaces collapsed."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Normalised equality, on the prediction's first line (models often go on after it)."""
    first_line = prediction.strip().split("\n", 1)[0] if prediction.strip() else ""
    return normalize_answer(first_line) == normalize_answer(reference)


def shifted_targets(ids: list[int], loss_mask: list[int]) -> list[int]:
    """targets[j] = the token position j must predict (ids[j+1]) where it carries loss, else
    IGNORE; the last position predicts nothing."""
    return [ids[j + 1] if loss_mask[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Examples (by position) laid end to end in rows of at most `width` tokens, in order: a new
    row starts when the next example does not fit."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > width:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def top_k_with_rest(logits: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probabilities of the top-k tokens, their indices, log-probability of all the other
    tokens together) of each row's softmax; the last is -inf when k covers the vocabulary."""
    log_p = F.log_softmax(logits, dim=-1)
    top_logp, top_idx = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    rest_logp = log_p.scatter(-1, top_idx, float("-inf")).logsumexp(-1)
    return top_logp, top_idx, rest_logp


class CausalLMModule(nn.Module):
    """The backbone (possibly PEFT-wrapped) computing per-example and batch losses; this is what
    the optimizer and accelerate see."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask, targets, segments, task_ids, example_ids=None,
                position_ids=None):
        """(batch loss, per-example loss, logits). `segments[r, j]` is the example (0..B-1)
        whose token sits at (r, j), -1 where there is none; `task_ids`/`example_ids` ride along
        for logging and strategies' per-example caches. A packed batch brings its 4-D mask and
        per-example `position_ids`; a padded one neither (the model numbers positions 0..)."""
        extra = {} if position_ids is None else {"position_ids": position_ids}
        logits = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        token_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                     ignore_index=IGNORE, reduction="none")
        has_loss = targets.flatten() != IGNORE
        loss = token_loss.sum() / has_loss.sum().clamp(min=1)
        seg = segments.flatten().clamp(min=0)
        n = len(task_ids)
        sums = torch.zeros(n, device=logits.device).index_add(0, seg, token_loss * has_loss)
        counts = torch.zeros(n, device=logits.device).index_add(0, seg, has_loss.float())
        return loss, sums / counts.clamp(min=1), logits


class CausalLMFamily(ModelFamily):
    """Any transformers causal LM (hub id or local folder)."""

    name = "causal_lm"
    score_definition = (
        "R[t][i]: task i's score after training through task t (row 0: before training): "
        "exact_match: the fraction of questions answered exactly (normalised, greedy); "
        "perplexity: exp(-mean token loss) = 1/perplexity of the held-out tokens (higher is "
        "better; `details` gives the perplexity). U[t]: 1/perplexity on the upstream general "
        "text.")

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.path = resolve_model_path(cfg.name_or_path)
        self.tokenizer = None
        self.hidden_size = 0
        self._token_cache: dict[tuple, list[tuple[list[int], list[int]]]] = {}
        self._tasks: dict[int, TaskData] = {}
        self.device = torch.device("cpu")
        self.accelerator = None  # set by the runner; each process scores everything (unsharded)
        self._packing_refused: str | None = None  # None: not checked yet; "": packing works

    # -- loading -------------------------------------------------------------------------------

    def _load_backbone(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return load_pretrained(AutoModelForCausalLM, self.path, self.cfg, "causal LM")

    def load(self) -> None:
        self.tokenizer = load_tokenizer(self.path, self.cfg)
        if self.tokenizer.eos_token_id is None:
            raise ConfigError(f"model.name_or_path: the tokenizer of {self.cfg.name_or_path!r} "
                              "has no end-of-text (eos) token, which ends every completion")
        backbone = self._load_backbone()
        self.hidden_size = int(backbone.config.hidden_size)
        self._fingerprint = fingerprint_module(backbone)
        self.module = CausalLMModule(backbone)

    def load_saved_backbone(self, folder: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder)).to(self.device)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # -- examples → tokens ---------------------------------------------------------------------

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _chat(self, messages: list[dict], generation_prompt: bool = False) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"the tokenizer of {self.cfg.name_or_path!r} has no chat template: "
                              "chat data (and model.chat_template) need one")
        out = self.tokenizer.apply_chat_template(messages, tokenize=True,
                                                 add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def prompt_and_answer(self, record: dict) -> tuple[list[int], str]:
        """The prompt's token ids and the reference answer (exact-match scoring)."""
        if "question" in record:
            if self.cfg.chat_template:
                prompt = self._chat([{"role": "user", "content": record["question"]}], True)
            else:
                prompt = self._ids(self.cfg.qa_template.format(question=record["question"]),
                                   True)
            return prompt, record["answer"]
        if "prompt" in record:
            return self._ids(record["prompt"], True), record["completion"]
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return self._chat(messages[:last], True), messages[last]["content"]

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """(token ids, loss mask) of one example, truncated to `max_length` (keeping the start);
        loss_mask[j] = 1 when token j is to be predicted."""
        eos = self.tokenizer.eos_token_id
        if "question" in record and self.cfg.chat_template:  # a one-turn chat, learned as one
            record = {"messages": [{"role": "user", "content": record["question"]},
                                   {"role": "assistant", "content": record["answer"]}]}
        if "text" in record:
            ids = self._ids(record["text"], True) + [eos]
            mask = [0] + [1] * (len(ids) - 1)
        elif "messages" in record:
            ids, mask = self._encode_chat(record["messages"])
        else:
            prompt, answer = self.prompt_and_answer(record)
            completion = answer if "prompt" in record else " " + answer
            tail = self._ids(completion, False) + [eos]
            ids, mask = prompt + tail, [0] * len(prompt) + [1] * len(tail)
        return ids[: self.cfg.max_length], mask[: self.cfg.max_length]

    def _encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._chat(messages[:i], generation_prompt=True) if i else []
            through = self._chat(messages[: i + 1])
            if through[: len(before)] != before or before[: len(ids)] != ids:
                raise ConfigError(
                    f"the chat template of {self.cfg.name_or_path!r} renders a conversation's "
                    "start differently once a turn is added, so the assistant tokens cannot be "
                    "told apart; use prompt/completion data instead")
            mask += [0] * (len(before) - len(ids)) + [1] * (len(through) - len(before))
            ids = through
        full = self._chat(messages)
        if full[: len(ids)] != ids:
            raise ConfigError(f"the chat template of {self.cfg.name_or_path!r} is not "
                              "prefix-consistent; use prompt/completion data instead")
        mask += [0] * (len(full) - len(ids))
        return full, mask

    def _tokens(self, task: TaskData, split: str) -> list[tuple[list[int], list[int]]]:
        """(ids, loss mask) of every example of a split, computed once and cached; an example
        left with no loss token by truncation is an error that names it."""
        key = (task.index, task.name, split)
        if key not in self._token_cache:
            encoded = [self.encode(r) for r in getattr(task, split).records]
            empty = [i for i, (_, m) in enumerate(encoded) if sum(m[1:]) == 0]
            if empty:
                raise ConfigError(
                    f"task {task.name}: {split} example {empty[0] + 1} (and {len(empty) - 1} "
                    f"more) has no token to learn within model.max_length {self.cfg.max_length}"
                    "; raise model.max_length or shorten the prompts")
            self._token_cache[key] = encoded
        return self._token_cache[key]

    def _batch(self, encoded: list[tuple[list[int], list[int]]], pack: bool) -> dict:
        """One right-padded row per example with shifted targets and segment ids, or those
        rows packed (`_pack`), on the device."""
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        targets = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
        segments = torch.full((len(encoded), width), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(encoded):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids)
            attention[i, :n] = 1
            targets[i, :n] = torch.tensor(shifted_targets(ids, mask))  # within the example
            segments[i, :n] = i
        batch = {"input_ids": input_ids, "attention_mask": attention, "targets": targets,
                 "segments": segments}
        if pack:
            batch = self._pack(batch)
        return {key: value.to(self.device) for key, value in batch.items()}

    def _pack(self, padded: dict) -> dict:
        """A padded batch's examples laid end to end in rows of at most `max_length` tokens, in
        batch order (`pack_rows`), with a block-diagonal causal mask (boolean for SDPA,
        additive for eager attention) and each example's own position ids from 0. Targets
        and segments move with their tokens, so no target crosses an example boundary."""
        mask = padded["attention_mask"]
        layout = packed_layout(mask, pack_rows(mask.sum(1).tolist(), self.cfg.max_length))
        return {"input_ids": layout.pack(padded["input_ids"], self.pad_id),
                "attention_mask": layout.attention_mask(additive_mask_dtype(self.backbone),
                                                        causal=True),
                "position_ids": layout.position_ids,
                "targets": layout.pack(padded["targets"], IGNORE),
                "segments": layout.pack(padded["segments"], -1)}

    # -- the engine's interface -----------------------------------------------------------------

    def begin_task(self, task: TaskData, tasks: list[TaskData], trainable_tasks: list[int],
                   reinit_tasks: list[int]) -> None:
        self._tasks[task.index] = task  # no per-task parts: the vocabulary is shared

    def collate(self, examples: list[tuple[int, int]], tasks: dict[int, TaskData]) -> dict:
        encoded = [self._tokens(tasks[t], "train")[i] for t, i in examples]
        batch = self._batch(encoded, self.cfg.packing and not self._packing_refused)
        batch["task_ids"] = torch.tensor([t for t, _ in examples], device=self.device)
        batch["example_ids"] = torch.tensor([i for _, i in examples], device=self.device)
        return batch

    def prepare_training(self, stream, tasks: dict[int, TaskData], train_cfg) -> str | None:
        """With `model.packing`: check once that this model computes on packed rows what it
        computes padded; a model that does not trains padded, and the line says why."""
        if not self.cfg.packing:
            return None
        if self._packing_refused is None:  # the model's behaviour does not change: check once
            self._packing_refused = self._check_packing(
                [self._tokens(tasks[t], "train")[i] for t, i in stream.order[:8]])
        if self._packing_refused:
            return f"packing off: {self._packing_refused}"
        return ("packed batches: examples end to end in rows of at most "
                f"{self.cfg.max_length} tokens, each attending to itself only (checked: the "
                "logits equal the padded batch's)")

    def _check_packing(self, sample: list[tuple[list[int], list[int]]]) -> str:
        """Why packing must stay off ("" when packed logits equal padded ones on every real
        token). The sample is cut to pieces of different lengths, at most a quarter of
        `max_length`, so that rows hold several examples and the padded batch has padding.
        Both sides list the real tokens in row-major order, which packing in batch order
        keeps as batch order: the check also covers the order the loss and LwF rely on.
        The tolerance is 1e-4 of the logits' scale, or 4 rounding units of a half-precision
        model (bfloat16: 0.03; measured 0.002 on the tiny Llama, where attending across
        examples moves the logits by 0.2): packed rows take other kernel shapes, whose
        half-precision rounding alone would fail 1e-4."""
        cut = max(2, self.cfg.max_length // 4)
        cuts = [ids[: max(1, cut - k)] for k, (ids, _) in enumerate(sample)]
        pieces = [(ids, [1] * len(ids)) for ids in cuts]  # the loss mask plays no part here
        padded, packed = self._batch(pieces, pack=False), self._batch(pieces, pack=True)

        def logits(batch: dict) -> torch.Tensor:
            extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
            out = self.backbone(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"], **extra)[0]
            return out[batch["segments"] != -1].float()

        dtype = self.backbone.get_input_embeddings().weight.dtype
        with self._eval():
            return packing_check(lambda *_: logits(padded), lambda *_: logits(packed),
                                 padded["input_ids"], padded["attention_mask"],
                                 max(1e-4, 4 * torch.finfo(dtype).eps))

    def forward(self, batch: dict, module: nn.Module | None = None) -> ForwardOutput:
        loss, per_example, logits = (module or self.module)(**batch)
        return ForwardOutput(loss, per_example.detach(), {}, logits.new_zeros(0),
                             lm_logits=logits, lm_targets=batch["targets"])

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    @torch.no_grad()
    def encode_split(self, task: TaskData, split: str, batch_size: int) -> torch.Tensor:
        """Mean of the last hidden state over each example's prompt (what a router sees at
        scoring time, before any answer exists; the whole text for `text` examples)."""
        records = getattr(task, split).records
        prompts = [ids if "text" in record else ids[: mask.index(1)] or ids[:1]
                   for (ids, mask), record in zip(self._tokens(task, split), records, strict=True)]
        out = torch.empty((len(prompts), self.hidden_size))
        with self._eval():
            for rows, input_ids, mask in self._left_padded(prompts, batch_size):
                hidden = self.backbone(input_ids=input_ids, attention_mask=mask,
                                       position_ids=_positions(mask),
                                       output_hidden_states=True).hidden_states[-1]
                out[rows] = self.pool(hidden, mask).float().cpu()
        return out

    @torch.no_grad()
    def token_top_k(self, task: TaskData, k: int, temperature: float, batch_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The current model's next-token distribution at temperature T on every loss token of
        the task's training examples, kept as its top-k: (offsets (n+1), indices (N, k) int32,
        log-probabilities (N, k), log-probability of all other tokens (N,)). Example i's tokens
        are rows offsets[i]:offsets[i+1], in their order in the example (LwF's teacher)."""
        encoded = self._tokens(task, "train")
        # A top_k above the vocabulary keeps the whole distribution (and `rest` is then empty).
        k = min(k, int(self.backbone.get_output_embeddings().weight.shape[0]))
        counts = [sum(mask[1:]) for _, mask in encoded]
        offsets = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.long)
        total = int(offsets[-1])
        indices = torch.empty((total, k), dtype=torch.int32)
        logp = torch.empty((total, k))
        rest = torch.empty(total)
        with self._eval():
            for start in range(0, len(encoded), batch_size):
                batch = self._batch(encoded[start:start + batch_size], pack=False)
                logits = self.backbone(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"])[0]
                # Row-major order of the loss positions = examples in order, tokens in order.
                z = logits[batch["targets"] != IGNORE].float() / temperature
                top_logp, top_idx, rest_logp = top_k_with_rest(z, k)
                at = int(offsets[start])
                indices[at:at + len(z)] = top_idx.to(torch.int32).cpu()
                logp[at:at + len(z)] = top_logp.cpu()
                rest[at:at + len(z)] = rest_logp.cpu()
        return offsets, indices, logp, rest

    def score_task(self, task: TaskData, trained: bool, batch_size: int) -> TaskScore:
        if task.scorer == "exact_match":
            return self._exact_match(task, batch_size)
        return self._perplexity(self._tokens(task, "eval"), batch_size)

    def score_upstream(self, probe: TextProbe, batch_size: int) -> TaskScore:
        key = ("upstream", probe.name)
        if key not in self._token_cache:
            self._token_cache[key] = [self.encode({"text": t}) for t in probe.texts]
        return self._perplexity(self._token_cache[key], batch_size)

    def save_task_parts(self, out_dir: Path) -> None:
        return None  # nothing beside the adapter: the vocabulary is the base model's

    # -- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def _perplexity(self, encoded: list[tuple[list[int], list[int]]],
                    batch_size: int) -> TaskScore:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        nll = [np.empty(0)] * len(encoded)
        right = [np.empty(0, dtype=bool)] * len(encoded)
        with self._eval():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = self._batch([encoded[i] for i in rows], pack=False)
                logits = self.backbone(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"])[0].float()
                targets = batch["targets"]
                losses = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0),
                                         reduction="none")
                hits = logits.argmax(-1) == targets
                for r, i in enumerate(rows):
                    keep = targets[r] != IGNORE
                    nll[i] = losses[r][keep].cpu().numpy()
                    right[i] = hits[r][keep].cpu().numpy()
        token_nll = np.concatenate(nll)
        mean = float(token_nll.mean())
        return TaskScore(math.exp(-mean), np.concatenate(right), "perplexity",
                         {"perplexity": math.exp(mean), "loss": mean, "tokens": len(token_nll)})

    def _left_padded(self, prompts: list[list[int]], batch_size: int
                     ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Length-sorted batches of left-padded prompts: (their positions, ids, mask)."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                n = len(prompts[i])
                ids[r, width - n:] = torch.tensor(prompts[i])
                mask[r, width - n:] = 1
            yield rows, ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int,
               batch_size: int) -> list[list[int]]:
        """Greedy continuations (token ids, without the end token) of many prompts, batched.
        Runs through whatever the backbone is (a PEFT model, moe's mixture), without a KV
        cache; a backbone that routes inputs keeps each row's route for the whole answer."""
        eos = self.tokenizer.eos_token_id
        out: list[list[int]] = [[] for _ in prompts]
        pinned = getattr(self.backbone, "pinned_routes", None)
        with self._eval(), (pinned() if pinned else nullcontext()):
            for rows, ids, mask in self._left_padded(prompts, batch_size):
                done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
                for _ in range(max_new_tokens):
                    logits = self.backbone(input_ids=ids, attention_mask=mask,
                                           position_ids=_positions(mask))[0][:, -1]
                    nxt = logits.argmax(-1)
                    for r in torch.nonzero(~done & (nxt != eos)).squeeze(-1).tolist():
                        out[rows[r]].append(int(nxt[r]))
                    done |= nxt == eos
                    if bool(done.all()):
                        break
                    ids = torch.cat([ids, nxt.unsqueeze(-1)], dim=1)
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                if pinned:
                    self.backbone.release_routes()
        return out

    def _exact_match(self, task: TaskData, batch_size: int) -> TaskScore:
        pairs = [self.prompt_and_answer(r) for r in task.eval.records]
        answers = self.greedy([p for p, _ in pairs], self.cfg.max_new_tokens, batch_size)
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        correct = np.array([exact_match(text, ref) for text, (_, ref) in
                            zip(texts, pairs, strict=True)], dtype=bool)
        return TaskScore(float(correct.mean()), correct, "exact_match",
                         {"exact_match": float(correct.mean()),
                          "examples": [{"prompt": task.eval.texts[i], "reference": pairs[i][1],
                                        "answer": texts[i]} for i in range(min(3, len(texts)))]})


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
