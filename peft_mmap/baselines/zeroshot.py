"""Zero-shot CLIP: class prompts from each task's template, no trainable parameters."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..classifier import CLIPTaskClassifier, TaskSpec
from .persistence import TrainableStateMixin


class ZeroShotCLIP(TrainableStateMixin, CLIPTaskClassifier):
    """Plain CLIP with every parameter frozen; logits are exactly CLIP's ``logits_per_image``."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Sequence[TaskSpec] | dict[str, Sequence[str]],
    ) -> None:
        super().__init__(clip, tokenizer, tasks)
        clip.requires_grad_(False)
