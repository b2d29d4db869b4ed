"""Fig. 4a baseline: independent deep text and vision prompts trained jointly (no coupling).

Same prompt length and depth as MmAP (defaults of `peft_mmap.MmAPConfig`: ``b=4`` at every layer both
towers have), used in MmAP's grouped layout (one unit per group and one per task).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPConfig

from ..config import MmAPConfig
from ..prompting import Tower, shared_depth
from .prompted import PromptUnit

#: MmAP's defaults, so that the ablation compares equal prompt budgets.
DEFAULT_PROMPT_LENGTH: int = MmAPConfig.__dataclass_fields__["prompt_length"].default
DEFAULT_INIT_STD: float = MmAPConfig.__dataclass_fields__["init_std"].default


class JointPrompts(PromptUnit):
    """Text prompts ``(depth, b, d_l)`` and vision prompts ``(depth, b, d_v)``, both N(0, 0.02²).

    Parameters: ``depth * b * (d_l + d_v)``.
    """

    def __init__(
        self, config: CLIPConfig, prompt_length: int = DEFAULT_PROMPT_LENGTH, depth: int | None = None
    ):
        super().__init__()
        self.depth = shared_depth(config, depth)
        self.lengths = {"text": prompt_length, "vision": prompt_length}
        shape = (self.depth, prompt_length)
        self.text = nn.Parameter(torch.randn(*shape, config.text_config.hidden_size) * DEFAULT_INIT_STD)
        self.vision = nn.Parameter(torch.randn(*shape, config.vision_config.hidden_size) * DEFAULT_INIT_STD)

    def prompts(self, tower: Tower, layer: int) -> torch.Tensor | None:
        if not self.prompted(tower, layer):
            return None
        return (self.text if tower == "text" else self.vision)[layer]


def joint_parameters(
    config: CLIPConfig, prompt_length: int = DEFAULT_PROMPT_LENGTH, depth: int | None = None
) -> int:
    """Parameters of one `JointPrompts`."""
    d_l, d_v = config.text_config.hidden_size, config.vision_config.hidden_size
    return shared_depth(config, depth) * prompt_length * (d_l + d_v)
