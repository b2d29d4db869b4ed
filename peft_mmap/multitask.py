"""`MultiTaskMmAP`: group-shared plus task-specific MmAP adapters on one CLIP (paper Fig. 3b, Eq. 9-12)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from peft.utils import set_peft_model_state_dict
from torch import nn
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase, ProcessorMixin

from ._version import __version__
from .base_models import load_clip_model, load_pretrained, portable_model_name
from .classifier import (
    CLIPTaskClassifier,
    TaskSpec,
    as_task_specs,
    classifier_family,
    context_template,
    load_clip_processor,
    tokenize_with_placeholders,
)
from .config import MmAPConfig
from .files import (
    atomic_write_json,
    check_state_dict,
    load_safetensors,
    read_json,
)
from .hub import save_adapters, save_model_card, upload
from .manifest import (
    ADAPTER_FILES,
    MANIFEST_CONFIG_FIELDS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    check_groups,
    commit_staged,
    group_adapter_name,
    manifest_task_specs,
    read_manifest,
    resolve_adapter_folder,
)


class MultiTaskMmAP(CLIPTaskClassifier):
    """CLIP with one MmAP adapter per task group and one per task; both are active when a task runs.

    Adapter names: ``group0``, ``group1``, ... for the groups and the task names for the tasks. For task
    ``t`` in group ``g`` the prompt slots are ``[prompts(group g), prompts(t)]`` (2b tokens per layer).
    Training sums the task losses (the trainer does): a group adapter then receives the summed gradient of
    its tasks (Eq. 11) and a task adapter only its own (Eq. 12).

    Args:
        clip: a transformers ``CLIPModel``, ``SiglipModel`` or ``MetaClip2Model`` (it is wrapped with PEFT in
            place).
        tokenizer: its tokenizer.
        tasks: task specs (or ``{name: classnames}``, which get the family's template).
        groups: a partition of the task names; ``None`` = no group adapters (task adapters only).
        config: MmAP config used for every adapter.
        task_adapters: give each task its own adapter (``False``: group adapters only).
        base_model_id: hub id or path of ``clip``, written to the manifest (the shipped tiny CLIP as its
            portable name, see `peft_mmap.base_models.portable_model_name`).
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
        specs = as_task_specs(tasks, classifier_family(clip).template)
        self.groups = check_groups(groups, list(specs))
        if not self.groups and not task_adapters:
            raise ValueError("MultiTaskMmAP needs group adapters, task adapters or both.")
        self.config = config or MmAPConfig()
        self.task_adapters = task_adapters
        self.base_model_id = portable_model_name(
            base_model_id or getattr(clip.config, "_name_or_path", "") or None
        )
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

    def tokenize_task(self, task: str) -> dict[str, torch.Tensor]:
        """``task``'s class prompts ``(C, L)``; with ``text_placement="replace"``, ``[SOS, T placeholders,
        class name + the template's text after '{}', EOS]``: the task's ``T`` text prompt tokens (group and task
        adapters) take the place of the template's words before ``{}`` (CoOp's and MaPLe's class prompt)."""
        if self.config.text_placement == "insert":
            return super().tokenize_task(task)
        if self.family.pad_to_max_length:
            raise ValueError(
                f"text_placement='replace' puts the text prompts at CLIP's context positions 1..T after the start "
                f"token; {self.family.label}'s text tower has no start token and pools its last padded position: "
                "use text_placement='insert'."
            )
        spec = self.check_task(task)
        texts = TaskSpec(spec.name, spec.classnames, context_template(spec.template)).prompts
        count = self.config.prompt_length * len(self._adapters_of[task])
        limit = self.clip_model.config.text_config.max_position_embeddings
        try:
            return tokenize_with_placeholders(self.tokenizer, texts, count, limit)
        except ValueError as err:
            raise ValueError(f"Task {task!r}: {err}") from None

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

        Crash safe: a crash or ``kill -9`` at any point leaves one consistent version readable by
        `from_pretrained` (see `peft_mmap.manifest.commit_staged`). Adapter folders of an earlier save that
        the new set no longer names are left in place (the manifest does not list them).
        """
        files = [f"{name}/{file}" for name in self.adapter_names for file in ADAPTER_FILES]

        def write(staging: Path) -> None:
            save_adapters(self.peft_model, staging, selected_adapters=self.adapter_names)
            if "default" in self.adapter_names:  # PEFT writes the "default" adapter at the top level
                (staging / "default").mkdir()
                for file in ADAPTER_FILES:
                    os.replace(staging / file, staging / "default" / file)
            save_model_card(
                self.peft_model,
                staging,
                title=f"Multi-task MmAP adapters for {self.family.label}",
                extra=self._card_extra(),
            )
            atomic_write_json(staging / MANIFEST_NAME, self.manifest())

        return commit_staged(Path(directory), [*files, "README.md", MANIFEST_NAME], write)

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
        base_model: str | os.PathLike | nn.Module,
        adapters: str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **hub_kwargs,
    ) -> MultiTaskMmAP:
        """Rebuild a saved model: ``base_model`` (a model reference, see `peft_mmap.base_models`, or a loaded
        ``CLIPModel``, ``SiglipModel`` or ``MetaClip2Model``) plus a saved folder (or the ``peft-mmap train``
        run folder holding it in ``adapters/``)
        or hub repo."""
        folder = resolve_adapter_folder(adapters, **hub_kwargs)
        manifest = read_manifest(folder)
        dual_encoder = hasattr(base_model, "get_text_features") and hasattr(base_model, "get_image_features")
        if isinstance(base_model, nn.Module) and dual_encoder:
            clip = base_model
            base_id = manifest["base_model"]
        elif not isinstance(base_model, (str, os.PathLike)):
            raise TypeError(
                "base_model: expected a CLIPModel or another dual encoder (SiglipModel, MetaClip2Model), a hub id "
                f"or a folder, got {type(base_model).__name__}."
            )
        else:
            clip = load_clip_model(base_model)
            base_id = portable_model_name(base_model)
        if tokenizer is None:
            if not base_id:
                raise ValueError("The manifest names no base model: pass `tokenizer=` explicitly.")
            tokenizer = load_pretrained(AutoTokenizer, base_id)
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
            check_state_dict(expected, tensors, f"Adapter {name!r}")
            if not all(torch.isfinite(t).all() for t in tensors.values()):
                raise ValueError(f"Adapter {name!r} holds NaN or inf weights; refusing to load it.")
        for name, tensors in state.items():
            set_peft_model_state_dict(self.peft_model, tensors, adapter_name=name)
        self.clear_cache()

    def processor(self) -> ProcessorMixin:
        """The base model's processor (``CLIPProcessor``, ``SiglipProcessor``, ...: image preprocessing
        identical to the checkpoint's)."""
        return load_clip_processor(self.base_model_id)
