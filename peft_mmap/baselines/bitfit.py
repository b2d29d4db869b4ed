"""BitFit (Ben Zaken et al., 2022): train every bias of CLIP (linear and layer-norm), nothing else.

One set of biases shared by all tasks, as in the paper's multi-task table.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import CLIPConfig, PreTrainedTokenizerBase

from ..classifier import CLIPTaskClassifier, TaskSpec
from .persistence import TrainableStateMixin


class BitFit(TrainableStateMixin, CLIPTaskClassifier):
    """CLIP with only its parameters named ``*.bias`` trainable."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Sequence[TaskSpec] | dict[str, Sequence[str]],
    ) -> None:
        super().__init__(clip, tokenizer, tasks)
        for name, param in clip.named_parameters():
            param.requires_grad_(name.rsplit(".", 1)[-1] == "bias")


def clip_bias_parameters(config: CLIPConfig) -> int:
    """Bias parameters of a ``CLIPModel``: per layer 4 attention, 2 MLP and 2 layer-norm biases, plus the
    final (text) and pre/post (vision) layer norms."""
    t, v = config.text_config, config.vision_config

    def per_layer(c) -> int:
        return 4 * c.hidden_size + 2 * c.hidden_size + c.intermediate_size + c.hidden_size

    text = t.num_hidden_layers * per_layer(t) + t.hidden_size
    vision = v.num_hidden_layers * per_layer(v) + 2 * v.hidden_size
    return text + vision
