"""Registration with peft: fails loudly when a peft release changes what MmAP relies on."""

from __future__ import annotations

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils.peft_types import PeftType

import peft_mmap
from peft_mmap import MmAPConfig, MmAPModel
from peft_mmap.registration import register


def test_mmap_is_a_peft_type():
    assert PeftType("MMAP") is PeftType.MMAP is peft_mmap.MMAP_PEFT_TYPE
    assert "MMAP" in [t.value for t in PeftType]
    assert PeftType.MMAP == "MMAP"


def test_dispatch_tables_point_to_mmap():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MMAP] is MmAPConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MMAP] is MmAPModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MMAP] == "mmap_"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MMAP"] is MmAPConfig  # raw string lookup used by from_pretrained


def test_register_is_idempotent():
    register()
    register()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MMAP] is MmAPModel
