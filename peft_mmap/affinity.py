"""Task affinity from gradient similarity on a global shared MmAP (paper Eq. 8, Fig. 3a).

One MmAP adapter shared by all tasks (`MultiTaskMmAP` with a single group and no task adapters) is trained
on all tasks with the regular trainer (sum of task losses, see `peft_mmap.train`). Every ``every`` steps, up
to ``snapshots`` times, each task's loss gradient w.r.t. the shared MmAP parameters is computed separately on
that task's batch of the step that just ran (after its update, without stepping), and the pairwise dot
products (or cosine similarities) are accumulated; the result is their mean over snapshots. The frozen CLIP
gets no gradient. Run it in a single process (each rank would only see its own shard of a batch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.utils.data import Dataset
from transformers import CLIPModel, PreTrainedTokenizerBase

from .checks import is_positive_int
from .classifier import CLIPTaskClassifier, TaskSpec, as_task_specs, classifier_family
from .config import MmAPConfig
from .files import atomic_write, atomic_write_json
from .multitask import MultiTaskMmAP
from .train import StepEvent, TrainConfig, seed_everything, steps_per_epoch, train

METRICS = ("dot", "cosine")
AFFINITY_JSON = "affinity.json"
AFFINITY_PNG = "affinity.png"


@dataclass
class AffinityResult:
    """Mean pairwise task similarity: ``matrix[i][j]`` relates ``task_names[i]`` and ``task_names[j]``."""

    matrix: list[list[float]]
    task_names: list[str]
    snapshots: int
    metric: str = "dot"

    def to_dict(self) -> dict:
        return {
            "task_names": list(self.task_names),
            "matrix": [list(row) for row in self.matrix],
            "snapshots": self.snapshots,
            "metric": self.metric,
        }


def task_gradients(
    model: CLIPTaskClassifier,
    batches: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    params: Sequence[nn.Parameter],
) -> torch.Tensor:
    """Flattened gradient of each task's mean cross-entropy w.r.t. ``params``: ``(T, P)`` float64.

    ``batches`` maps task -> ``(pixel_values (B, 3, H, W), labels (B,))``. Parameter ``.grad`` fields are not
    touched; parameters a task does not reach contribute zeros.
    """
    rows = []
    for task, (pixels, labels) in batches.items():
        loss = F.cross_entropy(model(pixels, task).float(), labels)
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows).double()


def similarity_matrix(gradients: torch.Tensor, metric: str = "dot") -> torch.Tensor:
    """Pairwise similarity of gradient rows ``(T, P)``: dot products (Eq. 8) or cosine -> ``(T, T)``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}.")
    if metric == "cosine":
        gradients = F.normalize(gradients, dim=-1)
    return gradients @ gradients.t()


def task_affinity(
    clip: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    datasets: Mapping[str, Dataset],
    tasks: Sequence[TaskSpec] | dict[str, Sequence[str]],
    config: MmAPConfig | None = None,
    train_config: TrainConfig | None = None,
    snapshots: int = 10,
    every: int | None = None,
    metric: str = "dot",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> AffinityResult:
    """Train a global shared MmAP on all tasks and average gradient similarities over snapshots.

    Args:
        clip: the base ``CLIPModel`` (wrapped with PEFT in place; its weights stay frozen).
        tokenizer: its tokenizer.
        datasets: ``{task: dataset of (pixel_values, label)}`` (training images).
        tasks: the task specs (class names, templates) of the datasets' tasks.
        config: MmAP config of the shared adapter.
        train_config: trainer settings (default `TrainConfig()`); ``max_steps`` shortens the run.
        snapshots: how many similarity snapshots to average (at most).
        every: steps between snapshots; default: spread ``snapshots`` evenly over the run.
        metric: ``"dot"`` (paper Eq. 8) or ``"cosine"``.
        device: where to train (e.g. ``"cuda"``).
        progress: show the trainer's progress bar.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}.")
    if not is_positive_int(snapshots):
        raise ValueError(f"snapshots must be a positive integer, got {snapshots!r}.")
    if every is not None and not is_positive_int(every):
        raise ValueError(f"every must be None or a positive integer, got {every!r}.")
    specs = as_task_specs(tasks, classifier_family(clip).template)
    names = list(datasets)
    if sorted(names) != sorted(specs):
        raise ValueError(f"datasets cover tasks {sorted(names)} but the task specs are {sorted(specs)}.")
    train_config = train_config or TrainConfig()
    total = (
        steps_per_epoch({t: len(d) for t, d in datasets.items()}, train_config.batch_size)
        * train_config.epochs
    )
    if train_config.max_steps is not None:
        total = min(total, train_config.max_steps)
    every = every or max(1, total // snapshots)

    seed_everything(train_config.seed)  # the shared adapter's init: same seed, same affinity and groups
    model = MultiTaskMmAP(clip, tokenizer, [specs[t] for t in names], [names], config, task_adapters=False)
    shared = [p for p in model.parameters() if p.requires_grad]
    state = {"sum": torch.zeros(len(names), len(names), dtype=torch.float64), "count": 0}

    def snapshot(event: StepEvent) -> None:
        if event.global_step % every or state["count"] >= snapshots:
            return
        grads = task_gradients(event.model, {t: event.batches[t] for t in names}, shared)
        state["sum"] += similarity_matrix(grads, metric).cpu()
        state["count"] += 1

    train(model, datasets, train_config, device=device, progress=progress, callback=snapshot)
    if state["count"] == 0:
        raise ValueError(f"No snapshot was taken: the run has {total} steps but every={every}.")
    matrix = state["sum"] / state["count"]
    matrix = (matrix + matrix.t()) / 2  # exact symmetry despite float summation order
    return AffinityResult(matrix.tolist(), names, state["count"], metric)


def _colour(value: float, scale: float) -> tuple[int, int, int]:
    """White at 0, red for positive, blue for negative values (intensity ``|value| / scale``)."""
    strength = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    fade = round(255 * (1.0 - 0.85 * strength))
    return (255, fade, fade) if value >= 0 else (fade, fade, 255)


def render_heatmap(result: AffinityResult, cell: int = 64) -> Image.Image:
    """The similarity matrix as a coloured grid with task names (rows and rotated columns) and values."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(measure.textlength(n, font=font)) for n in result.task_names) + 12
    size = len(result.task_names)
    image = Image.new("RGB", (label_width + size * cell + 8, label_width + size * cell + 8), "white")
    draw = ImageDraw.Draw(image)
    scale = max((abs(v) for row in result.matrix for v in row), default=0.0)
    for i, name in enumerate(result.task_names):
        y = label_width + i * cell + cell // 2
        draw.text((label_width - 6, y), name, fill="black", font=font, anchor="rm")
        column = Image.new("RGB", (label_width, cell), "white")
        ImageDraw.Draw(column).text((6, cell // 2), name, fill="black", font=font, anchor="lm")
        image.paste(column.rotate(90, expand=True), (label_width + i * cell, 0))
        for j, value in enumerate(result.matrix[i]):
            x0, y0 = label_width + j * cell, label_width + i * cell
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=_colour(value, scale), outline="grey")
            draw.text((x0 + cell // 2, y0 + cell // 2), f"{value:.3g}", fill="black", font=font, anchor="mm")
    return image


def save_affinity(result: AffinityResult, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Atomically write ``affinity.json`` and the ``affinity.png`` heatmap into ``directory``."""
    directory = Path(directory)
    json_path = atomic_write_json(directory / AFFINITY_JSON, result.to_dict())
    image = render_heatmap(result)
    png_path = atomic_write(directory / AFFINITY_PNG, lambda tmp: image.save(tmp, format="PNG"))
    return json_path, png_path
