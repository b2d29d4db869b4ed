"""VPT-deep (Jia et al., 2022): learnable vision tokens after CLS, new at every prompted layer.

The prompts enter after ``pre_layrnorm`` (as MmAP's) with no positional embedding and are replaced at each
of the first ``depth`` layers. Default: 8 tokens, the number of prompt tokens per layer a task gets in
grouped MmAP (group ``b=4`` + task ``b=4``), at every vision layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import CLIPConfig

from ..prompting import Tower, prompt_depth
from .prompted import PromptUnit

DEFAULT_PROMPT_LENGTH = 8


class VPTPrompts(PromptUnit):
    """Vision prompts ``(depth, n, d_v)``, uniform init with VPT's bound ``sqrt(6 / (3 p² + d_v))``.

    Parameters: ``depth * n * d_v`` (``depth`` defaults to every vision layer).
    """

    def __init__(
        self, config: CLIPConfig, prompt_length: int = DEFAULT_PROMPT_LENGTH, depth: int | None = None
    ):
        super().__init__()
        vision = config.vision_config
        self.depth = prompt_depth(depth, vision.num_hidden_layers)
        self.lengths = {"text": 0, "vision": prompt_length}
        bound = math.sqrt(6.0 / (3 * vision.patch_size**2 + vision.hidden_size))
        self.prompt = nn.Parameter(
            torch.empty(self.depth, prompt_length, vision.hidden_size).uniform_(-bound, bound)
        )

    def prompts(self, tower: Tower, layer: int) -> torch.Tensor | None:
        return self.prompt[layer] if self.prompted(tower, layer) else None


def vpt_parameters(
    config: CLIPConfig, prompt_length: int = DEFAULT_PROMPT_LENGTH, depth: int | None = None
) -> int:
    """Parameters of one `VPTPrompts`."""
    vision = config.vision_config
    return prompt_depth(depth, vision.num_hidden_layers) * prompt_length * vision.hidden_size
