"""Save and load the trainable parameters of any `CLIPTaskClassifier` as one safetensors file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..files import atomic_write, check_state_dict, load_safetensors


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of the parameters with ``requires_grad`` (shared parameters once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the trainable parameters of ``model`` to ``path`` (safetensors, contiguous CPU copies).

    The file is written under a temporary name and renamed, so an interrupted save keeps the previous file.
    """
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in trainable_state(model).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_trainable(model: nn.Module, path: str | os.PathLike) -> None:
    """Load parameters saved by `save_trainable` into ``model`` in place.

    The file must hold exactly the trainable parameters of ``model`` with the same shapes; every name and
    shape is checked before anything is copied, so a mismatch leaves ``model`` unchanged.
    """
    tensors = load_safetensors(path, "trainable-parameter file")
    expected = trainable_state(model)
    check_state_dict(
        expected,
        tensors,
        f"{path} does not match this model's trainable parameters (different method, tasks, CLIP or options?):",
    )
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    clear = getattr(model, "clear_cache", None)
    if clear is not None:
        clear()


class TrainableStateMixin:
    """Adds ``save_trainable(path)`` / ``load_trainable(path)`` to an ``nn.Module``."""

    def save_trainable(self, path: str | os.PathLike) -> Path:
        """Write the trainable parameters to ``path`` (see `save_trainable`)."""
        return save_trainable(self, path)

    def load_trainable(self, path: str | os.PathLike) -> None:
        """Load parameters written by `save_trainable`, with a strict name and shape check."""
        load_trainable(self, path)
