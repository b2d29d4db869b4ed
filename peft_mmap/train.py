"""One multi-task trainer for every `CLIPTaskClassifier` (MmAP and the baselines).

Task sampling
    An epoch has ``ceil(max_t |train_t| / batch_size)`` steps. Each step draws ONE batch of ``batch_size``
    images from EVERY task, computes each task's cross-entropy over its own classes and back-propagates the
    SUM of the task losses. Task ``t``'s images are read from an endless stream of shuffles of its training
    set (shuffle ``c`` of epoch ``e`` is seeded by ``(seed, e, t, c)``), so smaller tasks cycle through fresh
    shuffles and every task sees each of its images at least once per epoch. For `MultiTaskMmAP` this is the
    paper's Eq. 11 (a group adapter gets the summed gradients of its tasks) and Eq. 12 (a task adapter gets
    only its own task's gradient); for single-task baselines it trains independent per-task parameters.

Learning rate
    Per optimizer step: ``warmup_lr`` for the first ``warmup_epochs`` epochs (MaPLe-style constant warm-up),
    then ``lr`` (``"constant"``) or a cosine decay from ``lr`` to 0 over the remaining steps of ``epochs``
    epochs (``"cosine"``). ``max_steps`` only stops training early; it does not change the schedule.

Distributed training (``torchrun``)
    Detected from ``WORLD_SIZE``/``LOCAL_RANK``. Every rank computes the same global batch indices and takes
    the strided shard ``indices[rank::world_size]``; its task loss is ``sum(CE over shard) * world_size /
    batch_size``, so DDP's gradient average equals the single-process gradient of the global batch mean.
    Only rank 0 writes files. DDP runs with ``find_unused_parameters=True`` (adapters of a group may get no
    gradient from a rank's shard) around one module that computes all task losses of a step.

Checkpoints (``output_dir/checkpoint/``, no pickle anywhere)
    ``trainable.safetensors`` (the trainable parameters by name), ``state.safetensors`` (optimizer state
    tensors as ``optimizer.<param name>.<key>`` and torch RNG states as ``rng.*``) and ``trainer_state.json``
    (position, config, optimizer hyper-parameters and scalar state, LR-schedule position, GradScaler state,
    python/numpy RNG states). A new checkpoint is written to ``checkpoint.new/`` and swapped in, so a crash
    leaves the previous one usable. ``resume=True`` continues bit-identically to an uninterrupted run, also
    from the mid-epoch checkpoint written when SIGINT/SIGTERM stops training, when it runs with the same
    torch build, device type and ``torch.get_num_threads()`` as the run that wrote the checkpoint: CPU
    kernels split their floating-point sums by thread count, so another count changes the last bits of
    every step. The checkpoint records the three (``trainer_state.json``: ``"reproducibility"``) and a
    resume under other values logs a warning; it then continues correctly and agrees to float rounding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .augment import crop_flip_params, random_resized_crop_flip
from .classifier import CLIPTaskClassifier
from .files import atomic_write, atomic_write_json, check_state_dict, load_safetensors, read_json
from .train_config import OPTIMIZERS as OPTIMIZERS
from .train_config import PRECISIONS as PRECISIONS
from .train_config import SCHEDULERS as SCHEDULERS
from .train_config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = "peft_mmap.train_checkpoint"
CHECKPOINT_VERSION = 1
# Fields that may change between a run and its resumption without changing the trajectory.
_RESUMABLE_CHANGES = frozenset({"max_steps", "log_every", "num_workers"})


@dataclass
class StepEvent:
    """What a training callback sees after each optimizer step.

    Attributes:
        model: the (unwrapped) model being trained, in training mode.
        epoch: 0-based epoch of the step.
        step: 0-based step within the epoch.
        global_step: optimizer steps done so far, including this one.
        losses: this step's cross-entropy per task (global batch mean).
        lr: the learning rate used.
        batches: this rank's ``(pixel_values (B, 3, H, W), labels (B,))`` per task, on the model's device.
    """

    model: CLIPTaskClassifier
    epoch: int
    step: int
    global_step: int
    losses: dict[str, float]
    lr: float
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)


@dataclass
class TrainResult:
    """Outcome of `train`.

    Attributes:
        global_step: optimizer steps done in total (including steps before a resume).
        epoch: completed epochs.
        history: per-task losses of every step run by this call.
        checkpoint_dir: the last checkpoint written (``None`` without ``output_dir``).
        elapsed_s: wall-clock seconds of this call.
    """

    global_step: int
    epoch: int
    history: list[dict[str, float]]
    checkpoint_dir: Path | None
    elapsed_s: float


class NonFiniteLossError(FloatingPointError):
    """A task loss became NaN or infinite; the last good checkpoint is left untouched."""

    def __init__(self, task: str, value: float, epoch: int, step: int, global_step: int) -> None:
        self.task, self.value, self.epoch, self.step, self.global_step = task, value, epoch, step, global_step
        super().__init__(
            f"Non-finite loss {value} for task {task!r} at global step {global_step + 1} (epoch {epoch + 1}, "
            f"step {step + 1} of the epoch). Training stopped; the last good checkpoint is kept. Lower the "
            "learning rate, use precision='fp32' or check the task's images."
        )


# ---- sampling ---------------------------------------------------------------------------------------------
def steps_per_epoch(sizes: Mapping[str, int], batch_size: int) -> int:
    """``ceil(max_t |train_t| / batch_size)``."""
    return math.ceil(max(sizes.values()) / batch_size)


def task_batch_indices(
    num_samples: int, batch_size: int, seed: int, epoch: int, task_index: int, step: int
) -> list[int]:
    """Global dataset indices of task ``task_index``'s batch at ``step`` of ``epoch`` (length ``batch_size``).

    Positions ``step * batch_size ...`` of the task's stream: shuffle ``c`` covers positions
    ``c * num_samples ... (c + 1) * num_samples - 1`` and is ``permutation(num_samples)`` of a numpy RNG
    seeded with ``[seed, epoch, task_index, c]``, so any step can be computed without the earlier ones.
    """
    start = step * batch_size
    shuffles: dict[int, np.ndarray] = {}
    indices = []
    for position in range(start, start + batch_size):
        cycle, offset = divmod(position, num_samples)
        if cycle not in shuffles:
            shuffles[cycle] = np.random.default_rng([seed, epoch, task_index, cycle]).permutation(num_samples)
        indices.append(int(shuffles[cycle][offset]))
    return indices


def learning_rate(config: TrainConfig, global_step: int, steps_in_epoch: int) -> float:
    """Learning rate of optimizer step ``global_step`` (0-based); see the module docstring."""
    warmup = config.warmup_epochs * steps_in_epoch
    if global_step < warmup:
        return config.warmup_lr
    if config.scheduler == "constant":
        return config.lr
    total = config.epochs * steps_in_epoch - warmup
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * (global_step - warmup) / total))


# ---- distributed ------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    created_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed() -> _Dist:
    """Join the ``torchrun`` process group (gloo on CPU, nccl on CUDA) if ``WORLD_SIZE`` > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    created = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        created = True
    return _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), created_group=created)


def _default_device(ddp: _Dist, model: nn.Module) -> torch.device:
    if ddp.enabled and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return next(model.parameters()).device


class _TaskLosses(nn.Module):
    """All task losses of one step in a single forward, so DDP sees one forward per backward."""

    def __init__(self, model: CLIPTaskClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batches: dict[str, tuple[torch.Tensor, torch.Tensor]], denominator: float
    ) -> torch.Tensor:
        """Per-task ``sum(CE over the batch) / denominator``: ``(T,)`` in ``batches`` order."""
        losses = []
        for task, (pixels, labels) in batches.items():
            logits = self.model(pixels, task)
            losses.append(F.cross_entropy(logits.float(), labels, reduction="sum") / denominator)
        return torch.stack(losses)


# ---- signals ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _stop_requests() -> Iterator[Callable[[], bool]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum: int, frame: object) -> None:
        logger.warning(
            "Received %s: finishing the current step, then saving a checkpoint.", signal.Signals(signum).name
        )
        requested.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested.is_set
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---- checkpoints ------------------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _jsonable(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    return value


def _reproducibility(device: torch.device) -> dict[str, object]:
    """What a bit-identical resume needs unchanged besides the checkpoint (see the module docstring)."""
    return {"torch": torch.__version__, "device": device.type, "num_threads": torch.get_num_threads()}


def _warn_if_not_reproducible(folder: Path, saved: object, device: torch.device) -> None:
    if not isinstance(saved, dict):  # a checkpoint written before these were recorded
        return
    now = _reproducibility(device)
    changed = [
        f"{key} {saved.get(key)!r} -> {value!r}" for key, value in now.items() if saved.get(key) != value
    ]
    if changed:
        logger.warning(
            "Resuming from %s with another %s: training continues correctly, but not bit-identically to an "
            "uninterrupted run (floating-point sums are split differently). Resume with the checkpoint's "
            "settings (e.g. torch.set_num_threads) for an exact continuation.",
            folder,
            ", ".join(changed),
        )


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python/numpy states as JSON, torch states as tensors."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    json_state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return json_state, tensors


def _set_rng_state(json_state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = json_state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [
        tensors[k]
        for k in sorted(
            (k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1])
        )
    ]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Optimizer state flattened: tensors as ``optimizer.<param>.<key>``, everything else as JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{names[index]}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(names[index], {})[key] = _jsonable(value)
    groups = [{k: _jsonable(v) for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    return {"param_names": names, "param_groups": groups, "scalars": scalars}, tensors


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer, names: list[str], saved: dict, tensors: dict[str, torch.Tensor]
) -> None:
    if saved["param_names"] != names:
        raise ValueError("The checkpoint's trainable parameters differ from the model's; cannot resume.")
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer."):
            name, entry = key.removeprefix("optimizer.").rsplit(".", 1)
            state.setdefault(index[name], {})[entry] = tensor
    for name, entries in saved["scalars"].items():
        state.setdefault(index[name], {}).update(entries)
    (group,) = saved["param_groups"]
    optimizer.load_state_dict(
        {"state": state, "param_groups": [{**group, "params": list(range(len(names)))}]}
    )


def _write_checkpoint(
    directory: Path, params: dict[str, nn.Parameter], payload: dict, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write into ``checkpoint.new/`` and swap it in for ``checkpoint/`` (the old one is kept until then)."""
    final = directory / CHECKPOINT_DIR
    staging = directory / f"{CHECKPOINT_DIR}.new"
    previous = directory / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(staging, ignore_errors=True)
    weights = {name: p.detach().cpu().contiguous() for name, p in params.items()}
    atomic_write(staging / "trainable.safetensors", lambda tmp: save_file(weights, str(tmp)))
    atomic_write(staging / "state.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(staging / "trainer_state.json", payload)
    if final.exists():  # keep .old while it is the only complete checkpoint left
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The resumable checkpoint folder in ``output_dir`` (``checkpoint/``, or ``checkpoint.old/`` if a swap was cut short)."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        folder = Path(output_dir) / name
        if (folder / "trainer_state.json").is_file():
            return folder
    return None


def _read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    payload = read_json(folder / "trainer_state.json", "trainer state")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{folder} is not a {CHECKPOINT_FORMAT} checkpoint.")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{folder}: checkpoint version {payload.get('version')!r}, expected {CHECKPOINT_VERSION}."
        )
    trainable = load_safetensors(folder / "trainable.safetensors", "checkpoint weights")
    return payload, trainable, load_safetensors(folder / "state.safetensors", "checkpoint state")


# ---- the trainer ------------------------------------------------------------------------------------------
def _check_datasets(
    model: CLIPTaskClassifier, datasets: Mapping[str, Dataset], ddp: _Dist, batch_size: int
) -> dict[str, int]:
    if not datasets:
        raise ValueError("train() needs at least one task dataset.")
    for task in datasets:
        model.check_task(task)
    sizes = {task: len(ds) for task, ds in datasets.items()}
    empty = [task for task, size in sizes.items() if size == 0]
    if empty:
        raise ValueError(f"Tasks {empty} have no training images.")
    if batch_size < ddp.world_size:
        raise ValueError(
            f"batch_size ({batch_size}) must be at least the number of processes ({ddp.world_size})."
        )
    return sizes


def _make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("The model has no trainable parameters (requires_grad=True).")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for ``precision`` (``"fp32"``: none, ``"bf16"``, ``"fp16"``: CUDA only) on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision='fp16' needs a CUDA device, got {device}; use 'bf16' or 'fp32'.")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _gradient_checkpointing(model: CLIPTaskClassifier, enabled: bool) -> Iterator[None]:
    """Recompute CLIP's encoder layers in the backward pass (non-reentrant, so frozen inputs are fine)."""
    if not enabled:
        yield
        return
    clip = model.clip_model
    enable = getattr(clip, "activation_checkpointing_enable", None) or clip.gradient_checkpointing_enable
    disable = getattr(clip, "activation_checkpointing_disable", None) or clip.gradient_checkpointing_disable
    enable({"use_reentrant": False})
    try:
        yield
    finally:
        disable()


def train(
    model: CLIPTaskClassifier,
    datasets: Mapping[str, Dataset],
    config: TrainConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    callback: Callable[[StepEvent], None] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on all tasks at once (see the module docstring).

    Args:
        model: any `CLIPTaskClassifier`; only parameters with ``requires_grad`` are optimised.
        datasets: ``{task: dataset}`` whose items are ``(pixel_values (3, H, W), label)``; labels index the
            task's class names.
        config: optimisation settings (default `TrainConfig()`).
        output_dir: where ``checkpoint/`` is written after every epoch (and on SIGINT/SIGTERM); ``None``
            writes nothing.
        resume: continue from ``output_dir``'s checkpoint (a fresh start, with a warning, if there is none).
        device: where to train; default: ``cuda:LOCAL_RANK`` under ``torchrun`` with CUDA, else the model's.
        progress: show a tqdm bar with the task losses (rank 0 only).
        callback: called after every optimizer step with a `StepEvent`.

    Raises:
        NonFiniteLossError: a task loss is NaN/inf (nothing is written for that step).
        KeyboardInterrupt: SIGINT/SIGTERM arrived; a mid-epoch checkpoint was written first.
        FileExistsError: ``output_dir`` holds a checkpoint and ``resume`` is False.
    """
    config = config or TrainConfig()
    started = time.monotonic()
    ddp = _setup_distributed()
    try:
        return _train(model, datasets, config, output_dir, resume, device, progress, callback, ddp, started)
    finally:
        if ddp.created_group:
            dist.destroy_process_group()


def _train(
    model, datasets, config, output_dir, resume, device, progress, callback, ddp, started
) -> TrainResult:
    sizes = _check_datasets(model, datasets, ddp, config.batch_size)
    tasks = list(datasets)
    out = Path(output_dir) if output_dir is not None else None
    checkpoint = find_checkpoint(out) if out is not None else None
    if checkpoint is not None and not resume:
        raise FileExistsError(
            f"{out} already holds a training checkpoint; pass resume=True or use a new output_dir."
        )
    if resume and checkpoint is None:
        logger.warning("resume=True but no checkpoint in %s: starting from scratch.", out)

    device = torch.device(device) if device is not None else _default_device(ddp, model)
    model.to(device)
    model.train()
    seed_everything(config.seed)
    params = _trainable(model)
    names = list(params)
    optimizer = _make_optimizer(list(params.values()), config)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" and device.type == "cuda" else None
    spe = steps_per_epoch(sizes, config.batch_size)
    epoch, start_step, global_step = 0, 0, 0

    if checkpoint is not None:
        epoch, start_step, global_step = _restore(
            checkpoint, config, tasks, spe, params, optimizer, scaler, device
        )
        logger.info("Resuming from %s at epoch %d, step %d.", checkpoint, epoch + 1, start_step + 1)

    step_module: nn.Module = _TaskLosses(model)
    if ddp.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    denominator = config.batch_size / ddp.world_size
    total = config.epochs * spe if config.max_steps is None else min(config.max_steps, config.epochs * spe)
    history: list[dict[str, float]] = []
    last_checkpoint = checkpoint if checkpoint is not None and checkpoint.name == CHECKPOINT_DIR else None

    def save(epoch_: int, step_: int) -> None:
        nonlocal last_checkpoint
        if out is None or not ddp.is_main:
            return
        bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(
                f"Parameters {bad[:3]} hold NaN/inf; refusing to overwrite the last good checkpoint."
            )
        opt_json, tensors = _optimizer_state(optimizer, names)
        rng_json, rng_tensors = _rng_state()
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": epoch_,
            "step_in_epoch": step_,
            "global_step": global_step,
            "steps_per_epoch": spe,
            "tasks": tasks,
            "world_size": ddp.world_size,
            "config": config.to_dict(),
            "optimizer": opt_json,
            "scheduler": {"name": config.scheduler, "global_step": global_step},
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_json,
            "reproducibility": _reproducibility(device),
        }
        last_checkpoint = _write_checkpoint(out, params, payload, {**tensors, **rng_tensors})

    bar = tqdm(
        total=total, initial=min(global_step, total), disable=not (progress and ddp.is_main), desc="train"
    )
    mixed_precision = autocast(config.precision, device)
    with _stop_requests() as stop_requested, _gradient_checkpointing(model, config.gradient_checkpointing):
        try:
            while epoch < config.epochs and global_step < total:
                loaders = {
                    task: iter(
                        _epoch_loader(datasets[task], sizes[task], config, epoch, index, start_step, spe, ddp)
                    )
                    for index, task in enumerate(tasks)
                }
                for step in range(start_step, spe):
                    if global_step >= total:
                        break
                    batches = {
                        task: tuple(t.to(device, non_blocking=True) for t in next(loaders[task]))
                        for task in tasks
                    }
                    if config.augment:
                        batches = _augmented(batches, config, epoch, step, ddp)
                    lr = learning_rate(config, global_step, spe)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    with mixed_precision:
                        losses = step_module(batches, denominator)
                    report = torch.cat(
                        [losses.detach().float(), losses.new_tensor([float(stop_requested())])]
                    )
                    if ddp.enabled:
                        dist.all_reduce(report)
                        report[:-1] /= ddp.world_size
                    values = report.tolist()
                    task_losses = dict(zip(tasks, values[:-1], strict=True))
                    for task, value in task_losses.items():
                        if not math.isfinite(value):
                            raise NonFiniteLossError(task, value, epoch, step, global_step)
                    _optimizer_step(losses.sum(), optimizer, scaler, params, config.grad_clip)
                    global_step += 1
                    history.append(task_losses)
                    bar.update(1)
                    bar.set_postfix({t: f"{v:.3f}" for t, v in task_losses.items()}, refresh=False)
                    if global_step % config.log_every == 0:
                        logger.info("step %d lr %.3g losses %s", global_step, lr, task_losses)
                    if callback is not None:
                        callback(StepEvent(model, epoch, step, global_step, task_losses, lr, batches))
                    # Under DDP all ranks must agree, so only the all-reduced flag counts.
                    if values[-1] > 0 if ddp.enabled else stop_requested():
                        save(epoch, step + 1)
                        raise KeyboardInterrupt(f"Training stopped by a signal at global step {global_step}.")
                else:
                    epoch, start_step = epoch + 1, 0
                    save(epoch, 0)
                    continue
                save(epoch, step)  # max_steps reached mid-epoch
                break
        finally:
            bar.close()
    return TrainResult(global_step, epoch, history, last_checkpoint, time.monotonic() - started)


def _augmented(
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    epoch: int,
    step: int,
    ddp: _Dist,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Crop and flip each task's batch; crops are drawn for the global batch, then this rank's shard is
    taken, so DDP sees the same augmented images as a single process."""
    out = {}
    for index, (task, (pixels, labels)) in enumerate(batches.items()):
        theta = crop_flip_params(config.batch_size, [config.seed, epoch, index, step])
        out[task] = (random_resized_crop_flip(pixels, theta[ddp.rank :: ddp.world_size]), labels)
    return out


def _epoch_loader(
    dataset: Dataset,
    size: int,
    config: TrainConfig,
    epoch: int,
    task_index: int,
    start_step: int,
    spe: int,
    ddp: _Dist,
) -> DataLoader:
    """Batches of steps ``start_step ... spe - 1`` of one task and epoch, this rank's shard of each."""
    batches = [
        task_batch_indices(size, config.batch_size, config.seed, epoch, task_index, step)[
            ddp.rank :: ddp.world_size
        ]
        for step in range(start_step, spe)
    ]
    return DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers)


def _optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    params: dict[str, nn.Parameter],
    grad_clip: float | None,
) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _restore(
    folder: Path,
    config: TrainConfig,
    tasks: list[str],
    spe: int,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
) -> tuple[int, int, int]:
    """Load a checkpoint into the model/optimizer/RNGs; returns ``(epoch, step_in_epoch, global_step)``.

    Logs a warning when ``device`` or this process's torch build or thread count differ from the run that
    wrote the checkpoint (the continuation is then not bit-identical; see the module docstring).
    """
    payload, weights, tensors = _read_checkpoint(folder)
    saved = payload["config"]
    changed = sorted(
        k for k, v in config.to_dict().items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v
    )
    if changed:
        raise ValueError(
            f"Cannot resume from {folder}: TrainConfig fields {changed} differ from the checkpoint's "
            f"({ {k: saved.get(k) for k in changed} })."
        )
    if payload["tasks"] != tasks or payload["steps_per_epoch"] != spe:
        raise ValueError(
            f"Cannot resume from {folder}: it was trained on tasks {payload['tasks']} with {payload['steps_per_epoch']} "
            f"steps per epoch, now {tasks} with {spe}."
        )
    check_state_dict(
        params, weights, f"Cannot resume from {folder}: its trainable parameters differ from the model's"
    )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    _load_optimizer_state(optimizer, list(params), payload["optimizer"], tensors)
    if scaler is not None and payload["grad_scaler"] is not None:
        scaler.load_state_dict(payload["grad_scaler"])
    _set_rng_state(payload["rng"], tensors)
    _warn_if_not_reproducible(folder, payload.get("reproducibility"), device)
    return payload["epoch"], payload["step_in_epoch"], payload["global_step"]
