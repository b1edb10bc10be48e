"""Image classifiers: any transformers image model (ViT, DeiT, ResNet, ConvNeXt, Swin ...) from
a hub id or a local folder, with a head per task and the model's own pretrained head kept frozen
as the upstream head.

A checkpoint saved as `...ForImageClassification` (what hub image classifiers are) is split in
two: the base model (`model.<base_model_prefix>`, e.g. `vit` or `resnet`), which is what LoRA
adapts and what adapters are saved against (so they load on `AutoModel.from_pretrained` of the
same checkpoint), and its classifier, frozen, which scores the upstream classes (`id2label`)
on held-out images of them: the model's upstream accuracy after every task (seed 002). A
checkpoint without a classification head loads as `AutoModel`, with no upstream head.

Features are what the checkpoint's own head reads: the [CLS] token of the last hidden state for
ViT and DeiT, the pooled output for convolutional models (ResNet, ConvNeXt, ...), else the
mean over positions. Task heads see them L2-normalised (`model.normalize`), the upstream head
raw, as it was trained.

BatchNorm statistics stay frozen during training (`ImageClassifierModule.train`).

Images become pixels through the checkpoint's own image processor (`AutoImageProcessor`), once
per split, cached as float tensors.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from continual_lora.config import EMBEDDED_VISION, ConfigError, ModelConfig
from continual_lora.families.base import TaskScore
from continual_lora.families.classifier import ClassifierFamily, ClassifierModule
from continual_lora.families.common import DTYPES, fingerprint_module, resolve_model_path
from continual_lora.sequence import ClassProbe, TaskData

#: Model types whose classification head reads the [CLS] token of the last hidden state.
CLS_TOKEN_MODELS = ("vit", "deit")


def image_model_path(name_or_path: str) -> str:
    """The folder of an embedded vision model (built on first use), else as `resolve_model_path`."""
    if name_or_path in EMBEDDED_VISION:
        from continual_lora.embedded_vision import embedded_vision_path

        return str(embedded_vision_path(EMBEDDED_VISION[name_or_path]))
    return resolve_model_path(name_or_path)


def is_image_model(name_or_path: str, trust_remote_code: bool = False) -> bool:
    """Whether a model's config describes an image model (it has `num_channels`)."""
    if name_or_path in EMBEDDED_VISION:
        return True
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path),
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False  # the text family's loader reports what is wrong with it
    return hasattr(config, "num_channels") and not hasattr(config, "vocab_size")


def _linear_of(head: nn.Module) -> nn.Linear | None:
    """The Linear layer of a classification head (`Linear`, or `Sequential(Flatten, Linear)`
    as ResNet's); None for `Identity` or anything else."""
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if len(linears) == 1 else None


class ImageClassifierModule(ClassifierModule):
    """Backbone (possibly PEFT-wrapped) + task heads + the frozen upstream head."""

    def __init__(self, backbone: nn.Module, cfg: ModelConfig, cls_token: bool,
                 upstream_head: nn.Linear | None):
        super().__init__(backbone, cfg)
        self.cls_token = cls_token
        self.upstream_head = upstream_head

    def train(self, mode: bool = True) -> ImageClassifierModule:
        """As nn.Module.train, but BatchNorm layers stay in eval mode: their running
        statistics belong to the base model, not to the adapter, so a LoRA run that moved them
        would leave an adapter that does not reproduce the model it was scored as."""
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.backbone(pixel_values=pixel_values)
        if self.cls_token:
            return out.last_hidden_state[:, 0]
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(1)

    def head_input(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats, dim=-1) if self.cfg.normalize else feats

    def head_logits(self, key: str, feats: torch.Tensor) -> torch.Tensor:
        if key == "upstream":  # the pretrained head reads raw features
            return self.upstream_head(feats)
        return super().head_logits(key, feats)

    def forward(self, pixel_values, labels, task_ids, example_ids=None):
        return self.task_losses(self.features(pixel_values), labels, task_ids)


class ImageClassifierFamily(ClassifierFamily):
    """The classifier family for image models (selected when the model is an image model)."""

    modality = "image"
    score_definition = (
        "R[t][i]: accuracy on task i's held-out images after training through task t (row 0: "
        "before training). Tasks not trained yet are scored with their nearest-class-mean "
        "(prototype) head. U[t]: accuracy of the model's own pretrained head (frozen) on "
        "held-out images of its upstream classes.")

    def prepare_training(self, stream, tasks, train_cfg) -> str | None:
        """No lower-layer cache for image models (their stages are not one list of layers
        for CNNs, and pixels are not cached token ids): every step runs the whole model."""
        return None

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.path = image_model_path(cfg.name_or_path)
        self.processor = None
        self.upstream_labels: list[str] = []
        self._pixel_cache: dict[tuple[int, str], torch.Tensor] = {}
        self._num_channels = 3

    # -- loading -------------------------------------------------------------------------------

    def _load_full(self) -> tuple[nn.Module, nn.Linear | None, object]:
        """(base model, upstream head or None, config), frozen."""
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

        kwargs = {"trust_remote_code": self.cfg.trust_remote_code, "dtype": DTYPES[self.cfg.dtype]}
        try:
            config = AutoConfig.from_pretrained(self.path,
                                                trust_remote_code=self.cfg.trust_remote_code)
            with_head = any(a.endswith("ForImageClassification")
                            for a in (config.architectures or []))
            if with_head:
                full = AutoModelForImageClassification.from_pretrained(self.path, **kwargs)
                base = getattr(full, full.base_model_prefix)
                # most heads are `classifier`; a model without one keeps no upstream head
                classifier = getattr(full, "classifier", None)
                head = _linear_of(classifier) if classifier is not None else None
            else:
                base, head = AutoModel.from_pretrained(self.path, **kwargs), None
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"model.name_or_path: cannot load image model {self.cfg.name_or_path!r}: {exc}. "
                "Give a local folder with config.json, weights and preprocessor_config.json, or "
                "a hub id reachable from this machine.") from None
        base.requires_grad_(False)
        if head is not None:
            head.requires_grad_(False)
        return base, head, config

    def _load_backbone(self) -> nn.Module:
        return self._load_full()[0]

    def load(self) -> None:
        from transformers import AutoImageProcessor

        backbone, head, config = self._load_full()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "torchvision not installed: PIL backend"
                self.processor = AutoImageProcessor.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.name_or_path: {self.cfg.name_or_path!r} has no image "
                              f"processor (preprocessor_config.json): {exc}") from None
        self._num_channels = int(getattr(config, "num_channels", 3))
        self.hidden_size = int(getattr(config, "hidden_size", 0)
                               or config.hidden_sizes[-1])
        self.upstream_labels = ([config.id2label[i] for i in range(len(config.id2label))]
                                if head is not None else [])
        parts = nn.ModuleDict({"backbone": backbone, **({"head": head} if head else {})})
        self._fingerprint = fingerprint_module(parts)
        self.module = ImageClassifierModule(backbone, self.cfg,
                                            config.model_type in CLS_TOKEN_MODELS, head)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise ConfigError("moe's router reads text inputs; it does not route image models yet")

    # -- data ----------------------------------------------------------------------------------

    def _to_pil(self, item) -> Image.Image:
        mode = "L" if self._num_channels == 1 else "RGB"
        if isinstance(item, np.ndarray):
            image = Image.fromarray(item)
        elif isinstance(item, Image.Image):
            image = item
        else:
            try:
                with Image.open(item) as opened:
                    image = opened.copy()
            except OSError as exc:
                raise ConfigError(f"cannot read image {item}: {exc}") from None
        return image.convert(mode)

    def pixels(self, items: list, batch_size: int = 256) -> torch.Tensor:
        """Pixel values of images, through the model's image processor."""
        out = []
        for start in range(0, len(items), batch_size):
            images = [self._to_pil(x) for x in items[start:start + batch_size]]
            out.append(self.processor(images=images, return_tensors="pt")["pixel_values"])
        return torch.cat(out).to(DTYPES[self.cfg.dtype])

    def _inputs(self, task: TaskData, split: str) -> torch.Tensor:
        key = (task.index, split)
        if key not in self._pixel_cache:
            images = getattr(task, split).images
            if images is None:
                raise ConfigError(f"task {task.name}: the model {self.cfg.name_or_path!r} is an "
                                  "image model but the task holds text; give image folders, "
                                  "an image column or `image_classes`")
            self._pixel_cache[key] = self.pixels(images)
        return self._pixel_cache[key]

    def _batch_features(self, items: list) -> torch.Tensor:
        return self.module.features(torch.stack(items).to(self.device))

    def collate(self, examples: list[tuple[int, int]], tasks: dict[int, TaskData]) -> dict:
        pixel_values = torch.stack([self._inputs(tasks[t], "train")[i] for t, i in examples])
        return {"pixel_values": pixel_values.to(self.device), **self._targets(examples, tasks)}

    # -- scoring -------------------------------------------------------------------------------

    def upstream_columns(self, probe: ClassProbe) -> torch.Tensor:
        """The upstream head's column of each probe class (names as in `id2label`)."""
        if not self.upstream_labels:
            raise ConfigError(f"upstream.kind classes: {self.cfg.name_or_path!r} has no "
                              "classification head (config.architectures names no "
                              "...ForImageClassification); use upstream.kind none")
        unknown = [c for c in probe.classes if c not in self.upstream_labels]
        if unknown:
            raise ConfigError(f"upstream.images: classes {unknown[:10]} are not classes of the "
                              f"model's head; its id2label has {self.upstream_labels[:20]}"
                              f"{' ...' if len(self.upstream_labels) > 20 else ''}")
        return torch.tensor([self.upstream_labels.index(c) for c in probe.classes])

    def score_upstream(self, probe, batch_size: int) -> TaskScore:
        """Top-1 accuracy of the pretrained head, over all of its classes, on the probe."""
        if not isinstance(probe, ClassProbe):
            raise ConfigError("upstream.kind wordnet_retrieval scores a text encoder; for an "
                              "image model use upstream.kind classes (with upstream.images for "
                              "a model of your own) or none")
        columns = self.upstream_columns(probe)
        key = (0, "upstream")  # task indices start at 1
        if key not in self._pixel_cache:
            self._pixel_cache[key] = self.pixels(probe.images)
        feats = self._encode(self._pixel_cache[key], batch_size).to(self.device)
        with torch.no_grad():
            predicted = self.module.head_logits("upstream", feats).argmax(-1).cpu()
        correct = (predicted == columns[torch.as_tensor(probe.labels)]).numpy()
        return TaskScore(float(correct.mean()), correct, "upstream_head")

