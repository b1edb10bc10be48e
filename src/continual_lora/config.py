"""Typed, strict configuration.

Every field has a type, a default and a one-line docstring. Unknown keys, wrong types and
impossible values are errors that name the field (pydantic reports the dotted location; we
re-format it as `train.lr: ...`). A config is a YAML mapping plus dotted command-line overrides
(`train.lr=1e-4`); values of overrides are parsed as YAML scalars, so `1e-4`, `true` and `[a, b]`
mean what they look like.

Strategy options are not declared here: each strategy declares its own `Options` model and the
`strategy.options` mapping is validated against it when the config is loaded, so that adding a
strategy never touches this file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
EMBEDDED_LM = "embedded:wordnet-llama"
EMBEDDED_DIFFUSION = "embedded:silhouette-diffusion"
EMBEDDED_VIT = "embedded:vit"
EMBEDDED_RESNET = "embedded:resnet"
#: The embedded vision models (pretrained in-process on an upstream split; see
#: embedded_vision.py), by name → architecture.
EMBEDDED_VISION = {EMBEDDED_VIT: "vit", EMBEDDED_RESNET: "resnet"}
EMBEDDED_MODELS = {"classifier": EMBEDDED_MODEL, "causal_lm": EMBEDDED_LM,
                   "diffusion": EMBEDDED_DIFFUSION}


class ConfigError(ValueError):
    """A configuration problem, with a message that names the field and says what to do."""


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              use_attribute_docstrings=True)


class ModelConfig(Strict):
    family: Literal["classifier", "causal_lm", "diffusion"] = "classifier"
    """Model family: `classifier` (text encoders with classification heads), `causal_lm`
    (any transformers causal LM: Llama, Qwen, Mistral, GPT-2, SmolLM ...) or `diffusion` (a
    diffusers Stable Diffusion 1.x / SDXL pipeline; LoRA on the UNet)."""
    name_or_path: str = ""
    """Hub id or local folder of the base model; empty: the family's offline default
    (`embedded:all-MiniLM-L6-v2` for classifiers, `embedded:wordnet-llama` for causal LMs, a
    small Llama pretrained in-process on WordNet text and cached; `embedded:silhouette-diffusion`
    for diffusion, a small latent diffusion model pretrained in-process on animal silhouettes
    and digits and cached)."""
    head: Literal["per_task", "shared"] = "per_task"
    """Classifier: `per_task`: one head per task, frozen after it (task-incremental); `shared`:
    one head over all classes seen so far (class-incremental)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Classifier: how token states become one vector per text."""
    normalize: bool = True
    """Classifier: L2-normalise pooled features (cosine classifier); heads then use
    `logit_scale`."""
    logit_scale: float = Field(16.0, gt=0)
    """Classifier: multiplier of cosine logits when `normalize` is on (a fixed temperature)."""
    max_length: int = Field(64, ge=8, le=131072)
    """Maximum tokens per example; longer examples are truncated (a causal LM keeps the
    start)."""
    dropout: float | None = Field(None, ge=0, lt=1)
    """Override the base model's own dropout probabilities (hidden, attention, embeddings: every
    `*dropout*` / `*_pdrop` setting in its config); null keeps the checkpoint's. 0 makes the
    frozen layers deterministic, which the lower-layer cache needs (`lora.layers`)."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off by default: only enable it for models you trust."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype of the base model (bfloat16 halves the memory of a large LM on a GPU
    that supports it; CPUs here train in float32)."""
    packing: bool = False
    """Causal LM: concatenate the examples of a batch into as few rows of `max_length` tokens
    as they fill (less padding); each keeps its own loss mask, its own position ids and a
    block-diagonal causal attention mask, so the result is padded training's (to float
    rounding). Checked on the model first; one that fails trains padded, the log says why."""
    qa_template: str = "Question: {question}\nAnswer:"
    """Causal LM: the prompt of a question/answer example; the completion is ` {answer}`
    followed by the end-of-text token."""
    chat_template: bool = False
    """Causal LM: render question/answer examples as a user/assistant chat with the
    tokenizer's chat template instead of `qa_template` (for instruction-tuned models)."""
    max_new_tokens: int = Field(24, ge=1, le=4096)
    """Causal LM: tokens generated (greedy) per question when answers are scored by exact
    match."""
    image_size: int | None = Field(None, ge=8, le=4096)
    """Diffusion: training and sampling resolution in pixels (images are resized on the
    shorter side and centre-cropped); default: the pipeline's native size."""
    dino: str | None = None
    """Diffusion: a DINO image model (local folder or hub id, e.g. facebook/dino-vits16) to
    score samples against reference images (seed 003's DINO score)."""
    clip: str | None = None
    """Diffusion: a CLIP model (local folder or hub id, e.g. openai/clip-vit-base-patch32) for
    CLIP-I (image-image) and CLIP-T (prompt fidelity) scores."""
    inference_steps: int = Field(25, ge=1, le=1000)
    """Diffusion: DDIM sampling steps of the fixed-seed sample images."""
    guidance_scale: float = Field(5.0, ge=1.0, le=50.0)
    """Diffusion: classifier-free guidance scale of the sample images (1: no guidance)."""
    samples_per_prompt: int = Field(4, ge=1, le=64)
    """Diffusion: sample images per evaluation prompt (seeds 0..N-1), at every stage."""

    @model_validator(mode="after")
    def _default_model(self) -> ModelConfig:
        if not self.name_or_path:
            # object.__setattr__: an assignment would re-run this validator (validate_assignment)
            object.__setattr__(self, "name_or_path", EMBEDDED_MODELS[self.family])
        if "{question}" not in self.qa_template:
            raise ValueError(f"qa_template {self.qa_template!r} must contain {{question}}")
        return self


class LoraConfigModel(Strict):
    r: int = Field(8, ge=1, le=4096)
    """LoRA rank."""
    alpha: float | None = Field(None, gt=0)
    """LoRA alpha, fixed whatever the rank; when null it follows `alpha_rule`."""
    alpha_rule: Literal["2r", "r", "fixed"] = "2r"
    """How alpha follows the rank when `alpha` is null: `2r` (the incremental-LoRA study's
    choice), `r` (scaling 1). A rank sweep keeps the rule, so the scaling alpha/r stays the same
    across ranks; `fixed` requires `alpha` (then the scaling shrinks as the rank grows)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Module names to adapt; default per architecture (BERT: query, value). A name that matches no
    module is an error listing candidates."""
    init_adapter: str | None = None
    """A PEFT adapter folder to continue from (loaded trainable)."""
    layers: list[int] | str | None = None
    """Adapt only these transformer layers: `last N`, `first N`, or a list of indices (from 0);
    null: every layer. PEFT's `layers_to_transform`, saved in the adapter's config. With the
    lower layers all frozen, training caches their outputs (`train.cache_lower_layers`)."""

    @field_validator("layers")
    @classmethod
    def _layers_spec(cls, value):
        if isinstance(value, str) and not re.fullmatch(r"(last|first) [1-9]\d*", value.strip()):
            raise ValueError(f"lora.layers {value!r}: write `last N`, `first N` or a list of "
                             "layer indices such as [4, 5]")
        if isinstance(value, list) and (not value or min(value) < 0):
            raise ValueError(f"lora.layers {value}: give layer indices from 0 (at least one)")
        return value

    @model_validator(mode="after")
    def _alpha_matches_rule(self) -> LoraConfigModel:
        if self.alpha_rule == "fixed" and self.alpha is None:
            raise ValueError("alpha_rule 'fixed' needs lora.alpha (a number)")
        explicit_rule = "alpha_rule" in self.model_fields_set and self.alpha_rule != "fixed"
        if self.alpha is not None and explicit_rule:
            raise ValueError(f"alpha={self.alpha:g} contradicts alpha_rule {self.alpha_rule!r}: "
                             "set one or the other")
        return self

    @property
    def effective_alpha(self) -> float:
        if self.alpha is not None:
            return float(self.alpha)
        return float(self.r) if self.alpha_rule == "r" else 2.0 * self.r


class TrainConfig(Strict):
    lr: float = Field(1e-3, gt=0, le=1.0)
    """Peak learning rate (AdamW)."""
    head_lr: float | None = Field(None, gt=0, le=10.0)
    """Learning rate of classification heads; default: `lr`."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on trainable parameters."""
    batch_size: int = Field(32, ge=1)
    """Examples per optimisation step."""
    epochs: float = Field(2.0, gt=0)
    """Passes over the task's training stream (new data plus any replay, with repeats)."""
    max_steps: int | None = Field(None, ge=1)
    """Cap on steps per task (overrides `epochs` when smaller)."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Fraction of each task's steps with linear LR warm-up; then linear decay to 0."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this value; null disables."""
    eval_batch_size: int = Field(128, ge=1)
    """Examples per no-grad evaluation batch."""
    log_every: int = Field(10, ge=1)
    """Write a log line every N steps."""
    pack_sequences: bool = True
    """Text classifiers: run each training batch without its padding, the sequences laid end to
    end in a few rows with a block-diagonal attention mask. Same batches, same result (to float
    rounding), fewer tokens through every layer. Checked on the model first; a model whose
    forward does not support it trains padded, and the run's log says why."""
    cache_lower_layers: bool = True
    """When LoRA adapts only the upper layers (`lora.layers`) and the layers below are frozen
    and deterministic (no dropout), compute their outputs once per text (trained on or scored)
    and run only the layers above; the result is that of the uncached run (to float rounding)."""
    lower_cache_mb: int = Field(2048, ge=0)
    """Memory limit of that cache (MiB, float32 hidden states); beyond it training runs
    uncached."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"])
    """Where the loss (per task and per data source) and the held-out scores go while the run
    trains, besides `log.jsonl` (always written): `tensorboard` (event files in the run's
    `tensorboard/`; `tensorboard --logdir RUN_DIR`), `wandb`, `mlflow` (their packages
    installed apart). `[]`: log.jsonl only."""
    checkpoint_every: int = Field(50, ge=1)
    """Write a training checkpoint every N steps (and at each task's last step), so an
    interrupted run resumes (`continual-lora run --resume RUN_DIR`) losing at most N steps."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept per task while it trains; a finished task keeps its last one (its end
    weights) until the run finishes, when the `checkpoints/` folder is removed."""


class TaskConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=64)
    """Task name (letters, digits, `_.-`); used in folder names."""
    train: str | None = None
    """Training file (CSV, JSON lines, JSON or Parquet), relative to the config file; for an
    image classifier also a folder with one subfolder of images per class."""
    eval: str | None = None
    """Held-out file or image folder (same formats), relative to the config file."""
    wordnet: list[str] | None = None
    """Built-in data (classifier): WordNet glosses labelled by lexicographer category, one class
    per entry (`noun.animal`); `noun.animal+noun.plant` makes one class of several
    categories."""
    image_classes: list[str] | None = None
    """Built-in data (image classifier): classes of the embedded images (`animal-mnist`
    animals `bear` ... `zebra`, scikit-learn digits `zero` ... `nine`), one class each,
    `train_per_class` + `eval_per_class` images per class."""
    image_column: str = "image"
    """Image classifier, `train`/`eval` table files: the column holding the image (a `datasets`
    Image feature, or a path relative to the file)."""
    facts: int | None = Field(None, ge=1, le=20)
    """Built-in data (causal LM): round N of the WordNet fact rounds (question/answer pairs
    about hypernyms, synonyms and categories; rounds have disjoint subjects). The held-out split
    is the same facts: the score is how many of them the model recalls."""
    facts_per_round: int = Field(100, ge=1, le=2000)
    """Built-in facts only: facts per round."""
    images: str | None = None
    """Diffusion: a folder of images with a caption file beside each (`img.png` +
    `img.txt`), or a kohya `train_data_dir` whose subfolders are named `<repeats>_<tokens>`."""
    dataset_config: str | None = None
    """Diffusion: a kohya sd-scripts dataset config (TOML: `[[datasets.subsets]]` with
    `image_dir`, `num_repeats`, `caption_extension`, `class_tokens`, `is_reg`)."""
    concept: str | None = None
    """Diffusion, built-in data: one class of the embedded images (`giraffe`, `seven`, ...) as
    a new concept (embedded model only)."""
    instance_prompt: str | None = None
    """Diffusion: the caption of images without a caption file (DreamBooth's instance
    prompt, e.g. `a photo of sks dog`); built-in concepts: `a silhouette of a <concept>`."""
    prompts: list[str] | None = None
    """Diffusion: prompts of the fixed-seed evaluation samples; default: the instance prompt
    (or the most frequent caption)."""
    eval_images: str | None = None
    """Diffusion: reference images the samples are compared with; default: the training
    images (as DreamBooth's DINO and CLIP-I scores do)."""
    class_prompt: str | None = None
    """Diffusion: prior preservation's class prompt (`a photo of a dog`): `prior_images`
    images are sampled from the model as it is before the task and trained on with
    `prior_weight` (DreamBooth)."""
    prior_images: int = Field(0, ge=0, le=10000)
    """Diffusion: number of prior-preservation images (0: off)."""
    prior_weight: float = Field(1.0, ge=0)
    """Diffusion: loss weight of the prior-preservation images (and of `is_reg` subsets)."""
    format: Literal["auto", "text", "prompt_completion", "chat", "qa"] = "auto"
    """Causal LM: how examples are read: `text` (column `text_column`), `prompt_completion`
    (`prompt`, `completion`), `chat` (`messages`: a list of {role, content}), `qa`
    (`question`, `answer`); `auto` picks the one whose columns the file has."""
    scorer: Literal["auto", "accuracy", "exact_match", "perplexity", "dino", "clip_i",
                    "silhouette"] = "auto"
    """How the held-out split is scored: classifier `accuracy`; causal LM `exact_match` of
    greedy answers (normalised) or `perplexity` of the held-out tokens; diffusion: the mean
    cosine similarity of fixed-seed samples to the reference images under `dino`, `clip_i`,
    or `silhouette` (the embedded model's stand-in encoder); `auto`: accuracy for a
    classifier, exact match for `qa` tasks, perplexity otherwise; diffusion: dino, else clip_i,
    else silhouette for the embedded model."""
    text_column: str = "text"
    """Column holding the input text."""
    label_column: str = "label"
    """Classifier: column holding the class label (string or integer)."""
    train_per_class: int = Field(200, ge=1)
    """Built-in data only: training examples per class."""
    eval_per_class: int = Field(100, ge=1)
    """Built-in data only: held-out examples per class."""
    max_train_examples: int | None = Field(None, ge=1)
    """Keep at most this many training examples (a fixed, seeded sample)."""
    repeats: int = Field(1, ge=1, le=1000)
    """How many times this source appears per epoch (kohya's num_repeats), as new or replayed
    data."""
    weight: float | None = Field(None, gt=0)
    """Sampling weight of this source in a mixed stream; if any source has one, batches are drawn
    by weight instead of by repeats."""

    @model_validator(mode="after")
    def _one_source(self) -> TaskConfig:
        files = self.train is not None or self.eval is not None
        built_in = [k for k in ("wordnet", "image_classes", "facts", "images", "dataset_config",
                                "concept")
                    if getattr(self, k) is not None]
        if (files and built_in) or len(built_in) > 1:
            raise ValueError("give one data source: `train`+`eval` files, `wordnet` categories, "
                             "`image_classes`, `facts`, `images`, `dataset_config` or `concept`")
        if not files and not built_in:
            raise ValueError("a task needs `train` and `eval` files, `wordnet` categories or "
                             "`image_classes` (classifier), `facts` (causal LM), or `images`, "
                             "`dataset_config` or `concept` (diffusion)")
        if self.prior_images and not self.class_prompt:
            raise ValueError("prior_images needs class_prompt (the prompt the prior images are "
                             "sampled with)")
        if files and (self.train is None or self.eval is None):
            missing = "eval" if self.eval is None else "train"
            raise ValueError(f"`{missing}` is missing: a task needs both a train and a held-out "
                             "file")
        if self.wordnet is not None and len(set(self.wordnet)) < 2:
            raise ValueError("`wordnet` needs at least two distinct categories (one class each)")
        if self.image_classes is not None and len(set(self.image_classes)) < 2:
            raise ValueError("`image_classes` needs at least two distinct classes")
        return self


class UpstreamConfig(Strict):
    kind: Literal["auto", "wordnet_retrieval", "classes", "general_text", "text_file",
                  "concepts", "sample_drift", "none"] = "auto"
    """Upstream probe, what the base could do before training: `wordnet_retrieval` (classifier:
    find a gloss's word among candidates by embedding similarity, no head involved),
    `classes` (image classifier: accuracy of the model's own pretrained classification head,
    frozen, on held-out images of its classes: the embedded vision models' held-out split, or
    `images`), `general_text` (causal LM: perplexity on held-out general text shipped with
    the package),
    `text_file` (causal LM: perplexity on `file`), `concepts` (embedded diffusion model: samples
    of its pretraining classes against their real images), `sample_drift` (diffusion: samples
    of `prompts` against the starting model's samples at the same seeds), `none`; `auto`: the
    family's built-in probe."""
    size: int = Field(500, ge=10)
    """Number of gloss/word pairs, or of general-text documents."""
    file: str | None = None
    """`text_file` only: a file of general text (column `text`) the base model is good at,
    relative to the config file (a sample of its pretraining-like data)."""
    images: str | None = None
    """`classes` only: a folder with one subfolder of held-out images per pretraining class,
    named as in the model's `id2label` (unknown names are an error)."""
    prompts: list[str] | None = None
    """Diffusion `sample_drift`: the prompts (default: a few generic ones)."""


class StrategyConfig(Strict):
    name: str = "naive"
    """Registered strategy name (see `continual-lora strategies`)."""
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=64)
    """Name of this strategy's row in a bench (default: the strategy name), to compare one
    strategy under several options (olora with λ1 0.5 and 5, full_ft with and without
    replay)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Strategy options, validated by the strategy's own schema."""


# What each model family accepts: task data sources, scorers, upstream probes (first: default).
ALL_SOURCES = ("train", "wordnet", "image_classes", "facts", "images", "dataset_config", "concept")
FAMILY_FITS: dict[str, dict[str, tuple[str, ...]]] = {
    "classifier": {"sources": ("train", "wordnet", "image_classes"), "scorers": ("accuracy",),
                   "upstream": ("wordnet_retrieval", "classes")},
    "causal_lm": {"sources": ("train", "facts"), "scorers": ("exact_match", "perplexity"),
                  "upstream": ("general_text", "text_file")},
    "diffusion": {"sources": ("images", "dataset_config", "concept"),
                  "scorers": ("dino", "clip_i", "silhouette"),
                  "upstream": ("concepts", "sample_drift")},
}
DIFFUSION_ONLY = ("instance_prompt", "prompts", "eval_images", "class_prompt", "prior_images",
                  "prior_weight")


class RunConfig(Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    """Run name, used in the output folder name."""
    seed: int = 0
    """Seed for data sampling, initialisation and shuffling."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The base model."""
    lora: LoraConfigModel = Field(default_factory=LoraConfigModel)
    """The LoRA adapter."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The optimisation schedule, per task."""
    tasks: list[TaskConfig] = Field(min_length=1)
    """The task sequence, in order."""
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    """The upstream probe: what the base could do before training."""
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    """How each new task is learned."""
    data_dir: str | None = None
    """Folder that must hold every task file; when set, a path that leads out of it (through
    `..`, an absolute path or a symbolic link) is an error. Use it for configs you did not
    write."""
    output_dir: str = "runs"
    """Folder under which run folders are created."""
    overwrite: bool = False
    """Replace an existing run folder of the same name (off: an existing folder is an error)."""
    base_dir: str | None = Field(None, exclude=True)
    """Folder relative paths are resolved against (the config file's folder); set by the loader."""

    @model_validator(mode="after")
    def _fits_family(self) -> RunConfig:
        """Data sources, scorers and probes that the model family cannot use are errors."""
        family, up = self.model.family, self.upstream
        fits = FAMILY_FITS[family]
        if up.kind == "auto":
            kind = fits["upstream"][0]
            if family == "diffusion" and self.model.name_or_path != EMBEDDED_DIFFUSION:
                kind = "sample_drift"  # only the embedded model has real images of its classes
            if family == "classifier" and (self.model.name_or_path in EMBEDDED_VISION
                                           or up.images is not None):
                kind = "classes"
            object.__setattr__(up, "kind", kind)
        if up.kind != "none" and up.kind not in fits["upstream"]:
            raise ValueError(f"upstream.kind {up.kind!r} does not score a {family} model; use "
                             f"{' or '.join(fits['upstream'])}, or none")
        if up.kind == "concepts" and self.model.name_or_path != EMBEDDED_DIFFUSION:
            raise ValueError("upstream.kind 'concepts' needs the embedded diffusion model (it "
                             "knows its pretraining classes); use sample_drift")
        if up.kind == "classes" and up.images is None and \
                self.model.name_or_path not in EMBEDDED_VISION:
            raise ValueError("upstream.kind 'classes' needs upstream.images (a folder of held-out "
                             "images, one subfolder per class of the model's id2label) unless "
                             "the model is embedded:vit or embedded:resnet")
        if up.images is not None and up.kind != "classes":
            raise ValueError("upstream.images is used by upstream.kind classes only")
        if (up.kind == "text_file") != (up.file is not None):
            raise ValueError("upstream.file is needed by, and only by, upstream.kind text_file")
        if up.prompts is not None and up.kind != "sample_drift":
            raise ValueError("upstream.prompts is used by upstream.kind sample_drift only")
        for i, task in enumerate(self.tasks):
            where = f"tasks.{i} ({task.name})"
            sources = [k for k in ALL_SOURCES if getattr(task, k) is not None]
            wrong = [k for k in sources if k not in fits["sources"]]
            if wrong:
                raise ValueError(f"{where}.{wrong[0]}: not a data source of a {family} model; it "
                                 f"takes {', '.join(fits['sources'])}")
            if task.scorer != "auto" and task.scorer not in fits["scorers"]:
                raise ValueError(f"{where}.scorer {task.scorer!r} does not score a {family} "
                                 f"model; use {' or '.join(fits['scorers'])}")
            if family != "causal_lm" and task.format != "auto":
                raise ValueError(f"{where}.format is for causal LMs; a {family} model reads "
                                 "its own columns")
            # non-default values: a saved config.yaml writes every field out, defaults included
            used = [k for k in DIFFUSION_ONLY
                    if getattr(task, k) != TaskConfig.model_fields[k].default]
            if family != "diffusion" and used:
                raise ValueError(f"{where}.{used[0]} is for model.family diffusion")
            if task.concept is not None and self.model.name_or_path != EMBEDDED_DIFFUSION:
                raise ValueError(f"{where}.concept: built-in concepts are classes of the embedded "
                                 "images, for the embedded diffusion model; give `images` or "
                                 "`dataset_config`")
            if family == "diffusion" and task.scorer == "silhouette" and \
                    self.model.name_or_path != EMBEDDED_DIFFUSION:
                raise ValueError(f"{where}.scorer 'silhouette' is the embedded model's stand-in "
                                 "encoder; set model.dino or model.clip and use dino or clip_i")
        return self

    @field_validator("tasks")
    @classmethod
    def _unique_task_names(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")
        return tasks

    def portable_dump(self) -> dict[str, Any]:
        """The config as plain data with its data and adapter paths made absolute, so that a
        copy saved in a run folder reads the same files from anywhere (`eval`, `--resume`)."""
        data = self.model_dump(mode="json", exclude={"base_dir"})
        for task in data["tasks"]:
            for key in ("train", "eval"):
                if task.get(key):
                    task[key] = str(self.resolve_path(task[key]).resolve())
        for section, key in (("lora", "init_adapter"), (None, "data_dir"), ("upstream", "file"),
                             ("upstream", "images")):
            node = data[section] if section else data
            if node.get(key):
                node[key] = str(self.resolve_path(node[key]).resolve())
        return data

    def resolve_path(self, path: str) -> Path:
        """A path from the config, resolved against the config file's folder."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self.base_dir:
            p = Path(self.base_dir) / p
        return p


class BenchConfig(Strict):
    """A bench: several strategies (and ranks) over one sequence, side by side."""

    name: str = Field("bench", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    """Bench name, used in the output folder name."""
    strategies: list[StrategyConfig] = Field(min_length=1)
    """Strategies to compare (each with its options)."""
    ranks: list[int] | None = None
    """LoRA ranks to sweep (default: `run.lora.r` only). Strategies without LoRA run once."""
    include_joint: bool = True
    """Add a `joint` row (the upper bound) when it is not already listed."""
    run: RunConfig
    """The shared run settings: model, LoRA, schedule, tasks, upstream, output."""

    @field_validator("strategies")
    @classmethod
    def _unique_rows(cls, strategies: list[StrategyConfig]) -> list[StrategyConfig]:
        labels = [s.label or s.name for s in strategies]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"strategies {dupes} appear more than once: give each a distinct "
                             "`label` (the row's name)")
        return strategies

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, ranks: list[int] | None) -> list[int] | None:
        if ranks is not None and (not ranks or any(r < 1 for r in ranks)):
            raise ValueError("ranks must be a non-empty list of integers ≥ 1")
        return ranks


# ---------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides, with errors that name the field.


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "lora.r=4"]` → nested dict. Values are YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r} is not of the form dotted.key=value (e.g. train.lr=1e-4)"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        value = _number_if_numeric(value)
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part}")
        node[parts[-1]] = value
    return tree


def _number_if_numeric(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; on a command line it means a number."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge `extra` into a copy of `base`, recursing into mappings."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of settings (key: value), "
            f"found a {type(data).__name__}"
        )
    return data


def format_validation_error(exc: ValidationError, source: str, prefix: str = "") -> str:
    """One line per problem: `source: field.path: message (got value)`."""
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the documented fields)"
        got = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else (
            f" (got {got!r})"
        )
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def validate_strategy_options(strategy: StrategyConfig, where: str) -> None:
    """Check `strategy.name` is registered and its options fit the strategy's schema."""
    from continual_lora.registry import get_strategy, strategy_names

    try:
        cls = get_strategy(strategy.name)
    except KeyError:
        raise ConfigError(
            f"{where}.name: unknown strategy {strategy.name!r}; "
            f"available: {', '.join(strategy_names())}"
        ) from None
    try:
        cls.Options.model_validate(strategy.options)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "config", f"{where}.options")) from None


def load_run_config(path: str | Path | None, overrides: list[str] | None = None,
                    data: dict[str, Any] | None = None) -> RunConfig:
    """Build a `RunConfig` from a YAML file (or a mapping) plus dotted overrides."""
    source = str(path) if path else "config"
    raw = read_yaml_mapping(Path(path)) if path else dict(data or {})
    raw = deep_merge(raw, parse_overrides(overrides or []))
    if path:
        raw["base_dir"] = str(Path(path).resolve().parent)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    validate_strategy_options(cfg.strategy, "strategy")
    return cfg


def load_bench_config(path: str | Path | None, overrides: list[str] | None = None,
                      data: dict[str, Any] | None = None) -> BenchConfig:
    """Build a `BenchConfig` from a YAML file (or a mapping) plus dotted overrides."""
    source = str(path) if path else "config"
    raw = read_yaml_mapping(Path(path)) if path else dict(data or {})
    raw = deep_merge(raw, parse_overrides(overrides or []))
    if path and isinstance(raw.get("run"), dict):
        raw["run"] = {**raw["run"], "base_dir": str(Path(path).resolve().parent)}
    try:
        cfg = BenchConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    for i, strategy in enumerate(cfg.strategies):
        validate_strategy_options(strategy, f"strategies.{i}")
    return cfg


def is_bench_config(path: str | Path) -> bool:
    """A YAML with a `strategies` list is a bench config."""
    return "strategies" in read_yaml_mapping(Path(path))
