"""Deep prompts for any CLIP encoder layer, driven by a callback (used by the prompt baselines).

This generalises the sequence surgery of `peft_mmap.layer.MmAPLayer` to prompts that do not come from an
MmAP adapter: a `DeepPromptLayer` asks a callback for this layer's prompt *slots* and

* at layer 0 inserts every slot's tokens after position 0 (CLS for vision, SOS for text),
* at a later layer replaces a slot with new tokens, or lets it flow through when the callback gives
  ``None`` for it (the slot's owner is past its depth),
* after the last layer removes all prompt tokens, so pooling and every shape outside the encoder are
  CLIP's own.

Inserted tokens get no positional embedding (they enter after the embedding layer, and after
``pre_layrnorm`` in the vision tower), as in MmAP, VPT-deep and MVLPT. For learnable prompts this loses no
generality: a fixed positional embedding added to a free vector is a reparametrisation of that vector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .layer import PromptSlot, Tower, forward_with_prompt_slots

#: ``slots(layer_index) -> [slot, ...]`` for one tower, in slot order; ``[]`` = no prompts at all.
SlotFn = Callable[[int], list[PromptSlot]]


class DeepPromptLayer(nn.Module):
    """Wraps one ``CLIPEncoderLayer`` and splices in the prompt slots returned by ``slots``.

    Args:
        base_layer: the wrapped ``CLIPEncoderLayer``.
        layer_index: its index in the encoder (0-based).
        num_layers: number of layers of the encoder.
        slots: callback giving the prompt slots of this layer (see `SlotFn`); it must give the same slot
            lengths at every layer of one forward pass.
    """

    def __init__(self, base_layer: nn.Module, layer_index: int, num_layers: int, slots: SlotFn) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.num_layers = num_layers
        self.slots = slots

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """See `peft_mmap.layer.forward_with_prompt_slots`."""
        slots = self.slots(self.layer_index)
        return forward_with_prompt_slots(
            self.base_layer, hidden_states, attention_mask, self.layer_index, self.num_layers, slots, **kwargs
        )


def install_deep_prompts(encoder: nn.Module, slots: SlotFn) -> None:
    """Wrap every layer of a ``CLIPEncoder`` (``encoder.layers``) in a `DeepPromptLayer` calling ``slots``."""
    layers = encoder.layers
    for index, layer in enumerate(layers):
        if isinstance(layer, DeepPromptLayer):
            raise ValueError("This CLIP encoder already has deep prompts installed; use a fresh CLIPModel.")
        layers[index] = DeepPromptLayer(layer, index, len(layers), slots)


def tower_encoders(clip: nn.Module) -> dict[Tower, nn.Module]:
    """The ``CLIPEncoder`` of each tower of a ``CLIPModel``."""
    return {"text": clip.text_model.encoder, "vision": clip.vision_model.encoder}
