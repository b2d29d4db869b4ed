"""CLIP-Adapter (Gao et al., 2021): a residual bottleneck on the image features.

``f' = ratio * A(f) + (1 - ratio) * f`` with ``A = ReLU . Linear(D/r -> D) . ReLU . Linear(D -> D/r)`` (no
biases), ``D`` the projection dimension, ``r = 4``, ``ratio = 0.2``. One adapter shared by all tasks (the
paper's multi-task row) or one per task (``per_task=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPConfig, PreTrainedTokenizerBase

from ..classifier import CLIPTaskClassifier, TaskSpec
from .persistence import TrainableStateMixin
from .prompted import SHARED_UNIT

DEFAULT_REDUCTION, DEFAULT_RATIO = 4, 0.2


class FeatureAdapter(nn.Module):
    """The residual bottleneck: ``(B, D) -> (B, D)``. Parameters: ``2 * D * (D // reduction)``."""

    def __init__(self, dim: int, reduction: int = DEFAULT_REDUCTION, ratio: float = DEFAULT_RATIO) -> None:
        super().__init__()
        self.ratio = ratio
        self.bottleneck = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.ratio * self.bottleneck(features) + (1 - self.ratio) * features


class CLIPAdapter(TrainableStateMixin, CLIPTaskClassifier):
    """Frozen CLIP whose image features go through a `FeatureAdapter` (shared, or one per task)."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Sequence[TaskSpec] | dict[str, Sequence[str]],
        per_task: bool = False,
        reduction: int = DEFAULT_REDUCTION,
        ratio: float = DEFAULT_RATIO,
    ) -> None:
        super().__init__(clip, tokenizer, tasks)
        clip.requires_grad_(False)
        self.per_task = per_task
        names = list(self.tasks) if per_task else [SHARED_UNIT]
        device = next(clip.parameters()).device
        dim = clip.config.projection_dim
        self.adapters = nn.ModuleDict({n: FeatureAdapter(dim, reduction, ratio).to(device) for n in names})

    def encode_images(self, pixel_values: torch.Tensor, task: str) -> torch.Tensor:
        """Adapted image features ``(B, D)``."""
        features = super().encode_images(pixel_values, task)
        return self.adapters[task if self.per_task else SHARED_UNIT](features)


def clip_adapter_parameters(config: CLIPConfig, reduction: int = DEFAULT_REDUCTION) -> int:
    """Parameters of one `FeatureAdapter` on ``config``'s projection dimension."""
    return 2 * config.projection_dim * (config.projection_dim // reduction)
