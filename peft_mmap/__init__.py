"""peft_mmap: Multi-modal Alignment Prompts (MmAP) for CLIP as a Hugging Face PEFT method.

``import peft_mmap`` registers the ``"MMAP"`` method with peft, so ``get_peft_model(clip, MmAPConfig(...))``
and ``PeftModel.from_pretrained(clip, "<dir>")`` work, whichever of peft and peft_mmap is imported first.

The import itself is light (no torch, transformers or peft): each public name is imported from its module
on first use, and registration happens once peft is imported (`peft_mmap._autoregister`).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from ._autoregister import register_with_peft
from ._version import __version__

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "MmAPConfig": "config",
    "adapter_parameter_counts": "hub",
    "model_card": "hub",
    "push_to_hub": "hub",
    "save_model_card": "hub",
    "MmAPLayer": "layer",
    "MmAPModel": "model",
    "MMAP_PEFT_TYPE": "peft_type",
    "AffinityResult": "affinity",
    "save_affinity": "affinity",
    "task_affinity": "affinity",
    "METHODS": "baselines",
    "build_method": "baselines",
    "Benchmark": "apps.bench",
    "BenchmarkSpec": "apps.bench",
    "run_lr_search": "apps.bench",
    "run_shot_sweep": "apps.bench",
    "CLIPTaskClassifier": "classifier",
    "TaskSpec": "classifier",
    "ImageClassificationDataset": "data",
    "TaskFolder": "data",
    "TaskSplit": "data",
    "domainnet": "data",
    "few_shot_split": "data",
    "load_split": "data",
    "load_task_folders": "data",
    "office_home": "data",
    "save_split": "data",
    "scan_image_folder": "data",
    "validation_split": "data",
    "run_demo": "apps.demo",
    "evaluate": "evaluate",
    "results_table_markdown": "evaluate",
    "summarize": "evaluate",
    "write_results_json": "evaluate",
    "group_tasks": "grouping",
    "grouping_score": "grouping",
    "MultiTaskMmAP": "multitask",
    "SYNTHETIC_CLASSES": "apps.synthetic",
    "SYNTHETIC_DOMAINS": "apps.synthetic",
    "generate_benchmark": "apps.synthetic",
    "TINY_CLIP_NAME": "base_models",
    "TINY_CLIP_PATH": "base_models",
    "load_clip_model": "base_models",
    "load_tiny_clip": "apps.tiny_clip",
    "NonFiniteLossError": "train",
    "TrainConfig": "train_config",
    "TrainResult": "train",
    "train": "train",
}

__all__ = [
    "METHODS",
    "MMAP_PEFT_TYPE",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DOMAINS",
    "TINY_CLIP_NAME",
    "TINY_CLIP_PATH",
    "AffinityResult",
    "Benchmark",
    "BenchmarkSpec",
    "CLIPTaskClassifier",
    "ImageClassificationDataset",
    "MmAPConfig",
    "MmAPLayer",
    "MmAPModel",
    "MultiTaskMmAP",
    "NonFiniteLossError",
    "TaskFolder",
    "TaskSpec",
    "TaskSplit",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "adapter_parameter_counts",
    "build_method",
    "domainnet",
    "evaluate",
    "few_shot_split",
    "generate_benchmark",
    "group_tasks",
    "grouping_score",
    "load_clip_model",
    "load_split",
    "load_task_folders",
    "load_tiny_clip",
    "model_card",
    "office_home",
    "push_to_hub",
    "results_table_markdown",
    "run_demo",
    "run_lr_search",
    "run_shot_sweep",
    "save_affinity",
    "save_model_card",
    "save_split",
    "scan_image_folder",
    "summarize",
    "task_affinity",
    "train",
    "validation_split",
    "write_results_json",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


#: Public functions named like the submodule that defines them (``train``, ``evaluate``).
_SHADOWED = frozenset(name for name, module in _EXPORTS.items() if name == module)


class _Package(types.ModuleType):
    """The package keeps ``peft_mmap.train`` and ``peft_mmap.evaluate`` the public functions of those names.

    Importing a submodule binds it on its package (``peft_mmap.train = <module>``), which would replace the
    function once the submodule is imported lazily; the submodule stays in ``sys.modules``.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
register_with_peft()

if TYPE_CHECKING:
    from .affinity import AffinityResult, save_affinity, task_affinity
    from .apps.bench import Benchmark, BenchmarkSpec, run_lr_search, run_shot_sweep
    from .apps.demo import run_demo
    from .apps.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_DOMAINS, generate_benchmark
    from .apps.tiny_clip import load_tiny_clip
    from .base_models import TINY_CLIP_NAME, TINY_CLIP_PATH, load_clip_model
    from .baselines import METHODS, build_method
    from .classifier import CLIPTaskClassifier, TaskSpec
    from .config import MmAPConfig
    from .data import (
        ImageClassificationDataset,
        TaskFolder,
        TaskSplit,
        domainnet,
        few_shot_split,
        load_split,
        load_task_folders,
        office_home,
        save_split,
        scan_image_folder,
        validation_split,
    )
    from .evaluate import evaluate, results_table_markdown, summarize, write_results_json
    from .grouping import group_tasks, grouping_score
    from .hub import adapter_parameter_counts, model_card, push_to_hub, save_model_card
    from .layer import MmAPLayer
    from .model import MmAPModel
    from .multitask import MultiTaskMmAP
    from .peft_type import MMAP_PEFT_TYPE
    from .train import NonFiniteLossError, TrainResult, train
    from .train_config import TrainConfig
