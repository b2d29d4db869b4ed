"""`MmAPModel`: the PEFT tuner that injects MmAP prompts into the text and vision encoders of CLIP (and of
SigLIP, SigLIP 2 and MetaCLIP 2: `peft_mmap.families`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from .config import CLIP_ENCODER_LAYERS, TOWERS, MmAPConfig
from .families import model_family, tower_family
from .files import check_safe_name, check_state_dict
from .layer import MmAPLayer, MmAPSharedState, RouteSlot
from .prompting import Tower, prompt_depth

_RESERVED_NAMES = {"base_layer", "model", "mmap_source", "mmap_scale", "base_model"}

#: Per adapter, its parameters (scaling matrices and source prompts) with their ``requires_grad``.
Trainability = dict[str, list[tuple[nn.Parameter, bool]]]


@dataclass(frozen=True)
class TowerInfo:
    """One CLIP encoder found in the model."""

    path: str  # module path of the CLIPTextModel / CLIPVisionModel ("" for a bare tower)
    tower: Tower
    hidden_size: int
    num_layers: int


def find_towers(model: nn.Module) -> dict[str, TowerInfo]:
    """The towers of ``model`` by module path (a dual encoder has two, single-tower models one), for every
    family of `peft_mmap.families` (CLIP, SigLIP, SigLIP 2, MetaCLIP 2), detected from their classes."""
    model_family(model)  # one supported family, or a clear error
    towers = {}
    for path, module in model.named_modules():
        found = tower_family(module)
        if found is not None:
            tower: Tower = found[1]
            towers[path] = TowerInfo(path, tower, module.config.hidden_size, module.config.num_hidden_layers)
    return towers


def tower_sizes(towers: dict[str, TowerInfo]) -> dict[str, dict[str, int]]:
    """``{tower: {"hidden_size": d, "num_layers": L}}`` of a model's towers, as `MmAPConfig.tower_sizes` records it."""
    return {t.tower: {"hidden_size": t.hidden_size, "num_layers": t.num_layers} for t in towers.values()}


def describe_sizes(sizes: dict[str, dict[str, int]]) -> str:
    """``"text hidden 64 / vision hidden 96 / 4 layers"`` (layers per tower when they differ)."""
    present = [tower for tower in TOWERS if tower in sizes]
    layers = {sizes[tower]["num_layers"] for tower in present}
    if len(layers) == 1:
        parts = [f"{t} hidden {sizes[t]['hidden_size']}" for t in present] + [f"{layers.pop()} layers"]
    else:
        parts = [f"{t} hidden {sizes[t]['hidden_size']}, {sizes[t]['num_layers']} layers" for t in present]
    return " / ".join(parts + [f"no {tower} tower" for tower in TOWERS if tower not in sizes])


def check_tower_sizes(config: MmAPConfig, sizes: dict[str, dict[str, int]], adapter_name: str) -> None:
    """Refuse a model whose tower sizes differ from those the adapter recorded (``config.tower_sizes``)."""
    if config.tower_sizes is None or config.tower_sizes == sizes:
        return
    base = f" ({config.base_model_name_or_path})" if config.base_model_name_or_path else ""
    raise ValueError(
        f"MmAP adapter {adapter_name!r} was saved for a model{base} with {describe_sizes(config.tower_sizes)}; "
        f"this model has {describe_sizes(sizes)}. Load it onto the base model it was trained on; a new adapter "
        "for this model needs a config without tower_sizes (a fresh MmAPConfig, or "
        "dataclasses.replace(config, tower_sizes=None))."
    )


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
    layers = min(t.num_layers for t in towers.values())
    return prompt_depth(
        config.depth, layers, label="MmAPConfig.depth", scope=f"the towers share (model: {sizes})"
    )


def text_position_table(model: nn.Module, towers: dict[str, TowerInfo]) -> nn.Embedding | None:
    """The position embedding ``(max positions, d_l)`` of ``model``'s text tower (``None`` without one): what
    ``text_placement="replace"`` adds to the first layer's text prompts."""
    paths = [info.path for info in towers.values() if info.tower == "text"]
    return model.get_submodule(paths[0]).embeddings.position_embedding if paths else None


def find_layer(key: str, towers: dict[str, TowerInfo]) -> tuple[TowerInfo, int] | None:
    """The tower and index of the CLIP encoder layer at module path ``key`` (``None`` if it is none)."""
    owner, sep, index = key.rpartition("encoder.layers.")
    info = towers.get(owner.removesuffix("."))
    if not sep or info is None or not index.isdigit():
        return None
    return info, int(index)


def checkpoint_shapes(
    model: nn.Module, config: MmAPConfig, towers: dict[str, TowerInfo], depth: int
) -> dict[str, tuple[int, ...]]:
    """The weights PEFT saves for one MmAP adapter on ``model`` (the base CLIP), as keys of
    ``adapter_model.safetensors``: source prompts ``(depth, m, n)`` and each prompted layer's scaling matrix
    ``(b/m, d/n)``."""
    m, n = config.source_shape
    shapes = {"base_model.mmap_source": (depth, m, n)}
    for key, _ in model.named_modules():
        layer = find_layer(key, towers) if check_target_module_exists(config, key) else None
        if layer is not None and layer[1] < depth:
            shapes[f"base_model.model.{key}.mmap_scale"] = (
                config.prompt_length // m,
                layer[0].hidden_size // n,
            )
    return shapes


def misfit(adapter_name: str) -> str:
    """The start of the error refusing adapter weights that do not fit the model (see `check_state_dict`)."""
    return (
        f"MmAP adapter {adapter_name!r} does not fit this base model (other hidden sizes, number of layers "
        "or towers?):"
    )


class MmAPModel(BaseTuner):
    """Injects Multi-modal Alignment Prompts into a transformers CLIP model.

    Every ``CLIPEncoderLayer`` (or the encoder layer of another family) is wrapped by an `MmAPLayer`. Per
    adapter the tuner holds the source prompts ``mmap_source[adapter]`` of shape ``(depth, m, n)``, shared by
    the two towers; each wrapped layer ``k < depth`` holds its tower's scaling matrix. Several adapters can be active at once
    (``base_model.set_adapter(["group0", "art"])``): their prompts are concatenated in that order.
    """

    prefix = "mmap_"
    tuner_layer_cls = MmAPLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {
        model_type: [CLIP_ENCODER_LAYERS] for model_type in ("clip", "siglip", "siglip2", "metaclip_2")
    }
    uses_shared_state = True

    def _pre_injection_hook(self, model: nn.Module, config: MmAPConfig, adapter_name: str) -> None:
        self.mmap_source = nn.ParameterDict()
        self._mmap_shared = MmAPSharedState(source=self.mmap_source)
        self._trainability_before_disable: Trainability | None = None  # set while adapters are disabled

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
        """Validate name, config and recorded sizes, create the source prompts, then wrap/update the layers.

        Every check runs before the model is changed, including, for a config read by
        `MmAPConfig.from_pretrained` from a local folder, the shapes of the weights about to be loaded. As in
        PEFT, the adapter keeps the config object it was given (``peft_config[adapter_name] is config``) and
        records on it what it learns from the model: ``tower_sizes`` (when unset; a failed injection unsets it
        again).
        Parameters are created in the base model's dtype (PEFT's ``_cast_adapter_dtype`` then upcasts them
        unless ``autocast_adapter_dtype=False``). The trainability of the other adapters is left as it was;
        the new adapter is trainable iff it is active and its config is not in inference mode (as in PEFT).
        """
        config: MmAPConfig = self.peft_config[adapter_name]
        self._check_adapter_name(model, adapter_name)
        towers = find_towers(model)
        sizes = tower_sizes(towers)
        check_tower_sizes(config, sizes, adapter_name)
        depth = resolve_depth(config, towers)
        saved_shapes = vars(config).pop("checkpoint_shapes", None)
        if saved_shapes is not None:
            check_state_dict(
                checkpoint_shapes(model, config, towers, depth), saved_shapes, misfit(adapter_name)
            )
        recorded = config.tower_sizes is None
        if recorded:
            config.tower_sizes = sizes
        m, n = config.source_shape
        weight = next(model.parameters())
        dtype = weight.dtype if weight.is_floating_point() else None
        source = torch.randn(depth, m, n, device=weight.device) * config.init_std
        existing = {name: p.requires_grad for name, p in self.mmap_source.items()}
        saved = self._trainability_before_disable  # PEFT's housekeeping calls set_adapter, which drops it
        self.mmap_source[adapter_name] = nn.Parameter(source.to(dtype))
        self._mmap_shared.prompt_lengths[adapter_name] = config.prompt_length
        self._mmap_shared.depths[adapter_name] = depth
        self._mmap_shared.placements[adapter_name] = config.text_placement
        self._mmap_shared.text_positions = text_position_table(model, towers)
        try:
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, **kwargs
            )
        except Exception:
            self._forget_adapter(adapter_name)
            if recorded:
                config.tower_sizes = None
            raise
        for name, requires_grad in existing.items():
            self.mmap_source[name].requires_grad_(requires_grad)
        self._sources_follow_scales([adapter_name])
        self._trainability_before_disable = saved

    def _forget_adapter(self, adapter_name: str) -> None:
        del self.mmap_source[adapter_name]
        del self._mmap_shared.prompt_lengths[adapter_name]
        del self._mmap_shared.depths[adapter_name]
        del self._mmap_shared.placements[adapter_name]

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
        found = find_layer(current_key, find_towers(self.model))
        if found is None:
            raise ValueError(
                f"MmAP can only wrap the encoder layers of a supported dual encoder ('<tower>.encoder.layers.N'; CLIP, SigLIP, SigLIP 2, MetaCLIP 2); target_modules matched "
                f"{current_key!r} ({type(target).__name__})."
            )
        info, index = found
        layer = MmAPLayer(target, info.tower, index, info.num_layers, info.hidden_size, self._mmap_shared)
        layer.update_layer(adapter_name, peft_config, depth)
        self._replace_module(parent, target_name, layer, target)
        self._mmap_layers = []

    # ---- activation and trainability -------------------------------------------------------------
    def _sources_follow_scales(self, names: Iterable[str] | None = None) -> None:
        """Give each adapter's source prompts the trainability PEFT gave its scaling matrices."""
        trainable: dict[str, bool] = {}
        for layer in self._layers():
            for name, scale in layer.mmap_scale.items():
                trainable[name] = trainable.get(name, False) or scale.requires_grad
        for name in self.mmap_source if names is None else names:
            self.mmap_source[name].requires_grad_(trainable.get(name, False))

    def _trainability(self) -> Trainability:
        """Every adapter parameter with its current ``requires_grad``, by adapter."""
        state: Trainability = {name: [(p, p.requires_grad)] for name, p in self.mmap_source.items()}
        for layer in self._layers():
            for name, scale in layer.mmap_scale.items():
                state.setdefault(name, []).append((scale, scale.requires_grad))
        return state

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

    def use_adapters(self, adapter_names: Sequence[str]) -> contextlib.AbstractContextManager[None]:
        """Within the block, forward passes use ``adapter_names`` (prompts in that order), whatever is active.

        The choice travels with each layer call (a forward pre-hook passes ``adapter_names=`` to every
        `MmAPLayer`, as PEFT passes LoRA's per-call ``adapter_names``); trainability and the active adapters
        are left as they are, so a multi-task step can visit several tasks with all adapters trainable.
        """
        return self._layer_kwargs(self._layers(), adapter_names=tuple(self._check_known(adapter_names)))

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """``peft_model(..., adapter_names=[...])``: PEFT's per-call adapter choice, see `use_adapters`."""
        adapter_names = kwargs.get("adapter_names")
        with contextlib.nullcontext() if adapter_names is None else self.use_adapters(adapter_names):
            yield

    @staticmethod
    @contextlib.contextmanager
    def _layer_kwargs(layers: Sequence[MmAPLayer], **extra: object) -> Iterator[None]:
        """Within the block, every call of ``layers`` gets the keyword arguments ``extra``."""

        def add_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, **extra}

        handles = [layer.register_forward_pre_hook(add_kwargs, with_kwargs=True) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several (their prompts are concatenated in the given order).

        As in PEFT, the chosen adapters become trainable (frozen with ``inference_mode=True``) and all others
        frozen.
        """
        self._check_known([adapter_name] if isinstance(adapter_name, str) else adapter_name)
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sources_follow_scales()
        self._trainability_before_disable = None

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """Disabling freezes every adapter, as in PEFT; enabling restores each adapter parameter's
        ``requires_grad`` from before the adapters were disabled, so a model loaded for inference stays frozen.

        (PEFT's LoRA makes the active adapters trainable when they are enabled again, even after loading with
        ``is_trainable=False``: huggingface/peft#3447, kept there for backward compatibility.)
        """
        saved = self._trainability_before_disable
        if enabled:  # adapters added or set trainable while disabled keep their current state
            state = {**self._trainability(), **(saved or {})}
            super()._enable_adapter_layers(True)
            for params in state.values():
                for param, requires_grad in params:
                    param.requires_grad_(requires_grad)
            self._trainability_before_disable = None
            return
        if saved is None:  # disabling twice keeps the state from before the first time
            self._trainability_before_disable = self._trainability()
        super()._enable_adapter_layers(False)
        for source in self.mmap_source.values():
            source.requires_grad_(False)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Make the named adapters trainable or frozen (all their parameters); the others are left as they are."""
        super().set_requires_grad(adapter_names, requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        saved = self._trainability_before_disable
        for name in names & set(self.mmap_source):
            self.mmap_source[name].requires_grad_(requires_grad)
            if saved is not None:  # an explicit choice while disabled is kept when enabling again
                saved.pop(name, None)

    def delete_adapter(self, adapter_name: str) -> None:
        was_active = adapter_name in self.active_adapters
        super().delete_adapter(adapter_name)
        self._forget_adapter(adapter_name)
        if self._trainability_before_disable is not None:
            self._trainability_before_disable.pop(adapter_name, None)
        if was_active:  # PEFT re-activated the remaining adapters, which sets their trainability
            self._sources_follow_scales()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's upcast of fp16/bf16 adapter weights to fp32 (unless ``autocast_adapter_dtype=False``),
        extended to the source prompts on the tuner; every parameter keeps its ``requires_grad``."""
        layers = [layer for layer in self._layers() if adapter_name in layer.mmap_scale]
        flags = [layer.mmap_scale[adapter_name].requires_grad for layer in layers]
        super()._cast_adapter_dtype(adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        for layer, requires_grad in zip(layers, flags, strict=True):
            layer.mmap_scale[adapter_name].requires_grad_(requires_grad)
        source = self.mmap_source[adapter_name]
        dtype = layers[0].mmap_scale[adapter_name].dtype if layers else source.dtype
        if source.dtype != dtype:
            self.mmap_source[adapter_name] = nn.Parameter(
                source.detach().to(dtype), requires_grad=source.requires_grad
            )

    def adapter_routes(self, routes: Sequence[Sequence[str]]) -> contextlib.AbstractContextManager[None]:
        """Within the block, vision prompts are chosen per sample: ``routes[i]`` lists sample ``i``'s adapters.

        All routes must have the same number of adapters, and adapters in the same position must share
        prompt length and depth (e.g. ``[[group_of(task_i), task_i] for each sample]``). The text tower keeps
        using the adapters of the call (`use_adapters`, else the active ones). The slots (`RouteSlot`) are
        passed to every vision layer's forward, like `use_adapters`.
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
        device = self.mmap_source[routes[0][0]].device
        slots = []
        for slot, first in enumerate(routes[0]):
            names = list(dict.fromkeys(route[slot] for route in routes))
            position = {name: i for i, name in enumerate(names)}
            index = torch.tensor([position[route[slot]] for route in routes], device=device)
            slots.append(RouteSlot(names, index, lengths[first]))
        vision = [layer for layer in self._layers() if layer.tower == "vision"]
        return self._layer_kwargs(vision, routes=slots)

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: MmAPConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to this model and refuse a checkpoint that does not fit it exactly.

        A checkpoint from a model with other hidden sizes, another number of layers or other towers raises
        a ``ValueError`` naming expected and found shapes. A local checkpoint is refused before PEFT injects
        the adapter (`inject_adapter`); one PEFT reads only after injecting (a hub download) is refused here,
        and the adapter injected just before is removed again (and the base model unwrapped if it was the
        only one), so nothing is half-loaded.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        suffix = f".{adapter_name}"
        expected = {
            k: tuple(v.shape)
            for k, v in model.state_dict().items()
            if k.endswith(suffix) and ("mmap_source" in k or "mmap_scale" in k)
        }
        found = {k: tuple(v.shape) for k, v in remapped.items() if "mmap_source" in k or "mmap_scale" in k}
        try:
            check_state_dict(expected, found, misfit(adapter_name))
        except ValueError:
            tuner = getattr(model, "base_model", model)
            if isinstance(tuner, MmAPModel) and adapter_name in tuner.peft_config:
                tuner.delete_adapter(adapter_name)
                if not tuner.peft_config:
                    tuner.unload()
            raise
        return remapped

    # ---- merging and unloading -----------------------------------------------------------------------
    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "MmAP prompts are extra tokens, not weight deltas: they cannot be merged into CLIP's weights. "
            "Use `unload()` to get the untouched base model back."
        )

    def unload(self) -> nn.Module:
        """Remove every MmAP layer and return the untouched base CLIP model (without a ``peft_config``)."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, MmAPLayer):
                parent_name, _, child_name = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                setattr(parent, child_name, module.base_layer)
        for adapter_name in list(self.mmap_source):
            self._forget_adapter(adapter_name)
        self._mmap_layers = []
        self._trainability_before_disable = None
        if hasattr(self.model, "peft_config"):  # as PEFT's own unload: the model is a plain CLIP model again
            del self.model.peft_config
        return self.model

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        return self.unload()
