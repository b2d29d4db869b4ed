"""`METHODS`: every method of the benchmark by name, with its builder and closed-form parameter count.

Single-task methods (``coop``, ``vpt``, ``maple``, ``full_ft``) keep one parameter set per task; their
``*_mt`` forms share one set across all tasks. ``groups`` is used by the grouped methods (MmAP variants,
``joint_prompts``, ``mlp_prompts``) and ignored by the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from torch import nn
from transformers import CLIPConfig, PreTrainedTokenizerBase

from ..classifier import CLIPTaskClassifier, TaskSpec, as_task_specs
from ..config import MmAPConfig
from ..multitask import MultiTaskMmAP
from .bitfit import BitFit, clip_bias_parameters
from .clip_adapter import DEFAULT_RATIO, DEFAULT_REDUCTION, CLIPAdapter, clip_adapter_parameters
from .coop import DEFAULT_N_CTX, CoOpContext, coop_parameters
from .full_ft import FullFineTune, clip_parameters
from .joint import JointPrompts, joint_parameters
from .maple import DEFAULT_PROMPT_LENGTH, MaPLePrompts, maple_parameters
from .mlp_prompts import MLPPrompts, mlp_parameters
from .mmap_variants import DEFAULT_RANDOM_GROUPS, mmap_adapter_parameters, random_groups
from .prompted import Layout, PromptClassifier, PromptUnit, context_tasks, count_units, word_embeddings
from .recipes import RECIPES, Recipe
from .vpt import VPTPrompts, vpt_parameters
from .zeroshot import ZeroShotCLIP

Tasks = Sequence[TaskSpec] | dict[str, Sequence[str]]
Groups = Sequence[Sequence[str]] | None


@dataclass(frozen=True)
class MethodSpec:
    """One benchmark method.

    Attributes:
        name: registry key.
        summary: what it trains, with its defaults.
        paper_column: its column in the paper's Table 1 (``None`` if not there).
        build: ``build(clip, tokenizer, tasks, groups, **options) -> CLIPTaskClassifier`` (``clip`` is
            modified in place: pass a fresh ``CLIPModel``).
        parameters: ``parameters(clip_config, num_tasks, num_groups, **options) -> int``, the closed-form
            trainable-parameter count (``num_groups=None``: no groups given).
        recipe: its training recipe under the ``"recipes"`` protocol.
    """

    name: str
    summary: str
    paper_column: str | None
    build: Callable[..., CLIPTaskClassifier]
    parameters: Callable[..., int]
    recipe: Recipe = field(default_factory=Recipe)


def _prompt_method(
    name: str,
    summary: str,
    paper_column: str | None,
    unit: Callable[..., PromptUnit],
    unit_parameters: Callable[..., int],
    layout: Layout,
    context_length: Callable[..., int] | None = None,
) -> MethodSpec:
    """``context_length(**options)``: tokens of the learnable text context that replaces the template
    (CoOp, MaPLe; see `PromptClassifier`'s ``text_context``); ``None`` keeps each task's template."""

    def build(
        clip: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: Tasks, groups: Groups = None, **options
    ):
        ctx_init = options.pop("ctx_init", None)
        if ctx_init is not None:
            options["init"] = word_embeddings(clip, tokenizer, ctx_init)
        if context_length is not None:
            tasks = context_tasks(tasks, tokenizer, context_length(**options), ctx_init)
        grouping = groups if layout == "grouped" else None
        unit_factory = partial(unit, **options)
        return PromptClassifier(
            clip, tokenizer, tasks, unit_factory, layout, grouping, text_context=context_length is not None
        )

    def parameters(clip_config: CLIPConfig, num_tasks: int, num_groups: int | None = None, **options) -> int:
        options.pop("ctx_init", None)  # initial values do not change the count
        return count_units(num_tasks, layout, num_groups) * unit_parameters(clip_config, **options)

    return MethodSpec(name, summary, paper_column, build, parameters)


def _mmap_method(
    name: str, summary: str, paper_column: str | None, grouping: str, task_adapters: bool = True
) -> MethodSpec:
    """``grouping``: ``"given"`` (groups, else one group), ``"none"``, ``"one"`` or ``"random"``."""

    def build(
        clip: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Tasks,
        groups: Groups = None,
        config: MmAPConfig | None = None,
        seed: int = 0,
    ):
        names = list(as_task_specs(tasks))
        parts = {
            "given": [list(g) for g in groups] if groups else [names],
            "none": None,
            "one": [names],
            "random": random_groups(names, len(groups) if groups else DEFAULT_RANDOM_GROUPS, seed),
        }[grouping]
        return MultiTaskMmAP(clip, tokenizer, tasks, parts, config, task_adapters=task_adapters)

    def parameters(
        clip_config: CLIPConfig,
        num_tasks: int,
        num_groups: int | None = None,
        config: MmAPConfig | None = None,
        seed: int = 0,
    ) -> int:
        groups = {
            "given": num_groups or 1,
            "none": 0,
            "one": 1,
            "random": num_groups or DEFAULT_RANDOM_GROUPS,
        }
        adapters = groups[grouping] + (num_tasks if task_adapters else 0)
        return adapters * mmap_adapter_parameters(clip_config, config)

    return MethodSpec(name, summary, paper_column, build, parameters)


def _fixed_method(
    name: str,
    summary: str,
    paper_column: str | None,
    build: Callable[..., CLIPTaskClassifier],
    parameters: Callable[[CLIPConfig, int], int],
) -> MethodSpec:
    return MethodSpec(
        name,
        summary,
        paper_column,
        lambda clip, tokenizer, tasks, groups=None, **options: build(clip, tokenizer, tasks, **options),
        lambda clip_config, num_tasks, num_groups=None, **options: parameters(
            clip_config, num_tasks, **options
        ),
    )


def _adapter_parameters(
    config: CLIPConfig,
    num_tasks: int,
    per_task: bool = False,
    reduction: int = DEFAULT_REDUCTION,
    ratio: float = DEFAULT_RATIO,  # does not change the count
) -> int:
    return (num_tasks if per_task else 1) * clip_adapter_parameters(config, reduction)


def _coop_context(n_ctx: int = DEFAULT_N_CTX, **_: object) -> int:
    return n_ctx


def _maple_context(prompt_length: int = DEFAULT_PROMPT_LENGTH, **_: object) -> int:
    return prompt_length


_SPECS = [
    _fixed_method(
        "zeroshot",
        "Frozen CLIP, each task's template (default 'a photo of a {}.').",
        "ZeroShot",
        ZeroShotCLIP,
        lambda config, num_tasks: 0,
    ),
    _fixed_method(
        "full_ft",
        "All CLIP weights but the logit scale, one deep copy per task. T * (|CLIP| - 1).",
        "Full FT",
        partial(FullFineTune, per_task=True),
        lambda config, num_tasks: num_tasks * (clip_parameters(config) - 1),
    ),
    _fixed_method(
        "full_ft_mt",
        "All CLIP weights but the logit scale, one backbone for all tasks. |CLIP| - 1.",
        "Full FT (MT)",
        FullFineTune,
        lambda config, num_tasks: clip_parameters(config) - 1,
    ),
    _prompt_method(
        "coop",
        "CoOp text context per task (n_ctx=16, std 0.02). T * n_ctx * d_l.",
        "CoOp",
        CoOpContext,
        coop_parameters,
        "task",
        context_length=_coop_context,
    ),
    _prompt_method(
        "coop_mt",
        "One CoOp context for all tasks. n_ctx * d_l.",
        "CoOp-MT",
        CoOpContext,
        coop_parameters,
        "shared",
        context_length=_coop_context,
    ),
    _prompt_method(
        "vpt",
        "VPT-deep per task (prompt_length=8, every vision layer). T * depth * n * d_v.",
        "VPT",
        VPTPrompts,
        vpt_parameters,
        "task",
    ),
    _prompt_method(
        "vpt_mt",
        "One VPT-deep prompt set for all tasks. depth * n * d_v.",
        "VPT-MT",
        VPTPrompts,
        vpt_parameters,
        "shared",
    ),
    _prompt_method(
        "maple",
        "MaPLe per task (b=2, depth=9 clipped). T * depth * (b*d_l + d_l*d_v + d_v).",
        "MaPLe",
        MaPLePrompts,
        maple_parameters,
        "task",
        context_length=_maple_context,
    ),
    _prompt_method(
        "maple_mt",
        "One MaPLe prompt set for all tasks. depth * (b*d_l + d_l*d_v + d_v).",
        "MaPLe-MT",
        MaPLePrompts,
        maple_parameters,
        "shared",
        context_length=_maple_context,
    ),
    _fixed_method(
        "clip_adapter",
        "Image-feature adapter (r=4, ratio 0.2), shared (per_task=True: one per task). D^2/2.",
        "C-Adapter",
        CLIPAdapter,
        _adapter_parameters,
    ),
    _fixed_method(
        "bitfit",
        "Every CLIP bias, shared by all tasks.",
        "BitFit",
        BitFit,
        lambda config, num_tasks: clip_bias_parameters(config),
    ),
    _mmap_method(
        "mmap", "MmAP, group + task adapters (groups given, else one group). (G + T) * a.", "Ours", "given"
    ),
    _mmap_method("mmap_task_only", "MmAP, task adapters only (Table 3). T * a.", None, "none"),
    _mmap_method(
        "mmap_group_only",
        "MmAP, group adapters only (Table 3; groups given, else one). G * a.",
        None,
        "given",
        task_adapters=False,
    ),
    _mmap_method(
        "mmap_one_group", "MmAP, one group of all tasks + task adapters (Table 3). (1 + T) * a.", None, "one"
    ),
    _mmap_method(
        "mmap_random_groups",
        "MmAP, seeded random groups (as many as given, else 2) + task adapters. (G + T) * a.",
        None,
        "random",
    ),
    _prompt_method(
        "joint_prompts",
        "Fig. 4a: independent text/vision deep prompts, MmAP's b/depth, grouped. (G + T) * depth*b*(d_l+d_v).",
        None,
        JointPrompts,
        joint_parameters,
        "grouped",
    ),
    _prompt_method(
        "mlp_prompts",
        "Fig. 4b: source prompts + Linear generators per unit, MmAP's b/depth, grouped.",
        None,
        MLPPrompts,
        mlp_parameters,
        "grouped",
    ),
]

#: Every method by name.
METHODS: dict[str, MethodSpec] = {
    spec.name: dataclasses.replace(spec, recipe=RECIPES.get(spec.name, Recipe())) for spec in _SPECS
}


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; ``KeyError`` listing the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"Unknown method {name!r}; known methods: {sorted(METHODS)}.") from None


def build_method(
    name: str,
    clip: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Tasks,
    groups: Groups = None,
    **options,
) -> CLIPTaskClassifier:
    """Build method ``name`` on ``clip`` (modified in place) for ``tasks``; ``options`` are its keyword
    arguments (e.g. ``n_ctx=4`` for CoOp, ``config=MmAPConfig(...)`` for MmAP, ``per_task=True`` for CLIP-Adapter)."""
    return get_method(name).build(clip, tokenizer, tasks, groups, **options)
