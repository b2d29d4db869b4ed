"""Names and defaults of the library's options, importable without torch, transformers or peft.

``peft-mmap --help`` shows them without loading the heavy modules (which take seconds to import); the
modules that use them import them from here, so each value is written once.
"""

from __future__ import annotations

DEFAULT_TEMPLATE = "a photo of a {}."
"""Class-prompt template of a task (`peft_mmap.classifier.TaskSpec`), and the default of CLIP and MetaCLIP 2."""

SIGLIP_TEMPLATE = "This is a photo of {}."
"""The default class-prompt template of SigLIP and SigLIP 2 (their model cards' zero-shot template)."""

LAYOUTS = ("generic", "officehome", "domainnet")
"""Dataset folder layouts (`peft_mmap.data.load_task_folders`)."""

MMAP_CLI_FIELDS: dict[str, tuple[int | tuple[int, int] | None, str]] = {
    "prompt_length": (4, "b: prompt tokens per layer and tower; must be divisible by m"),
    "source_shape": ((2, 8), "[m, n]: shape of each layer's source prompt; n must divide both "
                     "hidden sizes"),
    "depth": (None, "layers (from the input) that get new prompts; None = every layer both towers have"),
}  # fmt: skip
"""The `MmAPConfig` fields the command line sets (``--prompt-length``, ``--source-shape``, ``--depth``):
name -> (default, help). The config's field defaults and help and the CLI options are all built from it,
so ``peft-mmap --help`` needs no peft import and the two cannot drift apart."""

SCALE_INITS = ("vision_zeros", "ones", "normal", "zeros")
"""`MmAPConfig.scale_init` choices (``--scale-init``); the first is the default."""

TEXT_PLACEMENTS = ("insert", "replace")
"""`MmAPConfig.text_placement` choices (``--text-placement``); the first is the default."""

TEXT_PLACEMENT_HELP = (
    "Where the text prompts sit: 'insert' (extra tokens without a position, inserted after SOS at the first "
    "layer and removed after the last one; the class prompt keeps its template, 'a photo of a {}.') or "
    "'replace' (as CoOp's and MaPLe's context: the T prompt tokens of the active adapters take positions 1..T "
    "of the input, which must hold T placeholder tokens after SOS, e.g. 'X X X X {}.'; at the first layer they "
    "replace those tokens' embeddings and get CLIP's positional embeddings 1..T, at each later prompted layer "
    "they replace rows 1..T, and the sequence keeps its length). The vision prompts are inserted after CLS "
    "either way"
)
"""Help of `MmAPConfig.text_placement` and ``--text-placement``."""

DEFAULT_NUM_GROUPS = 2
"""Task groups found by gradient-based grouping when no number is given (``peft-mmap group`` and
``bench``, `peft_mmap.apps.bench.BenchmarkSpec`); fewer tasks than this give one group per task. Two, not "the
best number": with the paper's criterion (the total within-group similarity) the best partition is a
single group whenever every pairwise similarity is positive, which is the "all in one group" ablation of
Table 3, not the method."""

ARCHS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "vit-b32": (512, 8, 768, 12, 12, 32, 512),
    "vit-b16": (512, 8, 768, 12, 12, 16, 512),
    "vit-l14": (768, 12, 1024, 24, 16, 14, 768),
}
"""Tower sizes of the OpenAI CLIP checkpoints: (text hidden, text heads, vision hidden, vision layers,
vision heads, patch size, projection dim); text: 12 layers, 77 positions, 49408 tokens; images 224 px
(`peft_mmap.apps.params.clip_config`)."""

FAMILY_ARCHS: dict[str, str] = {
    "siglip-b16-224": "google/siglip-base-patch16-224",
    "siglip2-b16-256": "google/siglip2-base-patch16-256",
    "metaclip2-b16": "facebook/metaclip-2-worldwide-b16",
}
"""Standard sizes of the other families (``peft-mmap params --arch``), each with the checkpoint whose shapes it
has (`peft_mmap.apps.family_archs.family_config`)."""

TINY_ARCH = "tiny"
"""``peft-mmap perf --arch tiny``: 2 layers of width 64 per tower, 32 px images."""

PERF_PRECISIONS = ("fp32", "bf16")
"""Precisions ``peft-mmap perf`` measures."""

PROTOCOLS = ("recipes", "paper")
"""How the benchmark trains its methods (`peft_mmap.apps.bench.BenchmarkSpec.protocol`): ``"recipes"`` gives each
method its own recipe (`peft_mmap.baselines.RECIPES`: its paper's learning rate, context init, warm-up,
augmentation) on top of the shared settings; ``"paper"`` trains every method with the shared settings
alone (the MmAP paper's single SGD recipe)."""

LR_SCALES = (0.3, 1.0, 3.0, 10.0, 30.0)
"""The shared grid of learning-rate factors (on each method's recipe rate) that ``peft-mmap bench
--lr-search`` tries on a validation split (`peft_mmap.apps.bench.run_lr_search`)."""

PERF_INFER_BATCHES = (1, 4, 16)
"""Serving batch sizes ``peft-mmap perf`` times."""

PERF_METHODS: dict[str, tuple[str, dict]] = {
    "mmap": ("mmap", {}),
    "vpt_deep": ("vpt_mt", {"prompt_length": "2b"}),
    "coop": ("coop_mt", {}),
    "maple": ("maple_mt", {}),
    "full_ft": ("full_ft_mt", {}),
    "mmap_all_rows": ("mmap", {}),
}
"""Training methods ``peft-mmap perf`` times: perf name -> (registry name, builder options; ``"2b"`` =
MmAP's tokens per layer). ``mmap_all_rows`` is MmAP through transformers' own layers, computing the layer
outputs at the prompt positions that the next layer discards (`peft_mmap.prompting.computing_prompt_rows`):
what the re-stated layer saves (skipped rows, prompt keys and values once per batch, the fused MLP)."""

PERF_FAMILY_METHODS = ("mmap", "vpt_deep", "full_ft", "mmap_all_rows")
"""The `PERF_METHODS` that ``peft-mmap perf`` times on the other families' sizes (`FAMILY_ARCHS`)."""

PERF_ALL_ROWS = "mmap_all_rows"
"""The `PERF_METHODS` entry that runs under `peft_mmap.prompting.computing_prompt_rows`."""
