"""Task affinity (Eq. 8): identical tasks agree, the matrix is symmetric, files are written, grouping follows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_clip
from PIL import Image
from test_train import COLOURS, colour_dataset

from peft_mmap import MmAPConfig
from peft_mmap.affinity import save_affinity, similarity_matrix, task_affinity
from peft_mmap.classifier import TaskSpec
from peft_mmap.grouping import group_tasks
from peft_mmap.train import TrainConfig

CONFIG = MmAPConfig(prompt_length=2, source_shape=(1, 8))
CLASSES = ["red", "green", "blue"]


def flipped_dataset(size: int) -> torch.utils.data.TensorDataset:
    """Same images as `colour_dataset` but labelled in reverse: its gradients oppose the original's."""
    pixels, labels = colour_dataset(size, 0).tensors
    return torch.utils.data.TensorDataset(pixels, (len(COLOURS) - 1) - labels)


def run(tokenizer, metric: str):
    same = colour_dataset(8, 0)  # batch_size 8: every batch is the whole set, in some order
    datasets = {"art": same, "clipart": same, "sketch": flipped_dataset(8)}
    tasks = [TaskSpec(name, CLASSES) for name in datasets]
    config = TrainConfig(epochs=3, batch_size=8, lr=0.01)
    return task_affinity(
        make_clip(), tokenizer, datasets, tasks, CONFIG, config, snapshots=3, metric=metric, progress=False
    )


def test_identical_tasks_have_identical_gradients(tokenizer, tmp_path):
    result = run(tokenizer, "dot")
    matrix = torch.tensor(result.matrix)
    assert result.task_names == ["art", "clipart", "sketch"] and result.snapshots == 3
    assert torch.equal(matrix, matrix.t())
    # art and clipart see the same images: same gradient g, so S[0][1] = g.g = S[0][0] = S[1][1] > 0.
    torch.testing.assert_close(matrix[0, 1], matrix[0, 0], rtol=1e-4, atol=0)
    torch.testing.assert_close(matrix[1, 1], matrix[0, 0], rtol=1e-4, atol=0)
    assert matrix[0, 1] > 0 and matrix[0, 2] < matrix[0, 1]
    assert group_tasks(result.matrix, result.task_names, num_groups=2) == [["art", "clipart"], ["sketch"]]

    json_path, png_path = save_affinity(result, tmp_path)
    saved = json.loads(json_path.read_text())
    assert saved["matrix"] == result.matrix and saved["task_names"] == result.task_names
    assert saved["metric"] == "dot"
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.width > 3 * 64
        assert image.getpixel((image.width - 20, image.height - 20)) != (255, 255, 255)


def test_cosine_metric_has_unit_diagonal(tokenizer):
    result = run(tokenizer, "cosine")
    matrix = torch.tensor(result.matrix)
    torch.testing.assert_close(matrix.diagonal(), torch.ones(3, dtype=matrix.dtype))
    torch.testing.assert_close(matrix[0, 1], torch.tensor(1.0, dtype=matrix.dtype), rtol=1e-4, atol=1e-4)


def test_similarity_matrix_is_eq_8():
    grads = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 1.0]], dtype=torch.float64)
    dot = similarity_matrix(grads, "dot")
    assert dot.tolist() == [[5.0, 1.0], [1.0, 11.0]]  # diagonal: squared gradient norms
    cosine = similarity_matrix(grads, "cosine")
    torch.testing.assert_close(cosine[0, 1], torch.tensor(1 / (5**0.5 * 11**0.5), dtype=torch.float64))
    with pytest.raises(ValueError, match="metric must be one of"):
        similarity_matrix(grads, "l2")


def test_bad_arguments(tokenizer):
    datasets = {"art": colour_dataset(4, 0)}
    with pytest.raises(ValueError, match="snapshots must be a positive integer, got 0"):
        task_affinity(make_clip(), tokenizer, datasets, {"art": CLASSES}, snapshots=0)
    with pytest.raises(
        ValueError, match=r"datasets cover tasks \['art'\] but the task specs are \['clipart'\]"
    ):
        task_affinity(make_clip(), tokenizer, datasets, {"clipart": CLASSES})


def test_same_seed_gives_the_same_affinity_and_groups(tokenizer):
    """The shared adapter is initialised from the run's seed, whatever the global RNG did before."""
    datasets = {
        "art": colour_dataset(8, 0),
        "clipart": colour_dataset(8, 1),
        "product": colour_dataset(8, 2),
        "sketch": flipped_dataset(8),
    }
    tasks = [TaskSpec(name, CLASSES) for name in datasets]
    config = TrainConfig(epochs=2, batch_size=4, lr=0.01, seed=7)
    results = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # unrelated use of the global RNG between the two runs
        torch.randn(100)
        result = task_affinity(
            make_clip(), tokenizer, datasets, tasks, CONFIG, config, snapshots=2, progress=False
        )
        results.append((result.matrix, group_tasks(result.matrix, result.task_names, num_groups=2)))
    assert results[0] == results[1]
