"""The dual-encoder families MmAP supports, detected from the model's tower classes (never chosen by a flag).

| family | tower classes (transformers) | text tower | vision tower | template |
|---|---|---|---|---|
| ``clip`` | ``CLIPTextModel``, ``CLIPVisionModel`` | causal, EOS pooling | CLS pooling | ``a photo of a {}.`` |
| ``siglip`` | ``SiglipTextModel``, ``SiglipVisionModel`` | bidirectional, last position + ``head``, padded to 64 | attention-pooling ``head`` over all patches | ``This is a photo of {}.`` |
| ``siglip2`` | ``Siglip2TextModel``, ``Siglip2VisionModel`` (NaFlex) | as SigLIP | as SigLIP, over the real patches (``pixel_attention_mask``) | ``This is a photo of {}.`` |
| ``metaclip2`` | ``MetaClip2TextModel``, ``MetaClip2VisionModel`` | as CLIP (multilingual tokenizer) | as CLIP | ``a photo of a {}.`` |

The fixed-resolution SigLIP 2 checkpoints (``google/siglip2-base-patch16-256`` and the like) are ``SiglipModel``
checkpoints with a Gemma tokenizer: they are the ``siglip`` family here. ``Siglip2Model`` is SigLIP 2's NaFlex
variant (patch sequences of any length with ``pixel_attention_mask`` and ``spatial_shapes``).

Every family's encoder layer is called as ``layer(hidden_states, attention_mask, **kwargs)``, with the same
mask object for every layer; a causal text tower (CLIP, MetaCLIP 2) passes ``is_causal=True`` among the
kwargs, a bidirectional one (SigLIP, SigLIP 2) does not, and its mask (``None`` or a 4-D key-padding mask
from ``create_bidirectional_mask``) is the same for every query row. `peft_mmap.prompting` reads the
direction from that call, so prompts work in every tower without knowing its family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers import (
    CLIPTextModel,
    CLIPVisionModel,
    MetaClip2TextModel,
    MetaClip2VisionModel,
    Siglip2TextModel,
    Siglip2VisionModel,
    SiglipTextModel,
    SiglipVisionModel,
)
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer
from transformers.models.metaclip_2.modeling_metaclip_2 import MetaClip2Attention, MetaClip2EncoderLayer
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipEncoderLayer
from transformers.models.siglip2.modeling_siglip2 import Siglip2Attention, Siglip2EncoderLayer

from .options import DEFAULT_TEMPLATE, SIGLIP_TEMPLATE


@dataclass(frozen=True)
class Family:
    """One dual-encoder family.

    Attributes:
        name: short name (``clip``, ``siglip``, ``siglip2``, ``metaclip2``), written nowhere but in messages.
        label: the name users know (``SigLIP``).
        text_tower, vision_tower: the transformers classes of its two towers.
        encoder_layer: the class of every encoder layer of both towers.
        attention: the class of those layers' ``self_attn``.
        template: the usual zero-shot class-prompt template (its model cards'); a task's default.
        pad_to_max_length: texts are padded (and truncated) to the text tower's ``max_position_embeddings``,
            as the family was trained and as its processor pads (SigLIP pools the last position, which must
            sit at the same place for every text); else to the longest text of a batch (CLIP's EOS pooling
            is independent of padding).
        patch_inputs: the vision tower takes patch sequences with ``pixel_attention_mask`` and
            ``spatial_shapes`` (NaFlex) instead of ``(B, 3, H, W)`` images.
    """

    name: str
    label: str
    text_tower: type[nn.Module]
    vision_tower: type[nn.Module]
    encoder_layer: type[nn.Module]
    attention: type[nn.Module]
    template: str
    pad_to_max_length: bool = False
    patch_inputs: bool = False
    towers: tuple[type[nn.Module], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "towers", (self.text_tower, self.vision_tower))

    def text_padding(self, max_position_embeddings: int) -> dict[str, object]:
        """Tokenizer arguments that pad class prompts as the family's processor does."""
        if self.pad_to_max_length:
            return {"padding": "max_length", "max_length": max_position_embeddings, "truncation": True}
        return {"padding": "longest"}


FAMILIES: tuple[Family, ...] = (
    Family("clip", "CLIP", CLIPTextModel, CLIPVisionModel, CLIPEncoderLayer, CLIPAttention, DEFAULT_TEMPLATE),
    Family(
        "siglip", "SigLIP", SiglipTextModel, SiglipVisionModel, SiglipEncoderLayer, SiglipAttention,
        SIGLIP_TEMPLATE, pad_to_max_length=True,
    ),
    Family(
        "siglip2", "SigLIP 2 (NaFlex)", Siglip2TextModel, Siglip2VisionModel, Siglip2EncoderLayer,
        Siglip2Attention, SIGLIP_TEMPLATE, pad_to_max_length=True, patch_inputs=True,
    ),
    Family(
        "metaclip2", "MetaCLIP 2", MetaClip2TextModel, MetaClip2VisionModel, MetaClip2EncoderLayer,
        MetaClip2Attention, DEFAULT_TEMPLATE,
    ),
)  # fmt: skip
"""The supported families, in the order their towers are looked for."""

#: Each encoder layer class with its attention class (the layers whose forward `peft_mmap.prompting` re-states).
ENCODER_LAYERS: dict[type[nn.Module], type[nn.Module]] = {f.encoder_layer: f.attention for f in FAMILIES}


def supported_classes() -> str:
    """``"CLIPTextModel, CLIPVisionModel, SiglipTextModel, ..."``: the tower classes, for error messages."""
    return ", ".join(tower.__name__ for family in FAMILIES for tower in family.towers)


def tower_family(module: nn.Module) -> tuple[Family, str] | None:
    """``(family, "text" | "vision")`` when ``module`` is a tower of a supported family, else ``None``."""
    for family in FAMILIES:
        if isinstance(module, family.towers):
            return family, "text" if isinstance(module, family.text_tower) else "vision"
    return None


def model_family(model: nn.Module) -> Family:
    """The family of ``model`` (a full model, a single tower, a ``...WithProjection`` model or a PEFT wrapper
    around one), from the classes of its towers.

    Raises:
        ValueError: ``model`` holds no tower of a supported family, or towers of two families.
    """
    found = {}
    for module in model.modules():
        hit = tower_family(module)
        if hit is not None:
            found[hit[0].name] = hit[0]
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        raise ValueError(
            f"MmAP supports CLIP, SigLIP, SigLIP 2 and MetaCLIP 2 dual encoders; {type(model).__name__} holds "
            f"none of their towers ({supported_classes()})."
        )
    raise ValueError(
        f"{type(model).__name__} holds towers of several families ({', '.join(sorted(found))}); MmAP needs "
        "the towers of one model."
    )
