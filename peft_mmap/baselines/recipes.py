"""`RECIPES`: how each method is trained under the benchmark's ``"recipes"`` protocol.

Each entry replaces some of the shared trainer settings (`peft_mmap.train.TrainConfig`: the MmAP paper's
SGD, lr 0.0035, batch 16, cosine) and may set builder options. Where a method's own paper gives a recipe
it is followed; every trained method gets the same augmentation (random resized crop and flip, as in the
CoOp, MaPLe and CLIP-Adapter papers) and the same epochs and batch size. A recipe's learning rate may carry
a factor that ``peft-mmap bench --lr-search`` picked on a validation split (`Recipe.lr_scale`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    """How a method is trained under the ``"recipes"`` protocol (`peft_mmap.apps.bench.PROTOCOLS`).

    Attributes:
        train: `peft_mmap.train.TrainConfig` fields that replace the shared settings (e.g. ``lr``).
        options: builder options (e.g. ``ctx_init="a photo of a"``).
        source: where the recipe comes from.
        lr_scale: factor on the learning rate (``train["lr"]``, else the shared one), picked from
            `peft_mmap.options.LR_SCALES` on a validation split (`peft_mmap.apps.bench.run_lr_search`);
            1 = as published.
    """

    train: Mapping[str, object] = field(default_factory=dict)
    options: Mapping[str, object] = field(default_factory=dict)
    source: str = ""
    lr_scale: float = 1.0

    def to_dict(self) -> dict:
        return {"train": dict(self.train), "options": dict(self.options), "source": self.source,
                "lr_scale": self.lr_scale}  # fmt: skip


_AUGMENT = {"augment": True}
_PHOTO_CTX = "a photo of a"
#: Full fine-tuning: AdamW at a small learning rate (the logit scale stays frozen, see ``full_ft``), times
#: the factor 10 that ``peft-mmap bench --lr-search`` picked on the demo benchmark's validation split (the
#: only pick away from 1; README, "Training recipes").
_FULL_FT = Recipe({**_AUGMENT, "optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.1},
                  source="small-lr AdamW fine-tuning of CLIP (e.g. WiSE-FT, FLYP); lr x 10 picked on a "
                         "validation split", lr_scale=10.0)  # fmt: skip
_COOP = Recipe({**_AUGMENT, "lr": 0.002}, {"n_ctx": 4, "ctx_init": _PHOTO_CTX},
               source="CoOp (Zhou et al., 2022): SGD lr 0.002, context from 'a photo of a'")  # fmt: skip
_MAPLE = Recipe({**_AUGMENT, "lr": 0.0035, "warmup_epochs": 1, "warmup_lr": 1e-5}, {"ctx_init": _PHOTO_CTX},
                source="MaPLe (Khattak et al., 2023): SGD lr 0.0035, 1 warm-up epoch at 1e-5, "
                       "first-layer context from 'a photo', then 'of a <class>.'")  # fmt: skip
_VPT = Recipe({**_AUGMENT, "lr": 0.0035}, source="VPT-deep prompts with the shared SGD recipe")
_SHARED = Recipe(_AUGMENT, source="the MmAP paper's SGD recipe (lr 0.0035)")

RECIPES: dict[str, Recipe] = {
    "full_ft": _FULL_FT,
    "full_ft_mt": _FULL_FT,
    "coop": _COOP,
    "coop_mt": _COOP,
    "maple": _MAPLE,
    "maple_mt": _MAPLE,
    "vpt": _VPT,
    "vpt_mt": _VPT,
    "clip_adapter": Recipe({**_AUGMENT, "lr": 0.002}, source="CLIP-Adapter (Gao et al., 2021), SGD"),
    "bitfit": _SHARED,
    "mmap": _SHARED,
    "mmap_task_only": _SHARED,
    "mmap_group_only": _SHARED,
    "mmap_one_group": _SHARED,
    "mmap_random_groups": _SHARED,
    "joint_prompts": _SHARED,
    "mlp_prompts": _SHARED,
}
