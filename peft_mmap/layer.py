"""`MmAPLayer`: a CLIP encoder layer wrapped with deep Kronecker prompts.

Sequence layout inside a prompted tower (``T`` = total prompt tokens of the active adapters)::

    vision: [CLS, prompts(adapter_1), ..., prompts(adapter_A), patch_1, ..., patch_M]
    text:   [SOS, prompts(adapter_1), ..., prompts(adapter_A), tok_1, ..., EOS, pad...]

The first encoder layer inserts the prompt tokens after position 0, every prompted layer ``k < depth``
replaces the adapter's slot with its own new prompts (deep prompts), layers past an adapter's depth let its
slot flow through, and the last encoder layer removes all prompt tokens again, so ``last_hidden_state``,
pooling (CLS for vision, EOS for text) and every shape outside the encoder are CLIP's own.

With ``text_placement="replace"`` (`MmAPConfig`) the text tower's input holds ``T`` placeholder tokens after
SOS, and the prompts take their rows instead of being inserted (CoOp's and MaPLe's context)::

    text:   [SOS, prompts(adapter_1), ..., prompts(adapter_A), class tokens, EOS, pad...]   (same length)

The first layer's prompts get CLIP's positional embeddings ``1..T``; nothing is removed at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import MmAPConfig
from .prompting import PromptSlot, Tower, forward_with_prompt_slots, positioned_slots


@dataclass(frozen=True)
class RouteSlot:
    """One prompt slot of a mixed-task batch (`MmAPModel.adapter_routes`), passed to each layer's forward.

    Attributes:
        names: the distinct adapters that fill this slot, in order of first use.
        index: ``(B,)`` long tensor on the adapters' device, ``names[index[i]]`` is batch row ``i``'s adapter.
        length: the slot's prompt length (equal for every adapter in it).
    """

    names: list[str]
    index: torch.Tensor
    length: int


@dataclass
class MmAPSharedState:
    """State shared by an `MmAPModel` and all of its layers (not an ``nn.Module``: it is never saved).

    Attributes:
        source: the tuner's ``ParameterDict`` of source prompts, one ``(depth, m, n)`` tensor per adapter.
        prompt_lengths: ``b`` per adapter.
        depths: number of prompted layers per adapter.
        placements: `MmAPConfig.text_placement` per adapter.
        text_positions: the text embeddings' position table (an ``nn.Embedding`` of the base model, held by
            reference: it is neither a parameter of the tuner nor saved), ``None`` without a text tower.
    """

    source: nn.ParameterDict
    prompt_lengths: dict[str, int] = field(default_factory=dict)
    depths: dict[str, int] = field(default_factory=dict)
    placements: dict[str, str] = field(default_factory=dict)
    text_positions: nn.Embedding | None = None


def kron_prompt(scale: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``kron(scale, source)``: ``(b/m, d/n) x (m, n) -> (b, d)`` (paper Eq. 6-7)."""
    return torch.kron(scale, source)


#: Adapter combinations whose constant prompts one layer keeps (mixed batches can create many); the oldest
#: half is dropped when the limit is reached.
MAX_CONSTANT_PROMPTS = 64


class MmAPLayer(nn.Module, BaseTunerLayer):
    """Wraps one ``CLIPEncoderLayer`` of one tower and adds MmAP prompts around it.

    Holds, per adapter prompted at this layer, the tower's scaling matrix ``mmap_scale[adapter]`` of shape
    ``(b/m, d/n)``. The source prompt ``P_s^k`` is shared with the other tower and lives on the tuner
    (`MmAPSharedState.source`).

    Args:
        base_layer: the wrapped ``CLIPEncoderLayer``.
        tower: ``"text"`` or ``"vision"``.
        layer_index: ``k``, the index of the layer in its encoder (0-based).
        num_layers: number of layers of that encoder.
        hidden_size: ``d_l`` or ``d_v``.
        shared: the tuner's shared state.
    """

    adapter_layer_names = ("mmap_scale",)
    other_param_names = ()

    def __init__(
        self,
        base_layer: nn.Module,
        tower: Tower,
        layer_index: int,
        num_layers: int,
        hidden_size: int,
        shared: MmAPSharedState,
    ) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.mmap_scale = nn.ParameterDict()
        self.tower = tower
        self.layer_index = layer_index
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        # A plain reference: registering it as a submodule would save the source prompts once per layer.
        object.__setattr__(self, "_shared", shared)
        self.merged_adapters = []
        # (names, dtype, stacked) -> (parameter state, parameters, prompts); see `_prompts`.
        self._constant_prompts: dict[tuple, tuple[list, list[nn.Parameter], torch.Tensor]] = {}

    def update_layer(self, adapter_name: str, config: MmAPConfig, depth: int) -> None:
        """Create the scaling matrix of ``adapter_name`` if this layer is prompted (``layer_index < depth``)."""
        if self.layer_index >= depth:
            return
        m, n = config.source_shape
        scale = torch.empty(config.prompt_length // m, self.hidden_size // n)
        init = config.scale_init
        if init == "vision_zeros":  # zeros only where a text tower can carry P_s's first gradient
            has_text = config.tower_sizes is None or "text" in config.tower_sizes
            init = "zeros" if self.tower == "vision" and has_text else "ones"
        if init == "ones":
            nn.init.ones_(scale)
        elif init == "zeros":
            nn.init.zeros_(scale)
        else:
            nn.init.normal_(scale)
        weight = next(self.base_layer.parameters())
        dtype = weight.dtype if weight.is_floating_point() else None  # PEFT upcasts unless autocast is off
        self.mmap_scale[adapter_name] = nn.Parameter(scale.to(device=weight.device, dtype=dtype))
        self.set_adapter(self.active_adapters)

    def layer_prompt(self, adapter_name: str) -> torch.Tensor:
        """This layer's prompt for one adapter: ``kron(M^k, P_s^k)`` of shape ``(b, d)``."""
        source = self._shared.source[adapter_name][self.layer_index]
        return kron_prompt(self.mmap_scale[adapter_name], source)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "MmAP prompts are extra tokens, not weight deltas: they cannot be merged into CLIP's weights. "
            "Use `unload()` to get the base model back, or keep the PeftModel for inference."
        )

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def _prompts(self, names: tuple[str, ...], dtype: torch.dtype, stack: bool) -> torch.Tensor:
        """This layer's prompts of adapters ``names`` (all prompted here) in ``dtype``.

        ``stack``: ``(U, b, d)``, one row per adapter (a routed slot); else ``(1, U * b, d)``, the adapters'
        prompts one after the other (the active adapters' slots as one block).

        Without autograd (grad mode off, e.g. ``torch.inference_mode()``, or every parameter involved frozen)
        the prompts are constants: computed once and reused while the scaling matrices and source prompts
        are the same objects with the same storage and in-place version counters, so an optimizer step, a
        ``load_state_dict``, ``model.to(...)`` or re-created adapter invalidates them (writes through
        ``param.data`` bypass the version counter and are not seen, as for the classifier's text cache).
        """
        source = self._shared.source
        params = [p for name in names for p in (self.mmap_scale[name], source[name])]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._join_prompts(names, dtype, stack)
        key = (names, dtype, stack)
        state = [(id(p), p._version, p.data_ptr()) for p in params]
        cached = self._constant_prompts.get(key)
        if cached is not None and cached[0] == state:
            return cached[2]
        # A normal tensor (not an inference tensor) even when called under torch.inference_mode().
        with torch.inference_mode(False), torch.no_grad():
            value = self._join_prompts(names, dtype, stack)
        if len(self._constant_prompts) >= MAX_CONSTANT_PROMPTS:
            for old in list(self._constant_prompts)[: MAX_CONSTANT_PROMPTS // 2]:
                del self._constant_prompts[old]
        self._constant_prompts[key] = (state, params, value)  # keeping params keeps their ids unique
        return value

    def _join_prompts(self, names: tuple[str, ...], dtype: torch.dtype, stack: bool) -> torch.Tensor:
        """`layer_prompt` of each of ``names``, stacked or concatenated as `_prompts` describes."""
        prompts = [self.layer_prompt(name) for name in names]
        if len(prompts) == 1:
            return prompts[0].to(dtype)[None]
        return (torch.stack(prompts) if stack else torch.cat(prompts)[None]).to(dtype)

    def _active_slots(self, names: tuple[str, ...], like: torch.Tensor) -> list[PromptSlot]:
        """Slots of adapters ``names``: one ``(1, T, d)`` block when all are prompted here, else per adapter."""
        lengths = self._shared.prompt_lengths
        if self.mmap_scale.keys() >= set(names):  # every active adapter is prompted at this layer
            return [(self._prompts(names, like.dtype, stack=False), sum(map(lengths.__getitem__, names)))]
        return [
            (
                self._prompts((name,), like.dtype, stack=False) if name in self.mmap_scale else None,
                lengths[name],
            )
            for name in names
        ]

    def _routed_slots(self, routes: list[RouteSlot], like: torch.Tensor) -> list[PromptSlot]:
        """Slots of a mixed-task batch: ``(B, b, d)`` prompts picked per row (or ``None``), and lengths."""
        if routes[0].index.shape[0] != like.shape[0]:
            raise ValueError(
                f"Adapter routes name {routes[0].index.shape[0]} samples but the batch has {like.shape[0]}."
            )
        slots = []
        for route in routes:
            if route.names[0] not in self.mmap_scale:  # past this slot's depth: it flows through
                slots.append((None, route.length))
                continue
            prompts = self._prompts(tuple(route.names), like.dtype, stack=True)
            if len(route.names) > 1:
                prompts = prompts[route.index]
            slots.append((prompts, route.length))
        return slots

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str] | None = None,
        routes: list[RouteSlot] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``hidden_states``: ``(B, L, d)`` (``L + T`` after the first layer) -> same layout.

        The adapters of this call: ``routes`` (per-sample slots, see `RouteSlot`), else ``adapter_names`` (in
        slot order), else the active adapters; with none (every adapter deleted, or ``adapter_names=[]``) it is
        the base layer's own forward. `MmAPModel.use_adapters` and `MmAPModel.adapter_routes`
        pass the first two to every layer through forward pre-hooks, as PEFT passes LoRA's ``adapter_names``.
        """
        if self.disable_adapters:
            slots, names = [], ()
        elif routes is not None:
            slots = self._routed_slots(routes, hidden_states)
            names = tuple(name for route in routes for name in route.names)
        else:
            names = tuple(self.active_adapters if adapter_names is None else adapter_names)
            slots = self._active_slots(names, hidden_states) if names else []  # none: the base layer alone
        next_replaces = all(self._shared.depths[n] > self.layer_index + 1 for n in names)
        replace_rows = self.tower == "text" and self._replaces_text_rows(names)
        if replace_rows and self.layer_index == 0:
            slots = positioned_slots(slots, self._shared.text_positions.weight)
        return forward_with_prompt_slots(
            self.base_layer,
            hidden_states,
            attention_mask,
            self.layer_index,
            self.num_layers,
            slots,
            next_replaces,
            replace_rows,
            **kwargs,
        )

    def _replaces_text_rows(self, names: tuple[str, ...]) -> bool:
        """Whether the prompts of adapters ``names`` replace placeholder rows (all ``text_placement="replace"``);
        adapters of one call with different placements are refused."""
        placements = {self._shared.placements[name] for name in names}
        if len(placements) > 1:
            raise ValueError(
                f"Adapters {list(names)} mix text placements {sorted(placements)}: the text prompts of one call "
                "must all be inserted or all replace placeholder tokens (MmAPConfig.text_placement)."
            )
        return placements == {"replace"}

    def __repr__(self) -> str:
        return f"mmap.{super().__repr__()}"
