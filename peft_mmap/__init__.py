"""peft_mmap: Multi-modal Alignment Prompts (MmAP) for CLIP as a Hugging Face PEFT method.

``import peft_mmap`` registers the ``"MMAP"`` method with peft, so ``get_peft_model(clip, MmAPConfig(...))``
and ``PeftModel.from_pretrained(clip, "<dir>")`` work.
"""

from .config import MmAPConfig
from .hub import adapter_parameter_counts, model_card, push_to_hub, save_model_card
from .layer import MmAPLayer
from .model import MmAPModel
from .registration import MMAP_PEFT_TYPE, register

__version__ = "0.1.0"

register()

__all__ = [
    "MMAP_PEFT_TYPE",
    "MmAPConfig",
    "MmAPLayer",
    "MmAPModel",
    "__version__",
    "adapter_parameter_counts",
    "model_card",
    "push_to_hub",
    "save_model_card",
]
