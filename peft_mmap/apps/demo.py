"""`peft-mmap demo`: the whole method, offline, on the shipped tiny CLIP and the synthetic benchmark.

It takes the same library path as a real run on ``openai/clip-vit-base-patch16`` and Office-Home: image
folders → seeded k-shot splits → gradient-based task grouping → group-shared + task-specific MmAP training
→ evaluation against zero-shot and the baselines → saved adapters, ``results.json``, ``results.md`` and two
figures (accuracy against trainable parameters, task affinity) → task switching on a few test images with
the saved adapters → a verdict with its context and a ready ``peft-mmap eval`` command for the adapters.

The full demo writes to ``peft-mmap-demo/``, the quick one to ``peft-mmap-demo-quick/``. A folder holds the
results of one set of settings (`peft_mmap.apps.bench.Benchmark`): a rerun with the same settings reuses
the finished runs; a demo of other settings runs in a subfolder named after its settings (or, with
``overwrite``, replaces the folder's results). How long each takes:
`peft_mmap.apps.cli.DEMO_TIMES` (``peft-mmap demo --help``).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..affinity import AFFINITY_PNG
from ..base_models import TINY_CLIP_NAME, portable_model_name
from ..config import MmAPConfig
from ..data import scan_image_folder
from ..evaluate import AVERAGE
from ..files import atomic_write_json
from ..multitask import MultiTaskMmAP
from ..train import TrainConfig
from .bench import (
    ACCURACY_VS_PARAMS_PNG,
    RESULTS_JSON,
    RESULTS_MD,
    Benchmark,
    BenchmarkSpec,
    benchmark_settings,
    holds_other_settings,
    settings_folder_name,
)
from .synthetic import generate_benchmark

#: Every method of the library that the demo compares, in table order.
DEMO_METHODS = (
    "zeroshot", "full_ft", "coop", "vpt", "maple",
    "full_ft_mt", "clip_adapter", "bitfit", "coop_mt", "vpt_mt", "maple_mt", "mmap",
)  # fmt: skip
QUICK_METHODS = ("zeroshot", "coop_mt", "vpt_mt", "mmap")
DEMO_IMAGES_PER_CLASS = 30
DEMO_SHOTS = 6
DEMO_OUTPUT, QUICK_OUTPUT = Path("peft-mmap-demo"), Path("peft-mmap-demo-quick")
#: Where the demo's standing on the tiny CLIP is explained (its verdict points there).
TINY_CLIP_VERDICT_CONTEXT = "docs/results.md#why-no-prompt-method-beats-zero-shot-on-the-tiny-clip"


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
    ``quick`` trains 2 epochs instead of 5, on one seed, with fewer methods (times: ``peft-mmap demo --help``).
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
    output_dir: str | os.PathLike | None = None,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    model: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict:
    """Run the demo end to end; returns the ``results.json`` payload (see `peft_mmap.apps.bench.Benchmark.run`).

    ``output_dir`` defaults to `QUICK_OUTPUT` or `DEMO_OUTPUT`. Runs of other settings never mix: when
    ``output_dir`` holds a demo of other settings, this demo runs in its own subfolder named after its
    settings (`peft_mmap.apps.bench.settings_folder_name`) and leaves the other one as it is; ``overwrite``
    replaces the other demo in ``output_dir`` instead.
    """
    started = time.monotonic()
    output_dir = Path(output_dir or (QUICK_OUTPUT if quick else DEMO_OUTPUT))
    model_id = str(model or TINY_CLIP_NAME)
    tiny_clip = portable_model_name(model_id) == TINY_CLIP_NAME
    folders = scan_image_folder(demo_benchmark(data_dir, log))
    spec = demo_spec(quick, seeds, methods, device)
    settings = benchmark_settings(model_id, folders, spec)
    if not overwrite and holds_other_settings(output_dir, settings):
        own = output_dir / settings_folder_name(settings)
        log(f"{output_dir} holds a demo of other settings, left as it is (--overwrite replaces it); "
            f"this demo goes to {own}")  # fmt: skip
        output_dir = own
    bench = Benchmark(model_id, folders, spec, output_dir, progress=progress, log=log, overwrite=overwrite)
    results = bench.run()
    seed = spec.seeds[0]
    if "mmap" in spec.methods:
        adapters = bench.run_file("mmap", seed).with_suffix("") / "adapters"
        results["task_switching"] = show_task_switching(model_id, adapters, bench, seed, log=log)
        results["verdict"] = verdict(results["methods"], tiny_clip)
        atomic_write_json(output_dir / RESULTS_JSON, results)
        log(f"\n{results['verdict']['line']}")
        if "context" in results["verdict"]:
            log(f"  {results['verdict']['context']}")
        log(f"MmAP adapters (seed {seed}): {adapters} (MultiTaskMmAP.from_pretrained(model, that folder))")
        log(f"split (seed {seed}): {bench.split_file(seed)}")
        log(f"evaluate them again: {eval_command(bench, adapters, seed, None if tiny_clip else model_id)}")
    figures = [(output_dir / ACCURACY_VS_PARAMS_PNG, "accuracy against trainable parameters"),
               (bench.grouping_dir / AFFINITY_PNG, "task affinity")]  # fmt: skip
    shown = [f"{path} ({what})" for path, what in figures if path.is_file()]
    log(f"figures: {', '.join(shown)}")
    log(f"results: {output_dir / RESULTS_JSON}, {output_dir / RESULTS_MD} "
        f"({time.monotonic() - started:.0f}s in all)")  # fmt: skip
    return results


def eval_command(bench: Benchmark, adapters: Path, seed: int, model: str | None = None) -> str:
    """The ``peft-mmap eval`` command that evaluates ``adapters`` on ``bench``'s test split of ``seed``
    (``--model`` only where the adapters' manifest should not name the base)."""
    words = ["peft-mmap", "eval", "--adapters", str(adapters), "--data", str(bench.data_root),
             "--split-file", str(bench.split_file(seed)), "--seed", str(seed)]  # fmt: skip
    return shlex.join(words + (["--model", model] if model is not None else []))


def verdict(methods: Mapping[str, Mapping], tiny_clip: bool = False) -> dict:
    """MmAP against zero-shot and against the best other trained method, as mean ± std over seeds.

    ``methods`` is ``results.json``'s ``"methods"``. Returns the numbers and a one-line ``"line"``; with
    ``tiny_clip`` (the results are the shipped tiny CLIP's) also ``"context"``: one sentence with MmAP's
    gain or loss against zero-shot, why, and where that is explained (`TINY_CLIP_VERDICT_CONTEXT`).
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
    if tiny_clip:
        gap = mmap[0] - out["zeroshot"][0] if "zeroshot" in out else None
        where = "above" if gap is not None and gap >= 0 else "below"
        standing = "" if gap is None else f"MmAP is {abs(gap):.1f} points {where} zero-shot here: "
        why = (
            "on the shipped 1.7 M-parameter tiny CLIP no prompt method beats zero-shot by more than noise, "
            "while full fine-tuning does gain"
        )
        sentence = f"{standing}{why} (see {TINY_CLIP_VERDICT_CONTEXT})."
        out["context"] = sentence[0].upper() + sentence[1:]
    return out
