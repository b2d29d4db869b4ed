"""Full fine-tuning: every CLIP weight trainable, one backbone per task or one shared by all tasks.

The logit scale stays frozen at CLIP's value in both forms (no baseline trains it), so all task copies
share one temperature. Memory: the per-task form holds ``T`` complete copies of CLIP (``copy.deepcopy``),
about ``T x 600 MB`` in fp32 for ViT-B/16 plus their gradients and optimizer state: meant for small models
and for parameter counting on the ``meta`` device.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from ..classifier import CLIPTaskClassifier, TaskSpec, as_task_specs
from .persistence import TrainableStateMixin


class FullFineTune(TrainableStateMixin, CLIPTaskClassifier):
    """CLIP with all weights (but the logit scale) trainable.

    Args:
        clip: a transformers ``CLIPModel``; it is the backbone of the first task (or of all tasks).
        tokenizer: its tokenizer.
        tasks: the tasks.
        per_task: give each further task its own deep copy of ``clip`` (single-task fine-tuning).
    """

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Sequence[TaskSpec] | dict[str, Sequence[str]],
        per_task: bool = False,
    ) -> None:
        specs = as_task_specs(tasks)
        clip.requires_grad_(True)
        clip.logit_scale.requires_grad_(False)
        names = list(specs)
        copies = {name: copy.deepcopy(clip) for name in names[1:]} if per_task else {}
        super().__init__(clip, tokenizer, specs)
        self.per_task = per_task
        self.copies = nn.ModuleDict(copies)
        self._active = names[0]

    @property
    def clip_model(self) -> CLIPModel:
        """The backbone of the active task."""
        return self.copies[self._active] if self._active in self.copies else self.clip  # noqa: SIM401 (ModuleDict has no get)

    @contextlib.contextmanager
    def for_task(self, task: str) -> Iterator[None]:
        """Within the block, ``clip_model`` is ``task``'s backbone (the shared one in the multi-task form)."""
        previous, self._active = self._active, self.check_task(task).name
        try:
            yield
        finally:
            self._active = previous


def _encoder_parameters(config) -> int:
    d, i = config.hidden_size, config.intermediate_size
    per_layer = 4 * (d * d + d) + 2 * 2 * d + (d * i + i) + (i * d + d)
    return config.num_hidden_layers * per_layer


def clip_parameters(config: CLIPConfig) -> int:
    """All parameters of a ``CLIPModel`` (closed form; includes the logit scale)."""
    t, v = config.text_config, config.vision_config
    text = (
        (t.vocab_size + t.max_position_embeddings) * t.hidden_size
        + _encoder_parameters(t)
        + 2 * t.hidden_size
    )
    positions = (v.image_size // v.patch_size) ** 2 + 1
    vision = (
        v.hidden_size  # class embedding
        + v.num_channels * v.patch_size**2 * v.hidden_size  # patch conv, no bias
        + positions * v.hidden_size
        + 2 * 2 * v.hidden_size  # pre and post layer norms
        + _encoder_parameters(v)
    )
    projections = (t.hidden_size + v.hidden_size) * config.projection_dim
    return text + vision + projections + 1
