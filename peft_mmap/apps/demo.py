"""`peft-mmap demo`: the whole method, offline, on the shipped tiny CLIP and the synthetic benchmark.

It takes the same library path as a real run on ``openai/clip-vit-base-patch16`` and Office-Home: image
folders → seeded k-shot splits → gradient-based task grouping → group-shared + task-specific MmAP training
→ evaluation against zero-shot and the baselines → saved adapters and ``results.json`` → task switching on
a few test images with the saved adapters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..base_models import TINY_CLIP_NAME
from ..config import MmAPConfig
from ..data import scan_image_folder
from ..evaluate import AVERAGE
from ..files import atomic_write_json
from ..multitask import MultiTaskMmAP
from ..train import TrainConfig
from .bench import Benchmark, BenchmarkSpec
from .synthetic import generate_benchmark

#: Every method of the library that the demo compares, in table order.
DEMO_METHODS = (
    "zeroshot", "full_ft", "coop", "vpt", "maple",
    "full_ft_mt", "clip_adapter", "bitfit", "coop_mt", "vpt_mt", "maple_mt", "mmap",
)  # fmt: skip
QUICK_METHODS = ("zeroshot", "coop_mt", "vpt_mt", "mmap")
DEMO_IMAGES_PER_CLASS = 30
DEMO_SHOTS = 6


def cache_dir() -> Path:
    """Where generated data is cached: ``$PEFT_MMAP_CACHE`` or ``~/.cache/peft_mmap``."""
    return Path(os.environ.get("PEFT_MMAP_CACHE", Path.home() / ".cache" / "peft_mmap"))


def demo_benchmark(
    data_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda line: None,
    object_names: bool = False,
) -> Path:
    """The demo's synthetic benchmark folder (``data_dir`` or the cache), generated there if missing.

    ``object_names``: the same images with every class labelled by its object name, none by a
    `BENCHMARK_LABELS` word (an experiment's variant; cached in its own folder).
    """
    name = f"synthetic{'-names' if object_names else ''}-seed0-{DEMO_IMAGES_PER_CLASS}"
    root = Path(data_dir) if data_dir else cache_dir() / name
    log(f"synthetic benchmark: {root}")
    return generate_benchmark(root, images_per_class=DEMO_IMAGES_PER_CLASS, seed=0, object_names=object_names)


def demo_spec(
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    device: str | None = None,
) -> BenchmarkSpec:
    """The demo's benchmark settings: the paper's optimiser (SGD, lr 0.0035, batch 16) on 6-shot splits.

    Every method trains without augmentation: on the 48-pixel synthetic images, random resized crops cut
    the object and lowered every trained method's accuracy on clean images (README, "Training recipes").
    ``quick`` trains 2 epochs instead of 5, on one seed, with fewer methods (the README gives measured times).
    """
    return BenchmarkSpec(
        methods=list(methods or (QUICK_METHODS if quick else DEMO_METHODS)),
        seeds=list(seeds or ([1] if quick else [1, 2, 3])),
        shots=DEMO_SHOTS,
        train=TrainConfig(epochs=2 if quick else 5, batch_size=16, lr=0.0035),
        mmap=MmAPConfig(prompt_length=4, source_shape=(2, 8)),
        num_groups=2,
        affinity_snapshots=5,
        augment=False,
        device=device,
    )


def show_task_switching(
    model_id: str | os.PathLike,
    adapters: Path,
    bench: Benchmark,
    seed: int,
    per_task: int = 2,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Load the saved MmAP adapters and classify a few test images of every task, switching task per call."""
    model = MultiTaskMmAP.from_pretrained(str(model_id), adapters).to(bench.device)
    data = bench.seed_data(seed)
    rows = []
    log("\ntask switching with the saved adapters (one model, adapters chosen per call):")
    for task, dataset in data.test.items():
        step = max(1, len(dataset) // per_task)
        for index in range(0, step * per_task, step):
            pixels, label = dataset[index]
            started = time.perf_counter()
            with torch.no_grad():
                predicted = int(model(pixels[None].to(bench.device), task).argmax(-1))
            seconds = time.perf_counter() - started
            classes = model.tasks[task].classnames
            row = {"task": task, "true": classes[label], "predicted": classes[predicted], "seconds": seconds}
            rows.append(row)
            mark = "✓" if predicted == label else "✗"
            log(f"  {task:<9} adapters {model.adapters_for(task)!s:<24} true {row['true']:<11} "
                f"predicted {row['predicted']:<11} {mark}")  # fmt: skip
    return rows


def run_demo(
    output_dir: str | os.PathLike = "peft-mmap-demo",
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    model: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the demo end to end; returns the ``results.json`` payload (see `peft_mmap.apps.bench.Benchmark.run`)."""
    started = time.monotonic()
    model_id = str(model or TINY_CLIP_NAME)
    folders = scan_image_folder(demo_benchmark(data_dir, log))
    spec = demo_spec(quick, seeds, methods, device)
    bench = Benchmark(model_id, folders, spec, output_dir, progress=progress, log=log)
    results = bench.run()
    if "mmap" in spec.methods:
        adapters = Path(output_dir) / "runs" / "mmap" / f"seed{spec.seeds[0]}" / "adapters"
        results["task_switching"] = show_task_switching(model_id, adapters, bench, spec.seeds[0], log=log)
        results["verdict"] = verdict(results["methods"])
        atomic_write_json(Path(output_dir) / "results.json", results)
        log(f"\n{results['verdict']['line']}")
        log(f"MmAP adapters: {adapters} (MultiTaskMmAP.from_pretrained(model, that folder))")
    log(f"results: {Path(output_dir) / 'results.json'} ({time.monotonic() - started:.0f}s in all)")
    return results


def verdict(methods: Mapping[str, Mapping]) -> dict:
    """MmAP against zero-shot and against the best other trained method, as mean ± std over seeds.

    ``methods`` is ``results.json``'s ``"methods"``. Returns the numbers and a one-line ``"line"``.
    """

    def score(name: str) -> tuple[float, float]:
        return methods[name]["average"], methods[name]["std"][AVERAGE]

    def shown(name: str) -> str:  # mean ± std over seeds; the mean alone for a single run
        mean, std = score(name)
        return f"{mean:.1f}" if len(methods[name]["runs"]) == 1 else f"{mean:.1f} ± {std:.1f}"

    mmap, parts = score("mmap"), []
    text = f"verdict: MmAP {shown('mmap')}"
    out: dict = {"mmap": mmap}
    if "zeroshot" in methods:
        out["zeroshot"] = score("zeroshot")
        parts.append(f"zero-shot {shown('zeroshot')} ({mmap[0] - out['zeroshot'][0]:+.1f})")
    others = [m for m in methods if m not in ("mmap", "zeroshot")]
    if others:
        best = max(others, key=lambda m: methods[m]["average"])
        out["best_baseline"] = {"method": best, "score": score(best)}
        parts.append(f"best baseline {best} {shown(best)} ({mmap[0] - score(best)[0]:+.1f})")
    out["line"] = text + (" vs " + "; vs ".join(parts) if parts else "")
    return out
