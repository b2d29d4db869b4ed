"""The benchmark harness: methods × seeds on k-shot splits, the paper's tables, a shot sweep, ablations.

One code path for every method: a fresh copy of the base CLIP, `peft_mmap.baselines.build_method`, the
shared trainer (`peft_mmap.train.train`) and evaluation (`peft_mmap.evaluate.evaluate`).

Runs never mix. An output folder belongs to one set of settings (model, data, `BenchmarkSpec`), recorded in
its ``settings.json``; a benchmark with other settings refuses the folder (naming the differences) unless
told to overwrite it. Each finished (method, seed) is written to ``runs/<method>/seed<s>.json`` with the
exact settings it was made with (model, data, split file digest, recipe, MmAP config, groups) and is
reused only when they are equal, so an interrupted benchmark continues where it stopped (a run that was
cut mid-training resumes from its trainer checkpoint, which is likewise kept only for the same settings);
the grouping is keyed the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftConfig
from transformers import CLIPModel

from ..affinity import save_affinity, task_affinity
from ..base_models import load_clip_model, portable_model_name
from ..baselines import METHODS, build_method
from ..checkpoint import find_checkpoint
from ..checks import is_positive_int, is_positive_number
from ..classifier import DEFAULT_TEMPLATE, CLIPTaskClassifier, TaskSpec, load_clip_processor
from ..config import MmAPConfig
from ..data import (
    ImageClassificationDataset,
    TaskFolder,
    TaskSplit,
    few_shot_split,
    load_split,
    save_split,
    validation_split,
)
from ..evaluate import (
    AVERAGE,
    evaluate,
    method_result,
    results_table_markdown,
    results_table_text,
    write_results_json,
)
from ..files import atomic_write, atomic_write_json, atomic_write_text, read_json
from ..grouping import group_tasks
from ..multitask import MultiTaskMmAP
from ..options import DEFAULT_NUM_GROUPS, LAYOUTS, LR_SCALES, MMAP_CLI_FIELDS, PROTOCOLS
from ..presets import flat_values, get_preset
from ..train import TrainConfig, train

SETTINGS_JSON = "settings.json"
"""An output folder's settings (`Benchmark.settings`): the folder holds results of these settings only."""
RUN_SETTINGS_JSON = "run_settings.json"
"""In a run's work folder (``runs/<method>/seed<s>/``): the settings its checkpoint and adapters belong to."""
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
ACCURACY_VS_PARAMS_PNG = "accuracy_vs_params.png"
#: What a benchmark writes into its output folder; a folder holding any of them holds someone's results.
OUTPUT_ENTRIES = (RESULTS_JSON, RESULTS_MD, ACCURACY_VS_PARAMS_PNG, "runs", "splits", "grouping")
#: Spec fields that change no result: where it runs, the evaluation batch size, and the preset the settings
#: came from (its values are in the other fields).
UNRESULTING_FIELDS = ("device", "eval_batch_size", "preset", "layout")
#: Settings that define the split files (with the seed, which names the file).
SPLIT_SETTINGS = ("data", "shots", "fraction")
#: Methods whose builder takes the task groups found by gradient-based grouping.
GROUPED_METHODS = ("mmap", "mmap_random_groups", "joint_prompts", "mlp_prompts")
#: Table 3 of the paper: (method, task-specific, group-shared) rows.
ABLATION_ROWS = (
    ("mmap_task_only", "✓", "✗"),
    ("mmap_group_only", "✗", "Group"),
    ("mmap_random_groups", "✓", "Random"),
    ("mmap", "✓", "Group"),
    ("mmap_one_group", "✓", "All in one group"),
)


@dataclass
class BenchmarkSpec:
    """What to run.

    Attributes:
        methods: registry names (`peft_mmap.baselines.METHODS`).
        seeds: one split, one training run and one evaluation per seed.
        shots / fraction: training images per class (exactly one of them).
        train: trainer settings (the seed is replaced by each run's seed).
        mmap: MmAP config of the MmAP methods.
        num_groups: number of task groups for gradient-based grouping (default
            `peft_mmap.options.DEFAULT_NUM_GROUPS`, at most one per task; ``None``: the best number).
        groups: fixed groups instead of grouping (skips the affinity run).
        affinity_snapshots: snapshots averaged by the grouping run.
        affinity_train: trainer settings of the grouping run (default: ``train``).
        template: class-prompt template.
        eval_batch_size: evaluation batch size.
        method_options: extra builder options per method (e.g. ``{"coop": {"n_ctx": 4}}``); they override
            the recipe's.
        protocol: ``"recipes"`` or ``"paper"`` (see `PROTOCOLS`).
        augment: ``None`` keeps each method's choice (the recipes augment, the paper protocol does not);
            ``True``/``False`` turns training augmentation on/off for every method, e.g. for data where
            random crops cut the object out (the demo's 48-pixel synthetic images).
        lr_scales: per method, a learning-rate factor that replaces its recipe's ``lr_scale`` (the learning
            rate is the recipe's, or under ``"paper"`` the shared one, times this factor).
        validation_shots: hold out this many of each class's training shots and evaluate on them instead
            of the test set (`peft_mmap.data.validation_split`; for choosing hyper-parameters).
        device: where to train and evaluate (default: CUDA if available).
        preset: the `peft_mmap.presets.PRESETS` name the settings came from (`preset_spec`), recorded in
            ``results.json`` with the values that replaced the preset's.
        layout: the data's folder layout (`peft_mmap.options.LAYOUTS`), which the preset's batch size
            depends on; required with ``preset``.
    """

    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    shots: int | None = None
    fraction: float | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    mmap: MmAPConfig = field(default_factory=MmAPConfig)
    num_groups: int | None = DEFAULT_NUM_GROUPS
    groups: list[list[str]] | None = None
    affinity_snapshots: int = 10
    affinity_train: TrainConfig | None = None
    template: str = DEFAULT_TEMPLATE
    eval_batch_size: int = 64
    method_options: dict[str, dict] = field(default_factory=dict)
    protocol: str = "recipes"
    augment: bool | None = None
    lr_scales: dict[str, float] = field(default_factory=dict)
    validation_shots: int | None = None
    device: str | None = None
    preset: str | None = None
    layout: str | None = None

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("BenchmarkSpec.methods is empty: name at least one method.")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; known methods: {sorted(METHODS)}.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"Methods repeat: {self.methods}.")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"BenchmarkSpec.seeds must be a non-empty list of ints, got {self.seeds!r}.")
        if (self.shots is None) == (self.fraction is None):
            raise ValueError("Give exactly one of BenchmarkSpec.shots and BenchmarkSpec.fraction.")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"Unknown protocol {self.protocol!r}; expected one of {PROTOCOLS}.")
        bad = {m: s for m, s in self.lr_scales.items() if not is_positive_number(s)}
        if bad:
            raise ValueError(f"BenchmarkSpec.lr_scales must be positive numbers, got {bad}.")
        v = self.validation_shots
        if v is not None and not is_positive_int(v):
            raise ValueError(f"BenchmarkSpec.validation_shots must be a positive int or None, got {v!r}.")
        if self.preset is not None:
            get_preset(self.preset)
            if self.layout not in LAYOUTS:
                raise ValueError(
                    f"BenchmarkSpec.layout must be one of {LAYOUTS} with a preset, got {self.layout!r}."
                )

    def recipe(self, method: str, seed: int) -> tuple[TrainConfig, dict]:
        """The trainer settings and builder options of ``method``'s run with ``seed`` under `protocol`."""
        recipe = METHODS[method].recipe
        use = self.protocol == "recipes"
        settings = dict(recipe.train) if use else {}
        scale = self.lr_scales.get(method, recipe.lr_scale if use else 1.0)
        # Rounded to 12 digits, so that 1e-5 x 10 is recorded as 1e-4.
        lr = float(f"{settings.get('lr', self.train.lr) * scale:.12g}")
        config = dataclasses.replace(self.train, **{**settings, "lr": lr}, seed=seed)
        if self.augment is not None:
            config = dataclasses.replace(config, augment=self.augment)
        options = {**(dict(recipe.options) if use else {}), **self.method_options.get(method, {})}
        return config, options

    def sizes(self) -> dict[str, dict]:
        """Each method's builder options (its size; the first seed's) and, for the MmAP methods, the MmAP
        config's size fields under ``"config"``."""
        sizes = {}
        for method in self.methods:
            options = self.recipe(method, self.seeds[0])[1]
            if method.startswith("mmap"):
                options["config"] = {name: getattr(self.mmap, name) for name in MMAP_CLI_FIELDS}
            sizes[method] = options
        return plain_json(sizes)

    def preset_record(self) -> dict | None:
        """`peft_mmap.presets.Preset.record` of the preset (name, layout, the settings that replaced its
        values), or ``None`` without one."""
        if self.preset is None:
            return None
        train = self.train.to_dict()
        if self.augment is not None:
            train["augment"] = self.augment
        used = flat_values(
            train=train, mmap=self.mmap.to_dict(),
            options={m: self.method_options.get(m, {}) for m in self.methods},
            bench={"seeds": self.seeds, "protocol": self.protocol},
        )  # fmt: skip
        return get_preset(self.preset).record(self.layout, used)

    def settings(self) -> dict:
        """Everything a result depends on, as plain JSON: every field but `UNRESULTING_FIELDS`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in UNRESULTING_FIELDS:
            del values[name]
        affinity_train = self.affinity_train and self.affinity_train.to_dict()
        values.update(
            train=self.train.to_dict(), mmap=mmap_settings(self.mmap), affinity_train=affinity_train
        )
        return plain_json(values)


def preset_spec(preset: str, layout: str, methods: list[str], **fields: object) -> BenchmarkSpec:
    """The `BenchmarkSpec` of preset ``preset`` (`peft_mmap.presets.PRESETS`) for data of ``layout``: its
    trainer settings, MmAP config, method sizes (``method_options``), seeds and protocol; ``fields`` (other
    `BenchmarkSpec` fields, e.g. ``shots=6``, or any of these, e.g. ``seeds=[1]``) win.

    Raises:
        ValueError: an unknown preset or layout, or a layout the preset has no batch size for when
            ``fields`` gives no ``train``.
    """
    chosen = get_preset(preset)
    values = dict(fields)
    if "train" not in values:
        values["train"] = chosen.train_config(layout)
    if "mmap" not in values:
        values["mmap"] = MmAPConfig(**chosen.mmap_settings())
    values.setdefault("method_options", chosen.options())
    for name, value in chosen.bench_settings().items():
        values.setdefault(name, value)
    return BenchmarkSpec(methods=methods, preset=preset, layout=layout, **values)


def plain_json(value: object) -> object:
    """``value`` as it reads back from JSON (tuples as lists, keys as strings), for comparing settings."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def mmap_settings(config: MmAPConfig) -> dict:
    """The MmAP fields of ``config`` (not PEFT's bookkeeping, such as its version or base model)."""
    peft_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    return {k: v for k, v in config.to_dict().items() if k not in peft_fields}


def data_settings(folders: Mapping[str, TaskFolder]) -> dict:
    """Each task's folder (resolved), class folders and image count per class."""
    return {
        name: {
            "root": str(Path(f.root).resolve()),
            "classes": list(f.class_dirs),
            "images": [len(i) for i in f.images],
        }
        for name, f in folders.items()
    }


def benchmark_settings(
    model_id: str | os.PathLike, folders: Mapping[str, TaskFolder], spec: BenchmarkSpec
) -> dict:
    """What a benchmark's results depend on: the model (by its portable name), the data and
    `BenchmarkSpec.settings`; recorded in its folder's `SETTINGS_JSON`."""
    local = Path(model_id).expanduser()
    model = portable_model_name(str(local.resolve()) if local.is_dir() else str(model_id))
    return plain_json({"model": model, "data": data_settings(folders), **spec.settings()})


def recorded_settings(output_dir: str | os.PathLike) -> dict | None:
    """The settings recorded in a benchmark folder (None when it records none)."""
    path = Path(output_dir) / SETTINGS_JSON
    return read_json(path, "benchmark settings") if path.is_file() else None


def holds_other_settings(output_dir: str | os.PathLike, settings: Mapping) -> bool:
    """Whether ``output_dir`` holds benchmark results made with settings other than ``settings`` (results
    with no recorded settings count as other)."""
    recorded = recorded_settings(output_dir)
    if recorded is None:
        return any((Path(output_dir) / name).exists() for name in OUTPUT_ENTRIES)
    return recorded != settings


def settings_folder_name(settings: Mapping) -> str:
    """A folder name that stands for ``settings``: ``settings-`` and 10 hex digits of their SHA-256."""
    text = json.dumps(settings, sort_keys=True)
    return f"settings-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def settings_differences(recorded: Mapping, now: Mapping, prefix: str = "") -> list[str]:
    """One line per setting that differs (nested keys joined by dots), ``recorded`` first."""
    missing = "(not set)"
    lines = []
    for key in sorted(set(recorded) | set(now)):
        before, after = recorded.get(key, missing), now.get(key, missing)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            lines += settings_differences(before, after, f"{prefix}{key}.")
        else:
            lines.append(
                f"{prefix}{key}: {json.dumps(before)} in the folder, {json.dumps(after)} in this run"
            )
    return lines


@dataclass
class SeedData:
    """One seed's split and preprocessed datasets (shared by all methods of that seed)."""

    splits: dict[str, TaskSplit]
    train: dict[str, ImageClassificationDataset]
    test: dict[str, ImageClassificationDataset]


class Benchmark:
    """Runs a `BenchmarkSpec` on a model and image-folder tasks, writing everything under ``output_dir``.

    Args:
        model_id: hub id or folder of a ``CLIPModel`` + ``CLIPProcessor`` (or the shipped tiny CLIP's name, see
            `peft_mmap.base_models`).
        folders: the tasks (``peft_mmap.data.scan_image_folder`` / ``office_home`` / ``domainnet``).
        spec: what to run.
        output_dir: results, splits, grouping, per-run files and trainer checkpoints; the folder's
            ``settings.json`` records `settings`.
        progress: show progress bars.
        log: where status lines go.
        overwrite: take over an ``output_dir`` that holds results of other settings: its results, figure
            and (if the data or shots differ) splits are removed; finished runs and the grouping are
            reused only where their own settings are unchanged.

    Raises:
        FileExistsError: ``output_dir`` holds results of other (or unrecorded) settings and ``overwrite``
            is False; the message names the differences. Nothing is written.
    """

    def __init__(
        self,
        model_id: str | os.PathLike,
        folders: Mapping[str, TaskFolder],
        spec: BenchmarkSpec,
        output_dir: str | os.PathLike,
        progress: bool = True,
        log: Callable[[str], None] = print,
        overwrite: bool = False,
    ) -> None:
        self.model_id = str(model_id)
        self.folders = dict(folders)
        self.spec = spec
        self.output_dir = Path(output_dir)
        self.progress = progress
        self.log = log
        self.device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        recorded = self._check_output(overwrite)
        self.processor = load_clip_processor(self.model_id)
        self._base = load_clip_model(self.model_id).eval()
        self._seed_data: dict[int, SeedData] = {}
        if recorded != self.settings():
            self._take_output(recorded)

    # ---- the output folder's settings ------------------------------------------------------------------
    def settings(self) -> dict:
        """What this benchmark's results depend on: the model, the data and `BenchmarkSpec.settings`."""
        return benchmark_settings(self.model_id, self.folders, self.spec)

    def _check_output(self, overwrite: bool) -> dict | None:
        """The settings recorded in ``output_dir``; refuses a folder of other settings unless ``overwrite``."""
        recorded = recorded_settings(self.output_dir)
        if not holds_other_settings(self.output_dir, self.settings()):
            return recorded
        if recorded is None:
            what = "results whose settings are unknown (no settings.json: written by an earlier version)"
        else:
            changes = settings_differences(recorded, self.settings())
            shown = [f"  {line}" for line in changes[:12]] + [f"  ... and {len(changes) - 12} more"] * (
                len(changes) > 12
            )
            what = f"results of other settings (its {SETTINGS_JSON}):\n" + "\n".join(shown)
        if not overwrite:
            raise FileExistsError(
                f"{self.output_dir} holds {what}\nNothing was changed. Choose another output folder "
                "(--output), or replace those results (--overwrite; finished runs whose own settings are "
                "unchanged are reused)."
            )
        self.log(f"overwriting {self.output_dir}, which held {what}")
        return recorded

    def _take_output(self, recorded: dict | None) -> None:
        """Remove the results of the settings ``recorded`` (and their splits, if drawn otherwise), then
        record this benchmark's settings."""
        for name in (RESULTS_JSON, RESULTS_MD, ACCURACY_VS_PARAMS_PNG):
            (self.output_dir / name).unlink(missing_ok=True)
        now = self.settings()
        if recorded is None or any(recorded.get(k) != now[k] for k in SPLIT_SETTINGS):
            shutil.rmtree(self.output_dir / "splits", ignore_errors=True)
        atomic_write_json(self.output_dir / SETTINGS_JSON, now)

    # ---- data ------------------------------------------------------------------------------------------
    def fresh_clip(self) -> CLIPModel:
        """An untouched copy of the base CLIP (methods modify their CLIP in place)."""
        return copy.deepcopy(self._base)

    def task_specs(self, splits: Mapping[str, TaskSplit]) -> list[TaskSpec]:
        return [TaskSpec(name, split.classnames, self.spec.template) for name, split in splits.items()]

    def split_file(self, seed: int) -> Path:
        """Where the seed's split is saved (`peft_mmap.data.save_split`, paths relative to `data_root`)."""
        return self.output_dir / "splits" / f"seed{seed}.json"

    @property
    def data_root(self) -> Path:
        """The data root the split files are written relative to."""
        return _common_root(self.folders)

    def split_settings(self, seed: int) -> dict:
        """What the seed's training and test sets depend on: the data, the split file and held-out shots."""
        self.seed_data(seed)
        digest = hashlib.sha256(self.split_file(seed).read_bytes()).hexdigest()
        return {"data": data_settings(self.folders), "split_sha256": digest,
                "validation_shots": self.spec.validation_shots}  # fmt: skip

    def seed_data(self, seed: int) -> SeedData:
        """The seed's split (drawn once, then read back from ``splits/seed<s>.json``) and its datasets."""
        if seed not in self._seed_data:
            path = self.split_file(seed)
            root = self.data_root
            if path.is_file():
                splits = load_split(path, root)
            else:
                splits = few_shot_split(
                    self.folders, shots=self.spec.shots, fraction=self.spec.fraction, seed=seed
                )
                save_split(splits, path, root)
            if self.spec.validation_shots is not None:
                splits = validation_split(splits, self.spec.validation_shots, seed)
            image_processor = self.processor.image_processor

            def datasets(part: str) -> dict[str, ImageClassificationDataset]:
                return {
                    name: ImageClassificationDataset(getattr(split, part), image_processor, cache=True)
                    for name, split in splits.items()
                }

            self._seed_data[seed] = SeedData(splits, datasets("train"), datasets("test"))
        return self._seed_data[seed]

    # ---- grouping --------------------------------------------------------------------------------------
    def grouping(self) -> list[list[str]] | None:
        """Task groups for the grouped methods: given, read back, or found by gradient similarity (Eq. 8).

        The affinity run uses the first seed's training split; the groups are reused for every seed.
        """
        if not any(m in GROUPED_METHODS for m in self.spec.methods):
            return self.spec.groups
        if self.spec.groups is not None:
            return self.spec.groups
        path = self.grouping_dir / "groups.json"
        seed = self.spec.seeds[0]
        train_config = dataclasses.replace(self.spec.affinity_train or self.spec.train, seed=seed)
        settings = plain_json({
            "model": self.settings()["model"], **self.split_settings(seed), "template": self.spec.template,
            "mmap": mmap_settings(self.spec.mmap), "train": train_config.to_dict(),
            "snapshots": self.spec.affinity_snapshots, "num_groups": self.spec.num_groups,
        })  # fmt: skip
        if path.is_file():
            found = read_json(path, "groups file")
            if found.get("settings") == settings:
                return found["groups"]
            self.log(f"{path} was found with other settings: grouping again")
        data = self.seed_data(seed)
        self.log(f"grouping {len(data.splits)} tasks by gradient similarity ...")
        result = task_affinity(
            self.fresh_clip(), self.processor.tokenizer, data.train, self.task_specs(data.splits),
            config=self.spec.mmap, train_config=train_config, snapshots=self.spec.affinity_snapshots,
            device=self.device, progress=self.progress,
        )  # fmt: skip
        save_affinity(result, path.parent)
        num_groups = (
            None if self.spec.num_groups is None else min(self.spec.num_groups, len(result.task_names))
        )
        groups = group_tasks(result.matrix, result.task_names, num_groups=num_groups)
        atomic_write_json(path, {"groups": groups, "similarity": result.matrix, "tasks": result.task_names,
                                 "settings": settings})  # fmt: skip
        self.log(f"groups: {groups}")
        return groups

    @property
    def grouping_dir(self) -> Path:
        """Where the grouping writes ``groups.json`` and the affinity run's ``affinity.json``/``.png``."""
        return self.output_dir / "grouping"

    # ---- runs ------------------------------------------------------------------------------------------
    def run_file(self, method: str, seed: int) -> Path:
        return self.output_dir / "runs" / method / f"seed{seed}.json"

    def build(
        self, method: str, seed: int, splits: Mapping[str, TaskSplit], groups, options: Mapping
    ) -> CLIPTaskClassifier:
        options = dict(options)
        if method.startswith("mmap"):
            options.setdefault("config", self.spec.mmap)
        if method == "mmap_random_groups":
            options.setdefault("seed", seed)
        return build_method(
            method, self.fresh_clip(), self.processor.tokenizer, self.task_specs(splits), groups, **options
        )

    def run_settings(self, method: str, seed: int, groups: list[list[str]] | None) -> dict:
        """What (method, seed)'s result depends on: model, data, split, template, recipe, MmAP config (MmAP
        methods) and groups (grouped methods)."""
        config, options = self.spec.recipe(method, seed)
        settings = {
            "model": self.settings()["model"], **self.split_settings(seed), "template": self.spec.template,
            "recipe": {"protocol": self.spec.protocol, "train": config.to_dict(), "options": options},
        }  # fmt: skip
        if method.startswith("mmap"):
            settings["mmap"] = mmap_settings(self.spec.mmap)
        if method in GROUPED_METHODS:
            settings["groups"] = groups
        return plain_json(settings)

    def run_one(self, method: str, seed: int, groups: list[list[str]] | None) -> dict:
        """Train and evaluate one (method, seed), or read its finished result if made with the same
        `run_settings`.

        Trained methods also get their accuracy on the (clean) training images before and after training.
        """
        path = self.run_file(method, seed)
        settings = self.run_settings(method, seed, groups)
        if path.is_file():
            found = read_json(path, "benchmark run")
            if found.get("settings") == settings:
                self.log(f"[{method} seed {seed}] finished before with the same settings: reusing {path}")
                return found
            self.log(f"[{method} seed {seed}] {path} was made with other settings: running it again")
        work = path.with_suffix("")
        marker = work / RUN_SETTINGS_JSON
        if work.exists() and not (marker.is_file() and read_json(marker, "run settings") == settings):
            shutil.rmtree(work)  # a cut run of other settings: its checkpoint must not be resumed
        data = self.seed_data(seed)
        torch.manual_seed(seed)
        config, options = self.spec.recipe(method, seed)
        model = self.build(method, seed, data.splits, groups, options).to(self.device)
        trainable = model.trainable_parameter_count()
        batch = self.spec.eval_batch_size
        if trainable:
            atomic_write_json(marker, settings)
            before = evaluate(model, data.train, batch_size=batch, device=self.device)[AVERAGE]
        started = time.monotonic()
        if trainable:
            self.log(f"[{method} seed {seed}] training {trainable:,} parameters")
            train(
                model,
                data.train,
                config,
                output_dir=work,
                resume=find_checkpoint(work) is not None,
                device=self.device,
                progress=self.progress,
            )
        train_seconds = time.monotonic() - started
        accuracies = evaluate(model, data.test, batch_size=batch, device=self.device)
        if isinstance(model, MultiTaskMmAP):
            model.save_pretrained(work / "adapters")
        if (work / "checkpoint").exists():
            shutil.rmtree(work / "checkpoint")  # the run is complete: its result file replaces it
        record = {
            "accuracy": accuracies,
            "trainable_params": trainable,
            "train_seconds": round(train_seconds, 2),
            "recipe": {"protocol": self.spec.protocol, "train": config.to_dict(), "options": options},
            "settings": settings,
        }
        if trainable:
            after = evaluate(model, data.train, batch_size=batch, device=self.device)[AVERAGE]
            record["train_accuracy"] = {"before": before, "after": after}
        atomic_write_json(path, record)
        self.log(f"[{method} seed {seed}] average {accuracies[AVERAGE]:.2f}%  ({train_seconds:.0f}s)")
        return record

    def run(self) -> dict:
        """Run every (method, seed); write ``results.json``, ``results.md``, the ``accuracy_vs_params.png``
        figure, and print the tables."""
        groups = self.grouping()
        records = {m: [self.run_one(m, s, groups) for s in self.spec.seeds] for m in self.spec.methods}
        methods = {m: method_entry(runs) for m, runs in records.items()}
        task_order = list(self.folders)
        write_results_json(
            self.output_dir / RESULTS_JSON, methods, grouping=groups or [], seeds=self.spec.seeds,
            model=self.model_id, shots=self.spec.shots, fraction=self.spec.fraction,
            preset=self.spec.preset_record(), sizes=self.spec.sizes(),
        )  # fmt: skip
        atomic_write_text(self.output_dir / RESULTS_MD, benchmark_markdown(methods, task_order))
        plot_accuracy_vs_params(methods, self.output_dir / ACCURACY_VS_PARAMS_PNG)
        self.log(results_table_text(_mean_std(methods), task_order, parameters=_params(methods)))
        learning = train_accuracy_text(methods)
        if learning:
            self.log(learning)
        return read_json(self.output_dir / RESULTS_JSON)


def method_entry(runs: Sequence[Mapping]) -> dict:
    """One method's ``results.json`` entry from its per-seed run records: `method_result`, the mean training
    time, the recipe and, for a trained method, the mean training-set accuracy before and after training."""
    entry = {
        **method_result([r["accuracy"] for r in runs], runs[0]["trainable_params"]),
        "train_seconds": sum(r["train_seconds"] for r in runs) / len(runs),
        "recipe": runs[0].get("recipe"),
    }
    if all("train_accuracy" in r for r in runs):
        entry["train_accuracy"] = {
            when: sum(r["train_accuracy"][when] for r in runs) / len(runs) for when in ("before", "after")
        }
    return entry


def _common_root(folders: Mapping[str, TaskFolder]) -> Path:
    """The data root the split files are written relative to."""
    return Path(os.path.commonpath([str(f.root) for f in folders.values()]))


def _mean_std(methods: Mapping[str, Mapping]) -> dict[str, dict[str, float | tuple[float, float]]]:
    """Table cells: ``(mean, std)`` over several runs, the plain accuracy of a single run."""

    def cell(entry: Mapping, key: str, mean: float) -> float | tuple[float, float]:
        return mean if len(entry["runs"]) == 1 else (mean, entry["std"][key])

    return {
        name: {**{t: cell(entry, t, acc) for t, acc in entry["tasks"].items()},
               AVERAGE: cell(entry, AVERAGE, entry["average"])}
        for name, entry in methods.items()
    }  # fmt: skip


def _params(methods: Mapping[str, Mapping]) -> dict[str, int]:
    return {name: entry["trainable_params"] for name, entry in methods.items()}


def benchmark_markdown(methods: Mapping[str, Mapping], task_order: Sequence[str]) -> str:
    """Table 1 layout (tasks as rows, methods as columns, mean ± std, parameters), the training-set accuracy
    before → after training, and Table 3 if present."""
    tables = [
        results_table_markdown(_mean_std(methods), task_order, parameters=_params(methods)),
        train_accuracy_markdown(methods),
        ablation_markdown(methods),
    ]
    return "\n".join(table for table in tables if table)


TRAIN_ACCURACY_TITLE = (
    "Training-set accuracy, before → after training (clean training images, mean over tasks and seeds)"
)


def _train_accuracy_rows(methods: Mapping[str, Mapping]) -> list[tuple[str, float, float]]:
    return [
        (name, entry["train_accuracy"]["before"], entry["train_accuracy"]["after"])
        for name, entry in methods.items()
        if "train_accuracy" in entry
    ]


def train_accuracy_markdown(methods: Mapping[str, Mapping]) -> str:
    """Every trained method's training-set accuracy before and after training, and the change (one row per
    method); empty if no method was trained."""
    rows = _train_accuracy_rows(methods)
    if not rows:
        return ""
    lines = [f"{TRAIN_ACCURACY_TITLE}:", "", "| Method | Before | After | Change |", "|:---|---:|---:|---:|"]
    lines += [f"| `{m}` | {b:.1f} | {a:.1f} | {a - b:+.1f} |" for m, b, a in rows]
    return "\n".join(lines) + "\n"


def train_accuracy_text(methods: Mapping[str, Mapping]) -> str:
    """`train_accuracy_markdown` as aligned lines for the terminal."""
    rows = _train_accuracy_rows(methods)
    width = max((len(m) for m, _, _ in rows), default=0)
    lines = [f"  {m:<{width}}  {b:5.1f} → {a:5.1f}  ({a - b:+.1f})" for m, b, a in rows]
    return "\n".join([f"{TRAIN_ACCURACY_TITLE}:", *lines]) + "\n" if rows else ""


def ablation_markdown(methods: Mapping[str, Mapping]) -> str:
    """Table 3 layout (task-specific / group-shared MmAP) when at least two of its variants were run."""
    rows = [(m, t, g) for m, t, g in ABLATION_ROWS if m in methods]
    if len(rows) < 2:  # one row compares nothing
        return ""
    lines = ["| Method | Task-specific | Group-shared | Average |", "|:---|:---:|:---:|---:|"]
    for name, task, group in rows:
        entry = methods[name]
        spread = f" ± {entry['std'][AVERAGE]:.2f}" if len(entry["runs"]) > 1 else ""
        lines.append(f"| `{name}` | {task} | {group} | {entry['average']:.2f}{spread} |")
    return "\n".join(lines) + "\n"


def check_summary(path: Path, settings: Mapping, overwrite: bool) -> None:
    """Refuse to replace the summary ``path`` (of a sweep or search) written with other ``settings``, its
    top-level keys, unless ``overwrite``; the runs under it are checked by each `Benchmark`."""
    if overwrite or not path.is_file():
        return
    found = read_json(path, "summary")
    changes = settings_differences({k: found.get(k) for k in settings}, plain_json(dict(settings)))
    if changes:
        raise FileExistsError(
            f"{path} was written with other settings:\n"
            + "\n".join(f"  {c}" for c in changes)
            + "\nNothing was changed. Choose another output folder (--output), or replace it (--overwrite)."
        )


def run_lr_search(
    model_id: str | os.PathLike,
    folders: Mapping[str, TaskFolder],
    spec: BenchmarkSpec,
    output_dir: str | os.PathLike,
    scales: Sequence[float] = LR_SCALES,
    validation_shots: int = 2,
    progress: bool = True,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict:
    """Pick each method's learning-rate factor on a validation split, then run the benchmark with the picks.

    Every method gets the same grid (``scales``, factors on its recipe's learning rate) and the same budget
    (``spec``'s epochs, batch and data): for each factor, the benchmark runs with ``validation_shots`` of
    each class's training shots held out and evaluates on them (`BenchmarkSpec.validation_shots`; the
    grouped methods use groups found once, on the remaining shots; averages are over ``spec``'s seeds). A
    few shots make a noisy validation set, so the pick follows the one-standard-error rule: among the
    factors whose validation average is within one binomial standard error of the best
    (``sqrt(p (1 - p) / n)``, ``n`` validation images of the first seed), the one nearest 1 (the published
    rate, in log distance) wins. The test-set benchmark
    then runs with the picked factors in ``output_dir``. Writes ``lr_search.json`` (``{"scales",
    "validation_shots", "validation_images", "seeds", "validation": {method: {factor: average}},
    "standard_error": {method: points}, "picked": {method: factor}}``), ``lr_search.md`` and the
    benchmark's results; the validation runs go to ``output_dir/lr-search/x<factor>/``. ``overwrite``: see
    `Benchmark` (it also allows replacing an ``lr_search.json`` of another grid).

    Raises:
        ValueError: an empty grid or a factor that is not a positive number.
        FileExistsError: results of other settings in ``output_dir`` (see `Benchmark`).
    """
    if not scales or not all(map(is_positive_number, scales)):
        raise ValueError(f"scales must be positive numbers, got {list(scales)!r}")
    output_dir = Path(output_dir)
    grid = {"scales": [float(s) for s in scales], "validation_shots": validation_shots, "seeds": spec.seeds}
    check_summary(output_dir / "lr_search.json", grid, overwrite)
    groups = spec.groups
    validation: dict[str, dict[str, float]] = {}
    for scale in scales:
        scales_now = dict.fromkeys(spec.methods, scale)
        search = dataclasses.replace(
            spec, groups=groups, validation_shots=validation_shots, lr_scales=scales_now
        )
        folder = output_dir / "lr-search" / f"x{scale:g}"
        bench = Benchmark(model_id, folders, search, folder, progress, log, overwrite)
        groups = bench.grouping()
        for method, entry in bench.run()["methods"].items():
            validation.setdefault(method, {})[f"{scale:g}"] = entry["average"]
    images = sum(len(d) for d in bench.seed_data(spec.seeds[0]).test.values())
    errors, picked = {}, {}
    for method, by_scale in validation.items():
        best = max(by_scale.values())
        errors[method] = 100 * math.sqrt(best / 100 * (1 - best / 100) / images)
        close = [s for s, acc in by_scale.items() if acc >= best - errors[method]]
        picked[method] = float(min(close, key=lambda s: (abs(math.log(float(s))), float(s))))
    payload = {"scales": [float(s) for s in scales], "validation_shots": validation_shots,
               "validation_images": images, "seeds": spec.seeds, "validation": validation,
               "standard_error": errors, "picked": picked}  # fmt: skip
    atomic_write_json(output_dir / "lr_search.json", payload)
    atomic_write_text(output_dir / "lr_search.md", lr_search_markdown(payload))
    log(lr_search_markdown(payload))
    final = dataclasses.replace(spec, groups=groups, lr_scales=picked)
    return Benchmark(model_id, folders, final, output_dir, progress, log, overwrite).run()


def lr_search_markdown(search: Mapping) -> str:
    """Validation average per method (rows) and learning-rate factor (columns), the standard error and the
    pick (in bold)."""
    scales = [f"{s:g}" for s in search["scales"]]
    lines = ["| Method | " + " | ".join(f"lr × {s}" for s in scales) + " | ± 1 SE | picked |",
             "|:---|" + "---:|" * (len(scales) + 2)]  # fmt: skip
    for method, by_scale in search["validation"].items():
        best = f"{search['picked'][method]:g}"
        cells = [f"**{by_scale[s]:.1f}**" if s == best else f"{by_scale[s]:.1f}" for s in scales]
        error = search["standard_error"][method]
        lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {error:.1f} | × {best} |")
    return "\n".join(lines) + "\n"


def run_shot_sweep(
    model_id: str | os.PathLike,
    folders: Mapping[str, TaskFolder],
    spec: BenchmarkSpec,
    output_dir: str | os.PathLike,
    shots: Sequence[int] = (1, 3, 6, 12),
    progress: bool = True,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict:
    """Run the benchmark at several shot counts (paper Fig. 5) in ``output_dir/shots<k>/``; write
    ``sweep.json`` and ``sweep.png``. ``overwrite``: see `Benchmark` (it also allows replacing a
    ``sweep.json`` of other shot counts).

    Raises:
        FileExistsError: results of other settings in ``output_dir`` (see `Benchmark`).
    """
    output_dir = Path(output_dir)
    check_summary(output_dir / "sweep.json", {"shots": list(shots)}, overwrite)
    sweep: dict[str, dict[str, dict[str, float]]] = {}
    for k in shots:
        shot_spec = dataclasses.replace(spec, shots=k, fraction=None)
        folder = output_dir / f"shots{k}"
        results = Benchmark(model_id, folders, shot_spec, folder, progress, log, overwrite).run()
        for method, entry in results["methods"].items():
            per_task = {**entry["tasks"], AVERAGE: entry["average"]}
            sweep.setdefault(method, {})[str(k)] = per_task
    payload = {"shots": list(shots), "methods": sweep}
    atomic_write_json(output_dir / "sweep.json", payload)
    plot_shot_sweep(payload, output_dir / "sweep.png")
    return payload


def plot_shot_sweep(sweep: Mapping, path: str | os.PathLike) -> Path:
    """One panel per task (and the average): accuracy against shots per class, one line per method."""
    shots = sweep["shots"]
    methods = sweep["methods"]
    panels = list(next(iter(methods.values()))[str(shots[0])])
    figure = new_figure(3.2 * len(panels), 3.0)
    axes = figure.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for method, by_shot in methods.items():
            ax.plot(shots, [by_shot[str(k)][panel] for k in shots], marker="o", label=method)
        ax.set_title("Average" if panel == AVERAGE else panel)
        ax.set_xlabel("shots per class")
        ax.set_xticks(shots)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return save_png(figure, path)


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` (inches) with a tight layout, outside pyplot: no global backend or figure
    state is touched, and `save_png` renders it with Agg."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="tight")


def save_png(figure, path: str | os.PathLike) -> Path:
    """Atomically write ``figure`` as a PNG."""
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


@dataclass
class AccuracyVsParams:
    """What the accuracy-against-parameters figure shows (the form of the paper's Fig. 1).

    Attributes:
        points: ``(method, trainable parameters, average accuracy, std over seeds)`` of every method that
            trains parameters.
        references: ``(method, average accuracy)`` of the methods that train none (zero-shot), drawn as
            horizontal lines (no point on a log axis).
    """

    points: list[tuple[str, int, float, float]]
    references: list[tuple[str, float]]


def accuracy_vs_params(methods: Mapping[str, Mapping]) -> AccuracyVsParams:
    """The figure's data from ``results.json``'s ``"methods"``."""
    points = [(name, entry["trainable_params"], entry["average"], entry["std"][AVERAGE])
              for name, entry in methods.items() if entry["trainable_params"] > 0]  # fmt: skip
    references = [
        (name, entry["average"]) for name, entry in methods.items() if entry["trainable_params"] == 0
    ]
    return AccuracyVsParams(points, references)


def plot_accuracy_vs_params(methods: Mapping[str, Mapping], path: str | os.PathLike) -> Path:
    """Average accuracy (± std over seeds) against trainable parameters on a log axis, one labelled point
    per method with MmAP highlighted, and zero-shot as a horizontal reference line."""
    data = accuracy_vs_params(methods)
    figure = new_figure(6.4, 4.2)
    ax = figure.subplots()
    for name, params, average, std in data.points:
        mine = name == "mmap"
        ax.errorbar(
            params, average, yerr=std, fmt="*" if mine else "o", markersize=14 if mine else 6,
            color="tab:red" if mine else "tab:blue", ecolor="grey", capsize=2, zorder=3 if mine else 2,
        )  # fmt: skip
        ax.annotate(
            name, (params, average), textcoords="offset points", xytext=(5, 4), fontsize=8,
            fontweight="bold" if mine else "normal", color="tab:red" if mine else "black",
        )  # fmt: skip
    for name, average in data.references:
        ax.axhline(average, color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            f"{name} (0 parameters) {average:.1f}", (0.99, average), xycoords=("axes fraction", "data"),
            textcoords="offset points", xytext=(0, -10), fontsize=8, color="dimgrey", ha="right",
        )  # fmt: skip
    if data.points:
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)  # room for the labels
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("average top-1 accuracy (%)")
    ax.set_title("Accuracy against trainable parameters")
    ax.grid(alpha=0.3, which="both")
    return save_png(figure, path)
