"""Atomic writes with normal permissions: everything the library writes follows the process umask."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_umask_modes, make_clip, process_umask
from peft import get_peft_model
from safetensors.torch import save_file
from test_train import make_datasets, make_model

from peft_mmap import MmAPConfig
from peft_mmap.affinity import AffinityResult, save_affinity
from peft_mmap.apps.bench import plot_shot_sweep
from peft_mmap.apps.synthetic import generate_benchmark
from peft_mmap.baselines import save_trainable
from peft_mmap.evaluate import AVERAGE, write_results_json
from peft_mmap.files import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    complete_directory,
    make_temp_dir,
    make_temp_file,
    replace_directory,
)
from peft_mmap.multitask import MultiTaskMmAP
from peft_mmap.train import TrainConfig, train

UMASKS = [0o022, 0o027, 0o077]


@pytest.mark.parametrize("mask", UMASKS, ids=lambda m: f"umask{m:03o}")
def test_atomic_writes_and_temporary_paths_follow_the_umask(tmp_path, mask):
    root = tmp_path / "out"
    with process_umask(mask):
        atomic_write_text(root / "a.txt", "text")
        atomic_write_json(root / "nested" / "b.json", {"x": 1})
        atomic_write(root / "c.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
        (root / "d.txt").write_text("old")
        (root / "d.txt").chmod(0o600)
        atomic_write_text(root / "d.txt", "new")  # a replaced file gets new-file permissions too
        make_temp_dir(root, prefix=".staging-")
        make_temp_file(root, prefix=".e.")
    assert (root / "d.txt").read_text() == "new"
    assert assert_umask_modes(root, mask) == 5


def test_temporary_names_are_unique_and_hidden(tmp_path):
    names = {make_temp_file(tmp_path, prefix=".x.").name for _ in range(20)}
    names |= {make_temp_dir(tmp_path, prefix=".x.").name for _ in range(20)}
    assert len(names) == 40 and all(n.startswith(".x.") for n in names)


def test_a_failed_atomic_write_leaves_no_file(tmp_path):
    def fail(tmp):
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.json", fail)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=lambda m: f"umask{m:03o}")
def test_every_output_of_the_library_follows_the_umask(tokenizer, tmp_path, mask):
    """Adapters (PEFT layout and multi-task folders with manifest and card), training checkpoints, baseline
    weights, the synthetic benchmark, results and benchmark plots: none is left at tempfile's 0600."""
    root = tmp_path / "out"
    with process_umask(mask):
        root.mkdir()
        get_peft_model(make_clip(), MmAPConfig(prompt_length=2, source_shape=(1, 8))).save_pretrained(
            root / "peft"
        )
        model = make_model(tokenizer)
        train(
            model,
            make_datasets(),
            TrainConfig(epochs=1, batch_size=8, max_steps=1),
            root / "run",
            progress=False,
        )
        model.save_pretrained(root / "adapters")
        model.save_pretrained(root / "adapters")  # an update in place (staging folder, commit marker)
        save_trainable(model, root / "weights.safetensors")
        generate_benchmark(root / "data", images_per_class=1, size=16, classes=["circle"], domains=["Photo"])
        write_results_json(
            root / "results.json", {"mmap": {"tasks": {"art": 50.0}, "average": 50.0, "trainable_params": 1}}
        )
        save_affinity(AffinityResult([[1.0, 0.5], [0.5, 1.0]], ["art", "clipart"], 1), root / "grouping")
        sweep = {"shots": [1, 2], "methods": {"mmap": {"1": {AVERAGE: 50.0}, "2": {AVERAGE: 60.0}}}}
        plot_shot_sweep(sweep, root / "sweep.png")
    assert MultiTaskMmAP.from_pretrained(make_clip(), root / "adapters", tokenizer=tokenizer)
    assert json.loads((root / "run" / "checkpoint" / "trainer_state.json").read_text())["global_step"] == 1
    assert assert_umask_modes(root, mask) > 15


def _has_marker(folder):
    return (folder / "marker.txt").is_file()


def test_replace_directory_swaps_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "state"
    replace_directory(target, lambda staging: atomic_write_text(staging / "marker.txt", "v1"))
    replace_directory(target, lambda staging: atomic_write_text(staging / "marker.txt", "v2"))
    assert (target / "marker.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no .new/.old left

    def fail(staging):
        atomic_write_text(staging / "marker.txt", "half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_directory(target, fail)
    assert complete_directory(target, _has_marker) == target
    assert (target / "marker.txt").read_text() == "v2"
    replace_directory(target, lambda staging: atomic_write_text(staging / "marker.txt", "v3"))
    assert (target / "marker.txt").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_complete_directory_finds_the_old_folder_after_a_swap_cut_short(tmp_path):
    target = tmp_path / "state"
    assert complete_directory(target, _has_marker) is None
    old = tmp_path / "state.old"  # a crash between the two renames: only .old (and .new) remain
    atomic_write_text(old / "marker.txt", "v1")
    atomic_write_text(tmp_path / "state.new" / "partial.txt", "x")
    assert complete_directory(target, _has_marker) == old
    replace_directory(target, lambda staging: atomic_write_text(staging / "marker.txt", "v2"))
    assert complete_directory(target, _has_marker) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
