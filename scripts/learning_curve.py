"""Learning curve of one method on the demo's benchmark: loss, clean-train and test accuracy per epoch.

Usage: ``python scripts/learning_curve.py [--model DIR] [--method mmap] [--epochs 5] [--augment | --no-augment]
[--lr LR] [--optimizer sgd|adamw] [--weight-decay WD] [--seed 1] [--prompt-length B] [--source-shape M N]
[--depth K] [--scale-init vision_zeros|ones|zeros|normal] [--vision-scale FACTOR] [--towers both|text|vision]
[--groups G] [--object-names] [--train-without-renamed] [--gradients] [--logit-scale S]``

It trains exactly as ``peft-mmap demo`` does (the method's recipe, the demo's 6-shot split of ``--seed``,
the demo's groups for the grouped methods) unless an option overrides a setting, and after every epoch
evaluates on the *un-augmented* training images and on the test set. Train accuracy that stays low means
under-fitting (or training on a distribution the clean images do not share); train accuracy far above
test accuracy means over-fitting. Epoch 0 is the untrained method. Before and after training it also
prints the test accuracy on the four labels the pretraining captions never use (`BENCHMARK_LABELS`) and on
the other twenty. ``--towers text`` (or ``vision``) prompts one CLIP tower only (MmAP's ``target_modules``);
``--train-without-renamed`` drops the training images of the `BENCHMARK_LABELS` classes (the test set and the
classes stay); ``--object-names`` labels every class by its object name instead (same images, no renamed
labels).
``--gradients`` prints, after the first optimizer step, every trainable tensor's norm before the step and
its gradient's norm; ``--logit-scale S`` sets CLIP's logit scale to ``log(S)`` before training (CLIP's
own ``exp(logit_scale)`` is 100; the shipped tiny CLIP's is 15.9).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from peft_mmap.apps.bench import Benchmark
from peft_mmap.apps.cli import inline_groups
from peft_mmap.apps.demo import cache_dir, demo_benchmark, demo_spec
from peft_mmap.apps.synthetic import BENCHMARK_LABELS
from peft_mmap.apps.tiny_clip import TINY_CLIP_PATH
from peft_mmap.data import ImageClassificationDataset, class_display_name, scan_image_folder
from peft_mmap.evaluate import AVERAGE, evaluate
from peft_mmap.options import SCALE_INITS
from peft_mmap.train import StepEvent, steps_per_epoch, train

#: MmAP ``target_modules`` per ``--towers`` choice (``None``: the config's default, both towers).
TOWER_TARGETS = {
    "both": None,
    "text": r"text_model\.encoder\.layers\.\d+",
    "vision": r"vision_model\.encoder\.layers\.\d+",
}

#: The grouping `peft-mmap demo` finds on its benchmark (seed 1), so a curve needs no affinity run.
DEMO_GROUPS = [["clipart", "painting", "photo"], ["sketch"]]


def renamed_classnames() -> set[str]:
    """The `BENCHMARK_LABELS` classes as the prompts say them."""
    return {class_display_name(label) for label in BENCHMARK_LABELS.values()}


@torch.no_grad()
def renamed_label_accuracy(model, data) -> str:
    """Test accuracy over all tasks on the images of the `BENCHMARK_LABELS` classes and on the others."""
    renamed = renamed_classnames()
    hits = {True: [0, 0], False: [0, 0]}
    model.eval()
    for task, dataset in data.test.items():
        names = data.splits[task].classnames
        for start in range(0, len(dataset), 128):
            items = [dataset[i] for i in range(start, min(len(dataset), start + 128))]
            labels = torch.tensor([label for _, label in items])
            correct = model(torch.stack([pixels for pixels, _ in items]), task).argmax(-1) == labels
            for label, ok in zip(labels.tolist(), correct.tolist(), strict=True):
                hits[names[label] in renamed][0] += ok
                hits[names[label] in renamed][1] += 1
    model.train()
    share = {
        key: f"{100 * right / total:.1f} %" if total else "- (none)" for key, (right, total) in hits.items()
    }
    return f"test accuracy: renamed labels {share[True]}, other labels {share[False]}"


def print_gradients(norms: dict[str, float], grads: dict[str, float], loss: float, lr: float) -> None:
    """Each trainable tensor's norm before the first step and its gradient's norm at that step, and totals."""
    total_p, total_g = math.hypot(*norms.values()), math.hypot(*grads.values())
    print(f"first step: summed loss {loss:.3f}, lr {lr:.4g}; {len(norms)} tensors, total |param| "
          f"{total_p:.4g}, total |grad| {total_g:.4g}, step lr x |grad| {lr * total_g:.3g}")  # fmt: skip
    for name, norm in norms.items():
        print(f"  {name:<80} |param| {norm:9.4g}  |grad| {grads.get(name, 0.0):9.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=str(TINY_CLIP_PATH), help="CLIP checkpoint (default: the shipped tiny CLIP)"
    )
    parser.add_argument("--method", default="mmap", help="registry name (default mmap)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="override the demo's setting (off)")  # fmt: skip
    parser.add_argument("--lr", type=float, help="override the recipe's learning rate")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], help="override the recipe's optimizer")
    parser.add_argument("--weight-decay", type=float, help="override the recipe's weight decay")
    parser.add_argument("--prompt-length", type=int, help="MmAP b (default: the demo's)")
    parser.add_argument("--source-shape", type=int, nargs=2, help="MmAP (m, n) (default: the demo's)")
    parser.add_argument("--depth", type=int, help="MmAP prompted layers (default: all)")
    parser.add_argument("--scale-init", choices=SCALE_INITS, help="MmAP scale init")
    parser.add_argument("--vision-scale", type=float, default=1.0,
                        help="multiply a fresh MmAP adapter's vision scaling matrices by this (prompt scale)")  # fmt: skip
    parser.add_argument("--towers", choices=list(TOWER_TARGETS), default="both", help="MmAP: prompted towers")
    parser.add_argument("--groups", type=inline_groups, default=DEMO_GROUPS,
                        help="task groups like 'clipart,photo;painting,sketch' (default: the demo's)")  # fmt: skip
    parser.add_argument("--object-names", action="store_true",
                        help="the demo's benchmark with every class labelled by its object name")  # fmt: skip
    parser.add_argument("--gradients", action="store_true",
                        help="print each trainable tensor's and its gradient's norm at step 1")  # fmt: skip
    parser.add_argument("--logit-scale", type=float,
                        help="set exp(logit_scale) to this before training (CLIP's is 100)")  # fmt: skip
    parser.add_argument("--train-without-renamed", action="store_true",
                        help="train without the images of the BENCHMARK_LABELS classes")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(2)

    spec = demo_spec(methods=[args.method], seeds=[args.seed])
    mmap = {"prompt_length": args.prompt_length, "source_shape": args.source_shape, "depth": args.depth,
            "scale_init": args.scale_init, "target_modules": TOWER_TARGETS[args.towers]}  # fmt: skip
    spec.mmap = dataclasses.replace(spec.mmap, **{k: v for k, v in mmap.items() if v is not None})
    if args.augment is not None:
        spec.augment = args.augment
    root = demo_benchmark(object_names=args.object_names)
    bench = Benchmark(
        args.model, scan_image_folder(root), spec, cache_dir() / "learning-curve" / root.name, progress=False,
        log=lambda line: None, overwrite=True,  # the folder only keeps the demo's splits, for every method
    )  # fmt: skip
    data = bench.seed_data(args.seed)
    if args.train_without_renamed:
        renamed = renamed_classnames()
        for task, dataset in data.train.items():
            names = data.splits[task].classnames
            kept = [sample for sample in dataset.samples if names[sample.label] not in renamed]
            data.train[task] = ImageClassificationDataset(kept, dataset.processor, cache=True)
    config, options = spec.recipe(args.method, args.seed)
    overrides = {"epochs": args.epochs, "lr": args.lr, "optimizer": args.optimizer,
                 "weight_decay": args.weight_decay}  # fmt: skip
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    torch.manual_seed(args.seed)
    model = bench.build(args.method, args.seed, data.splits, args.groups, options)
    if args.vision_scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "vision_model" in name and "mmap_scale" in name:
                    param.mul_(args.vision_scale)
    if args.logit_scale is not None:
        with torch.no_grad():
            model.clip_model.logit_scale.fill_(math.log(args.logit_scale))
    first_grads: dict[str, float] = {}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    norms = {name: p.detach().norm().item() for name, p in trainable.items()}
    if args.gradients:

        def record(param: torch.nn.Parameter, name: str) -> None:
            first_grads.setdefault(name, param.grad.norm().item())

        for name, param in trainable.items():
            param.register_post_accumulate_grad_hook(lambda p, name=name: record(p, name))
    spe = steps_per_epoch({t: len(d) for t, d in data.train.items()}, config.batch_size)
    print(f"{args.method}: {config}")
    print(f"{'epoch':>5} {'loss':>6} {'train':>6} {'test':>6}  test per task")
    started, losses = time.monotonic(), []

    def report(epoch: int) -> None:
        train_acc = evaluate(model, data.train, batch_size=128)[AVERAGE]
        test = evaluate(model, data.test, batch_size=128)
        loss = f"{sum(losses[-spe:]) / spe:6.3f}" if losses else f"{'-':>6}"
        tasks = " ".join(f"{t} {a:.1f}" for t, a in test.items() if t != AVERAGE)
        print(f"{epoch:5d} {loss} {train_acc:6.1f} {test[AVERAGE]:6.1f}  {tasks}  "
              f"({time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip

    def on_step(event: StepEvent) -> None:
        losses.append(sum(event.losses.values()) / len(event.losses))
        if args.gradients and event.global_step == 1:
            print_gradients(norms, first_grads, sum(event.losses.values()), event.lr)
        if event.global_step % spe == 0:
            report(event.global_step // spe)

    report(0)
    print(f"untrained {renamed_label_accuracy(model, data)}")
    if model.trainable_parameter_count():
        train(model, data.train, config, progress=False, callback=on_step)
        print(f"trained {renamed_label_accuracy(model, data)}")


if __name__ == "__main__":
    main()
