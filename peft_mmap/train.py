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
import gc
import logging
import math
import os
import random
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
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .augment import crop_flip_params, random_resized_crop_flip
from .checkpoint import (
    CHECKPOINT_DIR,
    find_checkpoint,
    restore_checkpoint,
    training_state,
    write_checkpoint,
)
from .classifier import CLIPTaskClassifier
from .train_config import OPTIMIZERS as OPTIMIZERS
from .train_config import PRECISIONS as PRECISIONS
from .train_config import SCHEDULERS as SCHEDULERS
from .train_config import TrainConfig

logger = logging.getLogger(__name__)


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


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


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
    run = None
    try:
        run = _Run.start(model, datasets, config, output_dir, resume, device, ddp)
        run.run_epochs(progress, callback)
        return TrainResult(
            run.global_step, run.epoch, run.history, run.last_checkpoint, time.monotonic() - started
        )
    finally:
        if ddp.created_group:
            # Free the DDP reducer while the group is still registered. Freed after `destroy_process_group`,
            # the reducer drops the group's last reference, and the gloo group's destructor joins its worker
            # threads with the GIL held; a worker still releasing a finished work needs the GIL, so both wait
            # forever (seen: one torchrun worker hanging at exit, rarely, more often under CPU load).
            del run
            gc.collect()
            dist.destroy_process_group()


@dataclass
class _Run:
    """One call of `train`: what it was given, what `start` set up, and the position it has reached.

    The steps of a run: `start` (check the inputs, place the model, build the optimizer, restore a
    checkpoint), then `run_epochs`, which for every step loads each task's batch (`batches`), takes one
    optimizer step (`step`) and writes a checkpoint (`save`) at the end of every epoch, on a stop request
    and when ``max_steps`` ends the run mid-epoch.
    """

    model: CLIPTaskClassifier
    datasets: Mapping[str, Dataset]
    config: TrainConfig
    ddp: _Dist
    out: Path | None
    device: torch.device
    sizes: dict[str, int]
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    spe: int  # steps per epoch
    step_module: nn.Module  # `_TaskLosses`, wrapped by DDP under torchrun
    epoch: int = 0
    start_step: int = 0  # first step of ``epoch`` still to run
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    last_checkpoint: Path | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.datasets)

    @property
    def total_steps(self) -> int:
        total = self.config.epochs * self.spe
        return total if self.config.max_steps is None else min(self.config.max_steps, total)

    @classmethod
    def start(
        cls,
        model: CLIPTaskClassifier,
        datasets: Mapping[str, Dataset],
        config: TrainConfig,
        output_dir: str | os.PathLike | None,
        resume: bool,
        device: str | torch.device | None,
        ddp: _Dist,
    ) -> _Run:
        """Check the inputs, move the model to ``device``, seed, build the optimizer, restore a checkpoint."""
        sizes = _check_datasets(model, datasets, ddp, config.batch_size)
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
        optimizer = _make_optimizer(list(params.values()), config)
        scaler = (
            torch.amp.GradScaler("cuda") if config.precision == "fp16" and device.type == "cuda" else None
        )
        spe = steps_per_epoch(sizes, config.batch_size)
        position = (0, 0, 0)
        if checkpoint is not None:
            position = restore_checkpoint(
                checkpoint, config, list(datasets), spe, params, optimizer, scaler, device
            )
            logger.info(
                "Resuming from %s at epoch %d, step %d.", checkpoint, position[0] + 1, position[1] + 1
            )

        step_module: nn.Module = _TaskLosses(model)
        if ddp.enabled:
            step_module = nn.parallel.DistributedDataParallel(
                step_module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        epoch, start_step, global_step = position
        last = checkpoint if checkpoint is not None and checkpoint.name == CHECKPOINT_DIR else None
        return cls(
            model, datasets, config, ddp, out, device, sizes, params, optimizer, scaler, spe, step_module,
            epoch, start_step, global_step, last_checkpoint=last,
        )  # fmt: skip

    def save(self, epoch: int, step: int) -> None:
        """Write the checkpoint of position ``(epoch, step)`` (rank 0, with an ``output_dir`` only)."""
        if self.out is None or not self.ddp.is_main:
            return
        bad = [name for name, p in self.params.items() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(
                f"Parameters {bad[:3]} hold NaN/inf; refusing to overwrite the last good checkpoint."
            )
        payload, tensors = training_state(
            (epoch, step, self.global_step),
            self.spe,
            self.tasks,
            self.ddp.world_size,
            self.config,
            self.optimizer,
            list(self.params),
            self.scaler,
            self.device,
        )
        self.last_checkpoint = write_checkpoint(self.out, self.params, payload, tensors)

    def batches(
        self, loaders: dict[str, Iterator], step: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every task's next batch on the device (augmented if the config says so)."""
        batches = {
            task: tuple(t.to(self.device, non_blocking=True) for t in next(loader))
            for task, loader in loaders.items()
        }
        if self.config.augment:
            batches = _augmented(batches, self.config, self.epoch, step, self.ddp)
        return batches

    def step(
        self,
        batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
        step: int,
        mixed_precision: contextlib.AbstractContextManager,
        stop_requested: Callable[[], bool],
    ) -> tuple[dict[str, float], float, bool]:
        """One optimizer step on the sum of the task losses; returns the task losses, the learning rate and
        whether any rank had a stop request when the losses were all-reduced (meaningful under DDP only)."""
        lr = learning_rate(self.config, self.global_step, self.spe)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with mixed_precision:
            losses = self.step_module(batches, self.config.batch_size / self.ddp.world_size)
        report = torch.cat([losses.detach().float(), losses.new_tensor([float(stop_requested())])])
        if self.ddp.enabled:
            dist.all_reduce(report)
            report[:-1] /= self.ddp.world_size
        values = report.tolist()
        task_losses = dict(zip(self.tasks, values[:-1], strict=True))
        for task, value in task_losses.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(task, value, self.epoch, step, self.global_step)
        _optimizer_step(losses.sum(), self.optimizer, self.scaler, self.params, self.config.grad_clip)
        self.global_step += 1
        self.history.append(task_losses)
        return task_losses, lr, values[-1] > 0

    def run_epochs(self, progress: bool, callback: Callable[[StepEvent], None] | None) -> None:
        """Train until ``epochs`` or ``max_steps``; see `train` for the stop and error behaviour."""
        config, total = self.config, self.total_steps
        bar = tqdm(
            total=total,
            initial=min(self.global_step, total),
            disable=not (progress and self.ddp.is_main),
            desc="train",
        )
        mixed_precision = autocast(config.precision, self.device)
        with (
            _stop_requests() as stop_requested,
            _gradient_checkpointing(self.model, config.gradient_checkpointing),
        ):
            try:
                while self.epoch < config.epochs and self.global_step < total:
                    loaders = {
                        task: iter(
                            _epoch_loader(
                                self.datasets[task],
                                self.sizes[task],
                                config,
                                self.epoch,
                                index,
                                self.start_step,
                                self.spe,
                                self.ddp,
                            )
                        )
                        for index, task in enumerate(self.tasks)
                    }
                    for step in range(self.start_step, self.spe):
                        if self.global_step >= total:
                            break
                        batches = self.batches(loaders, step)
                        task_losses, lr, stop_reported = self.step(
                            batches, step, mixed_precision, stop_requested
                        )
                        bar.update(1)
                        bar.set_postfix({t: f"{v:.3f}" for t, v in task_losses.items()}, refresh=False)
                        if self.global_step % config.log_every == 0:
                            logger.info("step %d lr %.3g losses %s", self.global_step, lr, task_losses)
                        if callback is not None:
                            callback(
                                StepEvent(
                                    self.model, self.epoch, step, self.global_step, task_losses, lr, batches
                                )
                            )
                        # Under DDP all ranks must agree, so only the all-reduced flag counts.
                        if stop_reported if self.ddp.enabled else stop_requested():
                            self.save(self.epoch, step + 1)
                            raise KeyboardInterrupt(
                                f"Training stopped by a signal at global step {self.global_step}."
                            )
                    else:
                        self.epoch, self.start_step = self.epoch + 1, 0
                        self.save(self.epoch, 0)
                        continue
                    self.save(self.epoch, step)  # max_steps reached mid-epoch
                    break
            finally:
                bar.close()


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
