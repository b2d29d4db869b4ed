"""The benchmark harness end to end on a tiny CLIP and generated image folders."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from peft_mmap.apps import bench as bench_module
from peft_mmap.apps.bench import Benchmark, BenchmarkSpec, ablation_markdown, plot_shot_sweep
from peft_mmap.config import MmAPConfig
from peft_mmap.data import scan_image_folder
from peft_mmap.evaluate import AVERAGE
from peft_mmap.train import TrainConfig

QUICK = TrainConfig(epochs=1, batch_size=4, lr=0.01, max_steps=2)


def spec(**overrides) -> BenchmarkSpec:
    values = dict(
        methods=["zeroshot", "mmap", "coop_mt"], seeds=[1, 2], shots=2, train=QUICK,
        mmap=MmAPConfig(prompt_length=2, source_shape=(1, 8)), affinity_snapshots=2, eval_batch_size=8,
        device="cpu",
    )  # fmt: skip
    values.update(overrides)
    return BenchmarkSpec(**values)


def test_benchmark_writes_results_and_resumes(workspace, tmp_path, monkeypatch):
    folders = scan_image_folder(workspace / "data")
    bench = Benchmark(workspace / "model", folders, spec(), tmp_path, progress=False, log=lambda _: None)
    results = bench.run()
    assert set(results) >= {"methods", "grouping", "seeds"} and results["seeds"] == [1, 2]
    assert sorted(t for g in results["grouping"] for t in g) == sorted(folders)
    for name in ("zeroshot", "mmap", "coop_mt"):
        entry = results["methods"][name]
        assert set(entry["tasks"]) == set(folders) and 0 <= entry["average"] <= 100
    assert results["methods"]["zeroshot"]["trainable_params"] == 0
    assert results["methods"]["mmap"]["trainable_params"] > 0
    recipe = results["methods"]["coop_mt"]["recipe"]  # each method's recipe is recorded
    assert recipe["protocol"] == "recipes" and recipe["train"]["lr"] == 0.002 and recipe["train"]["augment"]
    assert recipe["options"] == {"n_ctx": 4, "ctx_init": "a photo of a"}
    assert (tmp_path / "results.md").read_text().count("|") > 10
    assert (tmp_path / "grouping" / "affinity.png").is_file()
    assert (tmp_path / "runs" / "mmap" / "seed1" / "adapters" / "mmap_manifest.json").is_file()
    assert not (tmp_path / "runs" / "mmap" / "seed1" / "checkpoint").exists()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["methods"]["mmap"]["average"] == results["methods"]["mmap"]["average"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished (method, seed) was trained again")

    monkeypatch.setattr(bench_module, "train", no_training)
    monkeypatch.setattr(bench_module, "task_affinity", no_training)
    again = Benchmark(
        workspace / "model", folders, spec(), tmp_path, progress=False, log=lambda _: None
    ).run()
    assert again["methods"] == results["methods"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"methods": []}, "methods is empty"),
        ({"methods": ["nope"]}, r"Unknown methods \['nope'\]"),
        ({"shots": None}, "exactly one of"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"protocol": "mine"}, r"Unknown protocol 'mine'; expected one of \('recipes', 'paper'\)"),
    ],
)
def test_spec_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        spec(**overrides)


def test_ablation_table_and_sweep_plot(tmp_path):
    entry = {"average": 80.0, "std": {AVERAGE: 0.5}, "runs": [{}, {}]}
    table = ablation_markdown({"mmap": entry, "mmap_task_only": entry})
    assert "| `mmap_task_only` | ✓ | ✗ | 80.00 ± 0.50 |" in table and "| `mmap` | ✓ | Group |" in table
    assert ablation_markdown({"mmap": entry, "zeroshot": entry}) == ""  # one variant compares nothing
    single = {"average": 80.0, "std": {AVERAGE: 0.0}, "runs": [{}]}
    assert "| `mmap` | ✓ | Group | 80.00 |" in ablation_markdown({"mmap": single, "mmap_task_only": single})
    sweep = {
        "shots": [1, 3],
        "methods": {"mmap": {"1": {"a": 50.0, AVERAGE: 50.0}, "3": {"a": 60.0, AVERAGE: 60.0}}},
    }
    path = plot_shot_sweep(sweep, tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recipes_protocol_and_the_papers_single_recipe():
    config, options = spec(method_options={"coop_mt": {"n_ctx": 4}}).recipe("coop_mt", 3)
    assert (config.lr, config.augment, config.seed, config.epochs) == (0.002, True, 3, QUICK.epochs)
    assert options == {"n_ctx": 4, "ctx_init": "a photo of a"}
    config, options = spec(protocol="paper").recipe("coop_mt", 3)
    assert config == dataclasses.replace(QUICK, seed=3) and options == {}


@pytest.mark.parametrize("protocol", ["recipes", "paper"])
@pytest.mark.parametrize("augment", [True, False])
def test_augment_setting_overrides_every_methods_recipe(protocol, augment):
    for method in ("coop_mt", "mmap", "full_ft"):
        config, _ = spec(protocol=protocol, augment=augment).recipe(method, 1)
        assert config.augment is augment, (method, protocol)
    assert spec(protocol="recipes").recipe("mmap", 1)[0].augment is True  # None keeps the recipe's choice


def test_lr_scales_multiply_the_recipe_rate_and_bad_settings_are_refused():
    assert spec(lr_scales={"full_ft": 10}).recipe("full_ft", 1)[0].lr == 1e-4  # recipe 1e-5, rounded
    assert spec(lr_scales={"coop_mt": 3}).recipe("mmap", 1)[0].lr == QUICK.lr  # the others keep their rate
    assert spec(protocol="paper", lr_scales={"mmap": 0.5}).recipe("mmap", 1)[0].lr == QUICK.lr * 0.5
    with pytest.raises(ValueError, match=r"lr_scales must be positive numbers, got \{'mmap': 0\}"):
        spec(lr_scales={"mmap": 0})
    with pytest.raises(ValueError, match="validation_shots must be a positive int or None, got 0"):
        spec(validation_shots=0)


def test_lr_search_picks_each_methods_factor_on_held_out_training_shots(workspace, tmp_path):
    folders = scan_image_folder(workspace / "data")
    search = spec(methods=["zeroshot", "coop_mt"], seeds=[1], shots=3)
    results = bench_module.run_lr_search(
        workspace / "model", folders, search, tmp_path, scales=[0.5, 2], validation_shots=1,
        progress=False, log=lambda _: None,
    )  # fmt: skip
    found = json.loads((tmp_path / "lr_search.json").read_text())
    assert found["scales"] == [0.5, 2.0] and found["validation_shots"] == 1
    assert set(found["validation"]) == {"zeroshot", "coop_mt"}
    assert found["validation_images"] == 3 * 3  # one held-out shot per class, 3 tasks x 3 classes
    assert found["picked"]["zeroshot"] == 0.5  # equal scores: nearest 1 (equally near: the smaller)
    picked, by_scale = found["picked"]["coop_mt"], found["validation"]["coop_mt"]
    best = max(by_scale.values())
    error = 100 * (best / 100 * (1 - best / 100) / 9) ** 0.5
    assert found["standard_error"]["coop_mt"] == pytest.approx(error)
    close = {float(s) for s, acc in by_scale.items() if acc >= best - error}
    assert picked in close and abs(math.log(picked)) == min(abs(math.log(s)) for s in close)
    assert results["methods"]["coop_mt"]["recipe"]["train"]["lr"] == pytest.approx(0.002 * picked)
    assert "| `coop_mt` |" in (tmp_path / "lr_search.md").read_text()
    # Validation runs train on 2 of the 3 shots per class and score the third; the final run uses all 3.
    split = json.loads((tmp_path / "lr-search" / "x2" / "splits" / "seed1.json").read_text())
    assert split == json.loads((tmp_path / "splits" / "seed1.json").read_text())
    with pytest.raises(ValueError, match=r"scales must be positive numbers, got \[0\]"):
        bench_module.run_lr_search(workspace / "model", folders, search, tmp_path, scales=[0])
