"""Planted-teacher check: does a method find parameters that its own family can express?

A teacher (a method with every trainable parameter drawn from N(0, 1)) relabels every image of a
benchmark split with its own predictions. A fresh student is trained on the training images with those
labels, with the benchmark's recipe, and scored by its agreement with the teacher on the test images.
The labels are expressible by construction, so a student that stays near zero-shot CLIP's agreement with
the same teacher, or near its own agreement before training, "cannot find" rather than "cannot
express": its gradient path, its prompt placement, the trainer or its recipe keeps it from moving.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..classifier import CLIPTaskClassifier
from ..evaluate import AVERAGE, evaluate
from ..train import train
from .bench import Benchmark

#: The seed that draws the teacher's planted factors by default.
DEFAULT_TEACHER_SEED = 1234


def plant_normal(model: CLIPTaskClassifier, seed: int) -> None:
    """Draw every trainable parameter of ``model`` from N(0, 1), in place, in ``parameters()`` order, from a
    generator seeded with ``seed`` (so the draw does not touch, or depend on, torch's global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))


@torch.no_grad()
def relabel(
    model: CLIPTaskClassifier, datasets: Mapping[str, Dataset], batch_size: int = 128
) -> dict[str, TensorDataset]:
    """Each task's images with ``model``'s predictions as labels: ``{task: TensorDataset(pixels (N, 3, H, W),
    labels (N,))}``, in the datasets' order (``model`` is left in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for task, dataset in datasets.items():
        pixels = torch.cat([batch for batch, _ in DataLoader(dataset, batch_size=batch_size)])
        labels = torch.cat(
            [model(chunk.to(device), task).argmax(-1).cpu() for chunk in pixels.split(batch_size)]
        )
        out[task] = TensorDataset(pixels, labels)
    return out


def run_planted_teacher(
    bench: Benchmark,
    students: Sequence[tuple[str, int]],
    teacher: str = "mmap",
    teacher_seed: int = DEFAULT_TEACHER_SEED,
    log: Callable[[str], None] = print,
) -> dict:
    """Plant a ``teacher`` method on the split of ``bench``'s first seed and train each ``(method, seed)`` of
    ``students`` on its labels.

    The teacher is built with the split's seed and its recipe's builder options, then `plant_normal` with
    ``teacher_seed``; every student is built after ``torch.manual_seed(seed)`` and trained with its recipe
    under ``bench.spec`` (`peft_mmap.apps.bench.BenchmarkSpec.recipe`). Grouped methods use
    ``bench.grouping()``. Agreements are accuracies (percent) against the teacher's labels.

    Raises:
        ValueError: the teacher or a student has no trainable parameters (e.g. ``"zeroshot"``).

    Returns:
        ``{"teacher": {"method", "seed", "split_seed"}, "zero_shot": {task: agreement, "average": ...},
        "students": [{"method", "seed", "before", "after", "train_after", "loss": [first, last], "steps"}]}``
        where ``before``/``after`` are test agreements (per task and ``"average"``) before and after
        training, ``train_after`` the average agreement on the training images after training, and
        ``loss`` the summed task loss of the first and last step.
    """
    split_seed = bench.spec.seeds[0]
    data = bench.seed_data(split_seed)
    groups = bench.grouping()
    batch = bench.spec.eval_batch_size

    def build(method: str, seed: int, role: str | None = None) -> CLIPTaskClassifier:
        torch.manual_seed(seed)
        options = bench.spec.recipe(method, seed)[1]
        model = bench.build(method, seed, data.splits, groups, options).to(bench.device)
        if role and not model.trainable_parameter_count():
            raise ValueError(f"The {role} {method!r} has no trainable parameters; expected a trained method.")
        return model

    planted = build(teacher, split_seed, "teacher")
    plant_normal(planted, teacher_seed)
    train_labels, test_labels = relabel(planted, data.train, batch), relabel(planted, data.test, batch)
    zero_shot = evaluate(build("zeroshot", split_seed), test_labels, batch_size=batch)
    log(f"planted {teacher} (seed {teacher_seed}): zero-shot agreement {zero_shot[AVERAGE]:.1f} %")
    runs = []
    for method, seed in students:
        student = build(method, seed, "student")
        before = evaluate(student, test_labels, batch_size=batch)
        config = bench.spec.recipe(method, seed)[0]
        result = train(student, train_labels, config, device=bench.device, progress=bench.progress)
        after = evaluate(student, test_labels, batch_size=batch)
        train_after = evaluate(student, train_labels, batch_size=batch)[AVERAGE]
        losses = [sum(step.values()) for step in result.history]
        run = {"method": method, "seed": seed, "before": before, "after": after, "train_after": train_after}
        runs.append({**run, "loss": [losses[0], losses[-1]], "steps": result.global_step})
        log(
            f"{method} seed {seed}: test agreement {before[AVERAGE]:.1f} -> {after[AVERAGE]:.1f} % "
            f"(train {train_after:.1f} %), summed loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        )
    return {
        "teacher": {"method": teacher, "seed": teacher_seed, "split_seed": split_seed},
        "zero_shot": zero_shot,
        "students": runs,
    }


def planted_teacher_markdown(result: Mapping) -> str:
    """The result of `run_planted_teacher` as a table: one row per student, zero-shot CLIP first."""
    teacher = result["teacher"]
    lines = [
        f"Teacher: `{teacher['method']}` with N(0, 1) factors (seed {teacher['seed']}), split seed "
        f"{teacher['split_seed']}; test agreement with the teacher's labels (%).",
        "",
        "| Student | Seed | Before | After | Train after | Summed loss, first → last step |",
        "|:---|---:|---:|---:|---:|---:|",
        f"| zero-shot CLIP | - | {result['zero_shot'][AVERAGE]:.1f} | - | - | - |",
    ]
    for run in result["students"]:
        first, last = run["loss"]
        before, after = run["before"][AVERAGE], run["after"][AVERAGE]
        lines.append(
            f"| `{run['method']}` | {run['seed']} | {before:.1f} | {after:.1f} | {run['train_after']:.1f} "
            f"| {first:.3f} → {last:.3f} |"
        )
    return "\n".join(lines) + "\n"
