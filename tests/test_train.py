"""The trainer: learning, bit-identical resume (epoch end and SIGTERM mid-epoch), NaN handling, checkpoints."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, make_clip
from safetensors.torch import load_file
from torch.utils.data import Dataset, TensorDataset

from peft_mmap import MmAPConfig
from peft_mmap.classifier import TaskSpec
from peft_mmap.multitask import MultiTaskMmAP
from peft_mmap.train import (
    NonFiniteLossError,
    TrainConfig,
    learning_rate,
    task_batch_indices,
    train,
)

TESTS = Path(__file__).resolve().parent
COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
TASKS = [
    TaskSpec("art", ["red", "green", "blue"]),
    TaskSpec("clipart", ["red", "green", "blue"], template="a drawing of {}."),
]


def colour_dataset(size: int, seed: int) -> TensorDataset:
    """Images of one flat colour per class plus noise: ``(3, 16, 16)``, label = colour index."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(size) % 3
    pixels = COLOURS[labels][:, :, None, None].expand(size, 3, 16, 16)
    return TensorDataset(pixels + 0.3 * torch.randn(size, 3, 16, 16, generator=generator), labels)


def make_model(tokenizer) -> MultiTaskMmAP:
    clip = make_clip()
    torch.manual_seed(0)
    return MultiTaskMmAP(
        clip, tokenizer, TASKS, [["art", "clipart"]], MmAPConfig(prompt_length=2, source_shape=(1, 8))
    )


def make_datasets() -> dict[str, TensorDataset]:
    return {"art": colour_dataset(16, 0), "clipart": colour_dataset(6, 1)}


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# Resume tests: 2 epochs of ceil(16 / 8) = 2 steps, SGD with momentum and a cosine schedule.
RESUME_CONFIG = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=3)


def full_set_losses(model: MultiTaskMmAP, datasets: dict[str, TensorDataset]) -> dict[str, float]:
    """Cross-entropy of each task over all of its training images, in eval mode."""
    model.eval()
    with torch.no_grad():
        losses = {
            task: F.cross_entropy(model(data.tensors[0], task), data.tensors[1]).item()
            for task, data in datasets.items()
        }
    model.train()
    return losses


def test_training_lowers_the_loss(tokenizer):
    model, datasets = make_model(tokenizer), make_datasets()
    before = full_set_losses(model, datasets)
    config = TrainConfig(epochs=4, batch_size=8, lr=0.01, optimizer="adamw", scheduler="constant")
    result = train(model, datasets, config, progress=False)
    assert result.global_step == 4 * 2 and result.epoch == 4
    after = full_set_losses(model, datasets)
    for task in ("art", "clipart"):
        assert after[task] < before[task] - 0.1, (task, before, after)
    assert model.training


def test_resume_at_epoch_end_is_bit_identical(tokenizer, tmp_path, caplog):
    straight = make_model(tokenizer)
    train(straight, make_datasets(), RESUME_CONFIG, progress=False)

    first = make_model(tokenizer)
    result = train(
        first,
        make_datasets(),
        TrainConfig(**{**RESUME_CONFIG.to_dict(), "max_steps": 2}),
        tmp_path,
        progress=False,
    )
    assert result.global_step == 2 and result.checkpoint_dir == tmp_path / "checkpoint"
    resumed = make_model(tokenizer)  # fresh weights: everything must come from the checkpoint
    with caplog.at_level(logging.WARNING, logger="peft_mmap.train"):
        result = train(resumed, make_datasets(), RESUME_CONFIG, tmp_path, resume=True, progress=False)
    assert result.global_step == 4 and len(result.history) == 2
    assert_identical(trainable(straight), trainable(resumed))
    assert "bit-identically" not in caplog.text

    with pytest.raises(FileExistsError, match="resume=True"):
        train(make_model(tokenizer), make_datasets(), RESUME_CONFIG, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"fields \['lr'\] differ"):
        train(
            make_model(tokenizer),
            make_datasets(),
            TrainConfig(epochs=2, batch_size=8, lr=0.1, seed=3),
            tmp_path,
            resume=True,
        )


def test_resume_under_another_thread_count_warns(tokenizer, tmp_path, caplog):
    """Bit-identity needs the writer's thread count (CPU kernels split sums by it): the checkpoint records
    it with the torch build and device type, and a resume under other values says so."""
    train(
        make_model(tokenizer),
        make_datasets(),
        TrainConfig(**{**RESUME_CONFIG.to_dict(), "max_steps": 2}),
        tmp_path,
        progress=False,
    )
    threads = torch.get_num_threads()
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["reproducibility"] == {"torch": torch.__version__, "device": "cpu", "num_threads": threads}
    torch.set_num_threads(threads + 1)
    try:
        with caplog.at_level(logging.WARNING, logger="peft_mmap.train"):
            result = train(
                make_model(tokenizer), make_datasets(), RESUME_CONFIG, tmp_path, resume=True, progress=False
            )
    finally:
        torch.set_num_threads(threads)
    assert result.global_step == 4
    assert f"num_threads {threads} -> {threads + 1}" in caplog.text and "not bit-identically" in caplog.text


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import torch
    torch.set_num_threads({num_threads})  # that of the runs it is compared with (sums split by thread count)
    from transformers import CLIPTokenizer
    from conftest import write_char_tokenizer
    from test_train import RESUME_CONFIG, make_datasets, make_model
    from peft_mmap.train import train

    out = Path({out!r})
    (out / "tok").mkdir(parents=True, exist_ok=True)
    write_char_tokenizer(out / "tok")
    tokenizer = CLIPTokenizer(str(out / "tok" / "vocab.json"), str(out / "tok" / "merges.txt"), model_max_length=20)

    def callback(event):
        if event.global_step == 3:  # epoch 2, step 1 of 2: a mid-epoch stop
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        train(make_model(tokenizer), make_datasets(), RESUME_CONFIG, out / "run", progress=False, callback=callback)
    except KeyboardInterrupt:
        sys.exit(3)
    """
)


def test_sigterm_writes_a_mid_epoch_checkpoint_that_resumes_bit_identically(tokenizer, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        SIGTERM_SCRIPT.format(tests=str(TESTS), out=str(tmp_path), num_threads=torch.get_num_threads())
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    state = (tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text()
    assert '"step_in_epoch": 1' in state and '"epoch": 1' in state and '"global_step": 3' in state

    resumed = make_model(tokenizer)
    result = train(resumed, make_datasets(), RESUME_CONFIG, tmp_path / "run", resume=True, progress=False)
    assert result.global_step == 4 and len(result.history) == 1
    straight = make_model(tokenizer)
    train(straight, make_datasets(), RESUME_CONFIG, progress=False)
    assert_identical(trainable(straight), trainable(resumed))


def test_in_process_signal_stops_after_the_step(tokenizer, tmp_path):
    def callback(event):
        if event.global_step == 1:
            signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background runner may start with SIG_IGN
    with pytest.raises(KeyboardInterrupt, match="global step 1"):
        train(
            make_model(tokenizer), make_datasets(), RESUME_CONFIG, tmp_path, progress=False, callback=callback
        )
    assert '"step_in_epoch": 1' in (tmp_path / "checkpoint" / "trainer_state.json").read_text()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored


class Poisonable(Dataset):
    """Returns NaN images once ``poisoned`` is set."""

    def __init__(self, inner: Dataset) -> None:
        self.inner, self.poisoned = inner, False

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        pixels, label = self.inner[index]
        return (pixels * float("nan") if self.poisoned else pixels), label


def test_nan_loss_names_step_and_task_and_keeps_the_last_checkpoint(tokenizer, tmp_path):
    datasets = make_datasets()
    datasets["clipart"] = Poisonable(datasets["clipart"])

    def callback(event):
        if event.global_step == 2:  # end of epoch 1; the first step of epoch 2 sees NaN images
            datasets["clipart"].poisoned = True

    with pytest.raises(
        NonFiniteLossError, match=r"task 'clipart' at global step 3 \(epoch 2, step 1"
    ) as info:
        train(make_model(tokenizer), datasets, RESUME_CONFIG, tmp_path, progress=False, callback=callback)
    assert isinstance(info.value, FloatingPointError) and info.value.task == "clipart"
    state = (tmp_path / "checkpoint" / "trainer_state.json").read_text()
    assert '"global_step": 2' in state
    assert all(
        torch.isfinite(t).all() for t in load_file(tmp_path / "checkpoint" / "trainable.safetensors").values()
    )


def test_checkpoint_holds_only_safetensors_and_json(tokenizer, tmp_path):
    config = TrainConfig(epochs=1, batch_size=8, optimizer="adamw")
    result = train(make_model(tokenizer), make_datasets(), config, tmp_path, progress=False)
    files = sorted(p.name for p in result.checkpoint_dir.iterdir())
    assert files == ["state.safetensors", "trainable.safetensors", "trainer_state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    for path in result.checkpoint_dir.iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # pickle protocol header
    state = load_file(result.checkpoint_dir / "state.safetensors")
    assert state["rng.torch"].dtype == torch.uint8
    assert any(k.endswith(".exp_avg_sq") for k in state) and any(k.endswith(".step") for k in state)


def test_gradient_checkpointing_gives_the_same_update(tokenizer):
    results = []
    for enabled in (False, True):
        model = make_model(tokenizer)
        config = TrainConfig(epochs=1, batch_size=8, max_steps=1, gradient_checkpointing=enabled)
        train(model, make_datasets(), config, progress=False)
        results.append(trainable(model))
    for name, want in results[0].items():  # the checkpointed layers run transformers' own forward: rounding
        assert_close_to_scale(results[1][name], want)


def test_task_sampling_cycles_fresh_shuffles():
    first = task_batch_indices(6, 4, seed=0, epoch=0, task_index=1, step=0)
    second = task_batch_indices(6, 4, seed=0, epoch=0, task_index=1, step=1)
    stream = first + second
    assert sorted(stream[:6]) == list(range(6)) and len(set(stream[6:])) == 2
    assert first == task_batch_indices(6, 4, seed=0, epoch=0, task_index=1, step=0)
    assert first != task_batch_indices(6, 4, seed=0, epoch=1, task_index=1, step=0)


def test_learning_rate_schedule():
    config = TrainConfig(epochs=3, warmup_epochs=1, lr=0.1, warmup_lr=1e-5)
    assert learning_rate(config, 0, 10) == learning_rate(config, 9, 10) == 1e-5
    assert learning_rate(config, 10, 10) == pytest.approx(0.1)
    assert learning_rate(config, 20, 10) == pytest.approx(0.05)
    assert learning_rate(TrainConfig(scheduler="constant", lr=0.2), 7, 10) == 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, r"epochs must be a positive integer, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be a positive integer, got 2.5"),
        ({"lr": -1.0}, r"lr must be a positive finite number, got -1.0"),
        ({"optimizer": "lion"}, r"optimizer must be one of \['sgd', 'adamw'\], got 'lion'"),
        ({"scheduler": "step"}, r"scheduler must be one of"),
        ({"precision": "fp8"}, r"precision must be one of"),
        ({"warmup_epochs": 5}, r"warmup_epochs must be smaller than epochs \(5\)"),
        ({"momentum": 1.0}, r"momentum must be smaller than 1"),
        ({"max_steps": 0}, r"max_steps must be None or a positive integer"),
        ({"grad_clip": float("nan")}, r"grad_clip must be None or a positive finite number"),
        ({"gradient_checkpointing": "yes"}, r"gradient_checkpointing must be True or False"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_bad_inputs(tokenizer):
    model = make_model(tokenizer)
    with pytest.raises(KeyError, match="Unknown task 'sketch'"):
        train(model, {"sketch": colour_dataset(4, 0)}, progress=False)
    with pytest.raises(ValueError, match=r"Tasks \['art'\] have no training images"):
        train(model, {"art": colour_dataset(0, 0)}, progress=False)
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device"):
        train(model, make_datasets(), TrainConfig(precision="fp16"), device="cpu", progress=False)
