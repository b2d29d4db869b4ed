"""`CLIPTaskClassifier`: CLIP as an image classifier over several named tasks.

Every method of the library (MmAP, zero-shot and the baselines) is a subclass: it classifies an image of
task ``t`` by the cosine similarity of its image feature with the text features of ``t``'s class prompts
(paper Eq. 5), scaled, plus the model's ``logit_bias`` where it has one (SigLIP): the model's own logits.
The model's family (`peft_mmap.families`: CLIP, SigLIP, MetaCLIP 2) gives the default template and how
class prompts are padded. Subclasses change how the two towers encode (prompts, adapters, fine-tuned
weights); the trainer, evaluation and benchmark code only use the interface defined here.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from transformers import AutoProcessor, CLIPModel, PreTrainedTokenizerBase, ProcessorMixin

from .base_models import load_pretrained
from .families import Family, model_family
from .files import check_safe_name
from .options import DEFAULT_TEMPLATE


class _RegistrationCounter:
    """Counts every parameter and submodule registration in the process (torch's global registration hooks).

    A classifier keeps its list of parameters while the count is unchanged, so checking its text-feature
    cache costs a sum over that list instead of a walk over every submodule.
    """

    def __init__(self) -> None:
        self.value = 0

    def __call__(self, module: nn.Module, name: str, value: object) -> None:
        self.value += 1


_REGISTRATIONS = _RegistrationCounter()
_VERSION = operator.attrgetter("_version")
register_module_parameter_registration_hook(_REGISTRATIONS)
register_module_module_registration_hook(_REGISTRATIONS)


@dataclass
class TaskSpec:
    """One image-recognition task: its name, class names and the text template of its class prompts."""

    name: str
    classnames: list[str]
    template: str = DEFAULT_TEMPLATE
    prompts: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_safe_name(self.name, "task name")
        if isinstance(self.classnames, str) or not isinstance(self.classnames, Sequence):
            raise TypeError(f"Task {self.name!r}: classnames must be a list of str, got {self.classnames!r}.")
        self.classnames = list(self.classnames)
        if not self.classnames:
            raise ValueError(f"Task {self.name!r} has no classes: expected at least one class name.")
        bad = [c for c in self.classnames if not isinstance(c, str) or not c.strip()]
        if bad:
            raise ValueError(f"Task {self.name!r}: class names must be non-empty strings, got {bad!r}.")
        if len(set(self.classnames)) != len(self.classnames):
            dupes = sorted({c for c in self.classnames if self.classnames.count(c) > 1})
            raise ValueError(f"Task {self.name!r}: duplicate class names {dupes}.")
        if not isinstance(self.template, str) or len(re.findall(r"\{\}", self.template)) != 1:
            raise ValueError(
                f"Task {self.name!r}: template {self.template!r} must contain exactly one '{{}}' for the class name."
            )
        self.prompts = [self.template.format(c) for c in self.classnames]

    def to_dict(self) -> dict:
        return {"name": self.name, "classnames": list(self.classnames), "template": self.template}


def context_template(template: str, kept_words: str = "") -> str:
    """The class-prompt template that follows a learnable context replacing ``template``'s words before ``{}``
    (CoOp, MaPLe, MmAP's ``text_placement="replace"``): ``kept_words`` (words of an initialising phrase that
    the context does not cover), the class name and ``template``'s text after ``{}``:
    ``"a photo of a {}."`` gives ``"{}."``, with ``kept_words="of a"`` ``"of a {}."``."""
    suffix = template.split("{}", 1)[1]
    return f"{kept_words} {{}}{suffix}" if kept_words else f"{{}}{suffix}"


#: The word whose token fills the placeholder positions of a class prompt (CoOp's "X X X X {class}.").
PLACEHOLDER_WORD = "X"


def tokenize_with_placeholders(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], count: int, max_length: int
) -> dict[str, torch.Tensor]:
    """``texts`` tokenized (padded to the longest) with ``count`` placeholder tokens after SOS:
    ``[SOS, X * count, text tokens, EOS, pad...]``; ``input_ids`` and ``attention_mask`` ``(C, count + L)``.

    The placeholders are one token each (`PLACEHOLDER_WORD`), whatever the tokenizer merges in running text.
    Raises ``ValueError`` when the result exceeds the text encoder's ``max_length`` positions.
    """
    encoded = tokenizer(list(texts), padding="longest", return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    placeholder = tokenizer(PLACEHOLDER_WORD, add_special_tokens=False)["input_ids"]
    if len(placeholder) != 1:
        raise ValueError(f"The tokenizer splits the placeholder {PLACEHOLDER_WORD!r} into {placeholder}.")
    if count + ids.shape[1] > max_length:
        raise ValueError(
            f"{count} placeholder tokens + class prompts of up to {ids.shape[1]} tokens (with SOS/EOS) exceed the "
            f"text encoder's {max_length} positions; use fewer prompt tokens or shorter class names."
        )
    fill = torch.full((ids.shape[0], count), placeholder[0], dtype=ids.dtype)
    return {
        "input_ids": torch.cat([ids[:, :1], fill, ids[:, 1:]], dim=1),
        "attention_mask": torch.cat(
            [mask[:, :1], torch.ones_like(fill, dtype=mask.dtype), mask[:, 1:]], dim=1
        ),
    }


def as_task_specs(
    tasks: Sequence[TaskSpec] | dict[str, Sequence[str]], template: str = DEFAULT_TEMPLATE
) -> dict[str, TaskSpec]:
    """Normalise ``[TaskSpec, ...]`` or ``{name: classnames}`` to ``{name: TaskSpec}`` (names unique); tasks
    given by their class names get ``template``."""
    if isinstance(tasks, dict):
        specs = [c if isinstance(c, TaskSpec) else TaskSpec(n, list(c), template) for n, c in tasks.items()]
    else:
        specs = list(tasks)
    if not specs:
        raise ValueError("At least one task is needed.")
    by_name: dict[str, TaskSpec] = {}
    for spec in specs:
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"Expected TaskSpec, got {type(spec).__name__}.")
        if spec.name in by_name:
            raise ValueError(f"Duplicate task name {spec.name!r}.")
        by_name[spec.name] = spec
    return by_name


def load_clip_processor(model: str | os.PathLike, **kwargs) -> ProcessorMixin:
    """The checkpoint's processor (``AutoProcessor.from_pretrained(model)``: a ``CLIPProcessor``,
    ``SiglipProcessor``, ...) with the PIL image backend, chosen explicitly; ``model`` is a model reference
    (see `peft_mmap.base_models.load_pretrained`).

    transformers (>= 5.4) otherwise picks torchvision when it is installed and PIL when it is not, so the
    pixel values, and every accuracy, would depend on what else is installed. PIL matches the original CLIP
    preprocessing (a PIL bicubic resize) and is the backend the shipped tiny CLIP was trained with.
    """
    return load_pretrained(AutoProcessor, model, backend="pil", **kwargs)


class CLIPTaskClassifier(nn.Module):
    """A dual encoder (CLIP, SigLIP, MetaCLIP 2) classifying images of named tasks against their class prompts.

    ``forward(pixel_values, task)`` returns logits ``(B, C_task)`` for one task name, or ``(B, C_max)`` for a
    list of one task per sample (columns past a sample's own class count are ``-inf``). Class text features
    are computed once per task and cached while the model is in eval mode; the cache is keyed on the
    in-place version counters of all parameters (the parameter list itself is kept until a parameter or
    module is registered anywhere), so an optimizer step or a ``load_state_dict`` invalidates it, and it is
    bypassed entirely in training mode.

    Args:
        clip: a transformers ``CLIPModel``, ``SiglipModel`` or ``MetaClip2Model`` (possibly inside a PEFT
            model; see `clip_model`). SigLIP 2's NaFlex ``Siglip2Model`` is refused (its images are patch
            sequences); its fixed-resolution checkpoints are ``SiglipModel``s.
        tokenizer: the checkpoint's tokenizer.
        tasks: the tasks this classifier serves; tasks given as ``{name: classnames}`` get the family's
            template (`peft_mmap.families.Family.template`).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Sequence[TaskSpec] | dict[str, Sequence[str]],
    ) -> None:
        super().__init__()
        self.family: Family = classifier_family(clip)
        self.clip = clip
        self.tokenizer = tokenizer
        self.tasks = as_task_specs(tasks, self.family.template)
        self._tokens: dict[str, dict[str, torch.Tensor]] = {}
        self._text_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._watched: tuple[int, list[nn.Parameter]] = (-1, [])

    # ---- hooks for subclasses -------------------------------------------------------------------
    @property
    def clip_model(self) -> CLIPModel:
        """The underlying ``CLIPModel`` (whose towers may be wrapped by adapters)."""
        return self.clip

    def for_task(self, task: str) -> contextlib.AbstractContextManager[None]:
        """Within the block, the towers encode for ``task`` (e.g. with its adapters). Default: nothing to do.

        Entered once per encoding call (`text_features`, `forward`): the choice lives only as long as the call.
        """
        return contextlib.nullcontext()

    def encode_text(self, task: str) -> torch.Tensor:
        """Unnormalised class text features of ``task``: ``(C, D)``, called within ``for_task(task)``."""
        return self.clip_model.get_text_features(**self.task_tokens(task)).pooler_output

    def encode_images(self, pixel_values: torch.Tensor, task: str) -> torch.Tensor:
        """Unnormalised image features ``(B, D)`` for images ``(B, 3, H, W)`` of ``task``, within ``for_task(task)``."""
        return self.clip_model.get_image_features(pixel_values=pixel_values).pooler_output

    def encode_images_mixed(self, pixel_values: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        """Image features ``(B, D)`` when row ``i`` belongs to ``tasks[i]``. Default: one pass per task."""
        features: torch.Tensor | None = None
        for task in dict.fromkeys(tasks):
            rows = torch.tensor([i for i, t in enumerate(tasks) if t == task], device=pixel_values.device)
            with self.for_task(task):
                part = self.encode_images(pixel_values[rows], task)
            if features is None:
                features = part.new_empty(len(tasks), part.shape[-1])
            features = features.index_copy(0, rows, part)
        return features

    # ---- shared machinery ----------------------------------------------------------------------------
    def check_task(self, task: str) -> TaskSpec:
        """The spec of ``task``; ``KeyError`` listing the known tasks if it is unknown."""
        try:
            return self.tasks[task]
        except (KeyError, TypeError):
            raise KeyError(f"Unknown task {task!r}; known tasks: {sorted(self.tasks)}.") from None

    def tokenize_task(self, task: str) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``(C, L)`` of ``task``'s class prompts, which `task_tokens`
        caches. Default: padded as the family's processor pads (CLIP: to the longest prompt, not 77; SigLIP: to
        the text tower's 64 positions), with the attention mask only where the tokenizer gives one (SigLIP's
        does not: its text tower was trained attending to the padding)."""
        padding = self.family.text_padding(self.clip_model.config.text_config.max_position_embeddings)
        encoded = self.tokenizer(self.check_task(task).prompts, return_tensors="pt", **padding)
        return {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}

    def task_tokens(self, task: str) -> dict[str, torch.Tensor]:
        """Tokenized class prompts of ``task`` (`tokenize_task`), cached, on the model's device: ``(C, L)`` each."""
        if task not in self._tokens:
            self._tokens[task] = self.tokenize_task(task)
        device = self.logit_scale.device
        tokens = self._tokens[task]
        if tokens["input_ids"].device != device:
            tokens = self._tokens[task] = {k: v.to(device) for k, v in tokens.items()}
        return tokens

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip_model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """The model's logit bias (SigLIP's, added after the scale), or ``None`` (CLIP, MetaCLIP 2)."""
        return getattr(self.clip_model, "logit_bias", None)

    def _logits(self, scale: torch.Tensor, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The model's logits ``(B, C)`` from normalised image ``(B, D)`` and text ``(C, D)`` features:
        ``scale * cos`` (+ ``logit_bias``). Cross-entropy over a task's classes and the ranking of classes are
        the same with or without the bias (one constant per row)."""
        logits = scale * images @ text.t()
        bias = self.logit_bias
        return logits if bias is None else logits + bias

    def _cache_key(self, task: str) -> tuple:
        registrations, params = self._watched
        if registrations != _REGISTRATIONS.value:
            params = list(self.parameters())
            self._watched = (_REGISTRATIONS.value, params)
        versions = sum(map(_VERSION, params))  # no Python frame per parameter
        return (task, len(params), versions, self.logit_scale.device, self._activation_key(task))

    def _activation_key(self, task: str) -> object:
        """Anything besides parameter values that changes ``task``'s text features. Default: nothing."""
        return None

    def text_features(self, task: str) -> torch.Tensor:
        """L2-normalised class text features of ``task``: ``(C, D)``; cached in eval mode."""
        with self.for_task(task):
            return self._text_features(task)

    def _text_features(self, task: str) -> torch.Tensor:
        """`text_features`, called within ``for_task(task)``."""
        use_cache = not (self.training and torch.is_grad_enabled())
        if use_cache:
            key = self._cache_key(task)
            cached = self._text_cache.get(task)
            if cached is not None and cached[0] == key:
                return cached[1]
        features = F.normalize(self.encode_text(task), dim=-1)
        if use_cache:
            self._text_cache[task] = (key, features.detach())
            return self._text_cache[task][1]
        return features

    def clear_cache(self) -> None:
        """Drop cached text features (they are also invalidated automatically)."""
        self._text_cache.clear()

    def forward(self, pixel_values: torch.Tensor, task: str | Sequence[str]) -> torch.Tensor:
        """Logits ``(B, C_task)`` for one task, or ``(B, C_max)`` (``-inf`` padded) for one task per row."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}.")
        size = self.clip_model.config.vision_config.image_size
        if tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"pixel_values must be {size}x{size} images for this CLIP (vision_config.image_size), got "
                f"{pixel_values.shape[2]}x{pixel_values.shape[3]}; preprocess them with the model's image processor."
            )
        scale = self.logit_scale.exp()
        if isinstance(task, str):
            spec = self.check_task(task)
            if pixel_values.shape[0] == 0:
                return pixel_values.new_zeros(0, len(spec.classnames))
            with self.for_task(task):
                text = self._text_features(task)
                images = F.normalize(self.encode_images(pixel_values, task), dim=-1)
            return self._logits(scale, images, text)
        tasks = list(task)
        if len(tasks) != pixel_values.shape[0]:
            raise ValueError(f"Got {len(tasks)} task names for a batch of {pixel_values.shape[0]} images.")
        specs = [self.check_task(t) for t in tasks]
        width = max((len(s.classnames) for s in specs), default=0)
        if not tasks:
            return pixel_values.new_zeros(0, width)
        texts = {t: self.text_features(t) for t in dict.fromkeys(tasks)}
        images = F.normalize(self.encode_images_mixed(pixel_values, tasks), dim=-1)
        logits = images.new_full((len(tasks), width), float("-inf"))
        for t, text in texts.items():
            rows = torch.tensor([i for i, name in enumerate(tasks) if name == t], device=images.device)
            logits = logits.index_put(
                (rows[:, None], torch.arange(text.shape[0], device=images.device)),
                self._logits(scale, images[rows], text),
            )
        return logits

    def trainable_parameter_count(self) -> int:
        """Parameters that training updates."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def classifier_family(clip: nn.Module) -> Family:
    """The family of ``clip`` (`peft_mmap.families.model_family`), refusing what a classifier cannot serve: a
    single tower, or SigLIP 2's NaFlex ``Siglip2Model``, whose images are patch sequences with
    ``pixel_attention_mask`` and ``spatial_shapes`` rather than ``(B, 3, H, W)`` pixels."""
    family = model_family(clip)
    model = clip.get_base_model() if hasattr(clip, "get_base_model") else clip
    if family.patch_inputs:
        raise ValueError(
            f"{type(model).__name__} ({family.label}) takes images as patch sequences with "
            "pixel_attention_mask and spatial_shapes; the task classifiers, trainer and CLI take fixed-size "
            "images. Use a fixed-resolution SigLIP 2 checkpoint (a SiglipModel, e.g. "
            "google/siglip2-base-patch16-256), or the PEFT method directly (get_peft_model supports it)."
        )
    if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise ValueError(
            f"A task classifier needs both towers of a dual encoder (e.g. CLIPModel, SiglipModel, "
            f"MetaClip2Model); got {type(model).__name__}."
        )
    return family
