"""torchrun with 2 CPU processes (gloo) gives the same parameters as one process with the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_datasets, make_model

from peft_mmap.train import TrainConfig, train

TESTS = Path(__file__).resolve().parent
CONFIG = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=5)

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import torch
    from transformers import CLIPTokenizer
    from conftest import write_char_tokenizer
    from test_ddp import CONFIG
    from test_train import make_datasets, make_model
    from peft_mmap.train import train

    torch.set_num_threads(1)
    out = Path({out!r})
    tokenizer = CLIPTokenizer(str(out / "tok" / "vocab.json"), str(out / "tok" / "merges.txt"), model_max_length=20)
    train(make_model(tokenizer), make_datasets(), CONFIG, out / "run", progress=False)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_process_ddp_equals_single_process(tokenizer, tmp_path):
    from conftest import write_char_tokenizer

    (tmp_path / "tok").mkdir()
    write_char_tokenizer(tmp_path / "tok")
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), out=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    proc = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=1800
    )  # generous: CI machines may be loaded
    assert proc.returncode == 0, proc.stderr[-4000:]
    distributed = load_file(tmp_path / "run" / "checkpoint" / "trainable.safetensors")

    single = make_model(tokenizer)
    train(single, make_datasets(), CONFIG, progress=False)
    expected = {n: p.detach() for n, p in single.named_parameters() if p.requires_grad}
    assert distributed.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-6)
