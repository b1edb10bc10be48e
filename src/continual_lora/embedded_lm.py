"""The embedded causal LM: a small Llama pretrained in-process on WordNet text, offline.

:func:`embedded_lm_path` returns a normal Hugging Face model folder (``config.json``,
``model.safetensors``, ``generation_config.json``, tokenizer files, plus ``recipe.json``) that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load as they
would any hub model. The first call for a recipe pretrains the model (a few minutes on a laptop
CPU for the default recipe) on :func:`continual_lora.data.general_text.general_text` and caches
it; later calls return the cached folder. Nothing is downloaded and nothing runs at import time.

Model: ``LlamaForCausalLM`` (``q/k/v/o_proj``, ``gate/up/down_proj``, RMSNorm, RoPE) with tied
input/output embeddings. Tokenizer: byte-level BPE trained on the same text with the
``tokenizers`` library; it adds ``<|bos|>`` in front of every encoded text (as Llama's does) and
carries a chat template, so question/answer data can be rendered as chat turns::

    <|user|>
    What is a guitarist a kind of?<|end|>
    <|assistant|>
    musician<|end|>

(the template adds no ``<|bos|>`` itself: tokenizing its output adds one, and
``apply_chat_template(..., tokenize=True)`` gives none). Generation stops at ``<|end|>`` or
``<|eos|>``.

Pretraining data: every ``pretrain`` document as ``<|bos|> text <|eos|>``, concatenated into one
token stream; each step draws ``batch_size`` random windows of ``block_length`` tokens from it
(nanoGPT-style). AdamW with linear warmup and cosine decay to 10% of ``lr``; gradients clipped
at 1.0. ``recipe.json`` records the recipe, its key, wall seconds, the final training loss and
the held-out perplexity of the model and of a unigram model (add-one smoothed token counts of
the pretraining stream), both per token over the same held-out tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from continual_lora.build_cache import build_once
from continual_lora.config import EMBEDDED_LM

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "EMBEDDED_LM",
    "SPECIAL_TOKENS",
    "LmRecipe",
    "default_cache_root",
    "embedded_lm_path",
    "train_tokenizer",
]

# Bump when the build procedure changes in a way that changes the model for the same recipe,
# so that caches built by older code are not reused.
BUILD_VERSION = 1
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
END = "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, *ROLE_TOKENS, END)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
RECIPE_FILE = "recipe.json"
_MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json")


@dataclass(frozen=True)
class LmRecipe:
    """Everything that determines the embedded model; its :meth:`key` names the cache folder."""

    vocab_size: int = 4096
    """BPE vocabulary size, special tokens included."""
    hidden_size: int = 192
    """Width of the residual stream."""
    layers: int = 4
    """Number of transformer blocks."""
    heads: int = 4
    """Attention heads (no grouped-query attention: as many key/value heads)."""
    intermediate_size: int = 512
    """Width of the SwiGLU MLP."""
    block_length: int = 128
    """Tokens per training window; also the model's ``max_position_embeddings``."""
    batch_size: int = 16
    """Windows per optimizer step."""
    steps: int = 600
    """Optimizer steps."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 50
    """Linear warmup steps before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms)."""
    max_docs: int | None = None
    """Use only the first this many pretraining documents (``None``: all); for tests."""
    seed: int = 0
    """Seed of the initialization and of the window sampling."""

    @classmethod
    def tiny(cls) -> LmRecipe:
        """A model that builds in a few seconds, for tests."""
        return cls(vocab_size=384, hidden_size=32, layers=2, heads=2, intermediate_size=64,
                   block_length=64, batch_size=8, steps=20, lr=1e-2, warmup_steps=2,
                   max_docs=3000)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        """SHA-256 of the recipe and the build version (canonical JSON)."""
        blob = json.dumps({"build_version": BUILD_VERSION, "recipe": self.to_dict()},
                          sort_keys=True, separators=(",", ":"))  # fmt: skip
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def key(self) -> str:
        """Short cache key: the first 16 hex digits of :meth:`sha256`."""
        return self.sha256()[:16]


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same input).

    Special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` (bos/eos/pad), the chat tokens
    ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``, and :data:`CHAT_TEMPLATE`.
    Encoding adds ``<|bos|>`` in front (``add_special_tokens=False`` does not); decoding
    returns the exact text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet plus specials "
                         f"({len(alphabet) + len(SPECIAL_TOKENS)})")  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[*ROLE_TOKENS, END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- cache


def default_cache_root() -> Path:
    """``$CONTINUAL_LORA_CACHE`` or ``~/.cache/continual-lora``."""
    env = os.environ.get("CONTINUAL_LORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "continual-lora"


def _folder_is_valid(folder: Path, recipe: LmRecipe) -> bool:
    try:
        meta = json.loads((folder / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        meta.get("sha256") == recipe.sha256()
        and meta.get("recipe") == recipe.to_dict()
        and all((folder / name).is_file() for name in _MODEL_FILES)
    )


def embedded_lm_path(
    recipe: LmRecipe | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    echo: Callable[[str], object] = print,
) -> Path:
    """The folder of the embedded model for ``recipe`` (default :class:`LmRecipe`), built on
    first use.

    The folder is ``{cache}/embedded-lm/wordnet-llama-{recipe.key()}``, where ``cache`` is
    ``cache_dir``, else ``$CONTINUAL_LORA_CACHE``, else ``~/.cache/continual-lora``. It is
    built in a temporary sibling folder and renamed into place, so a crash leaves no half
    model and two concurrent builders both end with the same complete folder.
    """
    recipe = recipe or LmRecipe()
    parent = (Path(cache_dir) if cache_dir is not None else default_cache_root()) / "embedded-lm"
    folder = parent / f"wordnet-llama-{recipe.key()}"
    if _folder_is_valid(folder, recipe):
        return folder

    def build(tmp: Path) -> None:
        echo(f"embedded LM: building {folder.name} (once; cached under {parent})")
        _build(recipe, tmp, echo)

    build_once(folder, build, lambda f: _folder_is_valid(f, recipe))
    echo(f"embedded LM: ready at {folder}")
    return folder


# --------------------------------------------------------------------------- build


def _token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    import torch

    backend = tokenizer.backend_tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    for enc in backend.encode_batch(texts, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _lr_factor(step: int, recipe: LmRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _heldout_batches(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], block_length: int, batch_size: int
) -> list[torch.Tensor]:
    """Each held-out document as ``<|bos|> text <|eos|>`` (cut to ``block_length``), padded
    with -1 into batches of similar length."""
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    docs = sorted(([bos, *e.ids, eos][:block_length] for e in encoded), key=len)
    batches = []
    for i in range(0, len(docs), batch_size):
        chunk = docs[i : i + batch_size]
        width = max(map(len, chunk))
        batches.append(torch.tensor([d + [-1] * (width - len(d)) for d in chunk]))
    return batches


def _heldout_perplexities(
    model: Any, batches: list[torch.Tensor], unigram_logp: torch.Tensor
) -> tuple[float, float]:
    """(model, unigram) perplexity per predicted token (every token after ``<|bos|>``)."""
    import torch

    model.eval()
    nll_model = nll_unigram = 0.0
    count = 0
    with torch.no_grad():
        for batch in batches:
            mask = batch >= 0
            ids = batch.clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
            target, tmask = ids[:, 1:], mask[:, 1:]
            logp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll_model -= logp[tmask].sum().item()
            nll_unigram -= unigram_logp[target[tmask]].sum().item()
            count += int(tmask.sum())
    return math.exp(nll_model / count), math.exp(nll_unigram / count)


def _build(recipe: LmRecipe, out: Path, echo: Callable[[str], object]) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from .data.general_text import general_text

    start = time.perf_counter()
    texts = general_text("pretrain")
    if recipe.max_docs is not None:
        texts = texts[: recipe.max_docs]
    tokenizer = train_tokenizer(texts, recipe.vocab_size)
    stream = _token_stream(tokenizer, texts)
    if len(stream) <= recipe.block_length:
        raise ValueError(f"pretraining text has {len(stream)} tokens, not more than one block")
    vocab = len(tokenizer)
    echo(f"embedded LM: {len(texts)} documents, {len(stream)} tokens, vocabulary {vocab}")

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.block_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, recipe))
    echo(f"embedded LM: Llama {n_params / 1e6:.2f}M parameters, {recipe.steps} steps of "
         f"{recipe.batch_size}x{recipe.block_length} tokens")  # fmt: skip

    generator = torch.Generator().manual_seed(recipe.seed)
    offsets = torch.arange(recipe.block_length)
    every = max(1, recipe.steps // 20)
    model.train()
    recent: list[float] = []
    for step in range(recipe.steps):
        starts = torch.randint(len(stream) - recipe.block_length + 1, (recipe.batch_size, 1),
                               generator=generator)  # fmt: skip
        batch = stream[starts + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-every:]
        if (step + 1) % every == 0 or step + 1 == recipe.steps:
            echo(f"embedded LM: step {step + 1}/{recipe.steps} loss {sum(recent) / len(recent):.3f}"
                 f" ({time.perf_counter() - start:.0f}s)")  # fmt: skip
    final_loss = sum(recent) / len(recent)

    counts = torch.bincount(stream, minlength=vocab).double() + 1.0
    unigram_logp = (counts / counts.sum()).log()
    batches = _heldout_batches(tokenizer, general_text("heldout"), recipe.block_length, 64)
    ppl, ppl_unigram = _heldout_perplexities(model, batches, unigram_logp)
    seconds = time.perf_counter() - start
    echo(f"embedded LM: held-out perplexity {ppl:.1f} (unigram {ppl_unigram:.1f}), "
         f"final loss {final_loss:.3f}, {seconds:.0f}s")  # fmt: skip

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        "name": EMBEDDED_LM,
        "recipe": recipe.to_dict(),
        "key": recipe.key(),
        "sha256": recipe.sha256(),
        "build_version": BUILD_VERSION,
        "parameters": n_params,
        "pretrain_documents": len(texts),
        "pretrain_tokens": len(stream),
        "pretrain_seconds": round(seconds, 2),
        "final_train_loss": round(final_loss, 4),
        "heldout_perplexity": round(ppl, 3),
        "heldout_unigram_perplexity": round(ppl_unigram, 3),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    (out / RECIPE_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
