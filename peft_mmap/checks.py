"""Type-and-range predicates shared by the argument checks of every layer (``bool`` is never a number here)."""

from __future__ import annotations


def is_positive_int(value: object) -> bool:
    """``value`` is an ``int`` (not a ``bool``) greater than 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_positive_number(value: object) -> bool:
    """``value`` is an ``int`` or ``float`` (not a ``bool``) greater than 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
