"""The package namespace: light to import, every public name available, functions not shadowed by modules."""

from __future__ import annotations

import pytest
from test_cli import HEAVY, run_python

import peft_mmap


def test_import_peft_mmap_loads_no_heavy_module():
    script = "import sys, peft_mmap\nprint(*sorted(sys.modules))"
    result = run_python("-c", script)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert not [m for m in result.stdout.split() if m.split(".")[0] in HEAVY]


def test_every_public_name_resolves():
    for name in peft_mmap.__all__:
        assert getattr(peft_mmap, name) is not None
    assert set(peft_mmap.__all__) <= set(dir(peft_mmap))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        peft_mmap.nope  # noqa: B018


def test_functions_named_like_their_module_stay_functions():
    import peft_mmap.evaluate
    import peft_mmap.train  # binds the submodule on the package in a plain package
    from peft_mmap.evaluate import evaluate
    from peft_mmap.train import train

    assert peft_mmap.train is train and peft_mmap.evaluate is evaluate
