"""Fig. 4b baseline: one source prompt per layer, mapped to text and vision prompts by two MLPs.

``P_l^k = f_l(P_s^k)`` ``(b, d_l)`` and ``P_v^k = f_v(P_s^k)`` ``(b, d_v)`` with ``P_s^k`` ``(b, d_s)``. The paper
calls ``f_l`` and ``f_v`` "two MLP layers"; by default each is one ``Linear`` shared by all layers of a unit
(``mlp_hidden=None``), or ``Linear(d_s, h)``-GELU-``Linear(h, d)`` with ``mlp_hidden=h``. ``d_s`` defaults to
``d_l``. Prompt length, depth and the grouped layout are MmAP's (see `peft_mmap.baselines.joint`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPConfig

from ..prompting import Tower, shared_depth
from .joint import DEFAULT_INIT_STD, DEFAULT_PROMPT_LENGTH
from .prompted import PromptUnit


def _generator(d_in: int, d_out: int, hidden: int | None) -> nn.Module:
    if hidden is None:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def _generator_parameters(d_in: int, d_out: int, hidden: int | None) -> int:
    if hidden is None:
        return d_in * d_out + d_out
    return d_in * hidden + hidden + hidden * d_out + d_out


class MLPPrompts(PromptUnit):
    """Source prompts ``(depth, b, d_s)`` plus the text and vision generators.

    Parameters: ``depth * b * d_s + g(d_s, d_l) + g(d_s, d_v)`` with ``g(i, o) = i*o + o`` (one Linear) or
    ``i*h + h + h*o + o`` (two).
    """

    def __init__(
        self,
        config: CLIPConfig,
        prompt_length: int = DEFAULT_PROMPT_LENGTH,
        depth: int | None = None,
        source_dim: int | None = None,
        mlp_hidden: int | None = None,
    ):
        super().__init__()
        d_s = source_dim or config.text_config.hidden_size
        self.depth = shared_depth(config, depth)
        self.lengths = {"text": prompt_length, "vision": prompt_length}
        self.source = nn.Parameter(torch.randn(self.depth, prompt_length, d_s) * DEFAULT_INIT_STD)
        self.to_text = _generator(d_s, config.text_config.hidden_size, mlp_hidden)
        self.to_vision = _generator(d_s, config.vision_config.hidden_size, mlp_hidden)

    def prompts(self, tower: Tower, layer: int) -> torch.Tensor | None:
        if not self.prompted(tower, layer):
            return None
        return (self.to_text if tower == "text" else self.to_vision)(self.source[layer])


def mlp_parameters(
    config: CLIPConfig,
    prompt_length: int = DEFAULT_PROMPT_LENGTH,
    depth: int | None = None,
    source_dim: int | None = None,
    mlp_hidden: int | None = None,
) -> int:
    """Parameters of one `MLPPrompts`."""
    d_s = source_dim or config.text_config.hidden_size
    generators = sum(
        _generator_parameters(d_s, c.hidden_size, mlp_hidden)
        for c in (config.text_config, config.vision_config)
    )
    return shared_depth(config, depth) * prompt_length * d_s + generators
