"""Prompt slots: the sequence surgery that puts deep prompts into any CLIP encoder layer.

`forward_with_prompt_slots` runs one ``CLIPEncoderLayer`` with prompt *slots* spliced in after position 0
(CLS for vision, SOS for text), and `expand_attention_mask` gives the text mask the prompt positions. It is
used by `peft_mmap.layer.MmAPLayer` (slots of MmAP adapters) and by `DeepPromptLayer`, which asks a
callback for the slots (the prompt baselines). At every layer:

* at layer 0 every slot's tokens are inserted after position 0,
* at a later layer a slot is replaced by new tokens, or flows through when its tokens are ``None`` (the
  slot's owner is past its depth),
* after the last layer all prompt tokens are removed, so pooling and every shape outside the encoder are
  CLIP's own.

Inserted tokens get no positional embedding (they enter after the embedding layer, and after
``pre_layrnorm`` in the vision tower), as in MmAP, VPT-deep and MVLPT. For learnable prompts this loses no
generality: a fixed positional embedding added to a free vector is a reparametrisation of that vector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from transformers import CLIPConfig

Tower = Literal["text", "vision"]


#: One prompt slot at one layer: new tokens ``(n, d)``/``(1 or B, n, d)``, or ``None`` (keep the slot's
#: current tokens: its owner is past its depth), and the slot length ``n``.
PromptSlot = tuple[torch.Tensor | None, int]


def expand_attention_mask(mask: torch.Tensor | None, num_prompts: int) -> torch.Tensor | None:
    """Insert ``num_prompts`` tokens after position 0 of a (causal) text attention mask.

    The prompt tokens behave like tokens sitting between SOS and the first word: they attend to SOS and to
    earlier prompts; every later token attends to them; they are never padding. Works for ``None``, 2-D
    ``(B, L)`` padding masks and 4-D ``(B, 1, Lq, L)`` boolean or additive float masks (values for "allowed" and
    "blocked" are read from the mask itself, so dtype and convention are kept).

    Returns ``None`` or a mask of the same kind over ``L + num_prompts`` positions.
    """
    if mask is None or num_prompts == 0:
        return mask
    if mask.dim() == 2:  # (B, L) padding mask: prompts are real tokens.
        ones = mask[:, :1].expand(-1, num_prompts)
        return torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
    if mask.dim() != 4:
        raise ValueError(f"Unsupported attention mask of shape {tuple(mask.shape)}: expected 2-D or 4-D.")
    # Columns: prompts are keys that every row after SOS may see, like token 1 in a causal mask.
    prompt_cols = mask[..., 1:2].expand(*mask.shape[:-1], num_prompts)
    mask = torch.cat([mask[..., :1], prompt_cols, mask[..., 1:]], dim=-1)
    if mask.shape[-2] == 1:  # (B, 1, 1, L) key-only mask: no rows to add.
        return mask
    # Rows: a prompt query sees SOS and the prompts up to itself, nothing after.
    sos_row = mask[..., :1, :]  # (B, 1, 1, L + T)
    allowed, blocked = sos_row[..., :1], sos_row[..., -1:]
    causal = torch.ones(num_prompts, num_prompts, dtype=torch.bool, device=mask.device).tril()
    prompt_block = torch.where(causal, allowed, blocked)  # (B, 1, T, T)
    prompt_rows = torch.cat(
        [
            sos_row[..., :1].expand(*sos_row.shape[:-2], num_prompts, 1),
            prompt_block,
            sos_row[..., 1 + num_prompts :].expand(*sos_row.shape[:-2], num_prompts, -1),
        ],
        dim=-1,
    )
    return torch.cat([mask[..., :1, :], prompt_rows, mask[..., 1:, :]], dim=-2)


def forward_with_prompt_slots(
    base_layer: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer_index: int,
    num_layers: int,
    slots: list[PromptSlot],
    **kwargs: Any,
) -> torch.Tensor:
    """Run one CLIP encoder layer with deep prompt slots spliced in after position 0.

    At layer 0 every slot's tokens are inserted after CLS/SOS; at a later layer each slot is replaced by
    its new tokens (or flows through when they are ``None``); after the last layer all prompt tokens are
    removed again. ``hidden_states``: ``(B, L, d)`` at layer 0, ``(B, L + T, d)`` after it, with ``T`` the
    total slot length; returns the same layout (``(B, L, d)`` after the last layer).
    """
    if not slots:
        return base_layer(hidden_states, attention_mask, **kwargs)
    batch = hidden_states.shape[0]
    total = sum(length for _, length in slots)
    pieces, offset = [hidden_states[:, :1]], 1
    for prompts, length in slots:
        if prompts is None:
            if layer_index == 0:
                raise RuntimeError("A prompt slot has no tokens at the first layer.")
            prompts = hidden_states[:, offset : offset + length]
        pieces.append(prompts.to(hidden_states.dtype).expand(batch, -1, -1))
        offset += length
    rest = hidden_states[:, 1:] if layer_index == 0 else hidden_states[:, 1 + total :]
    hidden_states = torch.cat([*pieces, rest], dim=1)
    out = base_layer(hidden_states, expand_attention_mask(attention_mask, total), **kwargs)
    if layer_index == num_layers - 1:
        out = torch.cat([out[:, :1], out[:, 1 + total :]], dim=1)
    return out


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
        """See `forward_with_prompt_slots`."""
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


def prompt_depth(
    depth: int | None,
    num_layers: int,
    default: int | None = None,
    label: str = "depth",
    scope: str = "of this model",
) -> int:
    """The number of prompted layers: ``depth``, else ``default`` clipped to ``num_layers``, else every layer.

    The one depth check of the package: ``depth`` must be an int in ``[1, num_layers]``; the error names
    ``label`` and says whose layers count (``scope``).
    """
    if depth is None:
        return num_layers if default is None else min(default, num_layers)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"{label} must be an int in [1, {num_layers}] for this model, got {depth!r}.")
    if depth > num_layers:
        raise ValueError(
            f"{label}={depth} exceeds the {num_layers} layers {scope}; depth must be in [1, {num_layers}]."
        )
    return depth


def shared_depth(config: CLIPConfig, depth: int | None, default: int | None = None) -> int:
    """`prompt_depth` over the layers both towers of a ``CLIPModel`` config have (MmAP's default depth)."""
    layers = min(config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers)
    return prompt_depth(depth, layers, default, scope="both towers have")
