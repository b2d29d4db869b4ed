"""The linear-probe headroom check: it finds a better head when there is one and keeps zero-shot otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import COLOURS, WORKSPACE_TASKS

from peft_mmap.apps.probe import PENALTIES, fit_probe, measure_headroom, probe_accuracy
from peft_mmap.data import scan_image_folder


def _clusters(
    seed: int, per_class: int, classes: int = 5, dim: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=generator)
    return F.normalize(features, dim=-1), labels


def test_probe_beats_a_wrong_head() -> None:
    train, test = _clusters(0, 16), _clusters(1, 30)
    wrong = torch.randn(5, 16, generator=torch.Generator().manual_seed(3)) * 10  # unrelated to the classes
    zero_shot = 100.0 * (test[0] @ wrong.T).argmax(-1).eq(test[1]).float().mean().item()
    probe, penalty = probe_accuracy(train, test, wrong)
    assert penalty in PENALTIES
    assert probe > zero_shot + 30
    assert probe > 90


def test_a_strong_penalty_keeps_the_initial_head() -> None:
    features, labels = _clusters(0, 8)
    init = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    weight = fit_probe(features, labels, init, penalty=1e6)
    torch.testing.assert_close(weight, init, atol=1e-3, rtol=0)


def test_headroom_reports_each_class_and_the_classes_average_to_the_task(workspace) -> None:
    result = measure_headroom(workspace / "model", scan_image_folder(workspace / "data"), shots=2, seeds=[1])
    assert set(result["tasks"]) == set(WORKSPACE_TASKS)
    for row in result["tasks"].values():
        assert set(row["classes"]) == set(COLOURS)
        for key in ("zero_shot", "probe"):  # 2 test images per class: the class mean is the task accuracy
            per_class = [accuracy[key] for accuracy in row["classes"].values()]
            assert abs(sum(per_class) / len(per_class) - row[key]) < 1e-3  # float32 means
