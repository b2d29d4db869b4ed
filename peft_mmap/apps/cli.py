"""The ``peft-mmap`` command line: ``group`` (task affinity + grouping), ``train``, ``eval`` and the apps.

Every subcommand is one `Subcommand` entry in `SUBCOMMANDS`: a name, a help line, a function adding its
arguments and a function running it with the parsed namespace. Bad values end in an argparse error (exit
code 2) naming the value, never a traceback; each command checks everything it can (model reference, data
layout, split, groups, existing checkpoints, unreadable images) before its expensive step, and writes
nothing when a check fails.

This module imports only the standard library and torch-free modules (`peft_mmap.options`,
`peft_mmap.train_config`, `peft_mmap.files`, `peft_mmap.base_models`), so ``peft-mmap --help`` and ``peft-mmap <command> --help``
answer without importing torch, transformers or peft; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..base_models import TINY_CLIP_NAME, load_clip_model, resolve_model
from ..files import atomic_write_json, atomic_write_text, read_json
from ..options import (
    ARCHS,
    DEFAULT_NUM_GROUPS,
    DEFAULT_TEMPLATE,
    FAMILY_ARCHS,
    LAYOUTS,
    LR_SCALES,
    MMAP_CLI_FIELDS,
    PERF_FAMILY_METHODS,
    PERF_INFER_BATCHES,
    PERF_METHODS,
    PERF_PRECISIONS,
    PROTOCOLS,
    SCALE_INITS,
    SIGLIP_TEMPLATE,
    TEXT_PLACEMENT_HELP,
    TEXT_PLACEMENTS,
    TINY_ARCH,
)
from ..presets import PRESETS, get_preset
from ..train_config import TrainConfig
from .argtypes import fraction, non_negative_float, non_negative_int, positive_float, positive_int

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import CLIPModel, CLIPProcessor

    from ..classifier import TaskSpec
    from ..config import MmAPConfig
    from ..data import ImageClassificationDataset, TaskSplit
    from ..train import TrainResult

logger = logging.getLogger(__name__)

GROUPS_JSON = "groups.json"
PRESET_JSON = "preset.json"
"""In a ``train --preset`` run folder: the preset's name and layout, the options that replaced its values, the
trainer settings and the MmAP sizes (`preset_record`)."""
DEFAULT_BENCH_METHODS = ("zeroshot", "coop_mt", "vpt_mt", "maple_mt", "mmap")
#: Wall time of ``peft-mmap demo`` and ``peft-mmap demo --quick`` on 2 idle CPU cores, the benchmark images
#: already generated (``time peft-mmap demo [--quick]``); other jobs sharing the cores stretch it many times.
DEMO_TIMES = {"full": "5-6 min", "quick": "20-30 s"}
BEST = "best"
"""``--num-groups best``: the partition with the highest total within-group similarity, any number of groups."""
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors print the message and where the options are, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(all options: {self.prog} --help)\n")


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


def num_groups_type(text: str) -> int | str:
    """``--num-groups``: a positive integer or ``best``."""
    if text == BEST:
        return BEST
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or '{BEST}', got {text!r}") from None


num_groups_type.__name__ = f"a positive integer or '{BEST}'"


def check_model(text: str) -> str:
    """A model reference that can be loaded: a local folder holding a CLIP checkpoint (``config.json``), the
    shipped tiny CLIP's name ``peft_mmap:tiny-clip``, or a hub id ``org/name`` that the Hub answers for or
    that is in the local cache (one bounded request, no retry: `peft_mmap.base_models.resolve_model`).
    Nothing is loaded or downloaded here.

    Raises:
        ValueError: naming ``text`` and what was expected, or saying that the Hub could not be reached.
    """
    if text == TINY_CLIP_NAME:
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{text!r} is a folder without config.json; expected a model saved with save_pretrained."
            )
        return str(path)
    if path.exists():
        raise ValueError(
            f"{text!r} is a file; expected a checkpoint folder or a hub id of the form org/name."
        )
    if not HUB_ID.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a local folder, not {TINY_CLIP_NAME!r} and not a hub id of the form org/name."
        )
    try:
        resolve_model(text)
    except OSError as err:
        raise ValueError(str(err)) from None
    return text


def model_id(text: str) -> str:
    """``--model``: see `check_model`."""
    try:
        return check_model(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ---- shared argument groups ------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--model",
        type=model_id,
        required=required,
        help="dual-encoder checkpoint (CLIP, SigLIP, SigLIP 2 at fixed resolution, MetaCLIP 2; the family is "
        "read from its config): hub id (e.g. openai/clip-vit-base-patch16, google/siglip-base-patch16-224), local "
        f"folder with model + processor, or {TINY_CLIP_NAME} (the tiny CLIP shipped in the package).",
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
        help="generic: <root>/<task>/<class>/<img>; officehome: Art/Clipart/Product/Real World (Office-Home "
        "classes only); domainnet: clipart/painting/real/sketch (optionally with --split-dir).",
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
        "--template",
        help=f"class prompt template (default: the model family's, {DEFAULT_TEMPLATE!r} for CLIP and MetaCLIP 2, "
        f"{SIGLIP_TEMPLATE!r} for SigLIP and SigLIP 2).",
    )


def add_num_groups_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--num-groups",
        type=num_groups_type,
        help=f"number of task groups (default {DEFAULT_NUM_GROUPS}, or one group per task if there are fewer "
        f"tasks); '{BEST}': the highest total within-group similarity, any number of groups.",
    )


#: argparse types of numeric config fields, by annotation and metadata ``"range"``.
RANGE_TYPES: dict[tuple[str, str], Callable[[str], object]] = {
    ("int", "positive"): positive_int,
    ("int", "non_negative"): non_negative_int,
    ("float", "positive"): positive_float,
    ("float", "non_negative"): non_negative_float,
}


def config_options(config_cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are command-line options (those with ``"help"`` metadata)."""
    return [f for f in dataclasses.fields(config_cls) if "help" in f.metadata]


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_cls: type) -> None:
    """One ``--field-name`` option per field of `config_options`, from its metadata and annotation.

    ``bool`` fields are flags; ``"choices"`` fields take one of them; ``int``/``float`` fields (``X | None``
    too) get the argparse type of their ``"range"``. The help is the metadata's ``"help"`` plus the default.
    """
    for f in config_options(config_cls):
        kind = str(f.type).split("|")[0].strip()
        option = "--" + f.name.replace("_", "-")
        if kind == "bool":
            parser.add_argument(option, action="store_true", help=f"{f.metadata['help']}.")
            continue
        kwargs: dict[str, object] = {"default": f.default}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["type"] = RANGE_TYPES[kind, f.metadata["range"]]
        shown = "" if f.default is None else f" (default {f.default})"
        parser.add_argument(option, help=f"{f.metadata['help']}{shown}.", **kwargs)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a protocol's settings as this command's defaults; options given next to it win. "
        + " ".join(f"{p.name}: {p.summary}." for p in PRESETS.values()),
    )
    add_config_arguments(parser.add_argument_group("optimisation"), TrainConfig)
    mmap = parser.add_argument_group("MmAP")
    for name, (default, text) in MMAP_CLI_FIELDS.items():
        pair = isinstance(default, tuple)
        shown = "all" if default is None else " ".join(map(str, default)) if pair else default
        mmap.add_argument(
            "--" + name.replace("_", "-"),
            type=positive_int,
            default=list(default) if pair else default,
            help=f"{text} (default {shown}).",
            **({"nargs": 2, "metavar": ("M", "N")} if pair else {}),
        )
    mmap.add_argument(
        "--scale-init",
        choices=SCALE_INITS,
        default=SCALE_INITS[0],
        help=f"init of the scaling matrices (default {SCALE_INITS[0]}: text prompts start as tiled copies of "
        "P_s, vision prompts as zero tokens; see MmAPConfig.scale_init).",
    )
    mmap.add_argument(
        "--text-placement",
        choices=TEXT_PLACEMENTS,
        default=TEXT_PLACEMENTS[0],
        help=f"{TEXT_PLACEMENT_HELP} (default {TEXT_PLACEMENTS[0]}; see MmAPConfig.text_placement).",
    )


def preset_defaults(args: argparse.Namespace) -> dict[str, object]:
    """The option defaults that ``--preset`` gives the command parsed into ``args`` (for ``--layout``): its
    trainer, MmAP and benchmark settings that are options of that command (its other trainer settings, such
    as augmentation, reach `train_config` from the preset itself). A layout the preset has no batch size for
    gets ``batch_size=None``, which `train_config` refuses unless ``--batch-size`` is given."""
    preset = get_preset(args.preset)
    options = {f.name for f in config_options(TrainConfig)}
    train = {name: value for name, value in preset.train_settings(args.layout).items() if name in options}
    values = {"batch_size": None, **train, **preset.mmap_settings(), **preset.bench_settings()}
    return {name: value for name, value in values.items() if name in vars(args)}


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; with ``--preset``, parse it again with the preset's values as the command's defaults
    (`preset_defaults`), so that options given explicitly win. ``parser`` is left as it was."""
    args = parser.parse_args(argv)
    if getattr(args, "preset", None) is None:
        return args
    command, defaults = args.subparser, preset_defaults(args)
    saved = {name: command.get_default(name) for name in defaults}
    command.set_defaults(**defaults)
    try:
        return parser.parse_args(argv)
    finally:
        command.set_defaults(**saved)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of the parsed options (`add_train_arguments`; ``--seed`` where the command has it);
    with ``--preset``, its settings that are no option (training augmentation) too.

    Raises:
        ValueError: ``--preset`` has no batch size for ``--layout`` and ``--batch-size`` is not given.
    """
    options = {f.name: getattr(args, f.name) for f in config_options(TrainConfig)}
    seed = getattr(args, "seed", 0)
    if args.preset is None:
        return TrainConfig(**options, seed=seed)
    preset = get_preset(args.preset)
    if options["batch_size"] is None:
        raise ValueError(preset.missing_batch_size(args.layout, "--batch-size"))
    return preset.train_config(args.layout, **options, seed=seed)


def mmap_config(args: argparse.Namespace) -> MmAPConfig:
    """The `MmAPConfig` of the parsed ``--prompt-length``, ``--source-shape``, ``--depth``, ``--scale-init`` and
    ``--text-placement`` (with ``--preset``: on top of the preset's MmAP settings)."""
    from ..config import MmAPConfig

    preset = {} if args.preset is None else get_preset(args.preset).mmap_settings()
    options = {name: getattr(args, name) for name in MMAP_CLI_FIELDS}
    return MmAPConfig(
        **{**preset, **options, "scale_init": args.scale_init, "text_placement": args.text_placement}
    )


def preset_record(args: argparse.Namespace, config: TrainConfig, mmap: MmAPConfig) -> dict | None:
    """What a ``group`` or ``train`` run records about ``--preset`` (`peft_mmap.presets.Preset.record`:
    name, layout and the options that replaced its values); ``None`` without one."""
    from ..presets import flat_values

    if args.preset is None:
        return None
    used = flat_values(train=config.to_dict(), mmap=mmap.to_dict())
    return get_preset(args.preset).record(args.layout, used)


def num_groups_for(requested: int | str | None, num_tasks: int) -> int | None:
    """The number of groups to find (``None``: the best number) for ``--num-groups`` and ``num_tasks`` tasks.

    Raises:
        ValueError: ``--num-groups`` asks for more groups than there are tasks.
    """
    if requested == BEST:
        return None
    if requested is None:
        return min(DEFAULT_NUM_GROUPS, num_tasks)
    if requested > num_tasks:
        raise ValueError(
            f"--num-groups {requested} asks for more groups than there are tasks ({num_tasks}); every group "
            "needs at least one task."
        )
    return requested


# ---- loading ---------------------------------------------------------------------------------------------
def device_of(args: argparse.Namespace) -> torch.device:
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_processor(model: str) -> CLIPProcessor:
    """The checkpoint's processor (PIL image backend, see `peft_mmap.classifier.load_clip_processor`)."""
    from ..classifier import load_clip_processor

    try:
        return load_clip_processor(model)
    except OSError as err:
        raise ValueError(f"--model {model}: {err}") from None


def load_clip(model: str) -> CLIPModel:
    try:
        return load_clip_model(model)
    except OSError as err:
        raise ValueError(f"--model {model}: {err}") from None


def load_splits(args: argparse.Namespace) -> dict[str, TaskSplit]:
    """The train/test split of the selected tasks, read from ``--split-file`` or drawn; the data must be of
    ``--layout``. Writes nothing (see `save_split_file`)."""
    from ..data import check_layout, few_shot_split, load_split, load_task_folders

    if args.split_file is not None and args.split_file.is_file():
        splits = load_split(args.split_file, args.data)
        if args.tasks:
            unknown = sorted(set(args.tasks) - set(splits))
            if unknown:
                raise ValueError(f"--tasks {unknown} are not in the split file {args.split_file}.")
            splits = {t: splits[t] for t in args.tasks}
        check_layout(args.layout, {name: split.classnames for name, split in splits.items()}, args.data)
        return splits
    if args.shots is None and args.fraction is None:
        raise ValueError(f"give --shots K or --fraction F (or an existing --split-file){split_hint(args)}.")
    folders = load_task_folders(args.data, args.layout, args.split_dir, args.tasks)
    return few_shot_split(folders, shots=args.shots, fraction=args.fraction, seed=args.seed)


def split_hint(args: argparse.Namespace) -> str:
    """``--preset``'s splits for ``--layout`` as ``"; <options>"`` (empty without a preset or splits)."""
    hint = "" if args.preset is None else get_preset(args.preset).split_hint(args.layout)
    return f"; {hint}" if hint else ""


def save_split_file(args: argparse.Namespace, splits: dict[str, TaskSplit]) -> None:
    """Write a freshly drawn split to ``--split-file`` (once every check has passed)."""
    from ..data import save_split

    if args.split_file is not None and not args.split_file.is_file():
        save_split(splits, args.split_file, args.data)


def task_specs(splits: dict[str, TaskSplit], template: str | None, model: nn.Module) -> list[TaskSpec]:
    """The tasks of ``splits`` with ``template``, else the template of ``model``'s family."""
    from ..classifier import TaskSpec
    from ..families import model_family

    template = template or model_family(model).template
    return [TaskSpec(name, split.classnames, template) for name, split in splits.items()]


def datasets(
    splits: dict[str, TaskSplit], processor: CLIPProcessor, part: str, args: argparse.Namespace
) -> dict[str, ImageClassificationDataset]:
    """Each task's ``part`` (``train``/``test``) images; unreadable images are reported here, before any work."""
    from ..data import ImageClassificationDataset

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


def is_main_process() -> bool:
    """Rank 0 under ``torchrun`` (or no ``torchrun``): the process that writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


# ---- subcommands -----------------------------------------------------------------------------------------
def add_group_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_train_arguments(parser)
    parser.add_argument(
        "--output", type=Path, required=True, help="folder for affinity.json/png and groups.json."
    )
    add_num_groups_argument(parser)
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
    from ..affinity import AFFINITY_JSON, AFFINITY_PNG, save_affinity, task_affinity
    from ..grouping import group_tasks

    config, mmap = train_config(args), mmap_config(args)
    splits = load_splits(args)
    num_groups = num_groups_for(args.num_groups, len(splits))
    processor = load_processor(args.model)
    train_sets = datasets(splits, processor, "train", args)
    save_split_file(args, splits)
    clip = load_clip(args.model)
    result = task_affinity(
        clip, processor.tokenizer, train_sets, task_specs(splits, args.template, clip), mmap,
        config, snapshots=args.snapshots, every=args.every, metric=args.metric, device=device_of(args),
    )  # fmt: skip
    groups = group_tasks(result.matrix, result.task_names, num_groups)
    save_affinity(result, args.output)
    record = {"groups": groups, "task_names": result.task_names, "metric": args.metric}
    if args.preset is not None:
        record["preset"] = preset_record(args, config, mmap)
    atomic_write_json(args.output / GROUPS_JSON, record)
    print(f"groups: {groups}\nwrote {args.output / GROUPS_JSON}, {AFFINITY_JSON}, {AFFINITY_PNG}")


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
    from ..checkpoint import find_checkpoint
    from ..manifest import RUN_ADAPTERS_DIR, check_groups
    from ..multitask import MultiTaskMmAP
    from ..train import train

    config, mmap = train_config(args), mmap_config(args)
    splits = load_splits(args)
    groups = read_groups(args.groups) if args.groups else args.groups_inline
    check_groups(groups, list(splits))
    if not groups and args.no_task_adapters:
        raise ValueError("--no-task-adapters leaves no adapter to train: give --groups or --groups-inline.")
    if find_checkpoint(args.output) is not None and not args.resume:
        raise FileExistsError(
            f"{args.output} already holds a training checkpoint; pass --resume or use a new --output."
        )
    processor = load_processor(args.model)
    train_sets = datasets(splits, processor, "train", args)
    save_split_file(args, splits)
    clip = load_clip(args.model)
    model = MultiTaskMmAP(
        clip, processor.tokenizer, task_specs(splits, args.template, clip), groups, mmap,
        task_adapters=not args.no_task_adapters, base_model_id=args.model,
    )  # fmt: skip
    result = train(model, train_sets, config, args.output, resume=args.resume, device=device_of(args))
    if is_main_process():
        if args.preset is not None:
            sizes = {name: getattr(mmap, name) for name in MMAP_CLI_FIELDS}
            record = {
                **preset_record(args, config, mmap),
                "train": config.to_dict(),
                "sizes": {"mmap": sizes},
            }
            atomic_write_json(args.output / PRESET_JSON, record)
        adapters = model.save_pretrained(args.output / RUN_ADAPTERS_DIR)
        print(train_summary(result, adapters))


def train_summary(result: TrainResult, adapters: Path) -> str:
    """What `train` did: steps, time, first and last loss per task, and where the adapters are."""
    if not result.history:
        lines = [f"nothing to train: the checkpoint already holds all {result.global_step} steps."]
    else:
        first, last = result.history[0], result.history[-1]
        width = max(len("task"), *(len(t) for t in first))
        lines = [
            f"trained {len(result.history)} steps in {result.elapsed_s:.1f} s ({result.global_step} steps and "
            f"{result.epoch} complete epochs in all)",
            f"{'task':<{width}}  first loss  last loss",
            *(f"{t:<{width}}  {first[t]:>10.4f}  {last[t]:>9.4f}" for t in first),
        ]
    lines.append(f"adapters: {adapters}  (peft-mmap eval --adapters {adapters.parent} ...)")
    return "\n".join(lines)


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
    parser.add_argument(
        "--no-zero-shot",
        action="store_true",
        help="skip the zero-shot column (the base CLIP without adapters; it doubles the evaluation time).",
    )


def run_eval(args: argparse.Namespace) -> None:
    from ..baselines import build_method
    from ..evaluate import AVERAGE, evaluate, method_result, results_table_text, write_results_json
    from ..manifest import manifest_task_specs, read_manifest, resolve_adapter_folder
    from ..multitask import MultiTaskMmAP

    zero_shot = "zeroshot"
    if not args.no_zero_shot and args.method_name == zero_shot:
        raise ValueError(f"--method-name {zero_shot!r} is the zero-shot column's; choose another name.")
    splits = load_splits(args)
    if not args.adapters.is_dir():
        raise FileNotFoundError(f"--adapters {args.adapters} is not a folder.")
    folder = resolve_adapter_folder(args.adapters)
    manifest = read_manifest(folder)
    base = args.model
    if base is None:
        if not manifest["base_model"]:
            raise ValueError("the adapters' manifest names no base model: pass --model.")
        base = check_model(manifest["base_model"])
    trained = {t["name"]: t["classnames"] for t in manifest["tasks"]}
    for name, split in splits.items():
        if name not in trained:
            raise ValueError(
                f"task {name!r} of the data is not one of the adapters' tasks {sorted(trained)}."
            )
        if split.classnames != trained[name]:
            raise ValueError(
                f"task {name!r}: the data's classes differ from those the adapters were trained on."
            )
    processor = load_processor(base)
    test_sets = datasets(splits, processor, "test", args)
    save_split_file(args, splits)
    clip, device = load_clip(base), device_of(args)
    results: dict[str, dict[str, float]] = {}
    if not args.no_zero_shot:
        tasks = [spec for spec in manifest_task_specs(manifest) if spec.name in splits]
        results[zero_shot] = evaluate(
            build_method(zero_shot, clip, processor.tokenizer, tasks), test_sets, args.batch_size, device
        )
    model = MultiTaskMmAP.from_pretrained(clip, folder, tokenizer=processor.tokenizer)
    results[args.method_name] = evaluate(model, test_sets, args.batch_size, device)
    print(results_table_text(results, list(splits)))
    if zero_shot in results:
        gain = results[args.method_name][AVERAGE] - results[zero_shot][AVERAGE]
        print(f"{args.method_name} vs zero-shot: {gain:+.1f} points on average")
    params = {zero_shot: 0, args.method_name: model.trainable_parameter_count()}
    path = write_results_json(
        args.results or folder / "results.json",
        methods={name: method_result([acc], params[name]) for name, acc in results.items()},
        grouping=model.groups,
        seeds=[args.seed],
    )
    print(f"wrote {path}")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser, single_run=False)
    add_train_arguments(parser)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_BENCH_METHODS),
        metavar="METHOD",
        help=f"methods to run (default: {' '.join(DEFAULT_BENCH_METHODS)}); 'peft-mmap params' lists them all.",
    )
    bench.add_argument(
        "--seeds", nargs="+", type=non_negative_int, default=[1, 2, 3], help="seeds (default 1 2 3)."
    )
    add_num_groups_argument(bench)
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
        "--protocol",
        choices=PROTOCOLS,
        default=PROTOCOLS[0],
        help="'recipes': each method's own recipe (lr, context init, warm-up, augmentation) on top of the "
        "shared settings; 'paper': the shared settings alone for every method (default recipes).",
    )
    bench.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="turn training augmentation (random resized crop + flip) on or off for every method "
        "(default: as the protocol says).",
    )
    bench.add_argument(
        "--lr-search",
        nargs="*",
        type=positive_float,
        metavar="FACTOR",
        help="first pick each method's learning rate on a validation split: try these factors on its recipe's "
        f"rate (no value: {' '.join(f'{s:g}' for s in LR_SCALES)}) with --validation-shots of each class's "
        "training shots held out, then run the benchmark with the best factor per method.",
    )
    bench.add_argument(
        "--validation-shots",
        type=positive_int,
        default=2,
        help="training shots per class held out for validation by --lr-search (default 2).",
    )
    bench.add_argument(
        "--output",
        type=Path,
        required=True,
        help="results folder; it records its settings: a rerun with the same settings reuses its finished "
        "runs, one with other settings is refused (see --overwrite).",
    )
    add_overwrite_argument(bench)


def add_overwrite_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of other settings in --output (finished runs whose own settings are "
        "unchanged are reused; the others run again).",
    )


def bench_spec(args: argparse.Namespace, num_tasks: int):
    """The `BenchmarkSpec` of the parsed ``bench`` options (with ``--preset``: `preset_spec`, which adds
    the preset's method sizes)."""
    from .bench import BenchmarkSpec, preset_spec

    shots = args.shots if args.shots or args.fraction else (args.sweep_shots or [None])[0]
    if shots is None and args.fraction is None:
        raise ValueError(f"give --shots K, --fraction F or --sweep-shots K1 K2 ...{split_hint(args)}")
    fields = dict(
        methods=args.methods, seeds=args.seeds, shots=shots, fraction=args.fraction,
        train=train_config(args), mmap=mmap_config(args), num_groups=num_groups_for(args.num_groups, num_tasks),
        groups=args.groups_inline, affinity_snapshots=args.snapshots,
        template=args.template or DEFAULT_TEMPLATE,
        eval_batch_size=args.eval_batch_size, protocol=args.protocol, augment=args.augment,
        device=args.device,
    )  # fmt: skip
    return BenchmarkSpec(**fields) if args.preset is None else preset_spec(args.preset, args.layout, **fields)


def run_bench(args: argparse.Namespace) -> None:
    from ..data import load_task_folders
    from .bench import ACCURACY_VS_PARAMS_PNG, Benchmark, run_lr_search, run_shot_sweep

    folders = load_task_folders(args.data, args.layout, args.split_dir, args.tasks)
    spec = bench_spec(args, len(folders))
    if args.lr_search is not None:
        if args.sweep_shots:
            raise ValueError("--lr-search and --sweep-shots cannot be combined: search at one shot count.")
        run_lr_search(
            args.model, folders, spec, args.output, args.lr_search or LR_SCALES, args.validation_shots,
            overwrite=args.overwrite,
        )  # fmt: skip
        print(f"wrote {args.output / 'lr_search.md'}, {args.output / 'results.json'} and results.md")
    elif args.sweep_shots:
        run_shot_sweep(
            args.model, folders, spec, args.output, shots=args.sweep_shots, overwrite=args.overwrite
        )
        print(f"wrote {args.output / 'sweep.json'}, {args.output / 'sweep.png'} and shots<k>/results.*")
    else:
        Benchmark(args.model, folders, spec, args.output, overwrite=args.overwrite).run()
        print(f"wrote {args.output / 'results.json'}, results.md and {args.output / ACCURACY_VS_PARAMS_PNG}")


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        default="vit-b16",
        choices=[*sorted(ARCHS), *FAMILY_ARCHS],
        help="architecture, built from its config (default vit-b16): a CLIP one (every method's count) or "
        + ", ".join(f"{arch} ({checkpoint}'s shapes)" for arch, checkpoint in FAMILY_ARCHS.items())
        + " (MmAP's count next to CLIP ViT-B/16's).",
    )
    parser.add_argument("--tasks", type=positive_int, default=4, help="number of tasks (default 4).")
    parser.add_argument(
        "--groups",
        type=positive_int,
        default=DEFAULT_NUM_GROUPS,
        help=f"number of task groups (default {DEFAULT_NUM_GROUPS}).",
    )
    parser.add_argument(
        "--sizes",
        choices=["default", *sorted(PRESETS)],
        default="default",
        help="the methods' sizes: their defaults, or a preset's (paper: sized to the paper's Table 1 budgets, "
        "as 'bench --preset paper' trains them).",
    )
    parser.add_argument("--json", type=Path, help="also write {arch, sizes, methods} to this JSON file.")


def run_params(args: argparse.Namespace) -> None:
    from .params import NOTES, PAPER_SIZE_NOTES, count_method_parameters, markdown_table

    if args.groups > args.tasks:
        raise ValueError(f"--groups {args.groups} exceeds --tasks {args.tasks}.")
    sizes = None if args.sizes == "default" else args.sizes
    if args.arch in FAMILY_ARCHS:
        from .family_archs import family_table, mmap_counts
        from .params import size_options

        config = size_options(sizes)["mmap"].get("config")
        print(family_table(args.arch, args.tasks, args.groups, config))
        if args.json is not None:
            counts = mmap_counts(args.arch, args.tasks, args.groups, config)
            atomic_write_json(args.json, {"arch": args.arch, "sizes": args.sizes, "mmap": counts})
        return
    counts = count_method_parameters(args.arch, args.tasks, args.groups, sizes=sizes)
    print(markdown_table(args.arch, counts, NOTES if sizes is None else PAPER_SIZE_NOTES))
    if args.json is not None:
        atomic_write_json(args.json, {"arch": args.arch, "sizes": args.sizes, "methods": counts})


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        type=Path,
        help="results folder (default ./peft-mmap-demo, --quick: ./peft-mmap-demo-quick); a rerun with the "
        "same settings reuses its finished runs; a demo of other settings goes to a subfolder named after "
        "its settings, leaving the folder's results as they are (or replaces them: --overwrite).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a shorter run: one seed, 2 epochs, 4 methods ({DEMO_TIMES['quick']} on 2 idle CPU cores).",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=non_negative_int, help="seeds (default 1 2 3; --quick: 1)."
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help="methods (default: all baselines + mmap); 'peft-mmap params' lists them all.",
    )
    parser.add_argument(
        "--model",
        type=model_id,
        default=None,
        help=f"CLIP checkpoint (default: {TINY_CLIP_NAME}, the tiny CLIP shipped in the package).",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where the synthetic benchmark is generated (default: ~/.cache/peft_mmap).",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    add_overwrite_argument(parser)


def run_demo(args: argparse.Namespace) -> None:
    from .demo import demo_spec
    from .demo import run_demo as demo

    demo_spec(args.quick, args.seeds, args.methods, args.device)  # refuses bad methods before any work
    demo(
        args.output, args.quick, args.seeds, args.methods, args.model, args.data_dir, args.device,
        overwrite=args.overwrite,
    )  # fmt: skip


def _batch_list(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (positive integers)."""
    return [positive_int(part.strip()) for part in text.split(",") if part.strip()]


def add_perf_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``peft-mmap perf``."""
    parser.add_argument(
        "--arch",
        default="vit-b16",
        choices=[*sorted(ARCHS), TINY_ARCH, *FAMILY_ARCHS],
        help="CLIP shapes (default vit-b16), or another family's ("
        + ", ".join(FAMILY_ARCHS)
        + f": methods {', '.join(PERF_FAMILY_METHODS)}).",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu).")
    parser.add_argument(
        "--batch", type=positive_int, default=16, help="images per training step (default 16)."
    )
    parser.add_argument(
        "--infer-batches",
        type=_batch_list,
        default=list(PERF_INFER_BATCHES),
        help="comma-separated serving batch sizes (default 1,4,16).",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=5,
        help="timed round-robin rounds: each variant once per round (default 5).",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=1,
        help="untimed rounds (default 1; training always has one).",
    )
    parser.add_argument("--precision", choices=PERF_PRECISIONS, default="fp32", help="fp32 or bf16 autocast.")
    parser.add_argument(
        "--methods",
        type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
        help=f"comma-separated training methods (default all: {','.join(PERF_METHODS)}; on another family's "
        f"--arch: {','.join(PERF_FAMILY_METHODS)}).",
    )
    parser.add_argument(
        "--peak-tflops", type=positive_float, help="device dense peak TFLOP/s for --precision (gives MFU)."
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice).")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also write profile.md: torch.profiler summaries of batch-1 serving (zero-shot, MmAP) and of "
        "one training step (MmAP, full fine-tuning), and MmAP's step priced at full fine-tuning's rates.",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="on CPU, leave glibc's malloc as it is: it returns large freed blocks to the system, and every "
        "step then pays page faults to get them back (by default perf keeps freed memory for reuse).",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("perf"), help="writes perf.json and perf.md here."
    )


def run_perf(args: argparse.Namespace) -> None:
    from .perf import run_perf as run

    run(args)


def add_smoke_inputs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layout",
        choices=[layout for layout in LAYOUTS if layout != "generic"],  # the datasets' layouts
        required=True,
        help="officehome: <output>/data/{Art,Clipart,Product,Real World}/<Class>/*.jpg; domainnet (MiniDomainNet): "
        "<output>/data/{clipart,painting,real,sketch}/<class>/*.jpg and <output>/data/splits_mini/.",
    )
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help="writes <output>/model and <output>/data (replaced if there).",
    )
    parser.add_argument(
        "--arch",
        default="vit-b16",
        choices=[*sorted(ARCHS), TINY_ARCH],
        help="shapes of the random-weight CLIP (default vit-b16; tiny: 2 layers of width 64, 32 px).",
    )
    parser.add_argument(
        "--classes", type=positive_int, default=2, help="class folders per domain (default 2, at most 4)."
    )
    parser.add_argument(
        "--images-per-class",
        type=positive_int,
        default=2,
        help="images per class folder (default 2, at least 2).",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the weights and images.")


def run_smoke_inputs(args: argparse.Namespace) -> None:
    from .smoke import write_smoke_inputs

    inputs = write_smoke_inputs(
        args.output, args.layout, args.arch, args.classes, args.images_per_class, args.seed
    )
    split_dir = f"\nsplit dir: {inputs.split_dir}" if inputs.split_dir else ""
    print(f"model: {inputs.model}\ndata: {inputs.data}{split_dir}")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results", type=Path, required=True, help="a results.json of 'peft-mmap bench' or 'peft-mmap eval'."
    )
    parser.add_argument(
        "--dataset", required=True, help="officehome (the paper's Table 1) or minidomainnet (Table 2)."
    )
    parser.add_argument(
        "--split",
        help="the paper's split (officehome: 10%%, 20%%; minidomainnet: 1%%, 2%%; default: the one of the "
        "results' shots or fraction).",
    )
    parser.add_argument("--output", type=Path, help="also write the table to this Markdown file.")


def run_compare(args: argparse.Namespace) -> None:
    from .paper import comparison_markdown, paper_split

    results = read_json(args.results, "results file")
    paper = paper_split(args.dataset, args.split, results.get("shots"), results.get("fraction"))
    table = comparison_markdown(results, paper)
    print(table, end="")
    if args.output is not None:
        atomic_write_text(args.output, table)


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        "demo",
        "the whole method offline: synthetic benchmark, grouping, MmAP and baselines, tables, figures, verdict, "
        f"task switching ({DEMO_TIMES['full']} on 2 idle CPU cores, --quick {DEMO_TIMES['quick']}; longer "
        "when other jobs share the cores).",
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
        "evaluate saved adapters (and zero-shot CLIP) on the test splits and write a results JSON.",
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
        "compare",
        "print a results.json beside the paper's Table 1 (Office-Home) or Table 2 (MiniDomainNet).",
        add_compare_arguments,
        run_compare,
    ),
    Subcommand(
        "smoke-inputs",
        "write a random-weight CLIP of real shapes and a small image folder in a dataset's layout (smoke runs).",
        add_smoke_inputs_arguments,
        run_smoke_inputs,
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
    parser = ArgumentParser(
        prog="peft-mmap", description="Multi-modal Alignment Prompts (MmAP) for CLIP.", allow_abbrev=False
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help, allow_abbrev=False)
        command.add_arguments(child)
        child.set_defaults(run=command.run, subparser=child)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``peft-mmap``; returns the exit code (argparse errors exit with 2)."""
    parser = build_parser()
    args = parse_args(parser, argv)
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
