"""`peft-mmap perf`: training cost and serving latency of MmAP next to its baselines, in one run.

Every number comes from the library's own code path on a CLIP built from its config (random weights, no
download). Measured side by side:

* **training step** (``train``): ``model(pixel_values, task)`` + cross-entropy, backward and an SGD step
  (momentum 0.9), the text tower included (the 65 Office-Home class prompts of the task), for ``mmap`` (2
  groups + task adapters: ``2b`` prompt tokens per layer and tower), ``vpt_deep`` (VPT-MT with the same ``2b``
  vision tokens), ``coop`` (CoOp-MT), ``maple`` (MaPLe-MT) and ``full_ft`` (full fine-tuning, one backbone),
  and ``mmap_all_rows`` (MmAP through transformers' own layers, also computing the layer outputs at prompt
  positions that are discarded: what `peft_mmap.prompting`'s re-stated layer saves). Each method's forward and
  backward FLOPs are counted by `flop_counter` (``torch.utils.flop_counter`` plus fused attention on CPU) on
  its first step (machine-independent; a frozen weight gets no gradient, so a prompt method's backward costs
  about its forward and full fine-tuning's about twice); ``gflop_attention`` is the part in attention kernels.
  ``train_ratios`` gives, for every method, MmAP's time ratio to it, the FLOP ratio and their quotient: 1.0
  means MmAP is exactly as efficient per FLOP, above 1 is MmAP overhead the FLOPs do not explain.
  ``page_faults`` counts each timed step's minor page faults (the command line keeps freed memory for reuse on
  CPU, `keep_freed_memory`, so steps should have none);
* **memory** (``peak_mem_mb``): what the first step needs on top of the weights: on CUDA
  ``torch.cuda.max_memory_allocated`` during it minus the memory allocated before it; on CPU the bytes of
  the tensors saved for backward (distinct storages, parameters excluded, counted with
  ``torch.autograd.graph.saved_tensors_hooks``) plus gradients plus optimizer state;
* **serving** (``infer``): eval-mode images/s per call at each ``--infer-batches`` size, with the class
  text features of every task cached, for zero-shot CLIP and MmAP switching task on every call (the
  serving pattern), and MmAP on batches mixing the four tasks (one vision pass with per-sample prompts);
  the FLOP floor of each ratio (one call of each counted) says what the extra prompt tokens alone cost;
  each variant runs a block of calls of about `SERVING_BLOCK_S` per round, timed per call;
* **text tower** (``text``): MmAP text features forward + backward for one task with the class prompts
  padded to the longest prompt (what the library does) and to the 77 positions of CLIP's text encoder.

Timing is interleaved: the variants of one measurement (the training methods; the serving variants of one
batch size; the two paddings) run round-robin, one call of each per round, with the starting variant
rotating by one every round, so a load change on a shared machine lands on all of them alike. Each variant
reports the median and the interquartile range (``q1``, ``q3``) of its per-call seconds; each ratio the
ratio of the medians and the quartiles of the per-round ratios, the spread that tells a real difference
from noise.

The prompts are tokenized one token per word and punctuation mark (`word_tokenizer`), as CLIP's BPE does for
nearly every Office-Home class name, so sequence lengths match a real checkpoint's closely.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import functools
import gc
import itertools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import MODEL_MAPPING, CLIPConfig, PretrainedConfig, PreTrainedTokenizerFast

from ..baselines import build_method
from ..classifier import CLIPTaskClassifier, TaskSpec
from ..config import MmAPConfig
from ..data import OFFICE_HOME_CLASSES, OFFICE_HOME_DOMAINS
from ..files import atomic_write_json, atomic_write_text
from ..options import FAMILY_ARCHS, PERF_ALL_ROWS, PERF_FAMILY_METHODS, PERF_INFER_BATCHES, TINY_ARCH
from ..options import PERF_METHODS as TRAIN_METHODS
from ..prompting import computing_prompt_rows
from ..train import autocast
from .family_archs import family_config
from .params import clip_config

#: Goal per ratio: (comparison, target, what it compares). ``*_per_flop`` is a time ratio divided by its
#: FLOP ratio (overhead-free: at most 5 % above the FLOP floor); ``infer_b<N>_*`` needs batch ``N`` in
#: ``--infer-batches``; ``infer_mixed_over_switching`` is taken at the largest inference batch.
GOALS: dict[str, tuple[str, float, str]] = {
    "train_mmap_over_vpt_deep": ("<=", 1.10, "MmAP train step / VPT-deep (same vision tokens)"),
    "train_mmap_over_full_ft": ("<=", 0.70, "MmAP train step / full fine-tuning"),
    "train_mmap_over_vpt_deep_per_flop": ("<=", 1.05, "MmAP / VPT-deep step time ratio ÷ FLOP ratio"),
    "train_mmap_over_full_ft_per_flop": ("<=", 1.05, "MmAP / full fine-tuning step time ratio ÷ FLOP ratio"),
    "infer_b1_mmap_over_zeroshot": (">=", 0.93, "batch 1 images/s, MmAP (task switching) / zero-shot"),
    "infer_b16_mmap_over_zeroshot": (">=", 0.95, "batch 16 images/s, MmAP (task switching) / zero-shot"),
    "infer_mixed_over_switching": (">=", 0.95, "images/s, 4-task batches / one-task batches (largest batch)"),
    "text_pad77_over_dynamic": (">=", 3.0, "text tower step time, 77 tokens / longest prompt"),
}


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu``: query/key/value ``(B, heads, L, d)``."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu_backward`` (same count as CUDA's)."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts fused attention on CPU.

    torch's counter has formulas for the CUDA attention kernels only; on CPU ``scaled_dot_product_attention``
    runs ``_scaled_dot_product_flash_attention_for_cpu``, which it would count as 0 FLOPs (the attention
    products of every method, and the prompt tokens' share of them). Counted with torch's formulas for the
    CUDA kernels.
    """
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
        },
    )


#: Substring of the fused attention operators' names (``aten::_scaled_dot_product_*``, forward and backward).
ATTENTION_OP = "scaled_dot_product"


def attention_gflop(counter: FlopCounterMode) -> float:
    """GFLOP that ``counter`` counted in attention kernels (``scaled_dot_product_*``, forward or backward)."""
    counts = counter.get_flop_counts().get("Global", {})
    return sum(flops for op, flops in counts.items() if ATTENTION_OP in str(op)) / 1e9


#: glibc ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for reuse; returns whether it applied.

    By default glibc serves large blocks with ``mmap``, unmaps them when they are freed and trims the heap
    top, so a training step that frees its activations and allocates them again makes the kernel zero-fill
    every page anew: on ViT-B/16 at batch 16 on 2 cores we measured 0.2-1.1 M minor page faults and up to 7 s
    of system time in a 10-15 s step, more or less depending on what the step before it freed. With mmap off
    and trimming off, steps reuse the memory, as PyTorch's caching allocator does on CUDA. Process-wide and
    permanent; only on Linux with glibc (elsewhere nothing changes and this returns ``False``).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (``getrusage``), or ``None`` where it is not available."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


#: Serving variants timed at every inference batch size (see `_Bench.measure_inference`).
SERVING = ("zeroshot", "mmap", "mmap_mixed")
#: Each serving variant runs for about this many seconds per round (`interleaved_seconds`' ``min_seconds``):
#: a batch-1 ViT-B/16 call on 2 CPU cores takes about 0.3 s, and single calls varied by ±10 % round to round.
SERVING_BLOCK_S = 2.0
_SOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def perf_clip_config(arch: str) -> PretrainedConfig:
    """`peft_mmap.apps.params.clip_config`, a `FAMILY_ARCHS` config (`peft_mmap.apps.family_archs.family_config`),
    or ``"tiny"``: 2 layers of width 64 per tower, 32 px images."""
    if arch in FAMILY_ARCHS:
        config = family_config(arch)[1]
    elif arch != TINY_ARCH:
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

    ``<|startoftext|>``/``<|endoftext|>`` get the ids of ``config.text_config`` (bos/eos; no start token where
    it has no ``bos_token_id``, as SigLIP's tokenizer adds none), padding uses ``<|endoftext|>`` as CLIP's and
    SigLIP's tokenizers do, and the words get the ids from 0 upwards that are not special.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    text = config.text_config
    words = dict.fromkeys(
        w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t.lower())
    )
    special = {_SOS: text.bos_token_id, _EOS: text.eos_token_id}
    special = {token: i for token, i in special.items() if i is not None}
    ids = (i for i in itertools.count() if i not in special.values())
    vocab = dict(zip(words, ids, strict=False)) | special
    if max(vocab.values()) >= text.vocab_size:
        raise ValueError(f"{len(words)} words do not fit a vocabulary of {text.vocab_size}.")
    backend = Tokenizer(models.WordLevel(vocab, unk_token=_EOS))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join([*([_SOS] if _SOS in special else []), "$A", _EOS]),
        special_tokens=list(special.items()),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_SOS if _SOS in special else None,
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


def _timed(call: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Wall seconds per call of ``repeat`` back-to-back calls of ``call``."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        call()
    _sync(device)
    return (time.perf_counter() - start) / repeat


def interleaved_seconds(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: torch.device,
    log: Callable[[str], None] | None = None,
    min_seconds: float = 0.0,
) -> dict[str, list[float]]:
    """Wall seconds per call of every variant in ``calls``, timed round-robin.

    ``warmup`` untimed rounds, then ``rounds`` timed ones; each round runs every variant once, starting one
    variant later than the round before (A B C, B C A, C A B, ...). With ``min_seconds``, a variant runs as
    a block of back-to-back calls that lasts about that long (the count is fixed from its last warm-up
    call; one call without warm-up), so a short call's jitter averages out within the block. Returns
    ``{name: [seconds per call, one per round]}``, so ``result[a][r] / result[b][r]`` is the ratio of ``a``
    to ``b`` in round ``r``. ``log`` gets a line per round.
    """
    names = list(calls)
    repeat = dict.fromkeys(names, 1)
    for _ in range(warmup):
        for name in names:
            seconds = _timed(calls[name], 1, device)
            repeat[name] = max(1, round(min_seconds / max(seconds, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed(calls[name], repeat[name], device))
        if log is not None:
            log(f"  round {index + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names))
    return times


def quartiles(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "q1", "q3"}`` of ``values`` (inclusive quartiles; all equal for a single value)."""
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


def ratio_spread(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """``{"value", "q1", "q3", "of_medians"}`` of the per-round ratios ``numerator[r] / denominator[r]``.

    ``value`` is their median and ``q1``/``q3`` their quartiles: the two calls of one round run seconds
    apart, so their ratio cancels a load change that spans the round, which the ratio of the two medians
    (``of_medians``, kept for reference) does not.
    """
    per_round = quartiles([a / b for a, b in zip(numerator, denominator, strict=True)])
    of_medians = statistics.median(numerator) / statistics.median(denominator)
    return {
        "value": per_round["median"],
        "q1": per_round["q1"],
        "q3": per_round["q3"],
        "of_medians": of_medians,
    }


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


class _Bench:
    """Builds the models of one run and measures them (one base CLIP, deep-copied per method)."""

    def __init__(
        self,
        arch: str,
        device: torch.device,
        batch: int,
        precision: str,
        seed: int = 0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.device, self.batch, self.precision, self.log = device, batch, precision, log
        self.config = perf_clip_config(arch)
        self.tasks = benchmark_tasks()
        self.tokenizer = word_tokenizer([p for t in self.tasks for p in t.prompts], self.config)
        self.mmap_config = MmAPConfig()
        torch.manual_seed(seed)
        self.base = MODEL_MAPPING[type(self.config)](self.config).eval()
        self.pixels = self.images(batch)
        self.labels = torch.randint(len(OFFICE_HOME_CLASSES), (batch,), device=device)
        self.task = self.tasks[0].name

    def images(self, batch: int) -> torch.Tensor:
        """Random ``(batch, 3, H, W)`` pixel values on the device."""
        size = self.config.vision_config.image_size
        return torch.randn(batch, 3, size, size, device=self.device)

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

    def loss(self, model: CLIPTaskClassifier) -> torch.Tensor:
        """Cross-entropy of one training batch of the benchmark task."""
        with autocast(self.precision, self.device):
            logits = model(self.pixels, self.task)
        return F.cross_entropy(logits.float(), self.labels)

    def train_step(self, model: CLIPTaskClassifier, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.loss(model).backward()
        optimizer.step()

    def counted_step(self, model: CLIPTaskClassifier, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One training step with its forward and backward FLOPs and the memory it needs beyond the weights."""
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        forward, backward = flop_counter(), flop_counter()
        cuda = self.device.type == "cuda"
        if cuda:
            _sync(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        with forward, saved_tensor_bytes(list(model.parameters())) as saved:
            loss = self.loss(model)
        with backward:
            loss.backward()
        optimizer.step()
        if cuda:
            _sync(self.device)
            extra = torch.cuda.max_memory_allocated(self.device) - before
        else:
            state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            extra = saved[0] + sum(t.nbytes for t in [*(p.grad for p in params), *state] if t is not None)
        return {
            "gflop_forward": forward.get_total_flops() / 1e9,
            "gflop_backward": backward.get_total_flops() / 1e9,
            "gflop_attention": attention_gflop(forward) + attention_gflop(backward),
            "peak_mem_mb": extra / 2**20,
        }

    def measure_training(self, names: Sequence[str], rounds: int, warmup: int) -> dict[str, dict]:
        """Per method: step seconds (round-robin over ``names``), FLOPs and memory of one step.

        Every model stays resident for the interleaved timing. Its first step (one of the ``warmup`` steps,
        at least one) creates the optimizer state and is the one whose FLOPs and memory are counted. Each
        entry also gets the minor page faults of its timed steps (``page_faults``; ``None`` without
        ``getrusage``): the kernel work of touching freshly mapped memory, which the FLOPs do not see.
        """
        steps: dict[str, Callable[[], None]] = {}
        faults: dict[str, list[int]] = {name: [] for name in names}
        result: dict[str, dict] = {}
        for name in names:
            model = self.build_trainer(name)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
            rows = computing_prompt_rows if name == PERF_ALL_ROWS else contextlib.nullcontext
            with rows():
                result[name] = self.counted_step(model, optimizer)

            def step(model=model, optimizer=optimizer, rows=rows, step_faults=faults[name]) -> None:
                before = minor_page_faults()
                with rows():
                    self.train_step(model, optimizer)
                if before is not None:
                    step_faults.append(minor_page_faults() - before)

            steps[name] = step
        times = interleaved_seconds(steps, rounds, max(warmup - 1, 0), self.device, self.log)
        for name, entry in result.items():
            entry["seconds"] = times[name]
            entry["page_faults"] = faults[name][-rounds:] or None
        return result

    def serving_models(self) -> dict[str, CLIPTaskClassifier]:
        """Eval-mode zero-shot CLIP and MmAP with the class text features of every task cached."""
        models = {"zeroshot": self.build("zeroshot").eval(), "mmap": self.build("mmap").eval()}
        with torch.inference_mode(), autocast(self.precision, self.device):
            for model in models.values():
                for task in self.tasks:
                    model.text_features(task.name)
        return models

    def serving_calls(
        self, models: dict[str, CLIPTaskClassifier], batch: int
    ) -> dict[str, Callable[[], torch.Tensor]]:
        """One inference call per `SERVING` variant; each call serves the next task (or task mix)."""
        pixels = self.images(batch)
        names = [t.name for t in self.tasks]
        single = itertools.cycle(names)
        mixes = itertools.cycle(
            [[names[(i + k) % len(names)] for i in range(batch)] for k in range(len(names))]
        )

        def infer(model: CLIPTaskClassifier, tasks: Iterator) -> Callable[[], torch.Tensor]:
            def call() -> torch.Tensor:
                with torch.inference_mode(), autocast(self.precision, self.device):
                    return model(pixels, next(tasks))

            return call

        return {
            "zeroshot": infer(models["zeroshot"], single),
            "mmap": infer(models["mmap"], itertools.cycle(names)),
            "mmap_mixed": infer(models["mmap"], mixes),
        }

    def measure_inference(self, batches: Sequence[int], rounds: int, warmup: int) -> dict[str, dict]:
        """Per batch size: seconds per call of every `SERVING` variant and its FLOPs.

        Round-robin, each variant timed as a block of calls lasting about `SERVING_BLOCK_S` (calibrated in
        the warm-up rounds).
        """
        models = self.serving_models()
        result = {}
        for batch in batches:
            calls = self.serving_calls(models, batch)
            gflop = {}
            for name, call in calls.items():
                counter = flop_counter()
                with counter:
                    call()
                gflop[name] = counter.get_total_flops() / 1e9
            times = interleaved_seconds(calls, rounds, warmup, self.device, self.log, SERVING_BLOCK_S)
            result[f"b{batch}"] = {"batch": batch, "gflop": gflop, "seconds": times}
        return result

    def measure_text(self, rounds: int, warmup: int) -> dict:
        """MmAP text features forward + backward for one task: the library's padding (the longest prompt; all
        of SigLIP's 64 positions) vs all of the text tower's positions (77 for CLIP)."""
        model = self.build("mmap").train()
        max_length = self.config.text_config.max_position_embeddings
        padded = self.tokenizer(
            list(self.tasks[0].prompts), padding="max_length", max_length=max_length, return_tensors="pt"
        )
        token_sets = {
            "dynamic": model.task_tokens(self.task),
            "pad77": {k: padded[k].to(self.device) for k in ("input_ids", "attention_mask") if k in padded},
        }

        def step(tokens: dict[str, torch.Tensor]) -> Callable[[], None]:
            def call() -> None:
                model.zero_grad(set_to_none=True)
                with autocast(self.precision, self.device):
                    features = model.clip_model.get_text_features(**tokens).pooler_output
                F.normalize(features.float(), dim=-1).sum().backward()

            return call

        steps = {k: step(v) for k, v in token_sets.items()}
        with model.for_task(self.task):
            times = interleaved_seconds(steps, rounds, warmup, self.device, self.log)
        return {
            "seconds": times,
            "tokens_dynamic": int(token_sets["dynamic"]["input_ids"].shape[1]),
            "tokens_padded": max_length,
        }

    def profile_serving(self, calls: int = 8, rows: int = 15) -> str:
        """``torch.profiler`` summary (top operators by self time) of batch-1 serving, zero-shot and MmAP."""
        models = self.serving_models()
        serving = self.serving_calls(models, 1)
        parts = []
        for name in ("zeroshot", "mmap"):
            for _ in range(len(self.tasks)):
                serving[name]()  # warm-up: every task once
            title = f"{name}: {calls} batch-1 calls, task switching"
            parts.append(profile_section(title, serving[name], calls, self.device, rows)[0])
        return "\n".join(parts)

    def profile_training(self, names: Sequence[str] = ("mmap", "full_ft"), rows: int = 15) -> str:
        """``torch.profiler`` summary of one training step per method (after one warm-up step).

        Each section says how the step's self time splits between matrix products (`MATMUL_OPS`, the work
        the FLOP counter counts), the optimizer step and everything else (element-wise, normalisation,
        copies): the part a FLOP ratio does not see. With both ``mmap`` and ``full_ft`` profiled, a last
        section prices MmAP's step at full fine-tuning's rates (`priced_section`).
        """
        parts, splits = [], {}
        for name in names:
            model = self.build_trainer(name)
            optimizer = torch.optim.SGD(
                [p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9
            )
            step = functools.partial(self.train_step, model, optimizer)
            with flop_counter() as counter:
                step()  # the warm-up step, counted
            text, split = profile_section(
                f"{name}: one training step (batch {self.batch})", step, 1, self.device, rows, counter
            )
            parts.append(text)
            splits[name] = split
            del model, optimizer, step
            gc.collect()
        if "mmap" in splits and "full_ft" in splits:
            parts.append(priced_section(splits["mmap"], splits["full_ft"], "full_ft"))
        return "\n".join(parts)


#: Operators whose time is matrix-product work (what ``torch.utils.flop_counter`` counts).
MATMUL_OPS = ("::mm", "::addmm", "::bmm", "::baddbmm", "convolution", ATTENTION_OP)


@dataclasses.dataclass(frozen=True)
class ProfileSplit:
    """Aten self time of one profiled call in ms, split by kind, with the FLOPs of such a call (if counted)."""

    total_ms: float
    matmul_ms: float  # `MATMUL_OPS`, attention kernels included
    attention_ms: float
    optimizer_ms: float  # inclusive time of ``Optimizer.step`` (its ops are non-matrix ones)
    gflop: float = 0.0
    gflop_attention: float = 0.0

    @property
    def other_ms(self) -> float:
        """Non-matrix operations outside the optimizer step: element-wise, normalisation, copies."""
        return self.total_ms - self.matmul_ms - self.optimizer_ms

    @property
    def matmul_rate(self) -> float:
        """GFLOP/s of the matrix products other than attention."""
        return (self.gflop - self.gflop_attention) / (self.matmul_ms - self.attention_ms) * 1e3

    @property
    def attention_rate(self) -> float:
        """GFLOP/s of the attention kernels (0 without any)."""
        return self.gflop_attention / self.attention_ms * 1e3 if self.attention_ms else 0.0


def priced_ms(split: ProfileSplit, reference: ProfileSplit) -> dict[str, float]:
    """``split``'s call priced at ``reference``'s rates, in ms per part and in total.

    Its matrix products other than attention at the reference's rate for those, its attention FLOPs at the
    reference's attention rate, and the reference's non-matrix time (``other_ms``: a training step spends it
    on activations, which methods on the same architecture share) plus ``split``'s own optimizer step. The
    total is what the call would take with no overhead of its own beyond the op mix.
    """
    parts = {
        "matmul": (split.gflop - split.gflop_attention) / reference.matmul_rate * 1e3,
        "attention": split.gflop_attention / reference.attention_rate * 1e3 if split.gflop_attention else 0.0,
        "other": reference.other_ms + split.optimizer_ms,
    }
    return parts | {"total": sum(parts.values())}


def priced_section(split: ProfileSplit, reference: ProfileSplit, name: str) -> str:
    """Markdown section: MmAP's profiled step against its price at ``name``'s rates (`priced_ms`)."""
    price = priced_ms(split, reference)
    flop_ratio, time_ratio = split.gflop / reference.gflop, split.total_ms / reference.total_ms
    return "\n".join([
        f"## mmap priced at {name}'s rates",
        "",
        f"At {name}'s rates (other matrix products {reference.matmul_rate:.1f} GFLOP/s, attention "
        f"{reference.attention_rate:.1f} GFLOP/s, non-matrix operations {reference.other_ms:.1f} ms) MmAP's "
        f"step costs {price['matmul']:.1f} + {price['attention']:.1f} + {price['other']:.1f} = "
        f"{price['total']:.1f} ms; measured {split.total_ms:.1f} ms (measured / priced "
        f"{split.total_ms / price['total']:.3f}: above 1 is MmAP's own overhead). Time ratio {time_ratio:.3f}, "
        f"FLOP ratio {flop_ratio:.3f}, ÷ {time_ratio / flop_ratio:.3f}; priced, ÷ "
        f"{price['total'] / reference.total_ms / flop_ratio:.3f} (the op mix alone).",
        "",
    ])  # fmt: skip


def profile_section(
    title: str,
    call: Callable[[], object],
    calls: int,
    device: torch.device,
    rows: int,
    counter: FlopCounterMode | None = None,
) -> tuple[str, ProfileSplit]:
    """Markdown section: ``calls`` calls of ``call`` under ``torch.profiler``, the self-time split, top ops;
    and the split itself, with the FLOPs of one call when ``counter`` counted one."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        _sync(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [e for e in events if e.key.startswith("aten::")]
    total = sum(getattr(e, attr) for e in ops) or 1.0
    matmul = sum(getattr(e, attr) for e in ops if any(m in e.key for m in MATMUL_OPS))
    attention = sum(getattr(e, attr) for e in ops if ATTENTION_OP in e.key)
    inclusive = "device_time_total" if cuda else "cpu_time_total"
    optimizer = sum(getattr(e, inclusive) for e in events if e.key.startswith("Optimizer.step"))
    count = sum(e.count for e in ops)
    flops = (counter.get_total_flops() / 1e9, attention_gflop(counter)) if counter else (0.0, 0.0)
    split = ProfileSplit(*(value / 1e3 / calls for value in (total, matmul, attention, optimizer)), *flops)
    unmatched = split.total_ms - split.matmul_ms
    summary = (
        f"{count / calls:.0f} aten ops per call; aten self time {split.total_ms:.1f} ms per call: "
        f"matrix products {split.matmul_ms:.1f} ms ({100 * matmul / total:.1f} %; attention kernels "
        f"{split.attention_ms:.1f} ms), other {unmatched:.1f} ms ({100 * unmatched / split.total_ms:.1f} %)"
    )
    if optimizer:
        summary += f" (optimizer step, inclusive: {split.optimizer_ms:.1f} ms)"
    table = events.table(sort_by=attr, row_limit=rows)
    return "\n".join([f"## {title}", "", summary, "", "```", table, "```", ""]), split


def run_benchmark(
    arch: str = "vit-b16",
    device: str | torch.device = "cpu",
    batch: int = 16,
    rounds: int = 5,
    warmup: int = 1,
    precision: str = "fp32",
    methods: Sequence[str] | None = None,
    peak_tflops: float | None = None,
    infer_batches: Sequence[int] = PERF_INFER_BATCHES,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every quantity of the module docstring in one run; returns the JSON-ready result.

    Args:
        arch: ``vit-b16``, ``vit-b32``, ``vit-l14`` (`peft_mmap.apps.params.ARCHS`), ``tiny``, or another
            family's size (`FAMILY_ARCHS`, e.g. ``siglip-b16-224``: the methods of `PERF_FAMILY_METHODS`).
        device: where to run.
        batch: images per training step.
        rounds / warmup: timed and untimed round-robin rounds of every measurement.
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        methods: training methods to time (default: all of `TRAIN_METHODS`, or of `PERF_FAMILY_METHODS`).
        peak_tflops: the device's dense peak for ``precision``; gives ``mfu`` of every training step.
        infer_batches: batch sizes of the serving measurement.
        log: where progress lines go.
    """
    device = torch.device(device)
    known = PERF_FAMILY_METHODS if arch in FAMILY_ARCHS else tuple(TRAIN_METHODS)
    methods = list(methods or known)
    unknown = sorted(set(methods) - set(known))
    if unknown:
        built = "" if arch not in FAMILY_ARCHS else " (CoOp and MaPLe are built on CLIP's text embeddings)"
        raise ValueError(f"Unknown perf methods {unknown} for --arch {arch}; known: {list(known)}{built}.")
    bench = _Bench(arch, device, batch, precision, log=log)
    log(f"training steps, round-robin: {', '.join(methods)}")
    train = bench.measure_training(methods, rounds, warmup)
    gc.collect()  # free the training models before serving
    log(f"serving, batches {', '.join(map(str, infer_batches))}")
    infer = bench.measure_inference(infer_batches, rounds, warmup)
    log("text tower")
    text = bench.measure_text(rounds, warmup)
    result = {
        "arch": arch,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "batch": batch,
        "precision": precision,
        "rounds": rounds,
        "warmup": warmup,
        "torch": torch.__version__,
        "prompt_tokens_per_layer": 2 * bench.mmap_config.prompt_length,
        "peak_mem_kind": (
            "torch.cuda.max_memory_allocated during the first step minus the memory allocated before it"
            if device.type == "cuda"
            else "saved-for-backward tensors + gradients + optimizer state (weights excluded)"
        ),
        "train": {name: _train_entry(entry, batch, peak_tflops) for name, entry in train.items()},
        "infer": {key: _infer_entry(entry) for key, entry in infer.items()},
        "text": {
            "tokens_dynamic": text["tokens_dynamic"],
            "tokens_padded": text["tokens_padded"],
            "seconds": {k: quartiles(v) for k, v in text["seconds"].items()},
            "rounds_s": text["seconds"],
            "pad77_over_dynamic": ratio_spread(text["seconds"]["pad77"], text["seconds"]["dynamic"]),
        },
    }
    if peak_tflops is not None:
        result["peak_tflops"] = peak_tflops
    if "mmap" in train:
        result["train_ratios"] = {
            f"mmap_over_{other}": _train_ratio(train["mmap"], train[other])
            for other in methods
            if other != "mmap"
        }
    result["goals"] = goal_ratios(result)
    return result


def _gflop(entry: dict) -> float:
    return entry["gflop_forward"] + entry["gflop_backward"]


def _train_entry(entry: dict, batch: int, peak_tflops: float | None) -> dict:
    """JSON entry of one training method: step seconds (quartiles), images/s, FLOPs, memory, MFU."""
    seconds = statistics.median(entry["seconds"])
    out = {
        "step_s": quartiles(entry["seconds"]),
        "rounds_s": entry["seconds"],
        "img_per_s": batch / seconds,
        "gflop_forward": entry["gflop_forward"],
        "gflop_backward": entry["gflop_backward"],
        "gflop": _gflop(entry),
        "gflop_attention": entry["gflop_attention"],
        "gflop_per_s": _gflop(entry) / seconds,
        "peak_mem_mb": entry["peak_mem_mb"],
        "page_faults": entry["page_faults"],
    }
    if peak_tflops is not None:
        out["mfu"] = _gflop(entry) / seconds / (peak_tflops * 1e3)
    return out


def _train_ratio(mmap: dict, other: dict) -> dict:
    """MmAP over ``other``: step time ratio (with spread), FLOP ratio and time ratio ÷ FLOP ratio."""
    ratio = ratio_spread(mmap["seconds"], other["seconds"])
    flops = _gflop(mmap) / _gflop(other)
    return {
        "time": ratio,
        "flops": flops,
        "time_per_flop": {
            "value": ratio["value"] / flops,
            "q1": ratio["q1"] / flops,
            "q3": ratio["q3"] / flops,
        },
    }


def _infer_entry(entry: dict) -> dict:
    """JSON entry of one serving batch size: per-call seconds, images/s, FLOPs and ratios with floors.

    ``mmap_over_zeroshot`` and ``mixed_over_switching`` are images/s ratios; their ``flop_floor`` is what
    the FLOPs alone allow (e.g. zero-shot FLOPs / MmAP FLOPs) and ``of_floor`` the measured ratio over it.
    """
    seconds, gflop, batch = entry["seconds"], entry["gflop"], entry["batch"]
    ratios = {}
    for key, (fast, slow) in {
        "mmap_over_zeroshot": ("zeroshot", "mmap"),
        "mixed_over_switching": ("mmap", "mmap_mixed"),
    }.items():
        ratio = ratio_spread(seconds[fast], seconds[slow])  # seconds fast / seconds slow = img/s slow / fast
        floor = gflop[fast] / gflop[slow]
        ratios[key] = {**ratio, "flop_floor": floor, "of_floor": ratio["value"] / floor}
    return {
        "batch": batch,
        "call_s": {k: quartiles(v) for k, v in seconds.items()},
        "rounds_s": seconds,
        "img_per_s": {k: batch / statistics.median(v) for k, v in seconds.items()},
        "gflop": gflop,
        "ratios": ratios,
    }


def goal_ratios(result: dict) -> dict[str, dict]:
    """Every ratio of `GOALS` that ``result`` has the measurements for: ``{value, q1, q3, goal, met}``."""
    values: dict[str, dict] = {}
    if result["text"]["tokens_dynamic"] < result["text"].get("tokens_padded", 77):  # SigLIP always pads fully
        values["text_pad77_over_dynamic"] = result["text"]["pad77_over_dynamic"]
    for other in ("vpt_deep", "full_ft"):
        ratio = result.get("train_ratios", {}).get(f"mmap_over_{other}")
        if ratio is not None:
            values[f"train_mmap_over_{other}"] = ratio["time"]
            values[f"train_mmap_over_{other}_per_flop"] = ratio["time_per_flop"]
    infer = result["infer"]
    for key, entry in infer.items():
        values[f"infer_{key}_mmap_over_zeroshot"] = entry["ratios"]["mmap_over_zeroshot"]
    if infer:
        largest = max(infer.values(), key=lambda entry: entry["batch"])
        values["infer_mixed_over_switching"] = largest["ratios"]["mixed_over_switching"]
    goals = {}
    for key, (op, target, _) in GOALS.items():
        if key in values:
            ratio = values[key]
            met = ratio["value"] <= target if op == "<=" else ratio["value"] >= target
            goals[key] = {
                **{k: round(ratio[k], 4) for k in ("value", "q1", "q3")},
                "goal": f"{op} {target}",
                "met": met,
            }
    return goals


def _iqr(spread: dict, scale: float = 1.0, digits: int = 3) -> str:
    """``median [q1, q3]`` (or ``value [q1, q3]``) of a spread dict, times ``scale``."""
    middle = spread.get("median", spread.get("value"))
    return (
        f"{middle * scale:.{digits}f} [{spread['q1'] * scale:.{digits}f}, {spread['q3'] * scale:.{digits}f}]"
    )


def markdown_report(result: dict) -> str:
    """The result as Markdown tables: training, MmAP vs each method, serving, text tower and goals."""
    device = result["device_name"] + ("" if result["device"] != "cpu" else f", {result['threads']} threads")
    mfu = any("mfu" in entry for entry in result["train"].values())
    lines = [
        f"`{result['arch']}` shapes, training batch {result['batch']}, {result['precision']}, {device}; "
        f"{result['rounds']} interleaved rounds after {result['warmup']} warm-up; median [q1, q3]",
        "",
        "| Method | Train step (s) | Train img/s | GFLOP fwd + bwd | of which attention | GFLOP/s | "
        "Peak memory (MB) | Page faults / step |" + (" MFU |" if mfu else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if mfu else ""),
    ]
    for name, entry in result["train"].items():
        faults = entry.get("page_faults")
        lines.append(
            f"| `{name}` | {_iqr(entry['step_s'])} | {entry['img_per_s']:.1f} | "
            f"{entry['gflop_forward']:.1f} + {entry['gflop_backward']:.1f} | {entry['gflop_attention']:.1f} | "
            f"{entry['gflop_per_s']:.1f} | "
            f"{entry['peak_mem_mb']:.0f} | {'-' if not faults else f'{statistics.median(faults):,.0f}'} |"
            + (f" {100 * entry['mfu']:.1f}% |" if mfu else "")
        )
    lines += ["", f"Peak memory: {result['peak_mem_kind']}."]
    if result.get("malloc"):
        lines += [f"CPU memory allocator: {result['malloc']}."]
    if mfu:
        lines += [f"MFU against a dense peak of {result['peak_tflops']} TFLOP/s."]
    if result.get("train_ratios"):
        lines += [
            "",
            "| MmAP / method | Step time ratio | FLOP ratio | Time ratio ÷ FLOP ratio |",
            "|---|---:|---:|---:|",
        ]
        for key, ratio in result["train_ratios"].items():
            lines.append(
                f"| {key.removeprefix('mmap_over_')} | {_iqr(ratio['time'])} | {ratio['flops']:.3f} | "
                f"{_iqr(ratio['time_per_flop'])} |"
            )
    lines += [
        "",
        "| Serving batch | Zero-shot img/s | MmAP img/s (task switching) | MmAP img/s (4-task batch) | "
        "MmAP / zero-shot | FLOP floor | Mixed / switching | FLOP floor |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in result["infer"].values():
        img, ratios = entry["img_per_s"], entry["ratios"]
        mmap, mixed = ratios["mmap_over_zeroshot"], ratios["mixed_over_switching"]
        lines.append(
            f"| {entry['batch']} | {img['zeroshot']:.2f} | {img['mmap']:.2f} | {img['mmap_mixed']:.2f} | "
            f"{_iqr(mmap)} | {mmap['flop_floor']:.3f} | {_iqr(mixed)} | {mixed['flop_floor']:.3f} |"
        )
    text = result["text"]
    lines += [
        "",
        "| MmAP text tower (fwd + bwd, 65 classes) | s |",
        "|---|---:|",
        f"| padded to longest ({text['tokens_dynamic']} tokens) | {_iqr(text['seconds']['dynamic'], digits=4)} |",
        f"| padded to {text.get('tokens_padded', 77)} tokens | {_iqr(text['seconds']['pad77'], digits=4)} |",
        "",
        "| Ratio | Value [q1, q3] | Goal | Met |",
        "|---|---:|---:|:---:|",
    ]
    for key, goal in result["goals"].items():
        lines.append(
            f"| {GOALS[key][2]} | {_iqr(goal)} | {goal['goal']} | {'yes' if goal['met'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def run_perf(args: argparse.Namespace) -> dict:
    """Run `run_benchmark` with the parsed options; write ``perf.json`` and ``perf.md``; print the tables."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.methods is not None and not set(args.methods) <= set(TRAIN_METHODS):
        raise ValueError(f"--methods {args.methods}: known methods are {list(TRAIN_METHODS)}.")
    if not args.infer_batches:
        raise ValueError("--infer-batches: expected at least one batch size, e.g. 1,4,16.")
    malloc = "the system's default"
    if torch.device(args.device).type == "cpu" and not args.system_malloc and keep_freed_memory():
        malloc = "glibc keeping freed memory for reuse (`keep_freed_memory`; `--system-malloc` turns it off)"
    result = run_benchmark(
        args.arch,
        args.device,
        args.batch,
        args.rounds,
        args.warmup,
        args.precision,
        args.methods,
        args.peak_tflops,
        args.infer_batches,
    )
    result["malloc"] = malloc
    atomic_write_json(args.output / "perf.json", result)
    report = markdown_report(result)
    atomic_write_text(args.output / "perf.md", report)
    if args.profile:
        serving = _Bench(args.arch, torch.device(args.device), 1, args.precision).profile_serving()
        training = _Bench(args.arch, torch.device(args.device), args.batch, args.precision).profile_training()
        atomic_write_text(args.output / "profile.md", f"{serving}\n{training}")
    print(report)
    return result
