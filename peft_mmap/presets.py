"""Presets: named sets of settings for the trainer, MmAP, the baselines' sizes and the benchmark, as data.

Every setting of a preset carries its value, its basis (stated by the paper, inferred, or our choice) and its
source, so ``docs/reproduction.md`` and the code cannot disagree about where a number comes from. `PAPER`
(``--preset paper``) is the MmAP paper's protocol (Xin et al., AAAI 2024, "Implementation Details") with the
paper's Table 1 budgets as the methods' sizes; the settings the paper leaves open are those of MaPLe's
released config (the code base whose SGD recipe the paper repeats) and Dassl's defaults under it.

A preset is plain data over `TrainConfig` fields, `peft_mmap.config.MmAPConfig` fields, builder options of
`peft_mmap.baselines.METHODS` and `peft_mmap.apps.bench.BenchmarkSpec` fields; this module imports neither
torch nor the apps, so ``peft-mmap --help`` lists the presets and a training script can use one without the
benchmark. The apps apply it: ``peft-mmap bench|group|train --preset paper`` (explicit options next to it
win) and `peft_mmap.apps.bench.preset_spec`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass

from .options import LAYOUTS
from .train_config import TrainConfig

STATED, INFERRED, CHOICE = "stated", "inferred", "our choice"
"""A setting's basis: the paper states it; inferred from the code base the paper repeats; or our choice."""


@dataclass(frozen=True)
class Setting:
    """One setting of a preset.

    Attributes:
        value: the setting (a JSON value).
        basis: `STATED`, `INFERRED` or `CHOICE`.
        source: the paper's sentence, the config file it is inferred from, or the reason for our choice.
    """

    value: object
    basis: str
    source: str

    def __post_init__(self) -> None:
        if self.basis not in (STATED, INFERRED, CHOICE):
            raise ValueError(
                f"Setting.basis must be one of {(STATED, INFERRED, CHOICE)}, got {self.basis!r}."
            )


@dataclass(frozen=True)
class Preset:
    """A named protocol.

    Attributes:
        name: the ``--preset`` value.
        summary: one line for ``--help``.
        train: `TrainConfig` fields, the same for every method (the batch size is in ``batch_size``).
        batch_size: `TrainConfig.batch_size` per data layout (`peft_mmap.options.LAYOUTS`); a layout not
            listed needs an explicit batch size.
        mmap: `MmAPConfig` fields of the MmAP methods.
        method_options: builder options per method (their sizes; `peft_mmap.baselines.build_method`).
        bench: `BenchmarkSpec` fields (seeds, protocol).
        splits: per layout, the training splits the paper reports: ``{"fraction": [...], "shots": [...]}``.
    """

    name: str
    summary: str
    train: Mapping[str, Setting]
    batch_size: Mapping[str, Setting]
    mmap: Mapping[str, Setting]
    method_options: Mapping[str, Setting]
    bench: Mapping[str, Setting]
    splits: Mapping[str, Setting]

    def __post_init__(self) -> None:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.train) - fields) + sorted(set(self.batch_size) - set(LAYOUTS))
        unknown += sorted(set(self.splits) - set(LAYOUTS))
        if unknown or "batch_size" in self.train:
            raise ValueError(
                f"Preset {self.name!r}: unknown TrainConfig fields or layouts {unknown} (batch_size goes in "
                "Preset.batch_size, by layout)."
            )

    def layout_batch_size(self, layout: str) -> int | None:
        """The batch size for data of ``layout`` (``None``: the preset has none for it)."""
        if layout not in LAYOUTS:
            raise ValueError(f"Unknown layout {layout!r}; expected one of {LAYOUTS}.")
        setting = self.batch_size.get(layout)
        return None if setting is None else setting.value

    def train_settings(self, layout: str) -> dict[str, object]:
        """`TrainConfig` field values for data of ``layout`` (with its batch size, if the preset has one)."""
        values = {name: s.value for name, s in self.train.items()}
        batch = self.layout_batch_size(layout)
        return values if batch is None else {**values, "batch_size": batch}

    def train_config(self, layout: str, **overrides: object) -> TrainConfig:
        """The `TrainConfig` for data of ``layout``; ``overrides`` (`TrainConfig` fields) win.

        Raises:
            ValueError: the preset has no batch size for ``layout`` and ``overrides`` gives none.
        """
        if self.layout_batch_size(layout) is None and "batch_size" not in overrides:
            raise ValueError(self.missing_batch_size(layout, "batch_size"))
        return TrainConfig(**{**self.train_settings(layout), **overrides})

    def missing_batch_size(self, layout: str, option: str) -> str:
        """The error for a layout without a preset batch size, naming ``option`` as the way out."""
        known = ", ".join(f"{name} ({s.value})" for name, s in self.batch_size.items())
        return (
            f"preset {self.name!r} sets the batch size per dataset layout: {known}; for layout {layout!r} "
            f"give {option} explicitly."
        )

    def mmap_settings(self) -> dict[str, object]:
        """`MmAPConfig` field values."""
        return {name: s.value for name, s in self.mmap.items()}

    def options(self) -> dict[str, dict]:
        """Builder options per method."""
        return {method: dict(s.value) for method, s in self.method_options.items()}

    def bench_settings(self) -> dict[str, object]:
        """`BenchmarkSpec` field values."""
        return {name: s.value for name, s in self.bench.items()}

    def split_hint(self, layout: str) -> str:
        """The paper's splits for ``layout`` as command-line options (empty if it reports none)."""
        setting = self.splits.get(layout)
        if setting is None:
            return ""
        fractions = " or ".join(f"{f:g}" for f in setting.value["fraction"])
        shots = " or ".join(map(str, setting.value["shots"]))
        return f"preset {self.name!r} on {layout}: --fraction {fractions}, or --shots {shots}"

    def values(self, layout: str) -> dict[str, object]:
        """Every value the preset sets for data of ``layout``, keyed as by `flat_values`."""
        return flat_values(
            train=self.train_settings(layout), mmap=self.mmap_settings(), options=self.options(),
            bench=self.bench_settings(),
        )  # fmt: skip

    def record(self, layout: str, used: Mapping[str, object]) -> dict:
        """What a run records about the preset: its name, the layout, and ``overrides``: each value the preset
        sets that ``used`` (keyed as by `flat_values`) replaces, as ``{"preset": ..., "used": ...}``."""
        preset = self.values(layout)
        overrides = {
            key: {"preset": preset[key], "used": value}
            for key, value in used.items()
            if key in preset and _as_json(value) != _as_json(preset[key])
        }
        return {"name": self.name, "layout": layout, "overrides": overrides}

    def settings(self) -> dict[str, Setting]:
        """Every setting by its flat name (``train.lr``, ``batch_size.officehome``, ...), for documentation."""
        sections = ("train", "batch_size", "mmap", "method_options", "bench", "splits")
        return {f"{section}.{k}": s for section in sections for k, s in getattr(self, section).items()}


def flat_values(**sections: Mapping[str, object]) -> dict[str, object]:
    """``flat_values(train={"lr": 0.1}, options={"coop": {...}})`` -> ``{"train.lr": 0.1, "options.coop": {...}}``:
    the keys of `Preset.values` and `Preset.record` (sections ``train``, ``mmap``, ``options``, ``bench``)."""
    return {
        f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()
    }


def _as_json(value: object) -> object:
    """``value`` as it reads back from JSON (tuples as lists), for comparing settings."""
    return json.loads(json.dumps(value, sort_keys=True))


_DETAILS = "MmAP paper, Implementation Details"
_MAPLE_CONFIG = "MaPLe's configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"
_DASSL = "Dassl's defaults (dassl/config/defaults.py), under MaPLe's config"
_SGD = f'{_DETAILS}: "We employ the SGD optimizer with a learning rate of 0.0035."'
_BATCH = f'{_DETAILS}: "we use a batch size of 16/4 and train for 5 epochs for Office-Home/MiniDomainNet"'
_SPLITS = (
    'MmAP paper, Datasets: "we randomly select 10% (6-shot per class) and 20% (12-shot per class) samples '
    'from Office-Home [...] and 1% (3-shot per class) and 2% (6-shot per class) samples from MiniDomainNet"'
)
_TABLE1 = "Table 1's parameter column"
_MMAP_SIZE = (
    "the paper gives no b, m, n; with every layer prompted, b=22 and the default source shape "
    "2 x 8 give 6 adapters x 12 x (16 + 11 x 160) = 127,872 = 0.13M for 4 tasks in 2 groups "
    "(docs/reproduction.md lists the other candidates)"
)

PAPER = Preset(
    name="paper",
    summary="the MmAP paper's protocol: one SGD recipe for every method, its batch sizes, 3 seeds, and its "
    "Table 1 parameter budgets as the methods' sizes (docs/reproduction.md)",
    train={
        "optimizer": Setting("sgd", STATED, _SGD),
        "lr": Setting(0.0035, STATED, _SGD),
        "epochs": Setting(5, STATED, _BATCH),
        "momentum": Setting(0.9, INFERRED, f"{_DASSL}: OPTIM.MOMENTUM = 0.9"),
        "weight_decay": Setting(5e-4, INFERRED, f"{_DASSL}: OPTIM.WEIGHT_DECAY = 5e-4"),
        "scheduler": Setting("cosine", INFERRED, f"{_MAPLE_CONFIG}: LR_SCHEDULER cosine"),
        "warmup_epochs": Setting(1, INFERRED, f"{_MAPLE_CONFIG}: WARMUP_EPOCH 1, WARMUP_TYPE constant"),
        "warmup_lr": Setting(1e-5, INFERRED, f"{_MAPLE_CONFIG}: WARMUP_CONS_LR 1e-5"),
        "augment": Setting(
            True, INFERRED, f"{_MAPLE_CONFIG}: TRANSFORMS random_resized_crop, random_flip, normalize"
        ),
    },
    batch_size={
        "officehome": Setting(16, STATED, f"{_BATCH}; images per task per step (our reading)"),
        "domainnet": Setting(4, STATED, f"{_BATCH}; images per task per step (our reading)"),
    },
    mmap={
        "depth": Setting(
            None, STATED, "MmAP paper, Eq. 9-10: prompts at every layer k = 1..K (depth None: every layer)"
        ),
        "init_std": Setting(
            0.02,
            STATED,
            f'{_DETAILS}: "we initialize it with a Gaussian distribution of 0.02 standard deviation"',
        ),
        "prompt_length": Setting(22, CHOICE, _MMAP_SIZE),
        "source_shape": Setting([2, 8], CHOICE, _MMAP_SIZE),
        # text_placement: "replace" (MaPLe-style context at CLIP positions 1..b, the paper's Eq. 9) goes here
        # once MmAPConfig has the field (issue 29 item 3, branch `placement`).
    },
    method_options={
        "coop": Setting(
            {"n_ctx": 20},
            CHOICE,
            f"{_TABLE1}: 4 x 20 x 512 = 40,960 = 0.04M (CoOp-MT: 0.01M); random init "
            "N(0, 0.02), CoOp's default ('a photo of a' would set only 4 of the 20 tokens)",
        ),
        "coop_mt": Setting({"n_ctx": 20}, CHOICE, f"{_TABLE1}: 20 x 512 = 10,240 = 0.01M"),
        "vpt": Setting({"prompt_length": 18}, CHOICE, f"{_TABLE1}: 4 x 12 x 18 x 768 = 663,552 (0.68M)"),
        "vpt_mt": Setting({"prompt_length": 18}, CHOICE, f"{_TABLE1}: 12 x 18 x 768 = 165,888 = 0.17M"),
        "maple": Setting(
            {"prompt_length": 2, "depth": 12, "ctx_init": "a photo of a"},
            INFERRED,
            f"{_MAPLE_CONFIG}: N_CTX 2, CTX_INIT 'a photo of a'; depth 12 from {_TABLE1} (4 x 4.74M, 19.2M)",
        ),
        "maple_mt": Setting(
            {"prompt_length": 2, "depth": 12, "ctx_init": "a photo of a"},
            INFERRED,
            f"{_MAPLE_CONFIG}: N_CTX 2, CTX_INIT 'a photo of a'; depth 12 from {_TABLE1}: 12 x (2 x 512 + "
            "512 x 768 + 768) = 4.74M (4.8M); MaPLe's own depth 9 gives 3.56M",
        ),
        "clip_adapter": Setting(
            {"per_task": True}, CHOICE, f"{_TABLE1}: one adapter per task, 4 x 131,072 = 0.52M (0.53M)"
        ),
        "joint_prompts": Setting({"prompt_length": 22}, CHOICE, "Fig. 4a: MmAP's b and depth"),
        "mlp_prompts": Setting({"prompt_length": 22}, CHOICE, "Fig. 4b: MmAP's b and depth"),
    },
    bench={
        "seeds": Setting([1, 2, 3], STATED, f'{_DETAILS}: "run the experiments with three different seeds"'),
        "protocol": Setting(
            "paper",
            STATED,
            f'{_DETAILS}: "we maintain consistent hyperparameter settings across all parameter efficient tuning '
            'methods" (full fine-tuning too: our choice, docs/reproduction.md)',
        ),
    },
    splits={
        "officehome": Setting({"fraction": [0.1, 0.2], "shots": [6, 12]}, STATED, _SPLITS),
        "domainnet": Setting({"fraction": [0.01, 0.02], "shots": [3, 6]}, STATED, _SPLITS),
    },
)

PRESETS: dict[str, Preset] = {PAPER.name: PAPER}
"""Every preset by name (``--preset``)."""


def get_preset(name: str) -> Preset:
    """The preset ``name``; ``ValueError`` naming the known presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}; known presets: {sorted(PRESETS)}.") from None
