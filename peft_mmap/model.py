"""`MmAPModel`: the PEFT tuner that injects MmAP prompts into CLIP's text and vision encoders."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn
from transformers import CLIPTextModel, CLIPVisionModel

from .config import CLIP_ENCODER_LAYERS, MmAPConfig
from .files import check_safe_name
from .layer import MmAPLayer, MmAPSharedState, RouteSlot, Tower

_RESERVED_NAMES = {"base_layer", "model", "mmap_source", "mmap_scale", "base_model"}


@dataclass(frozen=True)
class TowerInfo:
    """One CLIP encoder found in the model."""

    path: str  # module path of the CLIPTextModel / CLIPVisionModel ("" for a bare tower)
    tower: Tower
    hidden_size: int
    num_layers: int


def find_towers(model: nn.Module) -> dict[str, TowerInfo]:
    """The CLIP towers of ``model`` by module path (``CLIPModel`` has two, single-tower models one)."""
    towers = {}
    for path, module in model.named_modules():
        if isinstance(module, (CLIPTextModel, CLIPVisionModel)):
            tower: Tower = "text" if isinstance(module, CLIPTextModel) else "vision"
            towers[path] = TowerInfo(path, tower, module.config.hidden_size, module.config.num_hidden_layers)
    if not towers:
        raise ValueError(
            f"MmAP needs a transformers CLIP model (CLIPModel, CLIPTextModel[WithProjection] or "
            f"CLIPVisionModel[WithProjection]); found no CLIP encoder in {type(model).__name__}."
        )
    return towers


def resolve_depth(config: MmAPConfig, towers: dict[str, TowerInfo]) -> int:
    """Validate ``config`` against the model's sizes and return the number of prompted layers."""
    n = config.source_shape[1]
    sizes = ", ".join(f"{t.tower}: hidden {t.hidden_size}, {t.num_layers} layers" for t in towers.values())
    for info in towers.values():
        if info.hidden_size % n:
            raise ValueError(
                f"MmAPConfig.source_shape n={n} must divide the {info.tower} hidden size {info.hidden_size} "
                f"(model: {sizes})."
            )
    shared_layers = min(t.num_layers for t in towers.values())
    depth = shared_layers if config.depth is None else config.depth
    if depth > shared_layers:
        raise ValueError(
            f"MmAPConfig.depth={depth} exceeds the {shared_layers} layers the towers share (model: {sizes})."
        )
    return depth


class MmAPModel(BaseTuner):
    """Injects Multi-modal Alignment Prompts into a transformers CLIP model.

    Every ``CLIPEncoderLayer`` is wrapped by an `MmAPLayer`. Per adapter the tuner holds the source prompts
    ``mmap_source[adapter]`` of shape ``(depth, m, n)``, shared by the two towers; each wrapped layer ``k <
    depth`` holds its tower's scaling matrix. Several adapters can be active at once
    (``base_model.set_adapter(["group0", "art"])``): their prompts are concatenated in that order.
    """

    prefix = "mmap_"
    tuner_layer_cls = MmAPLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {"clip": [CLIP_ENCODER_LAYERS]}
    uses_shared_state = True

    def _pre_injection_hook(self, model: nn.Module, config: MmAPConfig, adapter_name: str) -> None:
        self.mmap_source = nn.ParameterDict()
        self._mmap_shared = MmAPSharedState(source=self.mmap_source)

    def _check_adapter_name(self, model: nn.Module, adapter_name: str) -> None:
        """Refuse names peft's key filtering or our folder layout cannot handle."""
        check_safe_name(adapter_name, "adapter name")
        components = {part for name, _ in model.named_parameters() for part in name.split(".")}
        components |= {part for name, _ in model.named_modules() for part in name.split(".")}
        if adapter_name in components | _RESERVED_NAMES:
            raise ValueError(
                f"Invalid adapter name {adapter_name!r}: it is also a module or parameter name in the model, "
                "which would break saving and loading. Choose another name (e.g. 'task_art')."
            )

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, **kwargs
    ) -> None:
        """Validate name and config, create the adapter's source prompts, then wrap/update the layers."""
        config: MmAPConfig = self.peft_config[adapter_name]
        self._check_adapter_name(model, adapter_name)
        towers = find_towers(model)
        depth = resolve_depth(config, towers)
        m, n = config.source_shape
        device = next(model.parameters()).device
        self.mmap_source[adapter_name] = nn.Parameter(
            torch.randn(depth, m, n, device=device) * config.init_std
        )
        self._mmap_shared.prompt_lengths[adapter_name] = config.prompt_length
        self._mmap_shared.depths[adapter_name] = depth
        try:
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, **kwargs
            )
        except Exception:
            self._forget_adapter(adapter_name)
            raise
        self._mmap_layers = []
        self._sync_source_requires_grad(inference_mode=config.inference_mode)

    def _forget_adapter(self, adapter_name: str) -> None:
        del self.mmap_source[adapter_name]
        del self._mmap_shared.prompt_lengths[adapter_name]
        del self._mmap_shared.depths[adapter_name]

    @staticmethod
    def _check_target_module_exists(peft_config: MmAPConfig, key: str) -> bool:
        return bool(check_target_module_exists(peft_config, key))

    def _create_and_replace(
        self,
        peft_config: MmAPConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        depth = self._mmap_shared.depths[adapter_name]
        if isinstance(target, MmAPLayer):
            target.update_layer(adapter_name, peft_config, depth)
            return
        owner, sep, index = current_key.rpartition("encoder.layers.")
        towers = find_towers(self.model)
        info = towers.get(owner.removesuffix("."))
        if not sep or info is None or not index.isdigit():
            raise ValueError(
                f"MmAP can only wrap CLIP encoder layers ('<tower>.encoder.layers.N'); target_modules matched "
                f"{current_key!r} ({type(target).__name__})."
            )
        layer = MmAPLayer(
            target, info.tower, int(index), info.num_layers, info.hidden_size, self._mmap_shared
        )
        layer.update_layer(adapter_name, peft_config, depth)
        self._replace_module(parent, target_name, layer, target)

    # ---- activation and trainability -------------------------------------------------------------
    def _sync_source_requires_grad(self, inference_mode: bool = False) -> None:
        """Source prompts follow the layers: trainable iff their adapter is active and adapters are enabled."""
        enabled = not self._adapters_disabled()
        for name, param in self.mmap_source.items():
            param.requires_grad_(enabled and not inference_mode and name in self.active_adapters)

    def _adapters_disabled(self) -> bool:
        return any(layer.disable_adapters for layer in self._layers())

    def _layers(self) -> list[MmAPLayer]:
        if not getattr(self, "_mmap_layers", None):
            self._mmap_layers = [module for module in self.model.modules() if isinstance(module, MmAPLayer)]
        return self._mmap_layers

    def _check_known(self, names: Sequence[str]) -> list[str]:
        names = list(names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {sorted(self.peft_config)}.")
        if len(set(names)) != len(names):
            raise ValueError(f"Adapter names must not repeat, got {names}.")
        return names

    def activate(self, adapter_names: Sequence[str]) -> None:
        """Choose the adapters of the next forward passes, leaving trainability as it is.

        `set_adapter` also makes the chosen adapters (and only them) trainable, as in every PEFT method. A
        multi-task training step that visits several tasks needs all of them to stay trainable while the
        active set changes from task to task; this is what `activate` does.
        """
        names = self._check_known(adapter_names)
        for layer in self._layers():
            layer._active_adapter = names
        self.active_adapter = names

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several (their prompts are concatenated in the given order)."""
        self._check_known([adapter_name] if isinstance(adapter_name, str) else adapter_name)
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_source_requires_grad(inference_mode=inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._sync_source_requires_grad()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self.mmap_source):
            self.mmap_source[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._forget_adapter(adapter_name)
        self._sync_source_requires_grad()

    @contextlib.contextmanager
    def adapter_routes(self, routes: Sequence[Sequence[str]]) -> Iterator[None]:
        """Within the block, vision prompts are chosen per sample: ``routes[i]`` lists sample ``i``'s adapters.

        All routes must have the same number of adapters, and adapters in the same position must share
        prompt length and depth (e.g. ``[[group_of(task_i), task_i] for each sample]``). The text tower keeps
        using the active adapters.
        """
        routes = [list(route) for route in routes]
        if not routes or not routes[0]:
            raise ValueError("adapter_routes needs at least one sample with at least one adapter.")
        lengths, depths = self._mmap_shared.prompt_lengths, self._mmap_shared.depths
        for route in routes:
            unknown = [name for name in route if name not in self.peft_config]
            if unknown:
                raise ValueError(
                    f"Unknown adapter(s) {unknown} in routes; available: {sorted(self.peft_config)}."
                )
            if len(route) != len(routes[0]):
                raise ValueError(f"All routes need the same number of adapters, got {routes[0]} and {route}.")
            for slot, name in enumerate(route):
                first = routes[0][slot]
                if (lengths[name], depths[name]) != (lengths[first], depths[first]):
                    raise ValueError(
                        f"Adapters {first!r} and {name!r} share slot {slot} but differ in prompt length or depth."
                    )
        slots = []
        for slot, first in enumerate(routes[0]):
            names = list(dict.fromkeys(route[slot] for route in routes))
            position = {name: i for i, name in enumerate(names)}
            index = torch.tensor([position[route[slot]] for route in routes])
            slots.append(RouteSlot(names, index, lengths[first]))
        previous = self._mmap_shared.routes
        self._mmap_shared.routes = slots
        try:
            yield
        finally:
            self._mmap_shared.routes = previous

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: MmAPConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to this model and refuse a checkpoint that does not fit it exactly.

        A checkpoint from a model with other hidden sizes, another number of layers or other towers raises
        a ``ValueError`` naming expected and found shapes; the adapter that PEFT injected just before is
        removed again (and the base model unwrapped if it was the only one), so nothing is half-loaded.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        suffix = f".{adapter_name}"
        expected = {
            k: tuple(v.shape)
            for k, v in model.state_dict().items()
            if k.endswith(suffix) and ("mmap_source" in k or "mmap_scale" in k)
        }
        found = {k: tuple(v.shape) for k, v in remapped.items() if "mmap_source" in k or "mmap_scale" in k}
        problems = [f"unexpected weight {k} {s}" for k, s in found.items() if k not in expected]
        problems += [f"missing weight {k} {s}" for k, s in expected.items() if k not in found]
        problems += [
            f"{k}: checkpoint {found[k]} vs model {s}"
            for k, s in expected.items()
            if k in found and found[k] != s
        ]
        if problems:
            tuner = getattr(model, "base_model", model)
            if isinstance(tuner, MmAPModel) and adapter_name in tuner.peft_config:
                tuner.delete_adapter(adapter_name)
                if not tuner.peft_config:
                    tuner.unload()
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise ValueError(
                f"MmAP adapter {adapter_name!r} does not fit this base model (other hidden sizes, number of "
                f"layers or towers?): {shown}."
            )
        return remapped

    # ---- merging and unloading -----------------------------------------------------------------------
    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "MmAP prompts are extra tokens, not weight deltas: they cannot be merged into CLIP's weights. "
            "Use `unload()` to get the untouched base model back."
        )

    def unload(self) -> nn.Module:
        """Remove every MmAP layer and return the untouched base CLIP model."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, MmAPLayer):
                parent_name, _, child_name = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                setattr(parent, child_name, module.base_layer)
        for adapter_name in list(self.mmap_source):
            self._forget_adapter(adapter_name)
        self._mmap_layers = []
        return self.model

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        return self.unload()
