"""Headroom of the demo's benchmark: zero-shot against a few-shot linear probe on frozen image features.

Usage: ``python scripts/headroom.py [--model DIR] [--data DIR | --object-names] [--shots 16] [--seeds 1 2 3]
[--json FILE]``

Defaults: the shipped tiny CLIP and the demo's synthetic benchmark (generated if missing). A probe that
does not beat zero-shot means no adaptation method can show a gain on that benchmark. When the tasks use
the labels the pretraining captions never use (`BENCHMARK_LABELS`), it also prints zero-shot and probe
accuracy on those classes and on the others (means of per-class accuracy over tasks), which tells
vocabulary headroom from headroom on labels the model already reads.
"""

from __future__ import annotations

import argparse

import torch

from peft_mmap.apps.demo import demo_benchmark
from peft_mmap.apps.probe import measure_headroom
from peft_mmap.apps.synthetic import BENCHMARK_LABELS
from peft_mmap.apps.tiny_clip import TINY_CLIP_PATH
from peft_mmap.data import class_display_name, scan_image_folder
from peft_mmap.files import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TINY_CLIP_PATH), help="CLIP checkpoint folder or hub id")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data", default=None, help="image-folder tasks (default: the demo's benchmark)")
    data.add_argument("--object-names", action="store_true",
                      help="the demo's benchmark with every class labelled by its object name")  # fmt: skip
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = args.data or demo_benchmark(object_names=args.object_names)
    result = measure_headroom(args.model, scan_image_folder(root), shots=args.shots, seeds=args.seeds)
    print(f"{args.shots}-shot linear probe vs zero-shot, seeds {args.seeds}:")
    print(f"{'task':<10} {'zero-shot':>9} {'probe':>7} {'gain':>6}")
    for task, row in result["tasks"].items():
        print(
            f"{task:<10} {row['zero_shot']:9.1f} {row['probe']:7.1f} {row['probe'] - row['zero_shot']:+6.1f}"
        )
    avg = result["average"]
    print(f"{'average':<10} {avg['zero_shot']:9.1f} {avg['probe']:7.1f} {avg['gain']:+6.1f}")
    renamed = {class_display_name(label) for label in BENCHMARK_LABELS.values()}
    classes = [(c, acc) for row in result["tasks"].values() for c, acc in row["classes"].items()]
    if any(c in renamed for c, _ in classes):
        for title, pick in (("labels the captions never use", True), ("other labels", False)):
            rows = [acc for c, acc in classes if (c in renamed) == pick]
            zero_shot, probe = (sum(acc[k] for acc in rows) / len(rows) for k in ("zero_shot", "probe"))
            print(f"{title}: zero-shot {zero_shot:.1f}, probe {probe:.1f} ({probe - zero_shot:+.1f})")
    in_range = all(30.0 <= row["zero_shot"] <= 85.0 for row in result["tasks"].values())
    print(f"every task's zero-shot within 30-85 %: {'yes' if in_range else 'no'}")
    print(
        f"probe beats zero-shot by >= 5 points on average (headroom): {'yes' if avg['gain'] >= 5 else 'no'}"
    )
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
