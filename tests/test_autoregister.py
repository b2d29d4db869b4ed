"""``import peft_mmap`` registers MMAP with peft whichever is imported first, without importing peft itself."""

from __future__ import annotations

import warnings

import pytest
from conftest import make_clip
from test_cli import run_python

from peft_mmap import MmAPConfig

LOAD = """
import sys
{imports}
from transformers import CLIPModel
model = PeftModel.from_pretrained(CLIPModel.from_pretrained({clip!r}), {adapter!r})
assert type(model.base_model).__name__ == "MmAPModel", type(model.base_model)
assert model.peft_config["default"].prompt_length == 2
assert not [f for f in sys.meta_path if type(f).__name__ == "_PostImportFinder"]  # removed once registered
print("loaded")
"""

ORDERS = {
    "peft_mmap first": "import peft_mmap\nassert 'torch' not in sys.modules\nfrom peft import PeftModel",
    "peft first": "from peft import PeftModel\nimport peft_mmap",
    "a submodule imports peft": "import peft_mmap.config\nfrom peft import PeftModel",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base CLIP folder and an MMAP adapter saved with PEFT's own ``save_pretrained``."""
    from peft import get_peft_model

    folder = tmp_path_factory.mktemp("saved")
    make_clip().save_pretrained(folder / "clip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft 0.21 on transformers 5 (see multitask.py)
        model = get_peft_model(make_clip(), MmAPConfig(prompt_length=2, source_shape=(1, 8)))
    model.save_pretrained(folder / "adapter")
    return folder


@pytest.mark.parametrize("order", list(ORDERS))
def test_a_saved_adapter_loads_in_a_fresh_process(order, saved):
    script = LOAD.format(imports=ORDERS[order], clip=str(saved / "clip"), adapter=str(saved / "adapter"))
    result = run_python("-W", "ignore::FutureWarning", "-c", script)
    assert result.returncode == 0 and result.stdout.strip().endswith("loaded"), result.stderr
