"""Trainable-parameter counts of every method for a four-task setting, next to the paper's Table 1.

The CLIP models are built from hand-written configs on the ``meta`` device (no weights, no download), so
counting even ViT-L/14 takes seconds. The counts are measured on the built models; `METHODS` also has each
method's closed-form count, and the tests check that the two agree. The methods have their default sizes, or
a preset's (``--sizes paper``: `peft_mmap.presets.PAPER`, sized to the paper's budgets).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPConfig, CLIPModel

from ..baselines import METHODS, build_method
from ..classifier import TaskSpec
from ..config import MmAPConfig
from ..options import ARCHS
from ..presets import get_preset
from .paper import paper_parameters

#: The paper's Table 1 "Parameters" row (CLIP ViT-B/16, four Office-Home tasks), by Table 1 column.
PAPER_PARAMETERS = paper_parameters()

#: Why our count differs from the paper's (methods not listed match it).
NOTES = {
    "full_ft": "4 copies of full_ft_mt.",
    "full_ft_mt": "Every weight but the (frozen) logit scale: 149,620,737 - 1.",
    "coop": "4 x 16 x 512 = 32,768 (0.03M); the paper's 0.04M needs n_ctx 18-21 (--sizes paper: 20).",
    "vpt": "4 tasks x our VPT-MT; see vpt_mt.",
    "vpt_mt": "Our default is 8 tokens x 12 layers x 768; the paper's 0.17M implies about 18 tokens per layer.",
    "maple": "4 tasks x our MaPLe-MT; see maple_mt.",
    "maple_mt": "Depth 9 as in MaPLe (3.56M); depth 12 would give 4.74M, close to the paper's 4.8M.",
    "clip_adapter": "One shared adapter is D^2/2 = 131,072; one per task (per_task=True) is 0.52M, as the paper's 0.53M.",
    "mmap": "MmAPConfig defaults (b=4, m x n=2 x 8, 12 layers) for 2 groups + 4 tasks; the paper's 0.13M implies "
    "larger prompts or source shapes per adapter (its exact sizes are not given; --sizes paper: b=22).",
    "mlp_prompts": "The paper reports 3.96M for its MLP baseline; its exact sizes are not given.",
}

#: Why our count under the paper preset's sizes (``--sizes paper``) differs from the paper's.
PAPER_SIZE_NOTES = {
    "full_ft": "4 copies of full_ft_mt.",
    "full_ft_mt": "Every weight but the (frozen) logit scale: 149,620,737 - 1.",
    "coop": "n_ctx=20: 4 x 20 x 512. The paper's 0.04M and CoOp-MT's 0.01M allow n_ctx 18-21.",
    "coop_mt": "n_ctx=20: 20 x 512 (0.01M).",
    "vpt": "4 x vpt_mt; the paper's 0.68M is 4 x its rounded 0.17M.",
    "vpt_mt": "18 tokens x 12 layers x 768 (0.17M).",
    "maple": "4 x maple_mt; the paper's 19.2M is 4 x its rounded 4.8M.",
    "maple_mt": "b=2 (MaPLe's N_CTX) at depth 12: 12 x (2 x 512 + 512 x 768 + 768); MaPLe's depth 9 gives 3.56M.",
    "clip_adapter": "One bias-free adapter per task (as CLIP-Adapter's code): 4 x 131,072; with biases 0.53M.",
    "mmap": "b=22, m x n = 2 x 8, every layer: 6 adapters x 12 x (16 + 11 x 160); the paper gives no b, m, n "
    "(docs/reproduction.md).",
    "joint_prompts": "Fig. 4a baseline at MmAP's b=22 and depth: 6 x 12 x 22 x (512 + 768); the paper gives no count.",
    "mlp_prompts": "Fig. 4b baseline at MmAP's b=22 and depth; the paper's 3.96M fits 6 generator pairs "
    "(6 x 656,640 = 3.94M) plus only 0.02M of source prompts, fewer than one 512-wide token per layer and unit: "
    "its source prompts and widths are not given.",
}


def clip_config(arch: str) -> CLIPConfig:
    """The ``CLIPConfig`` of an OpenAI CLIP architecture (``vit-b32``, ``vit-b16``, ``vit-l14``)."""
    try:
        d_l, h_l, d_v, layers_v, h_v, patch, projection = ARCHS[arch]
    except KeyError:
        raise ValueError(f"Unknown arch {arch!r}; known: {sorted(ARCHS)}.") from None
    text = dict(
        hidden_size=d_l,
        intermediate_size=4 * d_l,
        num_hidden_layers=12,
        num_attention_heads=h_l,
        max_position_embeddings=77,
        vocab_size=49408,
    )
    vision = dict(
        hidden_size=d_v,
        intermediate_size=4 * d_v,
        num_hidden_layers=layers_v,
        num_attention_heads=h_v,
        image_size=224,
        patch_size=patch,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def demo_tasks(num_tasks: int) -> list[TaskSpec]:
    """``num_tasks`` placeholder tasks (counts do not depend on the classes)."""
    return [TaskSpec(f"task{i}", ["a", "b"]) for i in range(num_tasks)]


def demo_groups(num_tasks: int, num_groups: int) -> list[list[str]]:
    """Tasks ``task0..`` split into ``num_groups`` contiguous groups."""
    names = [t.name for t in demo_tasks(num_tasks)]
    size = -(-num_tasks // num_groups)
    return [names[i : i + size] for i in range(0, num_tasks, size)]


def size_options(sizes: str | None = None) -> dict[str, dict]:
    """Every method's builder options that set its size: ``{}`` each (``sizes=None``, the defaults) or the
    preset ``sizes``'s method options and, for the MmAP methods, its MmAP config (``"config"``). A context's
    initial words (``ctx_init``) are left out: they change no count, and need a tokenizer."""
    if sizes is None:
        return {name: {} for name in METHODS}
    preset = get_preset(sizes)
    options = {
        name: {k: v for k, v in preset.options().get(name, {}).items() if k != "ctx_init"} for name in METHODS
    }
    for name in METHODS:
        if name.startswith("mmap"):
            options[name]["config"] = MmAPConfig(**preset.mmap_settings())
    return options


def count_method_parameters(
    arch: str = "vit-b16",
    tasks: int = 4,
    groups: int | Sequence[Sequence[str]] = 2,
    methods: Sequence[str] | None = None,
    sizes: str | None = None,
) -> dict[str, int]:
    """Trainable parameters of each method, measured on models built on the ``meta`` device.

    Args:
        arch: CLIP architecture (see `ARCHS`).
        tasks: number of tasks (named ``task0``, ``task1``, ...).
        groups: number of groups (contiguous split of the tasks) or an explicit partition of the names.
        methods: methods to count (default: all of `METHODS`).
        sizes: ``None`` (the methods' defaults) or a preset whose sizes to count (`size_options`).
    """
    config = clip_config(arch)
    specs = demo_tasks(tasks)
    partition = demo_groups(tasks, groups) if isinstance(groups, int) else [list(g) for g in groups]
    options = size_options(sizes)
    counts = {}
    with torch.device("meta"):
        for name in methods or METHODS:
            # Construction never tokenises, so no tokenizer is needed.
            model = build_method(name, CLIPModel(config), None, specs, partition, **options[name])
            counts[name] = model.trainable_parameter_count()
    return counts


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def paper_parameters(name: str) -> float | None:
    """The paper's Table 1 count of method ``name`` (``None`` if it has no Table 1 column)."""
    text = PAPER_PARAMETERS.get(METHODS[name].paper_column or "")
    return None if text is None else float(text.removesuffix("M")) * 1e6


def markdown_table(arch: str, counts: dict[str, int], notes: dict[str, str] = NOTES) -> str:
    """A Markdown table of ``counts`` next to the paper's Table 1 values, our count's difference from the
    paper's, and ``notes`` (the reason of each gap: `NOTES` for the default sizes, `PAPER_SIZE_NOTES` for the
    paper preset's)."""
    lines = [
        f"| Method | Paper column | Ours ({arch}) | Paper (ViT-B/16) | Ours vs paper | Note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, count in counts.items():
        column = METHODS[name].paper_column
        paper = PAPER_PARAMETERS.get(column, "-") if column else "-"
        value = paper_parameters(name)
        change = "-" if not value else f"{100 * (count / value - 1):+.1f} %"
        lines.append(
            f"| `{name}` | {column or '-'} | {count:,} ({_millions(count)}) | {paper} | {change} | "
            f"{notes.get(name, '')} |"
        )
    return "\n".join(lines)
