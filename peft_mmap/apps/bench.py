"""The benchmark harness: methods × seeds on k-shot splits, the paper's tables, a shot sweep, ablations.

One code path for every method: a fresh copy of the base CLIP, `peft_mmap.baselines.build_method`, the
shared trainer (`peft_mmap.train.train`) and evaluation (`peft_mmap.evaluate.evaluate`). Each finished
(method, seed) is written to ``runs/<method>/seed<s>.json`` and never rerun, so an interrupted benchmark
continues where it stopped (a run that was cut mid-training resumes from its trainer checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import CLIPModel

from ..affinity import save_affinity, task_affinity
from ..base_models import load_clip_model
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
from ..options import DEFAULT_NUM_GROUPS, LR_SCALES, PROTOCOLS
from ..train import TrainConfig, train

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
        output_dir: results, splits, grouping, per-run files and trainer checkpoints.
        progress: show progress bars.
        log: where status lines go.
    """

    def __init__(
        self,
        model_id: str | os.PathLike,
        folders: Mapping[str, TaskFolder],
        spec: BenchmarkSpec,
        output_dir: str | os.PathLike,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.model_id = str(model_id)
        self.folders = dict(folders)
        self.spec = spec
        self.output_dir = Path(output_dir)
        self.progress = progress
        self.log = log
        self.device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.processor = load_clip_processor(self.model_id)
        self._base = load_clip_model(self.model_id).eval()
        self._seed_data: dict[int, SeedData] = {}

    # ---- data ------------------------------------------------------------------------------------------
    def fresh_clip(self) -> CLIPModel:
        """An untouched copy of the base CLIP (methods modify their CLIP in place)."""
        return copy.deepcopy(self._base)

    def task_specs(self, splits: Mapping[str, TaskSplit]) -> list[TaskSpec]:
        return [TaskSpec(name, split.classnames, self.spec.template) for name, split in splits.items()]

    def seed_data(self, seed: int) -> SeedData:
        """The seed's split (drawn once, then read back from ``splits/seed<s>.json``) and its datasets."""
        if seed not in self._seed_data:
            path = self.output_dir / "splits" / f"seed{seed}.json"
            root = _common_root(self.folders)
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
        path = self.output_dir / "grouping" / "groups.json"
        if path.is_file():
            return read_json(path, "groups file")["groups"]
        data = self.seed_data(self.spec.seeds[0])
        self.log(f"grouping {len(data.splits)} tasks by gradient similarity ...")
        train_config = self.spec.affinity_train or self.spec.train
        result = task_affinity(
            self.fresh_clip(), self.processor.tokenizer, data.train, self.task_specs(data.splits),
            config=self.spec.mmap, train_config=dataclasses.replace(train_config, seed=self.spec.seeds[0]),
            snapshots=self.spec.affinity_snapshots, device=self.device, progress=self.progress,
        )  # fmt: skip
        save_affinity(result, path.parent)
        num_groups = (
            None if self.spec.num_groups is None else min(self.spec.num_groups, len(result.task_names))
        )
        groups = group_tasks(result.matrix, result.task_names, num_groups=num_groups)
        atomic_write_json(path, {"groups": groups, "similarity": result.matrix, "tasks": result.task_names})
        self.log(f"groups: {groups}")
        return groups

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

    def run_one(self, method: str, seed: int, groups: list[list[str]] | None) -> dict:
        """Train and evaluate one (method, seed), or read its finished result."""
        path = self.run_file(method, seed)
        if path.is_file():
            return read_json(path, "benchmark run")
        data = self.seed_data(seed)
        torch.manual_seed(seed)
        config, options = self.spec.recipe(method, seed)
        model = self.build(method, seed, data.splits, groups, options).to(self.device)
        work = path.with_suffix("")
        started = time.monotonic()
        trainable = model.trainable_parameter_count()
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
        accuracies = evaluate(model, data.test, batch_size=self.spec.eval_batch_size, device=self.device)
        if isinstance(model, MultiTaskMmAP):
            model.save_pretrained(work / "adapters")
        if (work / "checkpoint").exists():
            shutil.rmtree(work / "checkpoint")  # the run is complete: its result file replaces it
        record = {
            "accuracy": accuracies,
            "trainable_params": trainable,
            "train_seconds": round(train_seconds, 2),
            "recipe": {"protocol": self.spec.protocol, "train": config.to_dict(), "options": options},
        }
        atomic_write_json(path, record)
        self.log(f"[{method} seed {seed}] average {accuracies[AVERAGE]:.2f}%  ({train_seconds:.0f}s)")
        return record

    def run(self) -> dict:
        """Run every (method, seed); write ``results.json``, ``results.md`` and print the table."""
        groups = self.grouping()
        records = {m: [self.run_one(m, s, groups) for s in self.spec.seeds] for m in self.spec.methods}
        methods = {
            m: {**method_result([r["accuracy"] for r in runs], runs[0]["trainable_params"]),
                "train_seconds": sum(r["train_seconds"] for r in runs) / len(runs),
                "recipe": runs[0].get("recipe")}
            for m, runs in records.items()
        }  # fmt: skip
        task_order = list(self.folders)
        write_results_json(
            self.output_dir / "results.json", methods, grouping=groups or [], seeds=self.spec.seeds,
            model=self.model_id, shots=self.spec.shots, fraction=self.spec.fraction,
        )  # fmt: skip
        atomic_write_text(self.output_dir / "results.md", benchmark_markdown(methods, task_order))
        self.log(results_table_text(_mean_std(methods), task_order, parameters=_params(methods)))
        return read_json(self.output_dir / "results.json")


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
    """Table 1 layout (tasks as rows, methods as columns, mean ± std, parameters) plus Table 3 if present."""
    text = results_table_markdown(_mean_std(methods), task_order, parameters=_params(methods))
    ablation = ablation_markdown(methods)
    return text + ("\n" + ablation if ablation else "")


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


def run_lr_search(
    model_id: str | os.PathLike,
    folders: Mapping[str, TaskFolder],
    spec: BenchmarkSpec,
    output_dir: str | os.PathLike,
    scales: Sequence[float] = LR_SCALES,
    validation_shots: int = 2,
    progress: bool = True,
    log: Callable[[str], None] = print,
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
    benchmark's results; the validation runs go to ``output_dir/lr-search/x<factor>/``.

    Raises:
        ValueError: an empty grid or a factor that is not a positive number.
    """
    if not scales or not all(map(is_positive_number, scales)):
        raise ValueError(f"scales must be positive numbers, got {list(scales)!r}")
    output_dir = Path(output_dir)
    groups = spec.groups
    validation: dict[str, dict[str, float]] = {}
    for scale in scales:
        scales_now = dict.fromkeys(spec.methods, scale)
        search = dataclasses.replace(
            spec, groups=groups, validation_shots=validation_shots, lr_scales=scales_now
        )
        bench = Benchmark(model_id, folders, search, output_dir / "lr-search" / f"x{scale:g}", progress, log)
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
    return Benchmark(model_id, folders, final, output_dir, progress, log).run()


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
) -> dict:
    """Run the benchmark at several shot counts (paper Fig. 5); write ``sweep.json`` and ``sweep.png``."""
    output_dir = Path(output_dir)
    sweep: dict[str, dict[str, dict[str, float]]] = {}
    for k in shots:
        shot_spec = dataclasses.replace(spec, shots=k, fraction=None)
        results = Benchmark(model_id, folders, shot_spec, output_dir / f"shots{k}", progress, log).run()
        for method, entry in results["methods"].items():
            per_task = {**entry["tasks"], AVERAGE: entry["average"]}
            sweep.setdefault(method, {})[str(k)] = per_task
    payload = {"shots": list(shots), "methods": sweep}
    atomic_write_json(output_dir / "sweep.json", payload)
    plot_shot_sweep(payload, output_dir / "sweep.png")
    return payload


def plot_shot_sweep(sweep: Mapping, path: str | os.PathLike) -> Path:
    """One panel per task (and the average): accuracy against shots per class, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sweep["shots"]
    methods = sweep["methods"]
    panels = list(next(iter(methods.values()))[str(shots[0])])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for method, by_shot in methods.items():
            ax.plot(shots, [by_shot[str(k)][panel] for k in shots], marker="o", label=method)
        ax.set_title("Average" if panel == AVERAGE else panel)
        ax.set_xlabel("shots per class")
        ax.set_xticks(shots)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
