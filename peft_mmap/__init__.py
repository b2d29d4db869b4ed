"""peft_mmap: Multi-modal Alignment Prompts (MmAP) for CLIP as a Hugging Face PEFT method.

``import peft_mmap`` registers the ``"MMAP"`` method with peft, so ``get_peft_model(clip, MmAPConfig(...))``
and ``PeftModel.from_pretrained(clip, "<dir>")`` work.
"""

from .config import MmAPConfig
from .hub import adapter_parameter_counts, model_card, push_to_hub, save_model_card
from .layer import MmAPLayer
from .model import MmAPModel
from .registration import MMAP_PEFT_TYPE, register

__version__ = "0.1.0"

register()

# The rest of the public API builds on the registered method.
from .affinity import AffinityResult, save_affinity, task_affinity  # noqa: E402
from .baselines import METHODS, build_method  # noqa: E402
from .bench import Benchmark, BenchmarkSpec, run_shot_sweep  # noqa: E402
from .classifier import CLIPTaskClassifier, TaskSpec  # noqa: E402
from .data import (  # noqa: E402
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
)
from .demo import run_demo  # noqa: E402
from .evaluate import evaluate, results_table_markdown, summarize, write_results_json  # noqa: E402
from .grouping import group_tasks, grouping_score  # noqa: E402
from .multitask import MultiTaskMmAP  # noqa: E402
from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_DOMAINS, generate_benchmark  # noqa: E402
from .tiny_clip import TINY_CLIP_PATH, load_tiny_clip  # noqa: E402
from .train import NonFiniteLossError, TrainConfig, TrainResult, train  # noqa: E402

__all__ = [
    "METHODS",
    "MMAP_PEFT_TYPE",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DOMAINS",
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
    "load_split",
    "load_task_folders",
    "load_tiny_clip",
    "model_card",
    "office_home",
    "push_to_hub",
    "results_table_markdown",
    "run_demo",
    "run_shot_sweep",
    "save_affinity",
    "save_model_card",
    "save_split",
    "scan_image_folder",
    "summarize",
    "task_affinity",
    "train",
    "write_results_json",
]
