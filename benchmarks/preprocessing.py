"""CLIP image preprocessing speed: transformers' PIL backend against its torchvision backend.

The library loads every processor with the PIL backend (`peft_mmap.classifier.load_clip_processor`); this
script measures what that costs. It preprocesses the same photos-sized RGB images (random sizes between
240 and 480 pixels a side, ViT-B/16 settings: shortest edge 224, centre crop 224) one image per call, as
`peft_mmap.data.ImageClassificationDataset` does, and in batches of 32, with each backend that is
installed (torchvision is not a dependency), and prints images/s (median of ``--repeats`` passes) plus the
largest pixel-value difference between the two backends.

Usage: ``python benchmarks/preprocessing.py [--images 64] [--repeats 5] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil
from transformers.utils import is_torchvision_available

SETTINGS = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(240, 481, size=(count, 2))
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def throughput(processor, batch: list[Image.Image], per_call: int, repeats: int) -> float:
    """Median images/s over ``repeats`` passes of ``batch``, ``per_call`` images per processor call."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, len(batch), per_call):
            processor(images=batch[i : i + per_call], return_tensors="pt")
        rates.append(len(batch) / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per pass (default 64).")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (default 5).")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = images(args.images)
    backends = {"pil": CLIPImageProcessorPil(**SETTINGS)}
    if is_torchvision_available():
        from transformers import CLIPImageProcessor  # the torchvision backend

        backends["torchvision"] = CLIPImageProcessor(**SETTINGS)
    pixels = {}
    for name, processor in backends.items():
        processor(images=batch[:2], return_tensors="pt")  # warm-up
        one = throughput(processor, batch, 1, args.repeats)
        many = throughput(processor, batch, 32, args.repeats)
        print(f"{name:<12} {one:7.1f} img/s one image per call   {many:7.1f} img/s batches of 32")
        pixels[name] = processor(images=batch, return_tensors="pt")["pixel_values"]
    if len(pixels) == 2:
        diff = (pixels["pil"] - pixels["torchvision"]).abs()
        print(f"pixel values (normalised): max |pil - torchvision| {diff.max():.3f}, mean {diff.mean():.4f}")
    else:
        print("torchvision is not installed: only the PIL backend was measured")


if __name__ == "__main__":
    main()
