"""argparse ``type`` callables shared by the command line and the benchmark entry points (no torch import)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _number_type(cast: Callable[[str], float], valid: Callable[[float], bool], expected: str) -> Callable:
    """An argparse ``type`` that parses with ``cast`` and accepts values where ``valid`` holds."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in "invalid <type> value" messages
    return parse


positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number_type(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number_type(float, lambda v: 0 < v < float("inf"), "a positive finite number")
fraction = _number_type(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")
non_negative_float = _number_type(float, lambda v: 0 <= v < float("inf"), "a non-negative finite number")
