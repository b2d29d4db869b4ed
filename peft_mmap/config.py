"""`MmAPConfig`: the PEFT configuration of Multi-modal Alignment Prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .options import DEFAULT_PROMPT_LENGTH, DEFAULT_SOURCE_SHAPE
from .registration import MMAP_PEFT_TYPE

#: Matches every ``CLIPEncoderLayer`` of ``CLIPModel`` (``{text,vision}_model.encoder.layers.N``) and of the
#: single-tower models (``[text_model.|vision_model.]encoder.layers.N``).
CLIP_ENCODER_LAYERS = r"(.*\.)?encoder\.layers\.\d+"

SCALE_INITS = ("ones", "normal", "zeros")


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"MmAPConfig.{name} must be a positive int, got {value!r}.")


@dataclass
class MmAPConfig(PeftConfig):
    """Configuration of an MmAP adapter (Xin et al., AAAI 2024, Eq. 6-7).

    For every prompted layer ``k`` an adapter holds a source prompt ``P_s^k`` of shape ``(m, n)`` shared by
    both CLIP towers and two scaling matrices ``M_l^k`` ``(b/m, d_l/n)`` and ``M_v^k`` ``(b/m, d_v/n)``. The
    layer's text prompt is ``kron(M_l^k, P_s^k)`` ``(b, d_l)`` and its vision prompt ``kron(M_v^k, P_s^k)``
    ``(b, d_v)``. Parameters per adapter: ``depth * (m*n + (b/m)*(d_l/n) + (b/m)*(d_v/n))``.

    Sizes that depend on the model (``d_l % n``, ``d_v % n``, ``depth <= layers``) are checked when the
    adapter is injected.
    """

    prompt_length: int = field(
        default=DEFAULT_PROMPT_LENGTH,
        metadata={"help": "b: prompt tokens per layer and tower; must be divisible by source_shape[0]."},
    )
    source_shape: tuple[int, int] = field(
        default=DEFAULT_SOURCE_SHAPE,
        metadata={"help": "(m, n): shape of each layer's source prompt; n must divide both hidden sizes."},
    )
    depth: int | None = field(
        default=None,
        metadata={
            "help": "Layers (from the input) that get new prompts; None = every layer both towers have."
        },
    )
    init_std: float = field(
        default=0.02, metadata={"help": "Std of the Gaussian init of the source prompts."}
    )
    scale_init: Literal["zeros", "ones", "normal"] = field(
        default="zeros",
        metadata={
            "help": "Init of the scaling matrices: 'zeros' (prompts start as zero tokens, the smallest change to "
            "the pretrained model, as LoRA zero-initialises B), 'ones' (each prompt starts as tiled copies of "
            "P_s, text and vision prompts aligned) or 'normal' (N(0, 1) entries)."
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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MMAP_PEFT_TYPE
        _check_positive_int(self.prompt_length, "prompt_length")
        shape = self.source_shape
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"MmAPConfig.source_shape must be a pair (m, n), got {shape!r}.")
        self.source_shape = (shape[0], shape[1])
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
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
