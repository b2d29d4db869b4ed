"""Registration of MmAP with PEFT: the only module that touches peft's method registry.

peft dispatches on the ``PeftType`` str-Enum and offers ``register_peft_method`` for methods whose name is
already a ``PeftType`` member, with no plugin hook for new names. `peft_mmap.peft_type` adds the ``MMAP``
member; `register` then calls peft's public ``register_peft_method``. Both steps are idempotent; a clash
with a different existing ``MMAP`` registration raises.
"""

from __future__ import annotations

from .peft_type import MMAP_NAME, MMAP_PEFT_TYPE


def register() -> None:
    """Register ``MmAPConfig``/``MmAPModel`` with peft under ``"MMAP"`` (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import MmAPConfig
    from .model import MmAPModel

    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(MMAP_PEFT_TYPE)
    if registered is MmAPConfig and PEFT_TYPE_TO_TUNER_MAPPING.get(MMAP_PEFT_TYPE) is MmAPModel:
        return
    if registered is not None:
        raise RuntimeError(f"peft already has a different method registered as {MMAP_NAME}: {registered!r}.")
    register_peft_method(name=MMAP_NAME.lower(), config_cls=MmAPConfig, model_cls=MmAPModel, prefix="mmap_")
