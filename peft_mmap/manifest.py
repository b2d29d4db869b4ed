"""The folder `MultiTaskMmAP.save_pretrained` writes: manifest schema, staged commit, and reading it back.

A saved folder holds one PEFT adapter folder per adapter (``group0/``, ..., one per task) and
``mmap_manifest.json`` (tasks, groups, adapters, the shared MmAP settings). Saving goes through
`commit_staged`; `resolve_adapter_folder` and `read_manifest` read a folder (or a ``peft-mmap train`` run
folder, or a hub repo) back, validating every field before a model is built.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .classifier import TaskSpec
from .config import MmAPConfig
from .files import atomic_write, atomic_write_json, fsync_file, make_temp_dir, read_json

MANIFEST_NAME = "mmap_manifest.json"
MANIFEST_FORMAT = "peft_mmap.multitask"
MANIFEST_VERSION = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_MANIFEST_BYTES = 10 * 2**20
"""Manifests larger than this (10 MiB) are refused before parsing."""
MANIFEST_CONFIG_FIELDS = frozenset(
    {"prompt_length", "source_shape", "depth", "init_std", "scale_init", "text_placement"}
)
"""The `MmAPConfig` fields a manifest records (shared by its adapters); a manifest written before a field
existed lacks it and loads with the field's default (``text_placement``: ``"insert"``)."""
COMMIT_NAME = ".mmap_commit.json"
STAGING_PREFIX = ".staging-"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md"]
"""The only files fetched from the hub: no code, no pickles."""
RUN_ADAPTERS_DIR = "adapters"
"""Where ``peft-mmap train`` saves the adapters in its run folder; `from_pretrained` accepts either folder."""


def group_adapter_name(index: int) -> str:
    """Adapter name of the ``index``-th group: ``group0``, ``group1``, ..."""
    return f"group{index}"


def check_groups(groups: Sequence[Sequence[str]] | None, task_names: Sequence[str]) -> list[list[str]]:
    """Validate that ``groups`` is a partition of ``task_names`` (each task in exactly one group)."""
    if groups is None:
        return []
    groups = [list(g) for g in groups]
    flat = [t for g in groups for t in g]
    unknown = sorted(set(flat) - set(task_names))
    if unknown:
        raise ValueError(f"Groups name unknown tasks {unknown}; tasks are {list(task_names)}.")
    if any(not g for g in groups):
        raise ValueError(f"Groups must not be empty, got {groups}.")
    if len(flat) != len(set(flat)) or set(flat) != set(task_names):
        raise ValueError(f"Groups {groups} must contain every task of {list(task_names)} exactly once.")
    return groups


def commit_staged(directory: Path, files: list[str], write: Callable[[Path], None]) -> Path:
    """Replace ``files`` (paths relative to ``directory``) by the set ``write(staging)`` creates, crash safely.

    A crash or ``kill -9`` at any point leaves one consistent version readable:

    1. ``write`` puts the complete new set into a fresh hidden folder ``directory/.staging-*``;
    2. ``directory/.mmap_commit.json`` naming that folder is written atomically: the commit point;
    3. each file is copied over its live counterpart (temporary name + rename), in order (manifest last);
    4. the commit marker, then every staging folder (and temporary file left by earlier crashes), is removed.

    `resolve_adapter_folder` reads the staged set while a commit marker exists, so it sees the old version
    before step 2 and the new one after it, never a mix. A folder interrupted in step 3 is a mix only for
    readers that bypass it (e.g. ``PeftModel.from_pretrained(..., subfolder=...)``); the next save finishes
    it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(directory, prefix=STAGING_PREFIX)
    try:
        write(staging)
        for file in files:
            fsync_file(staging / file)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_json(directory / COMMIT_NAME, {"staging": staging.name})
    for file in files:
        atomic_write(directory / file, lambda tmp, src=staging / file: shutil.copyfile(src, tmp))
    (directory / COMMIT_NAME).unlink()
    for folder in directory.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)
    for file in [*files, COMMIT_NAME]:  # temporary files of saves killed mid-write
        for tmp in (directory / file).parent.glob(f".{Path(file).name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    return directory


def manifest_task_specs(manifest: dict) -> list[TaskSpec]:
    """The tasks of a validated manifest (see `read_manifest`)."""
    return [TaskSpec(t["name"], t["classnames"], t["template"]) for t in manifest["tasks"]]


def resolve_adapter_folder(adapters: str | os.PathLike, **hub_kwargs) -> Path:
    """The folder to read: a local saved folder (its staged set while a save is being committed) or a
    ``peft-mmap train`` run folder holding one in `RUN_ADAPTERS_DIR`, or a hub repo id downloaded (JSON,
    safetensors and Markdown files only)."""
    path = Path(adapters)
    if path.is_dir():
        folder = _committed_staging(path) or path
        if (folder / MANIFEST_NAME).is_file():
            return folder
        if (path / RUN_ADAPTERS_DIR).is_dir():
            return resolve_adapter_folder(path / RUN_ADAPTERS_DIR)
        raise FileNotFoundError(
            f"{path} has no {MANIFEST_NAME} (nor {RUN_ADAPTERS_DIR}/{MANIFEST_NAME}): not a MultiTaskMmAP "
            "folder or a 'peft-mmap train' run folder."
        )
    if path.exists():
        raise ValueError(
            f"{path} is a file; expected a folder saved by MultiTaskMmAP.save_pretrained or a repo id."
        )
    from huggingface_hub import snapshot_download

    local = snapshot_download(str(adapters), allow_patterns=HUB_PATTERNS, **hub_kwargs)
    return resolve_adapter_folder(local)


def _committed_staging(directory: Path) -> Path | None:
    """The staged folder named by an interrupted save's commit marker (see `MultiTaskMmAP.save_pretrained`)."""
    marker = directory / COMMIT_NAME
    if not marker.is_file():
        return None
    data = read_json(marker, "MmAP save commit marker", max_bytes=4096)
    name = data.get("staging") if isinstance(data, dict) else None
    if not (isinstance(name, str) and name.startswith(STAGING_PREFIX) and Path(name).name == name):
        raise ValueError(f"{marker} is damaged: expected {{'staging': '{STAGING_PREFIX}...'}}, got {data!r}.")
    if not (directory / name).is_dir():
        raise FileNotFoundError(f"{marker} names {name!r}, which is missing from {directory}.")
    return directory / name


def read_manifest(folder: str | os.PathLike) -> dict:
    """Read and validate ``folder``'s manifest (at most `MAX_MANIFEST_BYTES`); see `validate_manifest`."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST_NAME, "MmAP manifest", max_bytes=MAX_MANIFEST_BYTES)
    return validate_manifest(manifest, folder)


def validate_manifest(manifest: object, folder: Path) -> dict:
    """Check a manifest's types, sizes and consistency and that every adapter it names is present.

    Returns it unchanged; raises ``ValueError`` (naming the file and the bad field) otherwise.
    """

    def fail(msg: str) -> NoReturn:
        raise ValueError(f"Invalid MmAP manifest {folder / MANIFEST_NAME}: {msg}")

    if not isinstance(manifest, dict):
        fail(f"expected a JSON object, got {type(manifest).__name__}.")
    if manifest.get("format") != MANIFEST_FORMAT:
        fail(f"format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}.")
    version = manifest.get("version")
    if version != MANIFEST_VERSION or isinstance(version, bool):
        fail(f"version is {version!r}, expected {MANIFEST_VERSION}.")
    if not isinstance(manifest.get("base_model"), (str, type(None))):
        fail(f"'base_model' must be a string or null, got {manifest.get('base_model')!r}.")
    tasks = manifest.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        fail(f"'tasks' must be a non-empty list, got {tasks!r}.")
    names = []
    for t in tasks:
        if not isinstance(t, dict) or set(t) != {"name", "classnames", "template"}:
            fail(f"task entry {t!r} must be an object with exactly 'name', 'classnames' and 'template'.")
        if not isinstance(t["classnames"], list):
            fail(f"task {t['name']!r}: 'classnames' must be a list, got {t['classnames']!r}.")
        try:
            names.append(TaskSpec(t["name"], t["classnames"], t["template"]).name)
        except (TypeError, ValueError) as err:
            fail(str(err))
    if len(set(names)) != len(names):
        fail(f"task names must be unique, got {names}.")
    groups = manifest.get("groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and all(isinstance(x, str) for x in g) for g in groups
    ):
        fail(f"'groups' must be a list of lists of task names, got {groups!r}.")
    try:
        check_groups(groups or None, names)
    except ValueError as err:
        fail(str(err))
    task_adapters = manifest.get("task_adapters")
    if not isinstance(task_adapters, bool):
        fail(f"'task_adapters' must be true or false, got {task_adapters!r}.")
    config = manifest.get("mmap_config")
    if not isinstance(config, dict) or not set(config) <= MANIFEST_CONFIG_FIELDS:
        fail(
            f"'mmap_config' must be an object with fields among {sorted(MANIFEST_CONFIG_FIELDS)}, got {config!r}."
        )
    try:
        MmAPConfig(**config)
    except (TypeError, ValueError) as err:
        fail(f"'mmap_config' is not a valid MmAPConfig: {err}")
    expected = [group_adapter_name(i) for i in range(len(groups))] + (names if task_adapters else [])
    if not expected:
        fail("no adapters: there are no groups and 'task_adapters' is false.")
    if manifest.get("adapters") != expected:
        fail(
            f"'adapters' is {manifest.get('adapters')!r}, but tasks, groups and task_adapters imply {expected}."
        )
    for name in expected:
        missing = [f for f in ADAPTER_FILES if not (folder / name / f).is_file()]
        if missing:
            fail(f"adapter {name!r} is named but {', '.join(missing)} missing in {folder / name}.")
    return manifest
