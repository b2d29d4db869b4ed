"""The ``peft-mmap`` command line: ``group`` (task affinity + grouping), ``train`` and ``eval``.

Every subcommand is one `Subcommand` entry in `SUBCOMMANDS`: a name, a help line, a function adding its
arguments and a function running it with the parsed namespace. Bad values end in an argparse error (exit
code 2) naming the value, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPModel, CLIPProcessor

from .argtypes import fraction, non_negative_float, non_negative_int, positive_float, positive_int
from .classifier import DEFAULT_TEMPLATE, TaskSpec
from .config import MmAPConfig
from .data import (
    LAYOUTS,
    ImageClassificationDataset,
    TaskSplit,
    few_shot_split,
    load_split,
    load_task_folders,
    save_split,
)
from .files import atomic_write_json, read_json

logger = logging.getLogger(__name__)

GROUPS_JSON = "groups.json"
DEFAULT_BENCH_METHODS = ("zeroshot", "coop_mt", "vpt_mt", "maple_mt", "mmap")
ADAPTERS_DIR = "adapters"


# ---- argument types --------------------------------------------------------------------------------------
def task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated task names, got {text!r}")
    return names


def inline_groups(text: str) -> list[list[str]]:
    """``"art,clipart;product"`` -> ``[["art", "clipart"], ["product"]]``."""
    groups = [task_list(part) for part in text.split(";") if part.strip()]
    if not groups:
        raise argparse.ArgumentTypeError(f"expected groups like 'art,clipart;product', got {text!r}")
    return groups


# ---- shared argument groups ------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--model",
        required=required,
        help="CLIP checkpoint: hub id (e.g. openai/clip-vit-base-patch16) or local folder with CLIPModel + CLIPProcessor.",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")


def add_data_arguments(parser: argparse.ArgumentParser, single_run: bool = True) -> None:
    """Dataset options; ``single_run=False`` leaves out ``--seed``/``--split-file`` (the benchmark draws
    one split per seed itself)."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", required=True, type=Path, help="data root holding one folder per task/domain."
    )
    data.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="generic",
        help="generic: <root>/<task>/<class>/<img>; officehome: Art/Clipart/Product/Real World; "
        "domainnet: clipart/painting/real/sketch (optionally with --split-dir).",
    )
    data.add_argument(
        "--split-dir", type=Path, help="domainnet: folder with <domain>_train.txt/<domain>_test.txt."
    )
    data.add_argument(
        "--tasks", type=task_list, help="comma-separated tasks to use (default: all of the layout)."
    )
    amount = data.add_mutually_exclusive_group()
    amount.add_argument("--shots", type=positive_int, help="training images per class (k-shot).")
    amount.add_argument(
        "--fraction", type=fraction, help="fraction of each class used for training, in (0, 1)."
    )
    if single_run:
        data.add_argument(
            "--seed", type=non_negative_int, default=0, help="seed of the split and of training (default 0)."
        )
        data.add_argument(
            "--split-file",
            type=Path,
            help="JSON split: reused if it exists, else written after drawing the split.",
        )
    data.add_argument(
        "--skip-unreadable", action="store_true", help="drop images PIL cannot read instead of failing."
    )
    data.add_argument(
        "--template", default=DEFAULT_TEMPLATE, help=f"class prompt template (default {DEFAULT_TEMPLATE!r})."
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import OPTIMIZERS, PRECISIONS, SCHEDULERS, TrainConfig

    d = TrainConfig()
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"epochs (default {d.epochs}).")
    opt.add_argument(
        "--batch-size",
        type=positive_int,
        default=d.batch_size,
        help=f"images per task per step (default {d.batch_size}).",
    )
    opt.add_argument("--lr", type=positive_float, default=d.lr, help=f"learning rate (default {d.lr}).")
    opt.add_argument(
        "--momentum",
        type=non_negative_float,
        default=d.momentum,
        help=f"SGD momentum (default {d.momentum}).",
    )
    opt.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=d.weight_decay,
        help=f"weight decay (default {d.weight_decay}).",
    )
    opt.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=d.optimizer, help=f"optimizer (default {d.optimizer})."
    )
    opt.add_argument(
        "--scheduler", choices=SCHEDULERS, default=d.scheduler, help=f"LR schedule (default {d.scheduler})."
    )
    opt.add_argument(
        "--warmup-epochs",
        type=non_negative_int,
        default=d.warmup_epochs,
        help="constant warm-up epochs (default 0).",
    )
    opt.add_argument(
        "--warmup-lr",
        type=positive_float,
        default=d.warmup_lr,
        help=f"warm-up learning rate (default {d.warmup_lr}).",
    )
    opt.add_argument(
        "--precision", choices=PRECISIONS, default=d.precision, help="fp32, bf16 or fp16 (CUDA) autocast."
    )
    opt.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute encoder layers to save memory."
    )
    opt.add_argument(
        "--num-workers", type=non_negative_int, default=d.num_workers, help="DataLoader workers per task."
    )
    opt.add_argument("--max-steps", type=positive_int, help="stop after this many steps (quick runs).")
    opt.add_argument("--grad-clip", type=positive_float, help="clip the gradient norm to this value.")
    opt.add_argument("--log-every", type=positive_int, default=d.log_every, help="log losses every N steps.")
    mmap = parser.add_argument_group("MmAP")
    m = MmAPConfig()
    mmap.add_argument(
        "--prompt-length",
        type=positive_int,
        default=m.prompt_length,
        help=f"b: prompt tokens per layer (default {m.prompt_length}).",
    )
    mmap.add_argument(
        "--source-shape",
        type=positive_int,
        nargs=2,
        metavar=("M", "N"),
        default=list(m.source_shape),
        help=f"shape of each source prompt (default {m.source_shape[0]} {m.source_shape[1]}).",
    )
    mmap.add_argument("--depth", type=positive_int, help="prompted layers (default: all).")


def train_config(args: argparse.Namespace):
    from .train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, optimizer=args.optimizer, scheduler=args.scheduler,
        warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, seed=getattr(args, "seed", 0), num_workers=args.num_workers,
        log_every=args.log_every, max_steps=args.max_steps, grad_clip=args.grad_clip,
    )  # fmt: skip


def mmap_config(args: argparse.Namespace) -> MmAPConfig:
    return MmAPConfig(
        prompt_length=args.prompt_length, source_shape=tuple(args.source_shape), depth=args.depth
    )


# ---- loading ---------------------------------------------------------------------------------------------
def device_of(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model(model_id: str) -> tuple[CLIPModel, CLIPProcessor]:
    return CLIPModel.from_pretrained(model_id), CLIPProcessor.from_pretrained(model_id)


def load_splits(args: argparse.Namespace) -> dict[str, TaskSplit]:
    """The train/test split of the selected tasks: read from ``--split-file`` or drawn (and saved there)."""
    if args.split_file is not None and args.split_file.is_file():
        splits = load_split(args.split_file, args.data)
        if args.tasks:
            unknown = sorted(set(args.tasks) - set(splits))
            if unknown:
                raise ValueError(f"--tasks {unknown} are not in the split file {args.split_file}.")
            splits = {t: splits[t] for t in args.tasks}
        return splits
    if args.shots is None and args.fraction is None:
        raise ValueError("give --shots K or --fraction F (or an existing --split-file).")
    folders = load_task_folders(args.data, args.layout, args.split_dir, args.tasks)
    splits = few_shot_split(folders, shots=args.shots, fraction=args.fraction, seed=args.seed)
    if args.split_file is not None:
        save_split(splits, args.split_file, args.data)
    return splits


def task_specs(splits: dict[str, TaskSplit], template: str) -> list[TaskSpec]:
    return [TaskSpec(name, split.classnames, template) for name, split in splits.items()]


def datasets(
    splits: dict[str, TaskSplit], processor: CLIPProcessor, part: str, args: argparse.Namespace
) -> dict:
    return {
        name: ImageClassificationDataset(
            getattr(split, part), processor.image_processor, skip_unreadable=args.skip_unreadable
        )
        for name, split in splits.items()
    }


def read_groups(path: Path) -> list[list[str]]:
    """Groups from ``groups.json`` (``{"groups": [[...]]}``) or a bare list of lists."""
    data = read_json(path, "groups file")
    groups = data.get("groups") if isinstance(data, dict) else data
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and all(isinstance(t, str) for t in g) for g in groups
    ):
        raise ValueError(
            f"groups file {path} must hold a list of lists of task names (optionally under 'groups')."
        )
    return groups


# ---- subcommands -----------------------------------------------------------------------------------------
def add_group_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_train_arguments(parser)
    parser.add_argument(
        "--output", type=Path, required=True, help="folder for affinity.json/png and groups.json."
    )
    parser.add_argument(
        "--num-groups", type=positive_int, help="exact number of groups (default: best any number)."
    )
    parser.add_argument(
        "--snapshots", type=positive_int, default=10, help="similarity snapshots to average (default 10)."
    )
    parser.add_argument(
        "--every", type=positive_int, help="steps between snapshots (default: spread over the run)."
    )
    parser.add_argument(
        "--metric", choices=("dot", "cosine"), default="dot", help="dot product (Eq. 8) or cosine."
    )


def run_group(args: argparse.Namespace) -> None:
    from .affinity import save_affinity, task_affinity
    from .grouping import group_tasks

    splits = load_splits(args)
    clip, processor = load_model(args.model)
    result = task_affinity(
        clip, processor.tokenizer, datasets(splits, processor, "train", args), task_specs(splits, args.template),
        mmap_config(args), train_config(args), snapshots=args.snapshots, every=args.every, metric=args.metric,
        device=device_of(args),
    )  # fmt: skip
    save_affinity(result, args.output)
    groups = group_tasks(result.matrix, result.task_names, args.num_groups)
    atomic_write_json(
        args.output / GROUPS_JSON, {"groups": groups, "task_names": result.task_names, "metric": args.metric}
    )
    print(f"groups: {groups}\nwrote {args.output / GROUPS_JSON}, affinity.json, affinity.png")


def add_train_subcommand_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_train_arguments(parser)
    groups = parser.add_mutually_exclusive_group()
    groups.add_argument("--groups", type=Path, help="groups.json written by 'peft-mmap group'.")
    groups.add_argument("--groups-inline", type=inline_groups, help="groups like 'art,clipart;product'.")
    parser.add_argument(
        "--no-task-adapters", action="store_true", help="group adapters only (no task-specific MmAP)."
    )
    parser.add_argument("--output", type=Path, required=True, help="run folder: checkpoint/ and adapters/.")
    parser.add_argument("--resume", action="store_true", help="continue from --output's checkpoint.")


def run_train(args: argparse.Namespace) -> None:
    from .multitask import MultiTaskMmAP
    from .train import train

    config = train_config(args)
    splits = load_splits(args)
    groups = read_groups(args.groups) if args.groups else args.groups_inline
    clip, processor = load_model(args.model)
    model = MultiTaskMmAP(
        clip, processor.tokenizer, task_specs(splits, args.template), groups, mmap_config(args),
        task_adapters=not args.no_task_adapters, base_model_id=args.model,
    )  # fmt: skip
    result = train(
        model,
        datasets(splits, processor, "train", args),
        config,
        args.output,
        resume=args.resume,
        device=device_of(args),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        model.save_pretrained(args.output / ADAPTERS_DIR)
        print(f"trained {result.global_step} steps; adapters saved to {args.output / ADAPTERS_DIR}")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=False)
    add_data_arguments(parser)
    parser.add_argument(
        "--adapters", type=Path, required=True, help="a train --output folder or its adapters/ folder."
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="evaluation batch size (default 64)."
    )
    parser.add_argument(
        "--results", type=Path, help="results JSON to write (default: <adapters>/results.json)."
    )
    parser.add_argument(
        "--method-name", default="mmap", help="column/key of this method in the results (default mmap)."
    )


def run_eval(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, method_result, results_table_text, write_results_json
    from .multitask import MANIFEST_NAME, MultiTaskMmAP, read_manifest

    folder = (
        args.adapters / ADAPTERS_DIR
        if (args.adapters / ADAPTERS_DIR / MANIFEST_NAME).is_file()
        else args.adapters
    )
    base = args.model or read_manifest(folder)["base_model"]
    if not base:
        raise ValueError("the adapters' manifest names no base model: pass --model.")
    clip, processor = load_model(base)
    model = MultiTaskMmAP.from_pretrained(clip, folder, tokenizer=processor.tokenizer)
    splits = load_splits(args)
    for name, split in splits.items():
        if name not in model.tasks:
            raise ValueError(
                f"task {name!r} of the data is not one of the adapters' tasks {sorted(model.tasks)}."
            )
        if split.classnames != model.tasks[name].classnames:
            raise ValueError(
                f"task {name!r}: the data's classes differ from those the adapters were trained on."
            )
    accuracies = evaluate(model, datasets(splits, processor, "test", args), args.batch_size, device_of(args))
    print(results_table_text({args.method_name: accuracies}, list(splits)))
    entry = method_result([accuracies], model.trainable_parameter_count())
    path = write_results_json(
        args.results or folder / "results.json",
        methods={args.method_name: entry},
        grouping=model.groups,
        seeds=[args.seed],
    )
    print(f"wrote {path}")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .baselines import METHODS

    add_model_arguments(parser)
    add_data_arguments(parser, single_run=False)
    add_train_arguments(parser)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        default=list(DEFAULT_BENCH_METHODS),
        metavar="METHOD",
        help=f"methods to run (default: {' '.join(DEFAULT_BENCH_METHODS)}); one of {', '.join(sorted(METHODS))}.",
    )
    bench.add_argument(
        "--seeds", nargs="+", type=non_negative_int, default=[1, 2, 3], help="seeds (default 1 2 3)."
    )
    bench.add_argument(
        "--num-groups", type=positive_int, default=2, help="task groups found by grouping (default 2)."
    )
    bench.add_argument("--groups-inline", type=inline_groups, help="fixed groups like 'art,clipart;product'.")
    bench.add_argument(
        "--snapshots",
        type=positive_int,
        default=10,
        help="affinity snapshots of the grouping run (default 10).",
    )
    bench.add_argument("--eval-batch-size", type=positive_int, default=64, help="evaluation batch size.")
    bench.add_argument(
        "--sweep-shots",
        nargs="+",
        type=positive_int,
        help="run a k-shot sweep (e.g. 1 3 6 12) instead of one --shots/--fraction setting.",
    )
    bench.add_argument(
        "--output", type=Path, required=True, help="results folder (finished runs there are not rerun)."
    )


def bench_spec(args: argparse.Namespace):
    from .bench import BenchmarkSpec

    shots = args.shots if args.shots or args.fraction else (args.sweep_shots or [None])[0]
    if shots is None and args.fraction is None:
        raise ValueError("give --shots K, --fraction F or --sweep-shots K1 K2 ...")
    return BenchmarkSpec(
        methods=args.methods, seeds=args.seeds, shots=shots, fraction=args.fraction,
        train=train_config(args), mmap=mmap_config(args), num_groups=args.num_groups,
        groups=args.groups_inline, affinity_snapshots=args.snapshots, template=args.template,
        eval_batch_size=args.eval_batch_size, device=args.device,
    )  # fmt: skip


def run_bench(args: argparse.Namespace) -> None:
    from .bench import Benchmark, run_shot_sweep

    folders = load_task_folders(args.data, args.layout, args.split_dir, args.tasks)
    spec = bench_spec(args)
    if args.sweep_shots:
        run_shot_sweep(args.model, folders, spec, args.output, shots=args.sweep_shots)
        print(f"wrote {args.output / 'sweep.json'}, {args.output / 'sweep.png'} and shots<k>/results.*")
    else:
        Benchmark(args.model, folders, spec, args.output).run()
        print(f"wrote {args.output / 'results.json'} and {args.output / 'results.md'}")


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    from .params import ARCHS

    parser.add_argument(
        "--arch",
        default="vit-b16",
        choices=sorted(ARCHS),
        help="CLIP architecture, built from its config (default vit-b16).",
    )
    parser.add_argument("--tasks", type=positive_int, default=4, help="number of tasks (default 4).")
    parser.add_argument("--groups", type=positive_int, default=2, help="number of task groups (default 2).")
    parser.add_argument("--json", type=Path, help="also write {arch, methods} to this JSON file.")


def run_params(args: argparse.Namespace) -> None:
    from .params import count_method_parameters, markdown_table

    if args.groups > args.tasks:
        raise ValueError(f"--groups {args.groups} exceeds --tasks {args.tasks}.")
    counts = count_method_parameters(args.arch, args.tasks, args.groups)
    print(markdown_table(args.arch, counts))
    if args.json is not None:
        atomic_write_json(args.json, {"arch": args.arch, "methods": counts})


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .baselines import METHODS

    parser.add_argument(
        "--output",
        type=Path,
        default=Path("peft-mmap-demo"),
        help="results folder (default ./peft-mmap-demo).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one seed, 2 epochs, 4 methods: about 2 minutes on 2 CPU cores."
    )
    parser.add_argument(
        "--seeds", nargs="+", type=non_negative_int, help="seeds (default 1 2 3; --quick: 1)."
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        metavar="METHOD",
        help="methods (default: all baselines + mmap).",
    )
    parser.add_argument(
        "--model", default=None, help="CLIP checkpoint (default: the tiny CLIP shipped in the package)."
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where the synthetic benchmark is generated (default: ~/.cache/peft_mmap).",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")


def run_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo as demo

    demo(args.output, args.quick, args.seeds, args.methods, args.model, args.data_dir, args.device)


def add_perf_arguments(parser: argparse.ArgumentParser) -> None:
    from .perf import add_perf_arguments as add

    add(parser)


def run_perf(args: argparse.Namespace) -> None:
    from .perf import run_perf as run

    run(args)


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        "demo",
        "the whole method offline: synthetic benchmark, grouping, MmAP and baselines, table, task switching.",
        add_demo_arguments,
        run_demo,
    ),
    Subcommand(
        "group",
        "train a global shared MmAP, measure task affinity (Eq. 8) and group the tasks.",
        add_group_arguments,
        run_group,
    ),
    Subcommand(
        "train",
        "train group-shared + task-specific MmAP adapters on all tasks.",
        add_train_subcommand_arguments,
        run_train,
    ),
    Subcommand(
        "eval",
        "evaluate saved adapters on the test splits and write a results JSON.",
        add_eval_arguments,
        run_eval,
    ),
    Subcommand(
        "bench",
        "run several methods x seeds on k-shot splits and write the paper-style tables (resumable).",
        add_bench_arguments,
        run_bench,
    ),
    Subcommand(
        "params",
        "count every method's trainable parameters for a CLIP architecture (no weights needed).",
        add_params_arguments,
        run_params,
    ),
    Subcommand(
        "perf",
        "measure training/inference cost of MmAP and its peers side by side (JSON + Markdown).",
        add_perf_arguments,
        run_perf,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-mmap", description="Multi-modal Alignment Prompts (MmAP) for CLIP."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(run=command.run, subparser=child)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``peft-mmap``; returns the exit code (argparse errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        args.subparser.error(str(err).strip('"'))
    return 0


if __name__ == "__main__":
    sys.exit(main())
