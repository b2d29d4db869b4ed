"""Registration of MmAP with PEFT: the only module that touches peft's method registry.

peft dispatches on the ``PeftType`` str-Enum and offers ``register_peft_method`` for methods whose name is
already a ``PeftType`` member, with no plugin hook for new names. We therefore add the ``MMAP`` member to the
enum the way the enum machinery does itself, then call peft's public ``register_peft_method``. Both steps
are idempotent; a clash with a different existing ``MMAP`` registration raises.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

MMAP_NAME = "MMAP"


def _add_enum_member() -> PeftType:
    """Return ``PeftType.MMAP``, creating the member if this peft release has none."""
    existing = PeftType.__members__.get(MMAP_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, MMAP_NAME)
    member._name_ = MMAP_NAME
    member._value_ = MMAP_NAME
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    member.__init__(MMAP_NAME)
    type.__setattr__(PeftType, MMAP_NAME, member)
    PeftType._member_map_[MMAP_NAME] = member
    PeftType._value2member_map_[MMAP_NAME] = member
    PeftType._member_names_.append(MMAP_NAME)
    if PeftType(MMAP_NAME) is not member or member not in list(PeftType):
        raise RuntimeError("Could not add MMAP to peft's PeftType enum; this peft release is not supported.")
    return member


MMAP_PEFT_TYPE: PeftType = _add_enum_member()


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
