"""CoOp (Zhou et al., 2022): learnable text context shared by the classes of a task.

Class prompt: ``[SOS, ctx_1, ..., ctx_n, class tokens, ".", EOS]`` -- the context replaces the template.
As in CoOp's code, the context vectors are token embeddings: they get CLIP's position embeddings 1..n and
the class tokens follow at n + 1.. (`peft_mmap.baselines.prompted.PromptClassifier`'s ``text_context``),
so a context initialised from "a photo of a" starts exactly at zero-shot CLIP's "a photo of a <class>.".
Context plus class prompt must fit the text encoder's positions (77 for CLIP).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPConfig

from ..prompting import Tower
from .prompted import PromptUnit, init_prefix

#: Context tokens and init std of CoOp.
DEFAULT_N_CTX, DEFAULT_INIT_STD = 16, 0.02


class CoOpContext(PromptUnit):
    """``n_ctx`` learnable text tokens ``(n_ctx, d_l)`` at the first layer. Parameters: ``n_ctx * d_l``.

    Initialised N(0, init_std²); with ``init`` (the word embeddings of a phrase such as "a photo of a",
    CoOp's ``ctx_init``, see `peft_mmap.baselines.prompted.word_embeddings`) its first tokens start as them.
    """

    def __init__(
        self,
        config: CLIPConfig,
        n_ctx: int = DEFAULT_N_CTX,
        init_std: float = DEFAULT_INIT_STD,
        init: torch.Tensor | None = None,
    ):
        super().__init__()
        self.lengths = {"text": n_ctx, "vision": 0}
        self.depth = 1
        ctx = torch.randn(n_ctx, config.text_config.hidden_size) * init_std
        self.ctx = nn.Parameter(init_prefix(ctx, init))

    def prompts(self, tower: Tower, layer: int) -> torch.Tensor | None:
        return self.ctx if self.prompted(tower, layer) else None


def coop_parameters(config: CLIPConfig, n_ctx: int = DEFAULT_N_CTX) -> int:
    """Parameters of one `CoOpContext`."""
    return n_ctx * config.text_config.hidden_size
