"""Planted-teacher table: fresh students trained on the labels of a teacher with N(0, 1) factors.

Usage: ``python scripts/planted_teacher.py [--model DIR] [--teacher mmap] [--teacher-seed 1234]
[--methods mmap full_ft_mt coop_mt] [--seeds 1 2] [--epochs 5] [--lr-scale F] [--domains D ...]
[--classes N] [--groups 'a,b;c'] [--json FILE]``

Defaults: the shipped tiny CLIP, the demo's benchmark, split (seed 1), recipes (SGD lr 0.0035, batch 16,
5 epochs, no augmentation) and grouping (found once by the demo's affinity run, cached), a default
`MmAPConfig`. The teacher relabels every image with its predictions (`peft_mmap.apps.planted`); each
student is scored by its agreement with the teacher on the test images, before and after training.
``--domains`` and ``--classes N`` (the first N classes) use that part of the synthetic benchmark instead,
generated in the cache (``--domains Sketch --classes 12`` is the setting of ``tests/test_planted.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from peft_mmap.apps.bench import Benchmark
from peft_mmap.apps.cli import inline_groups
from peft_mmap.apps.demo import DEMO_IMAGES_PER_CLASS, cache_dir, demo_benchmark, demo_spec
from peft_mmap.apps.planted import DEFAULT_TEACHER_SEED, planted_teacher_markdown, run_planted_teacher
from peft_mmap.apps.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_DOMAINS, generate_benchmark
from peft_mmap.apps.tiny_clip import TINY_CLIP_PATH
from peft_mmap.config import MmAPConfig
from peft_mmap.data import scan_image_folder
from peft_mmap.files import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=str(TINY_CLIP_PATH), help="CLIP checkpoint (default: the tiny CLIP)"
    )
    parser.add_argument("--teacher", default="mmap", help="registry name of the planted teacher")
    parser.add_argument("--teacher-seed", type=int, default=DEFAULT_TEACHER_SEED)
    parser.add_argument("--methods", nargs="+", default=["mmap", "full_ft_mt", "coop_mt"],
                        help="students (registry names)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="student seeds")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's 5 epochs")
    parser.add_argument("--lr-scale", type=float, default=None,
                        help="multiply every student's recipe learning rate by this factor")  # fmt: skip
    parser.add_argument("--domains", nargs="+", choices=SYNTHETIC_DOMAINS, help="tasks (default: all four)")
    parser.add_argument("--classes", type=int, choices=range(2, len(SYNTHETIC_CLASSES) + 1), metavar="N",
                        help="the first N classes of the benchmark (default: all)")  # fmt: skip
    parser.add_argument("--groups", type=inline_groups, default=None,
                        help="groups like 'clipart,photo;painting,sketch' (default: the demo's)")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(2)

    if args.domains or args.classes:
        classes = SYNTHETIC_CLASSES[: args.classes or len(SYNTHETIC_CLASSES)]
        domains = args.domains or SYNTHETIC_DOMAINS
        name = f"synthetic-{'-'.join(domains)}-{len(classes)}classes-{DEMO_IMAGES_PER_CLASS}"
        root = generate_benchmark(
            cache_dir() / name, images_per_class=DEMO_IMAGES_PER_CLASS, classes=classes, domains=domains
        )
    else:
        root = demo_benchmark()
    methods = list(dict.fromkeys(["zeroshot", args.teacher, *args.methods]))
    spec = dataclasses.replace(demo_spec(methods=methods, seeds=[1]), mmap=MmAPConfig(), groups=args.groups)
    if args.lr_scale is not None:
        spec.lr_scales = dict.fromkeys(args.methods, args.lr_scale)
    if args.epochs is not None:
        spec.train = dataclasses.replace(spec.train, epochs=args.epochs)
    output = cache_dir() / "planted-teacher" / f"{Path(args.model).name}-{root.name}"
    # the folder only keeps the splits; its settings follow the methods asked for
    bench = Benchmark(args.model, scan_image_folder(root), spec, output, progress=False, overwrite=True)
    students = [(method, seed) for method in args.methods for seed in args.seeds]
    result = run_planted_teacher(bench, students, teacher=args.teacher, teacher_seed=args.teacher_seed)
    print(planted_teacher_markdown(result))
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
