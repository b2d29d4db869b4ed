"""The ``MMAP`` member of peft's ``PeftType`` enum, which `MmAPConfig` needs and peft lacks.

peft dispatches on the ``PeftType`` str-Enum and offers ``register_peft_method`` only for methods whose name
is already a member, with no plugin hook for new names. This module adds the ``MMAP`` member the way the
enum machinery does itself (idempotent); it imports nothing from peft_mmap, so it can be checked on its own
on every supported Python (`peft_mmap.registration` then registers the method).
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
