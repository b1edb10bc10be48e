"""Skip work that does not change: train on the tokens, not on the padding.

A training batch of 32 short texts padded to its longest one is mostly padding (WordNet glosses:
2.5 padded tokens per real token in random batches), and every linear layer pays for each pad
token. Length-sorted batches would cut that but change which examples meet in a batch, which is
the sampling the user asked for. Packing keeps the batch and removes the padding instead: the
batch's sequences are laid end to end in a few rows (first-fit, longest first), each token keeps
its own position id, and a block-diagonal attention mask lets a token see only its own sequence.
Each sequence then gets the same hidden states as in the padded batch, so the pooled features
(and the loss, gradients and adapter) are those of the padded step, up to float rounding.

That holds only for an encoder whose forward honours `position_ids` and a ready-made 4-D
additive attention mask (BERT, RoBERTa, MiniLM, ELECTRA, ... in transformers). `packing_check`
verifies it on the model itself, once, by comparing packed and padded features; a model that
fails it trains padded, and the run's log says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_ROW_TOKENS = 128
"""Rows are at least this long: a few rows of 128 keep the attention matrices (quadratic in the
row length) about as small as the padded batch's, while the linear layers see only real tokens."""


@dataclass
class PackedLayout:
    """Where each real token of a padded `(batch, width)` batch goes in `(rows, row_len)`."""

    batch: int
    rows: int
    row_len: int
    source: torch.Tensor  # flat index of each real token in the padded batch
    target: torch.Tensor  # flat index of the same token in the packed rows
    segment: torch.Tensor  # (rows * row_len,): the example each slot holds; `batch` for padding
    position_ids: torch.Tensor  # (rows, row_len)
    first_token: torch.Tensor  # (batch,): packed flat index of each example's first token
    lengths: torch.Tensor  # (batch,)

    def pack(self, padded: torch.Tensor, fill=0) -> torch.Tensor:
        """`(batch, width, ...)` -> `(rows, row_len, ...)`, padding slots set to `fill`."""
        tail = padded.shape[2:]
        out = padded.new_full((self.rows * self.row_len, *tail), fill)
        out[self.target] = padded.reshape(-1, *tail)[self.source]
        return out.view(self.rows, self.row_len, *tail)

    def attention_mask(self, additive_dtype: torch.dtype | None = None,
                       causal: bool = False) -> torch.Tensor:
        """`(rows, 1, row_len, row_len)` mask that keeps each token inside its sequence:
        boolean (True: may attend), as SDPA takes it, or with `additive_dtype` the additive
        form eager attention adds to its scores (0, or the dtype's minimum). Padding slots see
        each other, so no softmax row is empty (an all-masked row would give NaN, and NaN
        times a zero pooling weight is still NaN). `causal` (a decoder): a token sees only
        its own sequence's earlier tokens and itself (a padding slot still sees itself)."""
        seg = self.segment.view(self.rows, self.row_len)
        same = (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)
        if causal:
            same &= torch.ones(self.row_len, self.row_len, dtype=torch.bool,
                               device=seg.device).tril()
        if additive_dtype is None:
            return same
        mask = torch.zeros(same.shape, dtype=additive_dtype, device=seg.device)
        return mask.masked_fill_(~same, torch.finfo(additive_dtype).min)

    def pool(self, hidden: torch.Tensor, pooling: str) -> torch.Tensor:
        """Per-example pooled states from packed `(rows, row_len, hidden)`, in batch order:
        the mean over each sequence's tokens, or its first token (`cls`)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if pooling == "cls":
            return flat[self.first_token]
        sums = flat.new_zeros((self.batch + 1, flat.shape[-1]))
        sums.index_add_(0, self.segment, flat)
        return sums[: self.batch] / self.lengths.to(flat.dtype).clamp(min=1).unsqueeze(-1)


def plan_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """Examples per row, first-fit over the examples longest first (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


def packed_layout(attention_mask: torch.Tensor,
                  rows: list[list[int]] | None = None) -> PackedLayout:
    """The layout of a right-padded batch (its mask: 1 on real tokens, first ones first).
    `rows` (the examples of each row, in their order there) replaces the default plan
    (`plan_rows` in rows of max(width, MIN_ROW_TOKENS)); rows are then as long as the
    fullest of them (a causal LM packs in batch order, so that its loss tokens keep their
    order)."""
    batch, width = attention_mask.shape
    lengths = attention_mask.sum(1)
    as_list = lengths.tolist()
    if rows is None:
        row_len = max(width, MIN_ROW_TOKENS)
        rows = plan_rows(as_list, row_len)
    else:
        row_len = max(sum(as_list[i] for i in row) for row in rows)
    source, target, positions, first = [], [], [], [0] * batch
    segment = torch.full((len(rows) * row_len,), batch, dtype=torch.long)
    for r, members in enumerate(rows):
        offset = r * row_len
        for i in members:
            n = as_list[i]
            source.append(torch.arange(i * width, i * width + n))
            target.append(torch.arange(offset, offset + n))
            positions.append(torch.arange(n))
            segment[offset: offset + n] = i
            first[i] = offset
            offset += n
    target_index = torch.cat(target)
    position_ids = torch.zeros(len(rows) * row_len, dtype=torch.long)
    position_ids[target_index] = torch.cat(positions)
    device = attention_mask.device
    return PackedLayout(batch, len(rows), row_len, torch.cat(source).to(device),
                        target_index.to(device), segment.to(device),
                        position_ids.view(len(rows), row_len).to(device),
                        torch.tensor(first, device=device), lengths)


def packing_check(features_padded, features_packed, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, tolerance: float = 1e-4) -> str:
    """"" when packed features equal padded ones on this batch, else why packing is off.
    Both callables take (input_ids, attention_mask) and return pooled features (eval mode,
    no grad: the comparison must not depend on dropout)."""
    try:
        with torch.no_grad():
            padded = features_padded(input_ids, attention_mask)
            packed = features_packed(input_ids, attention_mask)
    except (TypeError, ValueError, RuntimeError) as err:  # forward refuses the arguments
        return f"this model's forward does not take packed rows ({type(err).__name__}: {err})"
    gap = (padded - packed).abs().max().item()
    scale = padded.abs().max().item() or 1.0
    if not gap <= tolerance * max(scale, 1.0):
        return (f"this model's forward does not honour position_ids and 4-D attention masks "
                f"(packed features differ from padded ones by {gap:.2g})")
    return ""


def position_offsets(backbone) -> list[int]:
    """First position ids to try: 0, and padding_idx + 1 for embeddings that number positions
    after the padding index (RoBERTa's `create_position_ids_from_input_ids`)."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    padding_idx = getattr(getattr(base, "embeddings", None), "padding_idx", None)
    return [0] + ([padding_idx + 1] if isinstance(padding_idx, int) else [])


def additive_mask_dtype(backbone) -> torch.dtype | None:
    """The form of mask the model's attention takes: eager attention adds it to its scores
    (an additive mask in the weights' dtype); SDPA, the default, takes a boolean (None)."""
    config = getattr(backbone, "config", None)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        return backbone.get_input_embeddings().weight.dtype
    return None
