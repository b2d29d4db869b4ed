"""`TrainConfig`: the trainer's settings, a plain dataclass importable without torch (the CLI shows its
defaults in ``--help``); the trainer itself is `peft_mmap.train`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method.

    Defaults: the MmAP paper's SGD at lr 0.0035, 5 epochs and Office-Home's batch 16, with Dassl's momentum
    and weight decay and a cosine schedule (inferred, not stated by the paper); `peft_mmap.presets.PAPER`
    is the paper's whole protocol, each setting with its source (``--preset paper``).

    Attributes:
        epochs: passes over the largest task (see `peft_mmap.train` for the step count).
        batch_size: images per task per step (the global batch under ``torchrun``).
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay on every trainable parameter.
        optimizer: ``"sgd"`` or ``"adamw"``.
        scheduler: ``"cosine"`` (to 0 after warm-up) or ``"constant"``.
        warmup_epochs: epochs at the constant ``warmup_lr`` before the schedule starts.
        warmup_lr: learning rate during warm-up.
        precision: ``"fp32"``, ``"bf16"`` (autocast on CUDA or CPU) or ``"fp16"`` (autocast and loss scaling,
            CUDA only).
        gradient_checkpointing: recompute CLIP encoder layers in the backward pass to save memory.
        seed: seeds python, numpy and torch, and the per-epoch task shuffles.
        num_workers: ``DataLoader`` worker processes per task.
        log_every: log the task losses every this many steps.
        max_steps: stop after this many optimizer steps in total (quick runs; the schedule is unchanged).
        grad_clip: clip the global gradient norm to this value.
        augment: random resized crop and horizontal flip of every training batch (`peft_mmap.augment`),
            drawn from ``(seed, epoch, task, step)`` so runs stay reproducible and resumable.

    A field's metadata ``"help"`` (with ``"range"``: ``"positive"``/``"non_negative"``, or ``"choices"``)
    makes it a ``peft-mmap`` command-line option (`peft_mmap.apps.cli.add_config_arguments`); ``seed``
    and ``augment`` have none (the data options and the benchmark recipes set them).
    """

    epochs: int = field(default=5, metadata={"help": "epochs", "range": "positive"})
    batch_size: int = field(default=16, metadata={"help": "images per task per step", "range": "positive"})
    lr: float = field(default=0.0035, metadata={"help": "learning rate", "range": "positive"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum", "range": "non_negative"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay", "range": "non_negative"})
    optimizer: str = field(default="sgd", metadata={"help": "optimizer", "choices": OPTIMIZERS})
    scheduler: str = field(default="cosine", metadata={"help": "LR schedule", "choices": SCHEDULERS})
    warmup_epochs: int = field(
        default=0, metadata={"help": "constant warm-up epochs", "range": "non_negative"}
    )
    warmup_lr: float = field(default=1e-5, metadata={"help": "warm-up learning rate", "range": "positive"})
    precision: str = field(
        default="fp32", metadata={"help": "fp32, bf16 or fp16 (CUDA) autocast", "choices": PRECISIONS}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute encoder layers to save memory"}
    )
    seed: int = 0
    num_workers: int = field(
        default=0, metadata={"help": "DataLoader workers per task", "range": "non_negative"}
    )
    log_every: int = field(
        default=10, metadata={"help": "log losses every N steps with -v", "range": "positive"}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "stop after this many steps (quick runs)", "range": "positive"}
    )
    grad_clip: float | None = field(
        default=None, metadata={"help": "clip the gradient norm to this value", "range": "positive"}
    )
    augment: bool = False

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}.")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("epochs", "batch_size", "log_every"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "a positive integer")
        for name in ("warmup_epochs", "seed", "num_workers"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "a non-negative integer")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            fail("warmup_epochs", f"smaller than epochs ({self.epochs})")
        for name in ("lr", "warmup_lr"):
            if not is_number(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "a positive finite number")
        for name in ("momentum", "weight_decay"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "a non-negative finite number")
        if self.momentum >= 1:
            fail("momentum", "smaller than 1")
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("scheduler", SCHEDULERS),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                fail(name, f"one of {list(allowed)}")
        for name in ("gradient_checkpointing", "augment"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            fail("max_steps", "None or a positive integer")
        if self.grad_clip is not None and (not is_number(self.grad_clip) or self.grad_clip <= 0):
            fail("grad_clip", "None or a positive finite number")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
