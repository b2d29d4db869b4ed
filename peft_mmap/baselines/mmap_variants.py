"""The MmAP rows of Table 3: `peft_mmap.multitask.MultiTaskMmAP` with different group/task structures."""

from __future__ import annotations

import random
from collections.abc import Sequence

from transformers import CLIPConfig

from ..config import MmAPConfig
from ..prompting import shared_depth

DEFAULT_RANDOM_GROUPS = 2


def random_groups(task_names: Sequence[str], num_groups: int, seed: int = 0) -> list[list[str]]:
    """A seeded random partition of ``task_names`` into ``num_groups`` non-empty groups (Table 3 "Random")."""
    if not 1 <= num_groups <= len(task_names):
        raise ValueError(f"Cannot split {len(task_names)} tasks into {num_groups} non-empty groups.")
    shuffled = list(task_names)
    random.Random(seed).shuffle(shuffled)
    return [shuffled[i::num_groups] for i in range(num_groups)]


def mmap_adapter_parameters(config: CLIPConfig, mmap: MmAPConfig | None = None) -> int:
    """Parameters of one MmAP adapter: ``depth * (m*n + (b/m) * (d_l/n + d_v/n))``."""
    mmap = mmap or MmAPConfig()
    m, n = mmap.source_shape
    d_l, d_v = config.text_config.hidden_size, config.vision_config.hidden_size
    return shared_depth(config, mmap.depth) * (m * n + (mmap.prompt_length // m) * (d_l // n + d_v // n))
