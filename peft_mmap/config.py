"""`MmAPConfig`: the PEFT configuration of Multi-modal Alignment Prompts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME

from .base_models import portable_model_name
from .checks import is_positive_int
from .files import check_safetensors, new_file_mode
from .options import MMAP_CLI_FIELDS, SCALE_INITS, TEXT_PLACEMENT_HELP, TEXT_PLACEMENTS
from .peft_type import MMAP_PEFT_TYPE

#: Matches every ``CLIPEncoderLayer`` of ``CLIPModel`` (``{text,vision}_model.encoder.layers.N``) and of the
#: single-tower models (``[text_model.|vision_model.]encoder.layers.N``).
CLIP_ENCODER_LAYERS = r"(.*\.)?encoder\.layers\.\d+"

TOWERS = ("text", "vision")
TOWER_SIZE_KEYS = ("hidden_size", "num_layers")


def _check_positive_int(value: object, name: str) -> None:
    if not is_positive_int(value):
        raise ValueError(f"MmAPConfig.{name} must be a positive int, got {value!r}.")


def _check_tower_sizes(sizes: object) -> None:
    """``None`` or ``{tower: {"hidden_size": int > 0, "num_layers": int > 0}}`` for one or both towers."""
    if sizes is None:
        return
    valid = (
        isinstance(sizes, dict)
        and sizes
        and set(sizes) <= set(TOWERS)
        and all(
            isinstance(v, dict) and set(v) == set(TOWER_SIZE_KEYS) and all(map(is_positive_int, v.values()))
            for v in sizes.values()
        )
    )
    if not valid:
        raise ValueError(
            "MmAPConfig.tower_sizes must be None or a mapping from 'text'/'vision' to "
            f"{{'hidden_size': int, 'num_layers': int}} (positive ints), got {sizes!r}."
        )


@dataclass
class MmAPConfig(PeftConfig):
    """Configuration of an MmAP adapter (Xin et al., AAAI 2024, Eq. 6-7).

    For every prompted layer ``k`` an adapter holds a source prompt ``P_s^k`` of shape ``(m, n)`` shared by
    both CLIP towers and two scaling matrices ``M_l^k`` ``(b/m, d_l/n)`` and ``M_v^k`` ``(b/m, d_v/n)``. The
    layer's text prompt is ``kron(M_l^k, P_s^k)`` ``(b, d_l)`` and its vision prompt ``kron(M_v^k, P_s^k)``
    ``(b, d_v)``. Parameters per adapter: ``depth * (m*n + (b/m)*(d_l/n) + (b/m)*(d_v/n))``.

    Sizes that depend on the model (``d_l % n``, ``d_v % n``, ``depth <= layers``) are checked when the
    adapter is injected, which also records the model's tower sizes in ``tower_sizes``. `to_dict` gives
    exactly the JSON written to ``adapter_config.json`` (lists, never tuples or sets).
    """

    prompt_length: int = field(
        default=MMAP_CLI_FIELDS["prompt_length"][0],
        metadata={"help": f"{MMAP_CLI_FIELDS['prompt_length'][1]}."},
    )
    source_shape: list[int] = field(
        default_factory=lambda: list(MMAP_CLI_FIELDS["source_shape"][0]),
        metadata={
            "help": f"{MMAP_CLI_FIELDS['source_shape'][1]}. A tuple is accepted and stored as a list (the JSON form)."
        },
    )
    depth: int | None = field(
        default=MMAP_CLI_FIELDS["depth"][0], metadata={"help": f"{MMAP_CLI_FIELDS['depth'][1]}."}
    )
    init_std: float = field(
        default=0.02, metadata={"help": "Std of the Gaussian init of the source prompts."}
    )
    scale_init: Literal["vision_zeros", "ones", "zeros", "normal"] = field(
        default=SCALE_INITS[0],
        metadata={
            "help": "Init of the scaling matrices: 'vision_zeros' (text scales at one: each text prompt starts "
            "as tiled copies of P_s ~ N(0, init_std); vision scales at zero: each vision prompt starts as zero "
            "tokens, which a layer's LayerNorm maps to its bias; every factor gets a gradient at the first "
            "step, P_s through the text tower; on a vision-only model the vision scales start at one), 'ones' "
            "(both towers' prompts start as the same tiled copies of P_s), 'zeros' (prompts start as zero "
            "tokens; P_s gets no gradient until M has moved) or 'normal' (N(0, 1) entries)."
        },
    )
    text_placement: Literal["insert", "replace"] = field(
        default=TEXT_PLACEMENTS[0],
        metadata={
            "help": f"{TEXT_PLACEMENT_HELP}. Configs saved before this field existed load as 'insert'."
        },
    )
    target_modules: str | list[str] | None = field(
        default=CLIP_ENCODER_LAYERS,
        metadata={"help": "Regex (full match) or names of the CLIPEncoderLayer modules to wrap."},
    )
    exclude_modules: str | list[str] | None = field(default=None, metadata={"help": "Modules not to wrap."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save, as in other PEFT methods."}
    )
    tower_sizes: dict[str, dict[str, int]] | None = field(
        default=None,
        metadata={
            "help": "Filled in when the adapter is injected: the CLIP towers of that model with their hidden size "
            "and number of layers, e.g. {'text': {'hidden_size': 512, 'num_layers': 12}, 'vision': "
            "{'hidden_size': 768, 'num_layers': 12}}; saved in adapter_config.json. Loading the adapter onto a "
            "model with other sizes is refused before the model is changed. None (configs saved before this "
            "field existed) skips this check; the shapes of the saved weights are still checked."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MMAP_PEFT_TYPE
        _check_positive_int(self.prompt_length, "prompt_length")
        shape = self.source_shape
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"MmAPConfig.source_shape must be a pair (m, n), got {shape!r}.")
        self.source_shape = [shape[0], shape[1]]
        _check_positive_int(shape[0], "source_shape[0] (m)")
        _check_positive_int(shape[1], "source_shape[1] (n)")
        if self.prompt_length % shape[0]:
            raise ValueError(
                f"MmAPConfig.prompt_length (b={self.prompt_length}) must be divisible by source_shape[0] "
                f"(m={shape[0]}): the scaling matrices have b/m rows."
            )
        if self.depth is not None:
            _check_positive_int(self.depth, "depth")
        if (
            isinstance(self.init_std, bool)
            or not isinstance(self.init_std, (int, float))
            or not self.init_std > 0
        ):
            raise ValueError(f"MmAPConfig.init_std must be a positive float, got {self.init_std!r}.")
        if self.scale_init not in SCALE_INITS:
            raise ValueError(f"MmAPConfig.scale_init must be one of {SCALE_INITS}, got {self.scale_init!r}.")
        if self.text_placement not in TEXT_PLACEMENTS:
            raise ValueError(
                f"MmAPConfig.text_placement must be one of {TEXT_PLACEMENTS}, got {self.text_placement!r}."
            )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        _check_tower_sizes(self.tower_sizes)

    def to_dict(self) -> dict:
        """The fields as JSON values (sets as sorted lists): exactly what ``adapter_config.json`` holds.

        ``base_model_name_or_path`` is written portably: the shipped tiny CLIP's folder, which PEFT records as
        the path the model was loaded from, becomes its name ``peft_mmap:tiny-clip``; a Hub id or a user's own
        folder is written as PEFT recorded it (`peft_mmap.base_models.portable_model_name`).
        """
        data = {k: sorted(v) if isinstance(v, set) else v for k, v in super().to_dict().items()}
        data["base_model_name_or_path"] = portable_model_name(data.get("base_model_name_or_path"))
        return data

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``adapter_config.json`` (PEFT's writer) and give the folder's weights normal permissions.

        ``PeftModel.save_pretrained`` calls this right after writing ``adapter_model.safetensors``, which
        safetensors creates with mode ``0o600`` (its own temporary file); it then gets the mode of any new file
        (``0o644`` under umask ``022``).
        """
        super().save_pretrained(save_directory, **kwargs)
        weights = Path(save_directory, SAFETENSORS_WEIGHTS_NAME)
        if weights.is_file():
            weights.chmod(new_file_mode(save_directory))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs
    ) -> MmAPConfig:
        """Load ``adapter_config.json`` (PEFT's loader) and validate the adapter's weights file.

        ``PeftModel.from_pretrained`` and ``load_adapter`` call this before PEFT injects the adapter and reads
        ``adapter_model.safetensors``; checking the file's header here turns a truncated or corrupted file into
        a ``ValueError`` that names it, instead of safetensors' bare "Error while deserializing header". The
        weights' shapes are kept on the returned object (``checkpoint_shapes``, not a saved field), so that
        `MmAPModel.inject_adapter` refuses a checkpoint that does not fit the model before changing it. For
        a Hub repository the weights file is fetched here (PEFT then finds it in the cache); a repository
        without it is left to PEFT's own loader.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if Path(pretrained_model_name_or_path).is_dir():
            weights = Path(pretrained_model_name_or_path, subfolder or "", SAFETENSORS_WEIGHTS_NAME)
        else:
            weights = _hub_weights(str(pretrained_model_name_or_path), subfolder, kwargs)
        if weights is not None and weights.is_file():
            config.checkpoint_shapes = check_safetensors(weights, "MmAP adapter weights file")
        return config


def _hub_weights(repo_id: str, subfolder: str | None, kwargs: dict) -> Path | None:
    """The local copy of a Hub adapter's ``adapter_model.safetensors``, or ``None`` if there is none.

    Uses the download options PEFT passes on (``revision``, ``cache_dir``, ``token``), so PEFT's own download
    of the same file right after is a cache hit.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    options = {k: kwargs[k] for k in ("revision", "cache_dir", "token") if kwargs.get(k) is not None}
    try:
        return Path(hf_hub_download(repo_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **options))
    except EntryNotFoundError:  # no safetensors file in the repository, or offline and not cached
        return None
