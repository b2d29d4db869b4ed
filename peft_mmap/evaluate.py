"""Top-1 accuracy per task, mean ± std over seeds, and result tables in the paper's layout.

Tables have tasks as rows (plus ``Average``) and methods as columns; a cell is ``mean ± std`` in percent,
with the population standard deviation over seeds, or the plain accuracy of a single run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checks import is_positive_int
from .classifier import CLIPTaskClassifier
from .files import atomic_write_json

AVERAGE = "average"
"""Key of the mean over tasks in accuracy dicts (so no task may be called ``average``)."""

MeanStd = tuple[float, float]


def evaluate(
    model: CLIPTaskClassifier,
    datasets: Mapping[str, Dataset],
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy (percent) of ``model`` on each task's ``(pixel_values, label)`` dataset.

    Runs in eval mode without gradients, so each task's class text features are computed once (cached);
    the model's training mode is restored afterwards.

    Returns:
        ``{task: accuracy, ..., "average": mean over tasks}``.
    """
    if not datasets:
        raise ValueError("evaluate() needs at least one task dataset.")
    if AVERAGE in datasets:
        raise ValueError(f"A task may not be named {AVERAGE!r} (that key holds the mean over tasks).")
    if not is_positive_int(batch_size):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    for task, dataset in datasets.items():
        model.check_task(task)
        if len(dataset) == 0:
            raise ValueError(f"Task {task!r} has no test images.")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    accuracies: dict[str, float] = {}
    try:
        with torch.no_grad():
            for task, dataset in datasets.items():
                correct = 0
                loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
                for pixels, labels in tqdm(loader, desc=f"eval {task}", disable=not progress):
                    predictions = model(pixels.to(device), task).argmax(dim=-1).cpu()
                    correct += int((predictions == labels).sum())
                accuracies[task] = 100.0 * correct / len(dataset)
    finally:
        model.train(was_training)
    accuracies[AVERAGE] = float(np.mean([accuracies[t] for t in datasets]))
    return accuracies


def summarize(runs: Sequence[Mapping[str, float]]) -> dict[str, MeanStd]:
    """``{key: (mean, std)}`` over runs (e.g. seeds) that all report the same keys; std has ``ddof=0``."""
    if not runs:
        raise ValueError("summarize() needs at least one run.")
    keys = list(runs[0])
    for index, run in enumerate(runs):
        if set(run) != set(keys):
            raise ValueError(f"Run {index} reports {sorted(run)}, but run 0 reports {sorted(keys)}.")
    return {
        key: (float(np.mean([r[key] for r in runs])), float(np.std([r[key] for r in runs]))) for key in keys
    }


def _cell(value: float | MeanStd | None, digits: int) -> str:
    """``-`` (missing), ``mean ± std`` for a ``(mean, std)`` pair, the number alone for one run."""
    if value is None:
        return "-"
    if isinstance(value, tuple):
        mean, std = value
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{value:.{digits}f}"


def format_parameters(count: int) -> str:
    """``149620000 -> '149.62 M'``, ``24192 -> '0.024 M'`` (the paper's unit), ``0 -> '-'``."""
    if count == 0:
        return "-"
    millions = count / 1e6
    return f"{millions:.2f} M" if millions >= 0.1 else f"{millions:.3g} M"


def _rows(
    results: Mapping[str, Mapping[str, float | MeanStd]],
    task_order: Sequence[str],
    digits: int,
    parameters: Mapping[str, int] | None = None,
) -> tuple[list[str], list[list[str]]]:
    header = ["Task", *results]
    rows = []
    for key in [*task_order, AVERAGE]:
        label = "Average" if key == AVERAGE else key
        rows.append([label, *(_cell(method.get(key), digits) for method in results.values())])
    if parameters is not None:
        rows.append(["Parameters", *(format_parameters(parameters.get(m, 0)) for m in results)])
    return header, rows


def results_table_markdown(
    results: Mapping[str, Mapping[str, float | MeanStd]],
    task_order: Sequence[str],
    digits: int = 1,
    parameters: Mapping[str, int] | None = None,
) -> str:
    """A markdown table: one row per task of ``task_order`` plus ``Average``, one column per method.

    Args:
        results: ``{method: {task: accuracy of one run, or (mean, std)}}``, e.g. `summarize` output per
            method; a missing task shows as ``-``.
        task_order: the rows, in order.
        digits: decimals of the percentages.
        parameters: ``{method: trainable parameters}`` for a last ``Parameters`` row.
    """
    header, rows = _rows(results, task_order, digits, parameters)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", *["---:"] * (len(header) - 1)]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_table_text(
    results: Mapping[str, Mapping[str, float | MeanStd]],
    task_order: Sequence[str],
    digits: int = 1,
    parameters: Mapping[str, int] | None = None,
) -> str:
    """The same table as `results_table_markdown` with aligned plain-text columns, for the terminal."""
    header, rows = _rows(results, task_order, digits, parameters)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])]) + "\n"


def method_result(runs: Sequence[Mapping[str, float]], trainable_params: int) -> dict:
    """One method's entry of the results JSON from its per-seed `evaluate` outputs."""
    stats = summarize(runs)
    tasks = [k for k in stats if k != AVERAGE]
    return {
        "tasks": {t: stats[t][0] for t in tasks},
        "average": stats[AVERAGE][0],
        "trainable_params": int(trainable_params),
        "std": {k: v[1] for k, v in stats.items()},
        "runs": [dict(r) for r in runs],
    }


def write_results_json(
    path: str | os.PathLike,
    methods: Mapping[str, Mapping],
    grouping: Sequence[Sequence[str]] | None = None,
    seeds: Sequence[int] | None = None,
    **extra: object,
) -> Path:
    """Atomically write ``{"methods": ..., "grouping": [[...]], "seeds": [...], **extra}``.

    Each method entry (see `method_result`) needs ``tasks`` (``{task: acc}``), ``average`` and
    ``trainable_params``; ``std`` and other keys are kept. Accuracies must be finite numbers.
    """
    for name, entry in methods.items():
        missing = [k for k in ("tasks", "average", "trainable_params") if k not in entry]
        if missing:
            raise ValueError(f"Method {name!r} lacks {missing} in its results entry.")
        values = [entry["average"], *entry["tasks"].values()]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"Method {name!r} has non-finite or non-numeric accuracies: {values}.")
    payload = {
        "methods": {name: dict(entry) for name, entry in methods.items()},
        "grouping": [list(g) for g in grouping] if grouping is not None else [],
        "seeds": list(seeds) if seeds is not None else [],
        **extra,
    }
    return atomic_write_json(path, payload)
