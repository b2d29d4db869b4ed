"""`peft-mmap perf`: training cost and inference throughput of MmAP next to its baselines, in one run.

Every number comes from the library's own code path on a CLIP built from its config (random weights, no
download): ``model(pixel_values, task)`` + cross-entropy, backward and an SGD step (momentum 0.9), the text
tower included (the 65 Office-Home class prompts of the task). Measured side by side:

* ``train_step_s``: median seconds of one training step of ``mmap`` (2 groups + task adapters: ``2b``
  prompt tokens per layer and tower), ``vpt_deep`` (VPT-MT with the same ``2b`` vision tokens), ``coop``
  (CoOp-MT), ``maple`` (MaPLe-MT) and ``full_ft`` (full fine-tuning, one backbone);
* ``peak_mem_mb``: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps (weights included); on
  CPU the bytes of the tensors saved for backward (distinct storages, parameters excluded, counted with
  ``torch.autograd.graph.saved_tensors_hooks``) plus gradients plus optimizer state, i.e. the memory a step
  needs on top of the weights (``peak_mem_kind`` in the JSON says which);
* ``infer_img_per_s``: eval-mode images/s of zero-shot CLIP, MmAP with cached task text features (one task
  repeatedly) and MmAP on batches mixing four tasks (one vision pass with per-sample prompts);
* ``text_step_s``: MmAP text features forward + backward for one task with the class prompts padded to the
  longest prompt (what the library does) and to the 77 positions of CLIP's text encoder;
* ``train_flops`` / ``mfu``: FLOPs of one training step of each method (counted by
  ``torch.utils.flop_counter.FlopCounterMode``; machine-independent, so they explain the time ratios) and
  the model-FLOPs utilisation they give at the measured step time against ``--peak-tflops``.

The prompts are tokenized one token per word and punctuation mark (`word_tokenizer`), as CLIP's BPE does for
nearly every Office-Home class name, so sequence lengths match a real checkpoint's closely.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from .baselines import build_method
from .classifier import CLIPTaskClassifier, TaskSpec
from .config import MmAPConfig
from .data import OFFICE_HOME_CLASSES, OFFICE_HOME_DOMAINS
from .files import atomic_write_json, atomic_write_text
from .options import PERF_METHODS as TRAIN_METHODS
from .options import TINY_ARCH
from .params import clip_config

#: Goal per ratio: (comparison, target, what it compares).
GOALS: dict[str, tuple[str, float, str]] = {
    "train_mmap_over_vpt_deep": ("<=", 1.10, "MmAP train step / VPT-deep (same vision tokens)"),
    "train_mmap_over_full_ft": ("<=", 0.70, "MmAP train step / full fine-tuning"),
    "infer_mmap_cached_over_zeroshot": (">=", 0.92, "MmAP images/s (cached text) / zero-shot"),
    "infer_mixed_over_single": (">=", 0.95, "MmAP images/s, 4-task batches / one-task batches"),
    "text_pad77_over_dynamic": (">=", 3.0, "text tower step time, 77 tokens / longest prompt"),
}

_SOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def perf_clip_config(arch: str) -> CLIPConfig:
    """`peft_mmap.params.clip_config`, plus ``"tiny"``: 2 layers of width 64 per tower, 32 px images."""
    if arch != TINY_ARCH:
        config = clip_config(arch)
    else:
        config = CLIPConfig(
            text_config=dict(
                hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
            ),
            vision_config=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=16,
            ),
            projection_dim=32,
        )
    config._attn_implementation = "sdpa"
    return config


def word_tokenizer(texts: Sequence[str], config: CLIPConfig) -> PreTrainedTokenizerFast:
    """A CLIP-style tokenizer with one token per word or punctuation mark of ``texts``.

    ``<|startoftext|>``/``<|endoftext|>`` get the ids of ``config.text_config`` (bos/eos), padding uses
    ``<|endoftext|>`` as CLIP's tokenizer does, and the words get ids from 0 upwards.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    text = config.text_config
    words = dict.fromkeys(
        w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t.lower())
    )
    vocab = {word: i for i, word in enumerate(words)}
    vocab |= {_SOS: text.bos_token_id, _EOS: text.eos_token_id}
    if max(vocab.values()) >= text.vocab_size:
        raise ValueError(f"{len(words)} words do not fit a vocabulary of {text.vocab_size}.")
    backend = Tokenizer(models.WordLevel(vocab, unk_token=_EOS))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_SOS} $A {_EOS}", special_tokens=[(_SOS, text.bos_token_id), (_EOS, text.eos_token_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_SOS,
        eos_token=_EOS,
        pad_token=_EOS,
        unk_token=_EOS,
        model_max_length=text.max_position_embeddings,
    )


def benchmark_tasks() -> list[TaskSpec]:
    """The four Office-Home tasks, each with the 65 Office-Home classes."""
    return [TaskSpec(name, list(OFFICE_HOME_CLASSES)) for name in OFFICE_HOME_DOMAINS]


def benchmark_groups() -> list[list[str]]:
    """Two groups of two tasks (``art, clipart`` and ``product, real_world``)."""
    names = list(OFFICE_HOME_DOMAINS)
    return [names[:2], names[2:]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``steps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Sequence[torch.Tensor]) -> Iterator[list[int]]:
    """Count the bytes of the distinct storages autograd saves for backward inside the block.

    Storages of ``exclude`` (the parameters) are not counted. Yields a one-element list holding the total.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class _Bench:
    """Builds the models of one run and measures them (one base CLIP, deep-copied per method)."""

    def __init__(self, arch: str, device: torch.device, batch: int, precision: str, seed: int = 0) -> None:
        self.device, self.batch, self.precision = device, batch, precision
        self.config = perf_clip_config(arch)
        self.tasks = benchmark_tasks()
        self.tokenizer = word_tokenizer([p for t in self.tasks for p in t.prompts], self.config)
        self.mmap_config = MmAPConfig()
        torch.manual_seed(seed)
        self.base = CLIPModel(self.config).eval()
        size = self.config.vision_config.image_size
        self.pixels = torch.randn(batch, 3, size, size, device=device)
        self.labels = torch.randint(len(OFFICE_HOME_CLASSES), (batch,), device=device)
        self.task = self.tasks[0].name

    def build(self, method: str, **options) -> CLIPTaskClassifier:
        clip = copy.deepcopy(self.base)
        if method.startswith("mmap"):
            options.setdefault("config", self.mmap_config)
        model = build_method(method, clip, self.tokenizer, self.tasks, benchmark_groups(), **options)
        return model.to(self.device)

    def build_trainer(self, name: str) -> CLIPTaskClassifier:
        method, options = TRAIN_METHODS[name]
        b2 = 2 * self.mmap_config.prompt_length
        return self.build(method, **{k: b2 if v == "2b" else v for k, v in options.items()}).train()

    def train_step(self, model: CLIPTaskClassifier, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(self.precision, self.device):
            logits = model(self.pixels, self.task)
        F.cross_entropy(logits.float(), self.labels).backward()
        optimizer.step()

    def measure_training(self, name: str, steps: int, warmup: int) -> tuple[float, float, int]:
        """``(median step seconds, peak memory MB, FLOPs of one step)`` of a training method.

        The first step is one of the ``warmup`` steps (at least one): it creates the optimizer state and
        is where FLOPs and, on CPU, the saved-for-backward bytes are counted.
        """
        model = self.build_trainer(name)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
        step = lambda: self.train_step(model, optimizer)  # noqa: E731
        counter = FlopCounterMode(display=False)
        with counter, saved_tensor_bytes(list(model.parameters())) as saved:
            step()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        seconds = median_seconds(step, steps, max(warmup - 1, 0), self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            peak = saved[0] + sum(t.nbytes for t in [*(p.grad for p in params), *state] if t is not None)
        return seconds, peak / 2**20, counter.get_total_flops()

    def measure_inference(self, steps: int, warmup: int) -> dict[str, float]:
        """Eval-mode images/s: zero-shot, MmAP on one task (cached text), MmAP on 4-task batches."""
        names = [t.name for t in self.tasks]
        mixed = [names[i % len(names)] for i in range(self.batch)]
        runs = {"zeroshot": ("zeroshot", self.task), "mmap_cached": ("mmap", self.task)}
        runs["mmap_mixed"] = ("mmap", mixed)
        models: dict[str, CLIPTaskClassifier] = {}
        result = {}
        for key, (method, task) in runs.items():
            model = models.setdefault(method, self.build(method).eval())

            def infer(model: CLIPTaskClassifier = model, task: str | list[str] = task) -> None:
                with torch.inference_mode(), _autocast(self.precision, self.device):
                    model(self.pixels, task)

            result[key] = self.batch / median_seconds(infer, steps, warmup, self.device)
        return result

    def measure_text(self, steps: int, warmup: int) -> dict[str, float]:
        """MmAP text features forward + backward for one task: longest-prompt padding vs 77 positions."""
        model = self.build("mmap").train()
        model.activate(self.task)
        max_length = self.config.text_config.max_position_embeddings
        padded = self.tokenizer(
            list(self.tasks[0].prompts), padding="max_length", max_length=max_length, return_tensors="pt"
        )
        token_sets = {
            "dynamic": model.task_tokens(self.task),
            "pad77": {k: padded[k].to(self.device) for k in ("input_ids", "attention_mask")},
        }
        result = {}
        for key, tokens in token_sets.items():

            def step(tokens: dict[str, torch.Tensor] = tokens) -> None:
                model.zero_grad(set_to_none=True)
                with _autocast(self.precision, self.device):
                    features = model.clip_model.get_text_features(**tokens).pooler_output
                F.normalize(features.float(), dim=-1).sum().backward()

            result[key] = median_seconds(step, steps, warmup, self.device)
        result["dynamic_tokens"] = int(token_sets["dynamic"]["input_ids"].shape[1])
        return result


def run_benchmark(
    arch: str = "vit-b16",
    device: str | torch.device = "cpu",
    batch: int = 8,
    steps: int = 3,
    warmup: int = 1,
    precision: str = "fp32",
    methods: Sequence[str] | None = None,
    peak_tflops: float | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every quantity of the module docstring in one run; returns the JSON-ready result.

    Args:
        arch: ``vit-b16``, ``vit-b32``, ``vit-l14`` (`peft_mmap.params.ARCHS`) or ``tiny``.
        device: where to run.
        batch: images per step.
        steps / warmup: timed and untimed repetitions of every measurement (the median is reported).
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        methods: training methods to time (default: all of `TRAIN_METHODS`).
        peak_tflops: the device's dense peak for ``precision``; gives ``mfu`` of every training step.
        log: where progress lines go.
    """
    device = torch.device(device)
    methods = list(methods or TRAIN_METHODS)
    unknown = sorted(set(methods) - set(TRAIN_METHODS))
    if unknown:
        raise ValueError(f"Unknown perf methods {unknown}; known: {list(TRAIN_METHODS)}.")
    bench = _Bench(arch, device, batch, precision)
    train_s, memory, flops = {}, {}, {}
    for name in methods:
        log(f"training step: {name}")
        train_s[name], memory[name], flops[name] = bench.measure_training(name, steps, warmup)
    log("inference")
    infer = bench.measure_inference(steps, warmup)
    log("text tower")
    text = bench.measure_text(steps, warmup)
    result = {
        "arch": arch,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "batch": batch,
        "precision": precision,
        "steps": steps,
        "warmup": warmup,
        "torch": torch.__version__,
        "prompt_tokens_per_layer": 2 * bench.mmap_config.prompt_length,
        "text_tokens_dynamic": text.pop("dynamic_tokens"),
        "train_step_s": train_s,
        "train_img_per_s": {name: batch / s for name, s in train_s.items()},
        "peak_mem_mb": memory,
        "peak_mem_kind": (
            "torch.cuda.max_memory_allocated (weights included)"
            if device.type == "cuda"
            else "saved-for-backward tensors + gradients + optimizer state (weights excluded)"
        ),
        "infer_img_per_s": infer,
        "text_step_s": text,
        "train_flops": flops,
    }
    if peak_tflops is not None:
        result["peak_tflops"] = peak_tflops
        result["mfu"] = {name: flops[name] / train_s[name] / (peak_tflops * 1e12) for name in methods}
    result["ratios"] = goal_ratios(result)
    result["flop_ratios"] = {
        f"mmap_over_{other}": flops["mmap"] / flops[other]
        for other in ("vpt_deep", "full_ft")
        if "mmap" in flops and other in flops
    }
    return result


def goal_ratios(result: dict) -> dict[str, dict]:
    """Every ratio of `GOALS` that ``result`` has the measurements for: ``{value, goal, met}``."""
    train, infer, text = result["train_step_s"], result["infer_img_per_s"], result["text_step_s"]
    values = {
        "infer_mmap_cached_over_zeroshot": infer["mmap_cached"] / infer["zeroshot"],
        "infer_mixed_over_single": infer["mmap_mixed"] / infer["mmap_cached"],
        "text_pad77_over_dynamic": text["pad77"] / text["dynamic"],
    }
    for other in ("vpt_deep", "full_ft"):
        if "mmap" in train and other in train:
            values[f"train_mmap_over_{other}"] = train["mmap"] / train[other]
    ratios = {}
    for key, (op, target, _) in GOALS.items():
        if key in values:
            value = values[key]
            met = value <= target if op == "<=" else value >= target
            ratios[key] = {"value": round(value, 4), "goal": f"{op} {target}", "met": met}
    return ratios


def markdown_report(result: dict) -> str:
    """The result as Markdown tables: training, inference, text tower and goals."""
    device = result["device_name"] + ("" if result["device"] != "cpu" else f", {result['threads']} threads")
    lines = [
        f"`{result['arch']}` shapes, batch {result['batch']}, {result['precision']}, {device}, "
        f"median of {result['steps']} steps after {result['warmup']} warm-up",
        "",
        "| Method | Train step (s) | Train img/s | GFLOP/step | Peak memory (MB) |"
        + (" MFU |" if "mfu" in result else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if "mfu" in result else ""),
    ]
    for name, seconds in result["train_step_s"].items():
        mfu = f" {100 * result['mfu'][name]:.1f}% |" if "mfu" in result else ""
        lines.append(
            f"| `{name}` | {seconds:.3f} | {result['train_img_per_s'][name]:.1f} | "
            f"{result['train_flops'][name] / 1e9:.1f} | {result['peak_mem_mb'][name]:.0f} |{mfu}"
        )
    lines += ["", f"Peak memory: {result['peak_mem_kind']}.", "", "| Inference | img/s |", "|---|---:|"]
    lines += [f"| `{name}` | {value:.1f} |" for name, value in result["infer_img_per_s"].items()]
    text = result["text_step_s"]
    lines += [
        "",
        "| MmAP text tower (fwd + bwd, 65 classes) | s |",
        "|---|---:|",
        f"| padded to longest ({result['text_tokens_dynamic']} tokens) | {text['dynamic']:.4f} |",
        f"| padded to 77 tokens | {text['pad77']:.4f} |",
    ]
    if "mfu" in result:
        lines += ["", f"MFU against a dense peak of {result['peak_tflops']} TFLOP/s."]
    lines += ["", "| Ratio | Value | Goal | Met |", "|---|---:|---:|:---:|"]
    for key, ratio in result["ratios"].items():
        lines.append(
            f"| {GOALS[key][2]} | {ratio['value']:.3f} | {ratio['goal']} | {'yes' if ratio['met'] else 'NO'} |"
        )
    if result["flop_ratios"]:
        shown = ", ".join(f"{k.replace('_over_', ' / ')} {v:.3f}" for k, v in result["flop_ratios"].items())
        lines += ["", f"Training FLOP ratios (machine-independent): {shown}."]
    return "\n".join(lines) + "\n"


def run_perf(args: argparse.Namespace) -> dict:
    """Run `run_benchmark` with the parsed options; write ``perf.json`` and ``perf.md``; print the table."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.methods is not None and not set(args.methods) <= set(TRAIN_METHODS):
        raise ValueError(f"--methods {args.methods}: known methods are {list(TRAIN_METHODS)}.")
    result = run_benchmark(
        args.arch,
        args.device,
        args.batch,
        args.steps,
        args.warmup,
        args.precision,
        args.methods,
        args.peak_tflops,
    )
    atomic_write_json(args.output / "perf.json", result)
    report = markdown_report(result)
    atomic_write_text(args.output / "perf.md", report)
    print(report)
    return result


if __name__ == "__main__":  # ``python -m peft_mmap.perf``: the same as ``peft-mmap perf``
    import sys

    from .cli import main

    sys.exit(main(["perf", *sys.argv[1:]]))
