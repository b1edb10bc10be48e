"""The settings of `continual-lora update`, typed and strict (as `config.py`'s run settings).

Every field can come from a YAML file (`continual-lora update update.yaml`) or a flag
(`--new b.csv`); flags win. Relative paths in a YAML are resolved against its folder.
Every default that is `null` here is filled in by the recipe (`recipe.py`) and shown, with where
it came from, in the printed plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from continual_lora.config import (
    ConfigError,
    Strict,
    UpstreamConfig,
    format_validation_error,
    read_yaml_mapping,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class UpdateData(Strict):
    """One data source of an update: a train file, and optionally a held-out file."""

    train: str
    """Training file (CSV, TSV, JSON lines, JSON or Parquet) with a text and a label column."""
    eval: str | None = None
    """Held-out file; when null, `holdout` of the train file is held out (never trained on)."""
    name: str | None = Field(None, pattern=NAME_PATTERN, max_length=64)
    """Task name; default: the train file's name without its suffix. For old data, the name
    of the old task (a head in the old adapter's heads.json) it belongs to."""
    text_column: str = "text"
    """Column holding the input text."""
    label_column: str = "label"
    """Column holding the class label."""
    holdout: float = Field(0.2, gt=0, lt=1)
    """Fraction of the train file held out for scoring when `eval` is not given."""
    max_holdout: int = Field(500, ge=1)
    """At most this many held-out examples are taken from the train file."""


class UpdateConfig(Strict):
    """`continual-lora update`: base + old adapter + new data (+ old data) → a new adapter."""

    adapter: str
    """The adapter to update: a PEFT adapter folder (a run's `tasks/NN-name/adapter`, an earlier
    update's output, or any PEFT LoRA folder), or a run folder (its last stage)."""
    new: UpdateData
    """The new data."""
    out: str
    """Folder of the new adapter (a PEFT adapter folder, with the plan, the report, the heads
    and the lineage beside it). Must not exist unless `overwrite`; `--resume` continues an
    interrupted update into it."""
    base: str | None = None
    """Base model (hub id or local folder); default: the one the old adapter names."""
    old: list[UpdateData] = Field(default_factory=list)
    """Old data, when you kept it: replayed by `replay`, and its held-out part measures
    forgetting. Without it, forgetting is measured on a probe (see `probe_size`)."""
    strategy: str = "auto"
    """`auto` (replay with old data, else the best no-old-data strategy of the bench) or a
    registered strategy name."""
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    """Options of the strategy, validated by its own schema."""
    new_share: float | None = Field(None, gt=0, le=1)
    """Share of the new data in the training stream when old data is given (default 0.5); set
    through integer `repeats` of each source, as kohya's `num_repeats`."""
    lr: float | None = Field(None, gt=0, le=1)
    """Peak learning rate; default: `lr_scale` × the first stage's LR."""
    lr_scale: float = Field(0.4, gt=0, le=1)
    """Default LR = this × the old adapter's LR (seed 000: 0.3–0.5 of the first stage's)."""
    steps: int | None = Field(None, ge=1)
    """Optimisation steps; default: about 3 passes over the new data, kept within 100–300."""
    batch_size: int | None = Field(None, ge=1)
    """Examples per step; default: the first stage's, else 32."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Fraction of the steps with linear LR warm-up; then linear decay to 0."""
    max_forgetting: float | None = Field(None, ge=0, le=1)
    """Forgetting budget: the largest allowed drop of the old tasks' mean score (0.02 = two
    points). Training stops at, and saves, the last evaluation that stayed within it."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate the old and new held-out data (and checkpoint) every N steps; default:
    a tenth of the steps, at least 10."""
    budget_patience: int = Field(2, ge=1)
    """Stop after this many evaluations in a row over the budget (1: at the first)."""
    probe_size: int = Field(500, ge=10)
    """Without old data: held-out new inputs on which the old model's own predictions are the
    labels of the forgetting probe (its agreement with itself, 1.0 before the update)."""
    rank: int | None = Field(None, ge=1)
    """LoRA rank of the trained adapter; default and required: the old adapter's."""
    alpha: float | None = Field(None, gt=0)
    """LoRA alpha; default and required: the old adapter's."""
    target_modules: list[str] | None = None
    """Adapted modules; default and required: the old adapter's."""
    change_lora: bool = False
    """Allow `rank`/`alpha`/`target_modules` to differ from the old adapter's (only for
    strategies that train a new adapter beside the old: merge_reinit, ortho_init, olora)."""
    allow_base_mismatch: bool = False
    """Proceed when the base's fingerprint differs from the one in the old adapter's lineage
    (same shapes, other weights: a fine-tuned variant of the base, say)."""
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    """The upstream probe (what the base could do before any training)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Training checkpoints kept while the update runs (plus the budget's best); removed when
    it finishes."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"])
    """Where the loss and the budget's evaluations go while the stage trains, besides
    `log.jsonl`: `tensorboard` (event files in OUT's `tensorboard/`), `wandb`, `mlflow`; `[]`:
    log.jsonl only."""
    seed: int = 0
    """Seed of data order, held-out split and new adapter initialisation."""
    overwrite: bool = False
    """Replace an existing `out` folder."""
    base_dir: str | None = Field(None, exclude=True)
    """Folder relative paths are resolved against (the YAML's folder); set by the loader."""

    @model_validator(mode="after")
    def _share_needs_old(self) -> UpdateConfig:
        if self.new_share is not None and self.new_share < 1 and not self.old:
            raise ValueError(f"new_share={self.new_share:g} needs old data to mix with (`old`); "
                             "without old data the stream is all new data")
        return self

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        if not p.is_absolute() and self.base_dir:
            p = Path(self.base_dir) / p
        return p


def load_update_config(path: str | Path | None, values: dict[str, Any]) -> UpdateConfig:
    """A YAML file (optional) plus `values` from the command line (which win)."""
    data: dict[str, Any] = {}
    base_dir = None
    if path is not None:
        path = Path(path)
        data = read_yaml_mapping(path)
        base_dir = str(path.resolve().parent)
    data.update({k: v for k, v in values.items() if v is not None})
    source = str(path) if path is not None else "update arguments"
    try:
        cfg = UpdateConfig.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    return cfg
