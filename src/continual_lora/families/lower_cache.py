"""Skip work that does not change: when LoRA adapts only the upper layers of a text encoder
(`lora.layers: last 2`) and everything below is frozen and deterministic, the hidden state that
enters the first adapted layer is a fixed function of the text. It is computed once per text,
keyed by its token ids (training examples before their task, held-out texts when first scored;
no grad, length-sorted batches) and kept; each training step and scoring pass then runs the
embeddings (cheap) and only the layers from there up.

Exactness: pad positions never reach a real token (the attention mask hides them as keys, and
pooling ignores them), so a cached step computes what the uncached step computes, up to float
rounding from different batch shapes. The cache is only used when nothing below can change or
vary: no trainable parameter below the first adapted layer, no dropout there (the config's
attention dropout included), and the lower weights unchanged since it was filled (tracked by
each parameter's in-place version counter; when the tensors themselves are new, as when `joint`
reloads the base for each task, by a sha256 of their contents). Otherwise training runs
uncached and says why once.

The layers are swapped, for the duration of a cached forward, for stand-ins: the first returns
the cached states, the others pass them on. The model's own forward still builds the attention
mask and runs everything above, so this works for any encoder whose layers are called in turn
from one `nn.ModuleList` (BERT, RoBERTa, DeBERTa, MiniLM, ...).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch
from torch import nn

from continual_lora.sequence import Stream


class _StopForward(Exception):
    """Raised by the capture hook: nothing above the cached layer needs computing."""


class _Inject(nn.Module):
    """Stands in for layer 0: returns the cached states, shaped as the real layer returns."""

    def __init__(self, states: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.states, self.as_tuple = states, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (self.states,) if self.as_tuple else self.states


class _Pass(nn.Module):
    """Stands in for layers 1..start-1: passes the states on."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


def _padded(states: list[torch.Tensor], width: int, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """Unpadded `(length, hidden)` states stacked into `(batch, width, hidden)`, zeros after."""
    out = torch.zeros((len(states), width, states[0].shape[-1]), dtype=dtype, device=device)
    for row, kept in enumerate(states):
        out[row, :len(kept)] = kept.to(device=device, dtype=dtype)
    return out


def layer_list(backbone: nn.Module) -> nn.ModuleList | None:
    """The encoder's list of transformer layers: the ModuleList as long as the config's
    `num_hidden_layers`, or None when there is no such list."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    return None


_SHARED: dict[str, dict[tuple[int, ...], torch.Tensor]] = {}
"""The last filled store, by the digest of the weights it came from: the runs of one bench
(one process) share the base and the texts, so each run after the first finds their states
computed. One entry only, so a long-lived process keeps at most one store."""


class LowerLayerCache:
    """Hidden states entering layer `start`, one unpadded `(length, hidden)` tensor per text,
    keyed by its token ids: a training example or a held-out text, computed once."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.start = 0
        self.layers: nn.ModuleList | None = None
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.as_tuple = False
        self._identity: tuple | None = None  # (id, in-place version) of each lower weight
        self._digest = ""  # their contents, checked when the identity changes
        self.active = False
        self.reason = ""  # why the last `prepare` left it off
        self.pad_batch = None  # token id lists -> (input_ids, mask), given to `prepare`
        self.filled = 0  # texts the last `prepare` computed (the others were held already)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    # -- deciding whether the cache may be used -------------------------------------------

    def _lower_part(self, backbone: nn.Module, start: int) -> list[nn.Module]:
        base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        embeddings = getattr(base, "embeddings", None)
        return ([embeddings] if embeddings is not None else []) + list(self.layers[:start])

    def _why_not(self, backbone: nn.Module) -> str:
        """Why the cache cannot be used now ("" when it can); sets `layers` and `start`."""
        self.layers = layer_list(backbone)
        if self.layers is None:
            return "no list of transformer layers found in this model"
        trainable = [i for i, layer in enumerate(self.layers)
                     if any(p.requires_grad for p in layer.parameters())]
        if not trainable or trainable[0] == 0:
            return "the first layer trains (lora.layers adapts it, or every layer)"
        self.start = trainable[0]
        lower = self._lower_part(backbone, self.start)
        if any(p.requires_grad for part in lower for p in part.parameters()):
            return "the embeddings train"
        drops = [m.p for part in lower for m in part.modules() if isinstance(m, nn.Dropout)]
        config = getattr(backbone, "config", None)
        attention = [getattr(config, k, 0.0) or 0.0 for k in
                     ("attention_probs_dropout_prob", "attention_dropout")]
        if any(p > 0 for p in drops + attention):
            return ("the frozen layers below use dropout, so their outputs vary from step to "
                    "step; set model.dropout: 0 to cache them")
        return ""

    def _weights_identity(self, backbone: nn.Module) -> tuple:
        return tuple((id(p), p._version) for part in self._lower_part(backbone, self.start)
                     for p in part.parameters())

    def _weights_digest(self, backbone: nn.Module) -> str:
        """sha256 of the lower part's parameters (shapes, dtypes, bytes), in module order:
        which layer the states enter is part of it (a different `start`, other parameters)."""
        digest = hashlib.sha256(f"start={self.start}".encode())
        for part in self._lower_part(backbone, self.start):
            for p in part.parameters():
                t = p.detach().cpu().contiguous()
                digest.update(f"{tuple(t.shape)}:{t.dtype}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _check_weights(self, backbone: nn.Module) -> None:
        """Keep the states only while the lower weights are those they came from."""
        identity = self._weights_identity(backbone)
        if identity == self._identity:
            return
        digest = self._weights_digest(backbone)  # other tensors, or changed in place
        if digest != self._digest:  # changed (or first use): another bench run's, or none
            self.states = _SHARED.get(digest, {})
            _SHARED.clear()
            _SHARED[digest] = self.states
        # equal contents in new tensors (joint reloads the base for every task): keep all
        self._identity, self._digest = identity, digest

    # -- filling ----------------------------------------------------------------------------

    def prepare(self, backbone: nn.Module, stream: Stream, token_ids, pad_batch,
                batch_size: int) -> bool:
        """Before a task trains: decide, and compute the states of the stream's examples not
        cached yet. `token_ids(task, index)` gives an example's ids; `pad_batch(ids)` pads a
        list of them into (input_ids, attention_mask). Returns whether the cache is on."""
        self.pad_batch = pad_batch
        self.reason = self._why_not(backbone)
        if self.reason:
            self.active = False
            return False
        self._check_weights(backbone)
        wanted = {tuple(token_ids(*key)) for key in stream.order} - self.states.keys()
        need = sum(map(len, wanted)) * backbone.config.hidden_size * 4
        if self.bytes + need > self.limit_bytes:
            self.reason = (f"the cache would need {(self.bytes + need) / 2**20:.0f} MiB, more "
                           f"than train.lower_cache_mb {self.limit_bytes / 2**20:.0f}")
            self.active = False
            return False
        self._fill(backbone, sorted(wanted, key=len), batch_size)
        self.filled = len(wanted)
        self.active = True
        return True

    def _fill(self, backbone, keys: list[tuple[int, ...]], batch_size: int) -> None:
        if keys:
            computed = self._compute(backbone, [list(k) for k in keys], batch_size)
            self.states.update(zip(keys, computed, strict=True))

    @torch.no_grad()
    def _compute(self, backbone, id_lists, batch_size: int) -> list[torch.Tensor]:
        """The states entering layer `start` of each token id list, unpadded (float32)."""
        captured, out_states = {}, []

        def capture(module, args, output):
            captured["out"] = output
            raise _StopForward

        was_training = backbone.training
        backbone.eval()  # no dropout anywhere (there is none below; checked)
        handle = self.layers[self.start - 1].register_forward_hook(capture)
        try:
            for first in range(0, len(id_lists), batch_size):
                chunk = id_lists[first:first + batch_size]
                input_ids, mask = self.pad_batch(chunk)
                try:
                    backbone(input_ids=input_ids, attention_mask=mask)
                except _StopForward:
                    pass
                out = captured.pop("out")
                self.as_tuple = isinstance(out, tuple)
                states = out[0] if self.as_tuple else out
                out_states += [states[row, :len(seq)].float().clone()
                               for row, seq in enumerate(chunk)]
        finally:
            handle.remove()
            backbone.train(was_training)
        return out_states

    # -- using ------------------------------------------------------------------------------

    @staticmethod
    def _keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, ...]]:
        lengths = attention_mask.sum(1).tolist()
        return [tuple(row[:n]) for row, n in zip(input_ids.tolist(), lengths, strict=True)]

    def _dtype(self) -> torch.dtype:
        """The dtype of the layer the states enter (the model's weights)."""
        return next(self.layers[self.start].parameters()).dtype

    def training_states(self, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The cached states of a training batch, padded like it; None unless the cache is
        on and holds every example (filled by `prepare` before the task)."""
        if not self.active:
            return None
        keys = self._keys(input_ids, attention_mask)
        if any(k not in self.states for k in keys):
            return None
        return _padded([self.states[k] for k in keys], input_ids.shape[1], self._dtype(),
                       input_ids.device)

    def evaluation_states(self, backbone: nn.Module, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The states entering layer `start` for an evaluation batch (padded like it), from
        the cache, computing and keeping the texts not seen yet; None when the cache does not
        apply to `backbone` now (off, another layer stack, or the lower weights changed).

        Evaluation scores the same held-out texts after every task, and the layers below the
        adapted ones give the same states each time: they are keyed by the token ids."""
        if not self.active or layer_list(backbone) is not self.layers:
            return None
        if self._weights_identity(backbone) != self._identity:
            return None
        keys = self._keys(input_ids, attention_mask)
        missing = list(dict.fromkeys(k for k in keys if k not in self.states))
        need = sum(map(len, missing)) * backbone.config.hidden_size * 4
        if self.bytes + need > self.limit_bytes:
            return None
        self._fill(backbone, missing, len(missing))
        return _padded([self.states[k] for k in keys], input_ids.shape[1], self._dtype(),
                       input_ids.device)

    @contextmanager
    def skipping_lower_layers(self, states: torch.Tensor):
        """Layers below `start` stand in for themselves: the first returns `states`."""
        originals = [self.layers[i] for i in range(self.start)]
        self.layers[0] = _Inject(states, self.as_tuple)
        for i in range(1, self.start):
            self.layers[i] = _Pass(self.as_tuple)
        try:
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
