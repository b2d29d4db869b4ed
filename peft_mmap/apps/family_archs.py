"""Standard sizes of the other dual-encoder families (SigLIP, SigLIP 2, MetaCLIP 2) and MmAP's parameter count on
them, next to CLIP ViT-B/16's (``peft-mmap params --arch siglip-b16-224``).

The models are built from their config classes on the ``meta`` device (no weights, no download). The shapes
are those of the published checkpoints named in `FAMILY_ARCHS` (their ``config.json``, over the config classes'
defaults).
"""

from __future__ import annotations

import torch
from transformers import MetaClip2Config, MetaClip2Model, PretrainedConfig, SiglipConfig, SiglipModel

from ..config import MmAPConfig
from ..families import model_family
from ..model import find_towers
from ..options import FAMILY_ARCHS
from .params import clip_config, demo_groups, demo_tasks

#: Base/16 tower shapes shared by the SigLIP checkpoints (``SiglipConfig``'s defaults): width 768, MLP 3072,
#: 12 layers and 12 heads per tower, 64 text positions.
_SIGLIP_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
#: Special tokens of SigLIP's SentencePiece vocabulary (``</s>`` pads and ends) and of SigLIP 2's Gemma one.
_SIGLIP_TOKENS = dict(pad_token_id=1, eos_token_id=1, bos_token_id=None)
_GEMMA_TOKENS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)


def family_config(arch: str) -> tuple[type, PretrainedConfig]:
    """The model class and config of a `FAMILY_ARCHS` architecture."""
    if arch == "siglip-b16-224":  # google/siglip-base-patch16-224: 32,000-token SentencePiece vocabulary
        return SiglipModel, SiglipConfig(
            text_config={**_SIGLIP_B16, "vocab_size": 32000, "max_position_embeddings": 64, **_SIGLIP_TOKENS},
            vision_config={**_SIGLIP_B16, "image_size": 224, "patch_size": 16},
        )
    if (
        arch == "siglip2-b16-256"
    ):  # google/siglip2-base-patch16-256: a SiglipModel, 256,000-token Gemma vocabulary
        return SiglipModel, SiglipConfig(
            text_config={**_SIGLIP_B16, "vocab_size": 256000, "max_position_embeddings": 64, **_GEMMA_TOKENS},
            vision_config={**_SIGLIP_B16, "image_size": 256, "patch_size": 16},
        )
    if arch == "metaclip2-b16":  # facebook/metaclip-2-worldwide-b16: CLIP ViT-B/16, 901,629-token vocabulary
        return MetaClip2Model, MetaClip2Config(
            text_config=dict(
                hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                vocab_size=901629, max_position_embeddings=77,
            ),
            vision_config={**_SIGLIP_B16, "image_size": 224, "patch_size": 16},
            projection_dim=512,
        )  # fmt: skip
    raise ValueError(f"Unknown arch {arch!r}; known: {list(FAMILY_ARCHS)}.")


def mmap_counts(
    arch: str, tasks: int = 4, groups: int = 2, config: MmAPConfig | None = None
) -> dict[str, object]:
    """MmAP on ``arch`` (a `FAMILY_ARCHS` name or a CLIP one, e.g. ``vit-b16``) for ``tasks`` tasks in ``groups``
    groups, measured on the model built on the ``meta`` device.

    Returns ``{"arch", "family", "model_class", "base_parameters", "tower_sizes", "per_adapter", "adapters",
    "mmap"}``: the base model's parameters, its towers' sizes, one adapter's parameters, the number of adapters
    (one per group and per task) and their total.
    """
    from transformers import CLIPModel

    from ..multitask import MultiTaskMmAP

    cls, model_config = (CLIPModel, clip_config(arch)) if arch not in FAMILY_ARCHS else family_config(arch)
    config = config or MmAPConfig()
    with torch.device("meta"):
        base = cls(model_config)
        base_parameters = sum(p.numel() for p in base.parameters())
        family = model_family(base)
        sizes = {info.tower: info.hidden_size for info in find_towers(base).values()}
        model = MultiTaskMmAP(base, None, demo_tasks(tasks), demo_groups(tasks, groups), config)
    total = model.trainable_parameter_count()
    adapters = len(model.adapter_names)
    return {
        "arch": arch, "family": family.label, "model_class": cls.__name__, "base_parameters": base_parameters,
        "tower_sizes": sizes, "per_adapter": total // adapters, "adapters": adapters, "mmap": total,
    }  # fmt: skip


def family_table(arch: str, tasks: int = 4, groups: int = 2, config: MmAPConfig | None = None) -> str:
    """A Markdown table of MmAP's parameters on ``arch`` next to CLIP ViT-B/16's, with ``config`` (default: a
    default `MmAPConfig`) on both."""
    rows = [mmap_counts(name, tasks, groups, config) for name in dict.fromkeys([arch, "vit-b16"])]
    lines = [
        f"| Model | Class | Base parameters | Text / vision width | MmAP per adapter | MmAP ({groups} groups + {tasks} "
        "tasks) |",
        "|---|---|---:|---|---:|---:|",
    ]
    for row in rows:
        sizes = row["tower_sizes"]
        lines.append(
            f"| `{row['arch']}` ({row['family']}) | `{row['model_class']}` | {row['base_parameters']:,} | "
            f"{sizes.get('text')} / {sizes.get('vision')} | {row['per_adapter']:,} | {row['mmap']:,} |"
        )
    return "\n".join(lines)
