"""MaPLe (Khattak et al., 2023): deep text prompts, and vision prompts projected from them.

Class prompt: ``[SOS, p_1, ..., p_b, class tokens, ".", EOS]`` at layer 0 (the prompts replace the
template; like CoOp's context they take CLIP's positions 1..b); at each of the first ``depth`` layers
both towers get new prompts: text ``P^k`` ``(b, d_l)`` and vision ``Linear_k(P^k)`` ``(b, d_v)``.
Defaults: ``b=2``, ``depth=9`` (clipped to the layers both towers have), text prompts N(0, 0.02²); with
``ctx_init`` (e.g. "a photo of a") the first layer's text prompts start as the word embeddings of its
first ``b`` tokens and its other words stay in the prompt ("of a <class>."), as in MaPLe's code.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPConfig

from ..prompting import Tower, shared_depth
from .prompted import PromptUnit, init_prefix

DEFAULT_PROMPT_LENGTH, DEFAULT_DEPTH, DEFAULT_INIT_STD = 2, 9, 0.02


class MaPLePrompts(PromptUnit):
    """Text prompts ``(depth, b, d_l)`` and one ``Linear(d_l, d_v)`` per depth.

    Parameters: ``depth * (b * d_l + d_l * d_v + d_v)``.
    """

    def __init__(
        self,
        config: CLIPConfig,
        prompt_length: int = DEFAULT_PROMPT_LENGTH,
        depth: int | None = None,
        init_std: float = DEFAULT_INIT_STD,
        init: torch.Tensor | None = None,
    ):
        super().__init__()
        d_l, d_v = config.text_config.hidden_size, config.vision_config.hidden_size
        self.depth = shared_depth(config, depth, DEFAULT_DEPTH)
        self.lengths = {"text": prompt_length, "vision": prompt_length}
        text = torch.randn(self.depth, prompt_length, d_l) * init_std
        text[0] = init_prefix(text[0], init)  # MaPLe: the first layer's prompts from ctx_init's first words
        self.text = nn.Parameter(text)
        self.projections = nn.ModuleList(nn.Linear(d_l, d_v) for _ in range(self.depth))

    def prompts(self, tower: Tower, layer: int) -> torch.Tensor | None:
        if not self.prompted(tower, layer):
            return None
        return self.text[layer] if tower == "text" else self.projections[layer](self.text[layer])


def maple_parameters(
    config: CLIPConfig, prompt_length: int = DEFAULT_PROMPT_LENGTH, depth: int | None = None
) -> int:
    """Parameters of one `MaPLePrompts`."""
    d_l, d_v = config.text_config.hidden_size, config.vision_config.hidden_size
    return shared_depth(config, depth, DEFAULT_DEPTH) * (prompt_length * d_l + d_l * d_v + d_v)
