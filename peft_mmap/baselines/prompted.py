"""`PromptClassifier`: frozen CLIP plus deep prompt units, one set per task, shared, or per group and task.

A *prompt unit* (`PromptUnit`) owns the learnable prompts of one parameter set (CoOp context, VPT prompts,
MaPLe prompts, ...). A task uses a list of units whose slots are placed in that order after SOS/CLS:

* ``"task"`` layout (single-task baselines): one unit per task, ``units_of[t] == [t]``;
* ``"shared"`` layout (``*_mt`` baselines): one unit for all tasks, ``units_of[t] == ["shared"]``;
* ``"grouped"`` layout (MmAP-like): one unit per group and one per task, ``units_of[t] == ["group<g>", t]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import nn
from transformers import CLIPConfig, PreTrainedTokenizerBase

from ..classifier import CLIPTaskClassifier, TaskSpec, as_task_specs, context_template
from ..manifest import check_groups, group_adapter_name
from ..prompting import PromptSlot, Tower, install_deep_prompts, positioned_slots, tower_encoders
from .persistence import TrainableStateMixin

Layout = Literal["task", "shared", "grouped"]
SHARED_UNIT = "shared"


class PromptUnit(nn.Module):
    """The learnable prompts of one parameter set. Subclasses set `lengths` and implement `prompts`."""

    #: Prompt tokens per layer in each tower (0 = this unit does not prompt that tower).
    lengths: dict[Tower, int]
    #: The unit gives new tokens at layers ``0 .. depth - 1`` of each tower it prompts; later layers let its
    #: slot flow through.
    depth: int

    def prompted(self, tower: Tower, layer: int) -> bool:
        """Whether `prompts` gives new tokens at ``layer`` of ``tower`` (else it gives ``None``)."""
        return self.lengths[tower] > 0 and layer < self.depth

    def prompts(self, tower: Tower, layer: int) -> torch.Tensor | None:
        """New prompt tokens ``(lengths[tower], d_tower)`` at ``layer``, or ``None`` unless `prompted`."""
        raise NotImplementedError


def unit_layout(
    task_names: Sequence[str], layout: Layout, groups: Sequence[Sequence[str]] | None = None
) -> dict[str, list[str]]:
    """``{task: [unit name, ...]}`` for a layout; ``"grouped"`` with ``groups=None`` uses one group."""
    if layout == "task":
        return {t: [t] for t in task_names}
    if layout == "shared":
        return {t: [SHARED_UNIT] for t in task_names}
    if layout == "grouped":
        parts = check_groups(groups, list(task_names)) if groups is not None else [list(task_names)]
        clash = sorted({group_adapter_name(i) for i in range(len(parts))} & set(task_names))
        if clash:
            raise ValueError(f"Task names {clash} clash with group unit names; rename those tasks.")
        return {t: [group_adapter_name(i), t] for i, part in enumerate(parts) for t in part}
    raise ValueError(f"Unknown layout {layout!r}: expected 'task', 'shared' or 'grouped'.")


def count_units(num_tasks: int, layout: Layout, num_groups: int | None = None) -> int:
    """Number of units a layout creates (closed form of `unit_layout`)."""
    return {"task": num_tasks, "shared": 1, "grouped": (num_groups or 1) + num_tasks}[layout]


class PromptClassifier(TrainableStateMixin, CLIPTaskClassifier):
    """A frozen ``CLIPModel`` whose encoders get the deep prompts of each task's units.

    Only the units' parameters are trainable. Every encoder layer of both towers is wrapped in a
    `peft_mmap.prompting.DeepPromptLayer` (``clip`` is modified in place: pass a fresh model).

    Args:
        clip: a transformers ``CLIPModel``.
        tokenizer: its tokenizer.
        tasks: the tasks.
        make_unit: builds one unit from the model config.
        layout: how units map to tasks (see the module docstring).
        groups: task groups for the ``"grouped"`` layout (``None`` = one group of all tasks).
        text_context: the units' first-layer text prompts are context *tokens* (CoOp, MaPLe): they get
            CLIP's position embeddings ``1..n`` and the class prompt's tokens after SOS take positions from
            ``n + 1``, so ``[SOS, ctx_1..ctx_n, class, ".", EOS]`` enters the encoder exactly as in CoOp's
            and MaPLe's code (a context initialised from "a photo of a" starts as the zero-shot prompt).
            Otherwise prompts carry no position and the class prompt keeps CLIP's positions.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Sequence[TaskSpec] | dict[str, Sequence[str]],
        make_unit: Callable[[CLIPConfig], PromptUnit],
        layout: Layout,
        groups: Sequence[Sequence[str]] | None = None,
        text_context: bool = False,
    ) -> None:
        specs = as_task_specs(tasks)
        super().__init__(clip, tokenizer, specs)
        self.layout = layout
        self.text_context = text_context
        self.units_of = unit_layout(list(specs), layout, groups)
        clip.requires_grad_(False)
        device = next(clip.parameters()).device
        names = dict.fromkeys(n for units in self.units_of.values() for n in units)
        self.units = nn.ModuleDict({n: make_unit(clip.config).to(device) for n in names})
        self._active: list[str] = self.units_of[next(iter(specs))]
        for tower, encoder in tower_encoders(clip).items():
            install_deep_prompts(
                encoder,
                lambda layer, tower=tower: self._slots(tower, layer),
                lambda layer, tower=tower: self._replaces(tower, layer),
            )

    @contextlib.contextmanager
    def for_task(self, task: str) -> Iterator[None]:
        """Within the block, the deep-prompt layers use ``task``'s units."""
        previous, self._active = self._active, self.units_of[self.check_task(task).name]
        try:
            yield
        finally:
            self._active = previous

    def _slots(self, tower: Tower, layer: int) -> list[PromptSlot]:
        units = [self.units[name] for name in self._active]
        slots = [(u.prompts(tower, layer), u.lengths[tower]) for u in units if u.lengths[tower]]
        if self.text_context and tower == "text" and layer == 0:
            return positioned_slots(slots, self.clip_model.text_model.embeddings.position_embedding.weight)
        return slots

    def _replaces(self, tower: Tower, layer: int) -> bool:
        """Whether every slot of `_slots` ``(tower, layer)`` gets new tokens (none flows through)."""
        units = [self.units[name] for name in self._active]
        return all(u.prompted(tower, layer) for u in units if u.lengths[tower])

    def encode_text(self, task: str) -> torch.Tensor:
        """Class text features ``(C, D)``; with `text_context`, the class tokens follow the context's positions."""
        if not self.text_context:
            return super().encode_text(task)
        tokens = self.task_tokens(task)
        n_ctx = sum(self.units[name].lengths["text"] for name in self._active)
        length = tokens["input_ids"].shape[1]
        limit = self.clip_model.config.text_config.max_position_embeddings
        if n_ctx + length > limit:
            raise ValueError(
                f"Task {task!r}: {n_ctx} context tokens + class prompts of up to {length} tokens (with SOS/EOS) "
                f"exceed the text encoder's {limit} positions; use a shorter context or shorter class names."
            )
        device = tokens["input_ids"].device
        positions = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(n_ctx + 1, n_ctx + length)])
        return self.clip_model.get_text_features(
            **tokens, position_ids=positions[None].to(device)
        ).pooler_output


def word_embeddings(clip: nn.Module, tokenizer: PreTrainedTokenizerBase, phrase: str) -> torch.Tensor:
    """Token embeddings ``(n, d_l)`` of ``phrase`` (no SOS/EOS, no positions): CoOp's ``ctx_init`` vectors."""
    ids = tokenizer(phrase, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() == 0:
        raise ValueError(f"ctx_init {phrase!r} has no tokens.")
    text_model = getattr(clip, "text_model", clip)
    with torch.no_grad():
        return text_model.embeddings.token_embedding(
            ids.to(text_model.embeddings.token_embedding.weight.device)
        )


def init_prefix(prompts: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
    """``prompts`` ``(n, d)`` with its first ``min(n, len(init))`` rows set to ``init`` ``(k, d)``, the word
    embeddings of ``ctx_init`` (the other rows keep their random init); ``prompts`` itself if no ``init``."""
    if init is None:
        return prompts
    if init.shape[-1] != prompts.shape[-1]:
        raise ValueError(
            f"ctx_init embeddings of width {init.shape[-1]} do not fit prompts of width {prompts.shape[-1]}."
        )
    k = min(len(init), len(prompts))
    return torch.cat([init[:k].detach().to(prompts.dtype), prompts[k:]])


def context_tasks(
    tasks: Sequence[TaskSpec] | dict[str, Sequence[str]],
    tokenizer: PreTrainedTokenizerBase,
    n_ctx: int,
    ctx_init: str | None = None,
) -> list[TaskSpec]:
    """The tasks with the class prompt that follows a learnable context of ``n_ctx`` tokens (CoOp, MaPLe).

    The context replaces the template's words before ``{}`` (`peft_mmap.classifier.context_template`:
    ``"a photo of a {}."`` gives ``"{}."``). When ``ctx_init`` has more tokens than the context, the rest stay
    as fixed words, as in MaPLe's code: a 2-token context from "a photo of a" gives ``"of a {}."``, so the
    prompt starts as "a photo of a <class>.".
    """
    rest = ""
    if ctx_init:
        ids = tokenizer(ctx_init, add_special_tokens=False)["input_ids"]
        rest = tokenizer.decode(ids[n_ctx:]).strip()
    return [
        TaskSpec(s.name, s.classnames, context_template(s.template, rest))
        for s in as_task_specs(tasks).values()
    ]
