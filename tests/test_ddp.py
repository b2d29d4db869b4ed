"""torchrun with 2 CPU processes (gloo) gives the same parameters as one process with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_scale
from safetensors.torch import load_file
from test_train import make_datasets, make_model

from peft_mmap.train import TrainConfig, train

TESTS = Path(__file__).resolve().parent
CONFIG = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=5)

SCRIPT = textwrap.dedent(
    """
    import sys
    import os
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
    rank = os.environ["RANK"]
    tokenizer = CLIPTokenizer(str(out / "tok" / "vocab.json"), str(out / "tok" / "merges.txt"), model_max_length=20)

    def report(event):  # per-rank progress, shown if the run fails or hangs
        print(f"rank {{rank}} step {{event.global_step}} losses {{event.losses}}", file=sys.stderr, flush=True)

    train(make_model(tokenizer), make_datasets(), CONFIG, out / "run", progress=False, callback=report)
    print(f"rank {{rank}} done", file=sys.stderr, flush=True)
    """
)
#: Seconds the two-process run may take on a loaded CI machine (alone it takes about 20 s).
TIMEOUT = 900


def run_torchrun(command: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run a ``torchrun`` command; on timeout stop it and its workers, leaving no process behind.

    torchrun starts each worker in a session of its own, so killing the launcher alone would orphan them:
    the launcher first gets SIGTERM (it then stops its workers), and its session SIGKILL if it lingers.
    Returns the exit code (``None`` after a timeout) and the combined output.
    """
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        return None, output


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
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
    code, output = run_torchrun(command, env, TIMEOUT)
    assert code is not None, f"torchrun did not finish in {TIMEOUT} s; killed. Output:\n{output[-6000:]}"
    assert code == 0, output[-6000:]
    distributed = load_file(tmp_path / "run" / "checkpoint" / "trainable.safetensors")

    single = make_model(tokenizer)
    train(single, make_datasets(), CONFIG, progress=False)
    expected = {n: p.detach() for n, p in single.named_parameters() if p.requires_grad}
    assert distributed.keys() == expected.keys()
    for name, value in expected.items():
        assert_close_to_scale(distributed[name], value)
