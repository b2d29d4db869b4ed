"""Presets: the paper's protocol as data, applied to the trainer and the benchmark; explicit settings win."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from peft_mmap.apps.bench import BenchmarkSpec, preset_spec
from peft_mmap.baselines import METHODS
from peft_mmap.config import MmAPConfig
from peft_mmap.presets import CHOICE, INFERRED, PAPER, PRESETS, STATED, Setting, flat_values, get_preset
from peft_mmap.train_config import TrainConfig

REPRODUCTION_MD = Path(__file__).resolve().parents[1] / "docs" / "reproduction.md"

#: The settings the paper's "consistent hyperparameter settings" cover: the optimiser, its schedule, the
#: batch, the epochs and the augmentation.
OPTIMISER_FIELDS = ("optimizer", "lr", "momentum", "weight_decay", "scheduler", "warmup_epochs", "warmup_lr",
                    "batch_size", "epochs", "augment")  # fmt: skip


def optimiser_settings(spec: BenchmarkSpec, method: str, seed: int = 1) -> dict:
    config = spec.recipe(method, seed)[0]
    return {name: getattr(config, name) for name in OPTIMISER_FIELDS}


@pytest.mark.parametrize(("layout", "batch"), [("officehome", 16), ("domainnet", 4)])
def test_the_paper_preset_gives_every_parameter_efficient_method_the_same_optimiser_settings(layout, batch):
    trained = [name for name in METHODS if name != "zeroshot"]
    spec = preset_spec("paper", layout, trained, fraction=0.1)
    want = dict(optimizer="sgd", lr=0.0035, momentum=0.9, weight_decay=5e-4, scheduler="cosine",
                warmup_epochs=1, warmup_lr=1e-5, batch_size=batch, epochs=5, augment=True)  # fmt: skip
    for method in trained:
        assert optimiser_settings(spec, method) == want, method
    assert spec.seeds == [1, 2, 3] and spec.protocol == "paper"
    # The check can fail: under the per-method recipes the settings differ between methods.
    recipes = dataclasses.replace(spec, protocol="recipes")
    assert len({tuple(optimiser_settings(recipes, m).items()) for m in trained}) > 1


def test_the_preset_sizes_the_methods_and_builds_valid_configs():
    spec = preset_spec("paper", "officehome", ["mmap", "coop_mt", "maple_mt", "vpt", "clip_adapter"], shots=6)
    assert (spec.mmap.prompt_length, spec.mmap.source_shape, spec.mmap.depth) == (22, [2, 8], None)
    assert spec.mmap.init_std == 0.02
    assert spec.recipe("coop_mt", 1)[1] == {"n_ctx": 20}
    assert spec.recipe("maple_mt", 1)[1] == {"prompt_length": 2, "depth": 12, "ctx_init": "a photo of a"}
    assert spec.recipe("clip_adapter", 1)[1] == {"per_task": True}
    assert set(PAPER.options()) <= set(METHODS)
    assert spec.sizes()["mmap"] == {"config": {"prompt_length": 22, "source_shape": [2, 8], "depth": None}}
    assert spec.sizes()["vpt"] == {"prompt_length": 18}


def test_explicit_settings_win_and_are_recorded():
    spec = preset_spec("paper", "domainnet", ["mmap", "coop_mt"], fraction=0.01)
    assert spec.preset_record() == {"name": "paper", "layout": "domainnet", "overrides": {}}
    train = PAPER.train_config("domainnet", lr=0.01, warmup_epochs=0)
    mine = preset_spec("paper", "domainnet", ["mmap", "coop_mt"], fraction=0.01, seeds=[7], train=train,
                       method_options={"coop_mt": {"n_ctx": 4}}, augment=False)  # fmt: skip
    assert mine.seeds == [7] and mine.train.lr == 0.01 and mine.train.batch_size == 4
    assert mine.preset_record()["overrides"] == {
        "train.lr": {"preset": 0.0035, "used": 0.01},
        "train.warmup_epochs": {"preset": 1, "used": 0},
        "train.augment": {"preset": True, "used": False},
        "options.coop_mt": {"preset": {"n_ctx": 20}, "used": {"n_ctx": 4}},
        "bench.seeds": {"preset": [1, 2, 3], "used": [7]},
    }
    # The preset's name changes no result: a folder's settings are those of the values alone.
    assert dataclasses.replace(spec, preset=None, layout=None).settings() == spec.settings()


def test_a_layout_without_a_preset_batch_size_needs_one():
    with pytest.raises(ValueError, match=r"officehome \(16\), domainnet \(4\); for layout 'generic' give"):
        PAPER.train_config("generic")
    with pytest.raises(ValueError, match=r"officehome \(16\), domainnet \(4\); for layout 'generic' give"):
        preset_spec("paper", "generic", ["mmap"], shots=2)
    assert PAPER.train_config("generic", batch_size=8).batch_size == 8
    assert (
        preset_spec("paper", "generic", ["mmap"], shots=2, train=TrainConfig(batch_size=8)).layout
        == "generic"
    )


def test_bad_presets_and_layouts_are_refused():
    with pytest.raises(ValueError, match=r"Unknown preset 'nope'; known presets: \['paper'\]"):
        get_preset("nope")
    with pytest.raises(ValueError, match="Unknown preset 'nope'"):
        BenchmarkSpec(methods=["mmap"], shots=2, preset="nope", layout="generic")
    with pytest.raises(ValueError, match=r"BenchmarkSpec\.layout must be one of"):
        BenchmarkSpec(methods=["mmap"], shots=2, preset="paper", layout=None)
    with pytest.raises(ValueError, match="Unknown layout 'imagenet'"):
        PAPER.train_config("imagenet")
    with pytest.raises(ValueError, match=r"Setting\.basis must be one of"):
        Setting(1, "guessed", "nowhere")
    with pytest.raises(ValueError, match=r"batch_size goes in Preset\.batch_size"):
        dataclasses.replace(PAPER, train={**PAPER.train, "batch_size": Setting(8, CHOICE, "x")})


def test_the_paper_splits_as_options():
    assert (
        PAPER.split_hint("officehome")
        == "preset 'paper' on officehome: --fraction 0.1 or 0.2, or --shots 6 or 12"
    )
    assert (
        PAPER.split_hint("domainnet")
        == "preset 'paper' on domainnet: --fraction 0.01 or 0.02, or --shots 3 or 6"
    )
    assert PAPER.split_hint("generic") == ""


def test_every_setting_has_a_basis_and_a_source_and_the_docs_list_it():
    text = REPRODUCTION_MD.read_text()
    for preset in PRESETS.values():
        for name, setting in preset.settings().items():
            assert setting.basis in (STATED, INFERRED, CHOICE) and setting.source, name
            assert f"`{name}`" in text, f"docs/reproduction.md does not list {name}"
    stated = {name for name, s in PAPER.settings().items() if s.basis == STATED}
    assert {"train.optimizer", "train.lr", "train.epochs", "batch_size.officehome", "batch_size.domainnet",
            "bench.seeds", "mmap.init_std"} <= stated  # fmt: skip
    inferred = {name for name, s in PAPER.settings().items() if s.basis == INFERRED}
    assert {"train.momentum", "train.weight_decay", "train.scheduler", "train.warmup_epochs",
            "train.augment"} <= inferred  # fmt: skip
    assert all(
        "MaPLe" in PAPER.settings()[n].source or "Dassl" in PAPER.settings()[n].source for n in inferred
    )


def test_the_preset_values_build_the_configs():
    MmAPConfig(**PAPER.mmap_settings())
    for layout in ("officehome", "domainnet"):
        assert PAPER.train_config(layout).to_dict() == {
            **TrainConfig().to_dict(),
            **PAPER.train_settings(layout),
        }
    assert flat_values(train={"lr": 1}, bench={"seeds": [1]}) == {"train.lr": 1, "bench.seeds": [1]}
