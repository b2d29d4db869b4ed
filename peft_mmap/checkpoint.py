"""Training checkpoints (``output_dir/checkpoint/``, no pickle anywhere): writing, finding, reading, restoring.

A checkpoint holds ``trainable.safetensors`` (the trainable parameters by name), ``state.safetensors``
(optimizer state tensors as ``optimizer.<param name>.<key>`` and torch RNG states as ``rng.*``) and
``trainer_state.json`` (position, config, optimizer hyper-parameters and scalar state, LR-schedule position,
GradScaler state, python/numpy RNG states, and what a bit-identical resume needs unchanged). A new
checkpoint is written to ``checkpoint.new/`` and swapped in (`peft_mmap.files.replace_directory`), so a
crash leaves the previous one usable. See
`peft_mmap.train` for what resuming guarantees.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .files import (
    atomic_write,
    atomic_write_json,
    check_state_dict,
    complete_directory,
    load_safetensors,
    read_json,
    replace_directory,
)
from .train_config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
CHECKPOINT_FORMAT = "peft_mmap.train_checkpoint"
CHECKPOINT_VERSION = 1
# Fields that may change between a run and its resumption without changing the trajectory.
_RESUMABLE_CHANGES = frozenset({"max_steps", "log_every", "num_workers"})


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


def write_checkpoint(
    directory: Path, params: dict[str, nn.Parameter], payload: dict, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write ``directory/checkpoint/`` through `replace_directory` (the old one is kept until the swap)."""
    weights = {name: p.detach().cpu().contiguous() for name, p in params.items()}

    def write(staging: Path) -> None:
        atomic_write(staging / "trainable.safetensors", lambda tmp: save_file(weights, str(tmp)))
        atomic_write(staging / "state.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        atomic_write_json(staging / STATE_FILE, payload)

    return replace_directory(directory / CHECKPOINT_DIR, write)


def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The resumable checkpoint folder in ``output_dir`` (``checkpoint/``, or ``checkpoint.old/`` if a swap was cut short)."""
    return complete_directory(
        Path(output_dir) / CHECKPOINT_DIR, lambda folder: (folder / STATE_FILE).is_file()
    )


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    payload = read_json(folder / STATE_FILE, "trainer state")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{folder} is not a {CHECKPOINT_FORMAT} checkpoint.")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{folder}: checkpoint version {payload.get('version')!r}, expected {CHECKPOINT_VERSION}."
        )
    trainable = load_safetensors(folder / "trainable.safetensors", "checkpoint weights")
    return payload, trainable, load_safetensors(folder / "state.safetensors", "checkpoint state")


def training_state(
    position: tuple[int, int, int],
    spe: int,
    tasks: list[str],
    world_size: int,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``trainer_state.json``'s payload and ``state.safetensors``'s tensors at ``position`` =
    ``(epoch, step_in_epoch, global_step)``: optimizer, schedule, grad scaler and RNG states."""
    epoch, step, global_step = position
    opt_json, tensors = _optimizer_state(optimizer, names)
    rng_json, rng_tensors = _rng_state()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "step_in_epoch": step,
        "global_step": global_step,
        "steps_per_epoch": spe,
        "tasks": tasks,
        "world_size": world_size,
        "config": config.to_dict(),
        "optimizer": opt_json,
        "scheduler": {"name": config.scheduler, "global_step": global_step},
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_json,
        "reproducibility": _reproducibility(device),
    }
    return payload, {**tensors, **rng_tensors}


def restore_checkpoint(
    folder: Path,
    config: TrainConfig,
    tasks: list[str],
    spe: int,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
) -> tuple[int, int, int]:
    """Load a checkpoint into the parameters, optimizer, grad scaler and RNGs, after checking that it was
    written by the same run (config, tasks, steps per epoch, trainable parameters); returns
    ``(epoch, step_in_epoch, global_step)``.

    Logs a warning when ``device`` or this process's torch build or thread count differ from the run that
    wrote the checkpoint (the continuation is then not bit-identical; see the module docstring).
    """
    payload, weights, tensors = read_checkpoint(folder)
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
        params, weights, f"Cannot resume from {folder}: its trainable parameters differ from the model's:"
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
