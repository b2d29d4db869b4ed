"""Registration with peft: fails loudly when a peft release changes what MmAP relies on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
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


ENUM_CHECK = """
import importlib.util, sys, types
peft_types, registration = sys.argv[1], sys.argv[2]
for name in ("peft", "peft.utils"):
    sys.modules[name] = types.ModuleType(name)
spec = importlib.util.spec_from_file_location("peft.utils.peft_types", peft_types)
module = sys.modules["peft.utils.peft_types"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
spec = importlib.util.spec_from_file_location("registration", registration)
reg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reg)
P, m = module.PeftType, reg.MMAP_PEFT_TYPE
assert P("MMAP") is m and P["MMAP"] is m and P.MMAP is m and m in list(P) and m == "MMAP"
assert reg._add_enum_member() is m and len(set(P)) == len(list(P))
print("ok")
"""


def _find_python(version: str) -> str | None:
    """A working ``python<version>`` (on PATH or installed by pyenv), or ``None``."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}.*/bin/python"))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("version", ["3.10", "3.12", "3.13"])
def test_enum_extension_works_on_other_pythons(version):
    """The PeftType extension relies on enum internals: run it on every supported CPython found here.

    Only the enum step is exercised (peft's enum module and ours, loaded standalone), so no torch is needed
    for those interpreters.
    """
    python = _find_python(version)
    if python is None:
        pytest.skip(f"python{version} is not installed on this machine")
    import peft.utils.peft_types as peft_types

    import peft_mmap.peft_type as registration

    out = subprocess.run(
        [python, "-c", ENUM_CHECK, peft_types.__file__, registration.__file__],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
