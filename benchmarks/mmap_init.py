"""How each MmAP initialisation starts and learns, on the demo's benchmark (shipped tiny CLIP, 6 shots).

For every ``scale_init`` it reports: the accuracy of the untrained adapters against zero-shot, the
gradient norm of every trainable factor after one backward pass (source prompts P_s, text scales M_l,
vision scales M_v, and how many tensors got exactly zero gradient), the mean loss of the first and the
last steps of epoch 1, and the accuracy after the demo's training recipe.

Usage: ``python benchmarks/mmap_init.py [--inits zeros ones vision_zeros normal] [--seed 1] [--epochs 5]
[--validation-shots K]``

``--validation-shots K`` holds out K of each class's training shots (`peft_mmap.validation_split`), trains
on the rest and reports accuracy on the held-out images instead of the test set: the split on which to
choose an initialisation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

from peft_mmap.apps.demo import DEMO_IMAGES_PER_CLASS, DEMO_SHOTS, cache_dir, demo_spec
from peft_mmap.apps.synthetic import generate_benchmark
from peft_mmap.apps.tiny_clip import TINY_CLIP_PATH
from peft_mmap.baselines import build_method
from peft_mmap.classifier import TaskSpec
from peft_mmap.data import ImageClassificationDataset, few_shot_split, scan_image_folder, validation_split
from peft_mmap.evaluate import AVERAGE, evaluate
from peft_mmap.train import train


def _factor(name: str) -> str:
    if "mmap_source" in name:
        return "P_s"
    return "M_l" if "text_model" in name else "M_v"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inits", nargs="+", default=["zeros", "ones", "vision_zeros", "normal"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", default=str(TINY_CLIP_PATH))
    parser.add_argument("--validation-shots", type=int, default=None, help="evaluate on held-out shots")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = generate_benchmark(
        cache_dir() / f"synthetic-seed0-{DEMO_IMAGES_PER_CLASS}", images_per_class=DEMO_IMAGES_PER_CLASS
    )
    splits = few_shot_split(scan_image_folder(root), shots=DEMO_SHOTS, seed=args.seed)
    if args.validation_shots is not None:
        splits = validation_split(splits, args.validation_shots, args.seed)
    processor = CLIPProcessor.from_pretrained(args.model)
    base = CLIPModel.from_pretrained(args.model).eval()
    tasks = [TaskSpec(n, s.classnames) for n, s in splits.items()]
    train_sets = {
        n: ImageClassificationDataset(s.train, processor.image_processor, cache=True)
        for n, s in splits.items()
    }
    test_sets = {
        n: ImageClassificationDataset(s.test, processor.image_processor, cache=True)
        for n, s in splits.items()
    }
    spec = demo_spec(quick=False)
    config = dataclasses.replace(
        spec.recipe("mmap", args.seed)[0], epochs=args.epochs
    )  # the demo's, no augment
    zero_shot = evaluate(build_method("zeroshot", base, processor.tokenizer, tasks), test_sets)[AVERAGE]
    held_out = (
        "test" if args.validation_shots is None else f"{args.validation_shots} held-out shots per class"
    )
    report = {"evaluated_on": held_out, "zero_shot": zero_shot, "train": config.to_dict(), "inits": {}}
    for init in args.inits:
        torch.manual_seed(args.seed)
        mmap_config = dataclasses.replace(spec.mmap, scale_init=init)
        model = build_method("mmap", CLIPModel.from_pretrained(args.model), processor.tokenizer, tasks,
                             config=mmap_config)  # fmt: skip
        untrained = evaluate(model, test_sets)[AVERAGE]
        model.train()
        loss = sum(
            F.cross_entropy(model(torch.stack([d[i][0] for i in range(16)]), t),
                            torch.tensor([d[i][1] for i in range(16)]))
            for t, d in train_sets.items()
        )  # fmt: skip
        loss.backward()
        norms: dict[str, list[float]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                norms.setdefault(_factor(name), []).append(0.0 if p.grad is None else p.grad.norm().item())
        model.zero_grad(set_to_none=True)
        result = train(model, train_sets, config, progress=False)
        steps = len(result.history) // args.epochs
        first = [sum(h.values()) / len(h) for h in result.history[:steps]]
        trained = evaluate(model, test_sets)[AVERAGE]
        report["inits"][init] = {
            "untrained_accuracy": untrained,
            "grad_norm": {k: sum(v) for k, v in norms.items()},
            "zero_grad_tensors": {k: sum(x == 0.0 for x in v) for k, v in norms.items()},
            "tensors": {k: len(v) for k, v in norms.items()},
            "epoch1_loss_first3": sum(first[:3]) / 3,
            "epoch1_loss_last3": sum(first[-3:]) / 3,
            "trained_accuracy": trained,
        }
        print(json.dumps({init: report["inits"][init]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
