"""`MultiTaskMmAP`: group-shared plus task-specific MmAP adapters on one CLIP (paper Fig. 3b, Eq. 9-12)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch
from peft import PeftModel, get_peft_model
from peft.utils import set_peft_model_state_dict
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer, PreTrainedTokenizerBase

from ._version import __version__
from .classifier import CLIPTaskClassifier, TaskSpec, as_task_specs, load_clip_processor
from .config import MmAPConfig
from .files import (
    atomic_write,
    atomic_write_json,
    check_state_dict,
    fsync_file,
    load_safetensors,
    make_temp_dir,
    read_json,
)
from .hub import save_model_card, upload

MANIFEST_NAME = "mmap_manifest.json"
MANIFEST_FORMAT = "peft_mmap.multitask"
MANIFEST_VERSION = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_MANIFEST_BYTES = 10 * 2**20
"""Manifests larger than this (10 MiB) are refused before parsing."""
MANIFEST_CONFIG_FIELDS = frozenset({"prompt_length", "source_shape", "depth", "init_std", "scale_init"})
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


class MultiTaskMmAP(CLIPTaskClassifier):
    """CLIP with one MmAP adapter per task group and one per task; both are active when a task runs.

    Adapter names: ``group0``, ``group1``, ... for the groups and the task names for the tasks. For task
    ``t`` in group ``g`` the prompt slots are ``[prompts(group g), prompts(t)]`` (2b tokens per layer).
    Training sums the task losses (the trainer does): a group adapter then receives the summed gradient of
    its tasks (Eq. 11) and a task adapter only its own (Eq. 12).

    Args:
        clip: a transformers ``CLIPModel`` (it is wrapped with PEFT in place).
        tokenizer: its tokenizer.
        tasks: task specs (or ``{name: classnames}``).
        groups: a partition of the task names; ``None`` = no group adapters (task adapters only).
        config: MmAP config used for every adapter.
        task_adapters: give each task its own adapter (``False``: group adapters only).
        base_model_id: hub id or path of ``clip``, written to the manifest.
    """

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Sequence[TaskSpec] | dict[str, Sequence[str]],
        groups: Sequence[Sequence[str]] | None,
        config: MmAPConfig | None = None,
        task_adapters: bool = True,
        base_model_id: str | None = None,
    ) -> None:
        specs = as_task_specs(tasks)
        self.groups = check_groups(groups, list(specs))
        if not self.groups and not task_adapters:
            raise ValueError("MultiTaskMmAP needs group adapters, task adapters or both.")
        self.config = config or MmAPConfig()
        self.task_adapters = task_adapters
        self.base_model_id = base_model_id or getattr(clip.config, "_name_or_path", "") or None
        names = [group_adapter_name(i) for i in range(len(self.groups))]
        if task_adapters:
            clash = sorted(set(names) & set(specs))
            if clash:
                raise ValueError(f"Task names {clash} clash with group adapter names; rename those tasks.")
            names += list(specs)
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model,
            # which warns on every load with transformers >= 5; nothing a user of this class can act on.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            peft_model = get_peft_model(clip, dataclasses.replace(self.config), adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, dataclasses.replace(self.config))
        super().__init__(peft_model, tokenizer, specs)
        self.adapter_names = names
        self.peft_model.base_model.set_adapter(names)  # all adapters trainable; for_task() picks per call
        self._adapters_of = {task: self._adapters_for(task) for task in specs}

    @property
    def peft_model(self) -> PeftModel:
        return self.clip

    @property
    def clip_model(self) -> CLIPModel:
        return self.clip.get_base_model()

    def group_of(self, task: str) -> int | None:
        """Index of the group holding ``task`` (``None`` without groups)."""
        self.check_task(task)
        return next((i for i, g in enumerate(self.groups) if task in g), None)

    def _adapters_for(self, task: str) -> list[str]:
        group = self.group_of(task)
        names = [] if group is None else [group_adapter_name(group)]
        return names + ([task] if self.task_adapters else [])

    def adapters_for(self, task: str) -> list[str]:
        """The adapters active for ``task``, in prompt-slot order: ``[group adapter, task adapter]``."""
        self.check_task(task)
        return list(self._adapters_of[task])

    def for_task(self, task: str) -> contextlib.AbstractContextManager[None]:
        """Within the block, forward passes use ``task``'s adapters (trainability is left as it is)."""
        return self.peft_model.base_model.use_adapters(self._adapters_of[task])

    def _activation_key(self, task: str) -> object:
        return tuple(self._adapters_of[task])

    def encode_images_mixed(self, pixel_values: torch.Tensor, tasks: list[str]) -> torch.Tensor:
        """One vision pass with per-sample prompts: row ``i`` gets the adapters of ``tasks[i]``."""
        with self.peft_model.base_model.adapter_routes([self._adapters_of[t] for t in tasks]):
            return self.clip_model.get_image_features(pixel_values=pixel_values).pooler_output

    # ---- persistence -----------------------------------------------------------------------------
    def manifest(self) -> dict:
        config = self.config.to_dict()
        config.pop("target_modules", None)
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "library_version": __version__,
            "base_model": self.base_model_id,
            "tasks": [spec.to_dict() for spec in self.tasks.values()],
            "groups": self.groups,
            "task_adapters": self.task_adapters,
            "adapters": list(self.adapter_names),
            "mmap_config": {k: config[k] for k in sorted(MANIFEST_CONFIG_FIELDS)},
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write every adapter (PEFT layout, safetensors) plus ``mmap_manifest.json`` and a model card.

        Crash safety (a crash or ``kill -9`` at any point leaves one consistent version readable):

        1. the complete new set is written into a fresh hidden folder ``directory/.staging-*``;
        2. ``directory/.mmap_commit.json`` naming that folder is written atomically: the commit point;
        3. each file is copied over its live counterpart (temporary name + rename), the manifest last;
        4. the commit marker, then every staging folder (and temporary file left by earlier crashes), is removed.

        `from_pretrained` reads the staged set while a commit marker exists, so it sees the old version
        before step 2 and the new one after it, never a mix. A folder interrupted in step 3 is a mix only
        for readers that bypass `from_pretrained` (e.g. ``PeftModel.from_pretrained(..., subfolder=...)``);
        the next save finishes it. Adapter folders of an earlier save that the new set no longer names
        are left in place (the manifest does not list them).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        staging = make_temp_dir(directory, prefix=STAGING_PREFIX)
        files = [f"{name}/{file}" for name in self.adapter_names for file in ADAPTER_FILES]
        files += ["README.md", MANIFEST_NAME]
        try:
            self.peft_model.save_pretrained(staging, selected_adapters=self.adapter_names)
            if "default" in self.adapter_names:  # PEFT writes the "default" adapter at the top level
                (staging / "default").mkdir()
                for file in ADAPTER_FILES:
                    os.replace(staging / file, staging / "default" / file)
            save_model_card(
                self.peft_model, staging, title="Multi-task MmAP adapters for CLIP", extra=self._card_extra()
            )
            atomic_write_json(staging / MANIFEST_NAME, self.manifest())
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

    def _card_extra(self) -> str:
        lines = ["## Tasks and groups", ""]
        for spec in self.tasks.values():
            lines.append(
                f"- `{spec.name}`: {len(spec.classnames)} classes, adapters {self._adapters_of[spec.name]}"
            )
        lines += [
            "",
            f"Groups: {self.groups}",
            "",
            "Load with `peft_mmap.MultiTaskMmAP.from_pretrained(base, repo)`.",
        ]
        return "\n".join(lines)

    def push_to_hub(
        self, repo_id: str, *, private: bool | None = None, token: str | None = None, api=None
    ) -> str:
        """Upload the whole set (adapters, manifest, model card) as one commit; returns the commit URL."""
        return upload(
            self.save_pretrained,
            repo_id,
            private=private,
            token=token,
            commit_message="Upload multi-task MmAP",
            api=api,
        )

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike | CLIPModel,
        adapters: str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **hub_kwargs,
    ) -> MultiTaskMmAP:
        """Rebuild a saved model: ``base_model`` (hub id, folder or ``CLIPModel``) plus a saved folder (or the
        ``peft-mmap train`` run folder holding it in ``adapters/``) or hub repo."""
        folder = resolve_adapter_folder(adapters, **hub_kwargs)
        manifest = read_manifest(folder)
        if isinstance(base_model, CLIPModel):
            clip = base_model
            base_id = manifest["base_model"]
        elif not isinstance(base_model, (str, os.PathLike)):
            raise TypeError(
                f"base_model: expected a CLIPModel, a hub id or a folder, got {type(base_model).__name__}."
            )
        else:
            clip = CLIPModel.from_pretrained(base_model)
            base_id = str(base_model)
        if tokenizer is None:
            if not base_id:
                raise ValueError("The manifest names no base model: pass `tokenizer=` explicitly.")
            tokenizer = CLIPTokenizer.from_pretrained(base_id)
        # The base sizes the adapters were saved for: a CLIP of other sizes is refused before it is wrapped.
        config_path = folder / manifest["adapters"][0] / ADAPTER_FILES[0]
        saved = read_json(config_path, "MmAP adapter config")
        if not isinstance(saved, dict):
            raise ValueError(f"MmAP adapter config {config_path} must hold a JSON object, got {saved!r}.")
        model = cls(
            clip,
            tokenizer,
            manifest_task_specs(manifest),
            manifest["groups"] or None,
            MmAPConfig(**manifest["mmap_config"], tower_sizes=saved.get("tower_sizes")),
            task_adapters=manifest["task_adapters"],
            base_model_id=base_id,
        )
        model.load_adapter_weights(folder)
        return model.eval()

    def load_adapter_weights(self, folder: str | os.PathLike) -> None:
        """Load every adapter's safetensors from ``folder``, checking all shapes before changing anything."""
        folder = Path(folder)
        state = {
            name: load_safetensors(folder / name / "adapter_model.safetensors", f"Adapter {name!r} weights")
            for name in self.adapter_names
        }
        model_state = {k: v for k, v in self.peft_model.state_dict().items() if "mmap_" in k}
        for name, tensors in state.items():
            expected = {
                k.removesuffix(f".{name}"): v for k, v in model_state.items() if k.endswith(f".{name}")
            }
            check_state_dict(
                expected,
                tensors,
                f"Adapter {name!r} does not fit this base model (different number of layers or towers, hidden "
                "sizes or prompt config?)",
            )
            if not all(torch.isfinite(t).all() for t in tensors.values()):
                raise ValueError(f"Adapter {name!r} holds NaN or inf weights; refusing to load it.")
        for name, tensors in state.items():
            set_peft_model_state_dict(self.peft_model, tensors, adapter_name=name)
        self.clear_cache()

    def processor(self) -> CLIPProcessor:
        """A ``CLIPProcessor`` for the base model (image preprocessing identical to the checkpoint's)."""
        return load_clip_processor(self.base_model_id)


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
