"""Headroom of a benchmark: a few-shot linear probe on frozen CLIP image features against zero-shot.

A method-agnostic check that adaptation can help at all: if a logistic-regression head trained on frozen
image features of the training shots does not beat CLIP's zero-shot head (the class-prompt text
embeddings), no prompt or adapter method has anything to learn on that benchmark beyond the noise.

The probe starts from the zero-shot head (text features times CLIP's logit scale) and is pulled back to it
by an L2 penalty whose strength is picked from a grid on a held-out quarter of the training shots, then
refit on all of them (a very strong penalty gives back the zero-shot head).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import CLIPModel, CLIPProcessor

from ..base_models import load_clip_model, load_pretrained
from ..classifier import DEFAULT_TEMPLATE
from ..data import ImageClassificationDataset, Sample, TaskFolder, few_shot_split

#: L2 strengths (toward the zero-shot head) tried on the held-out shots.
PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_PROBE_STEPS = 300


@torch.no_grad()
def image_features(
    clip: CLIPModel, processor: CLIPProcessor, samples: Sequence[Sample], batch_size: int = 128
) -> torch.Tensor:
    """L2-normalised projected image features ``(N, D)`` of ``samples``."""
    dataset = ImageClassificationDataset(samples, processor.image_processor)
    device = clip.logit_scale.device
    chunks = [
        F.normalize(clip.get_image_features(pixel_values=pixels.to(device)).pooler_output, dim=-1).cpu()
        for pixels, _ in DataLoader(dataset, batch_size=batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def zero_shot_head(
    clip: CLIPModel, processor: CLIPProcessor, classnames: Sequence[str], template: str = DEFAULT_TEMPLATE
) -> torch.Tensor:
    """CLIP's zero-shot classifier weights ``(C, D)``: normalised class-prompt text features x logit scale."""
    text = processor.tokenizer([template.format(c) for c in classnames], padding=True, return_tensors="pt")
    text = {k: v.to(clip.logit_scale.device) for k, v in text.items()}
    features = F.normalize(clip.get_text_features(**text).pooler_output, dim=-1)
    return (features * clip.logit_scale.exp()).cpu()


def fit_probe(
    features: torch.Tensor, labels: torch.Tensor, init: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Logistic-regression weights ``(C, D)`` from ``features`` ``(N, D)`` and ``labels`` ``(N,)``.

    Minimises mean cross-entropy + ``penalty * ||W - init||^2`` with full-batch L-BFGS from ``init``.
    """
    weight = init.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], max_iter=_PROBE_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T, labels) + penalty * (weight - init).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


def _accuracy(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (features @ weight.T).argmax(-1).eq(labels).float().mean().item()


def fit_chosen_probe(
    train: tuple[torch.Tensor, torch.Tensor], init: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """``(weights (C, D), penalty)``: the probe fitted on all of ``train`` (features, labels), its penalty picked
    from :data:`PENALTIES` on a seeded held-out quarter of ``train``."""
    features, labels = train
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held, fit = order[: len(order) // 4], order[len(order) // 4 :]
    scores = [
        _accuracy(fit_probe(features[fit], labels[fit], init, p), features[held], labels[held])
        for p in PENALTIES
    ]
    penalty = PENALTIES[int(np.argmax(scores))]
    return fit_probe(features, labels, init, penalty), penalty


def probe_accuracy(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    init: torch.Tensor,
    seed: int = 0,
) -> tuple[float, float]:
    """``(probe accuracy, chosen penalty)`` on ``test`` of the probe `fit_chosen_probe` fits on ``train``."""
    weight, penalty = fit_chosen_probe(train, init, seed)
    return _accuracy(weight, *test), penalty


def _class_accuracy(
    weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]
) -> dict[str, float]:
    """Accuracy (percent) on the test images of each class that has some."""
    hits = (features @ weight.T).argmax(-1).eq(labels).float()
    return {
        c: 100.0 * hits[labels == i].mean().item() for i, c in enumerate(classnames) if (labels == i).any()
    }


def measure_headroom(
    model_id: str | os.PathLike,
    folders: Mapping[str, TaskFolder],
    shots: int = 16,
    seeds: Sequence[int] = (1,),
    template: str = DEFAULT_TEMPLATE,
) -> dict:
    """Zero-shot and ``shots``-shot linear-probe accuracy (percent) of every task, averaged over ``seeds``.

    Returns ``{"shots", "seeds", "tasks": {task: {"zero_shot", "probe", "classes": {class: {"zero_shot",
    "probe"}}}}, "average": {"zero_shot", "probe", "gain"}}`` (``classes``: accuracy on each class's test
    images).
    """
    torch.manual_seed(0)
    clip = load_clip_model(model_id).eval()
    processor = load_pretrained(CLIPProcessor, model_id)
    per_task: dict[str, dict[str, list[float]]] = {t: {"zero_shot": [], "probe": []} for t in folders}
    per_class: dict[str, dict[str, dict[str, list[float]]]] = {t: {} for t in folders}
    for seed in seeds:
        for name, split in few_shot_split(dict(folders), shots=shots, seed=seed).items():
            head = zero_shot_head(clip, processor, split.classnames, template)
            train = (
                image_features(clip, processor, split.train),
                torch.tensor([s.label for s in split.train]),
            )
            test = (image_features(clip, processor, split.test), torch.tensor([s.label for s in split.test]))
            probe = fit_chosen_probe(train, head, seed)[0]
            per_task[name]["zero_shot"].append(_accuracy(head, *test))
            per_task[name]["probe"].append(_accuracy(probe, *test))
            for key, weight in (("zero_shot", head), ("probe", probe)):
                for c, acc in _class_accuracy(weight, *test, split.classnames).items():
                    per_class[name].setdefault(c, {"zero_shot": [], "probe": []})[key].append(acc)
    tasks = {
        t: {
            **{k: float(np.mean(v)) for k, v in r.items()},
            "classes": {c: {k: float(np.mean(v)) for k, v in a.items()} for c, a in per_class[t].items()},
        }
        for t, r in per_task.items()
    }
    average = {k: float(np.mean([r[k] for r in tasks.values()])) for k in ("zero_shot", "probe")}
    average["gain"] = average["probe"] - average["zero_shot"]
    return {"shots": shots, "seeds": list(seeds), "tasks": tasks, "average": average}
