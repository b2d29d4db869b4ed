"""The benchmark harness end to end on a tiny CLIP and generated image folders."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from peft_mmap.apps import bench as bench_module
from peft_mmap.apps.bench import Benchmark, BenchmarkSpec, ablation_markdown, plot_shot_sweep
from peft_mmap.config import MmAPConfig
from peft_mmap.data import scan_image_folder
from peft_mmap.evaluate import AVERAGE
from peft_mmap.train import TrainConfig, train

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
    assert (tmp_path / "accuracy_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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


def _bench(workspace, folder, overwrite=False, **overrides) -> Benchmark:
    folders = scan_image_folder(workspace / "data")
    settings = spec(**{"seeds": [1], **overrides})
    return Benchmark(workspace / "model", folders, settings, folder, False, lambda _: None, overwrite)


def _record_training(monkeypatch) -> list[tuple[str, int, bool]]:
    """Patch the benchmark's trainer to record ``(method, epochs, resume)`` of every run it trains."""
    calls = []

    def recording(model, datasets, config, output_dir, resume, **kwargs):
        calls.append((output_dir.parent.name, config.epochs, resume))
        return train(model, datasets, config, output_dir=output_dir, resume=resume, **kwargs)

    monkeypatch.setattr(bench_module, "train", recording)
    return calls


@pytest.mark.parametrize(("first", "second"), [(1, 2), (2, 1)])
def test_a_folder_of_other_settings_is_refused_and_its_runs_are_never_reused(
    workspace, tmp_path, monkeypatch, first, second
):
    """Quick-then-full and full-then-quick: the second benchmark neither reuses nor silently replaces."""
    methods = ["zeroshot", "mmap"]
    _bench(workspace, tmp_path, methods=methods, train=dataclasses.replace(QUICK, epochs=first)).run()
    products = (
        "results.json",
        "results.md",
        "settings.json",
        "accuracy_vs_params.png",
        "runs/mmap/seed1.json",
    )
    before = {name: (tmp_path / name).read_bytes() for name in products}
    other = dataclasses.replace(QUICK, epochs=second)
    with pytest.raises(FileExistsError) as refused:
        _bench(workspace, tmp_path, methods=methods, train=other)
    message = str(refused.value)
    assert f"train.epochs: {first} in the folder, {second} in this run" in message
    assert "affinity_train" not in message and "methods" not in message  # only what differs is named
    assert "(--output)" in message and "(--overwrite;" in message
    assert {name: (tmp_path / name).read_bytes() for name in products} == before  # nothing was changed

    trained = _record_training(monkeypatch)
    results = _bench(workspace, tmp_path, True, methods=methods, train=other).run()
    assert trained == [("mmap", second, False)]  # its own run, from scratch; zero-shot has nothing to train
    assert results["methods"]["mmap"]["recipe"]["train"]["epochs"] == second
    assert json.loads((tmp_path / "settings.json").read_text())["train"]["epochs"] == second
    groups = json.loads((tmp_path / "grouping" / "groups.json").read_text())
    assert groups["settings"]["train"]["epochs"] == second  # grouped again, with this run's settings


def test_overwrite_reuses_exactly_the_runs_whose_own_settings_are_unchanged(workspace, tmp_path, monkeypatch):
    _bench(workspace, tmp_path, methods=["zeroshot", "coop_mt"]).run()
    more = ["zeroshot", "coop_mt", "vpt_mt"]
    with pytest.raises(
        FileExistsError, match=r'methods: \["zeroshot", "coop_mt"\] in the folder, \["zeroshot"'
    ):
        _bench(workspace, tmp_path, methods=more)
    trained = _record_training(monkeypatch)
    _bench(workspace, tmp_path, True, methods=more).run()
    assert trained == [("vpt_mt", 1, False)]
    _bench(workspace, tmp_path, methods=more).run()  # the same settings again: every run is reused
    assert trained == [("vpt_mt", 1, False)]
    _bench(
        workspace, tmp_path, True, methods=more, mmap=MmAPConfig(prompt_length=4, source_shape=(2, 8))
    ).run()
    assert trained == [("vpt_mt", 1, False)]  # the MmAP config is not a setting of these methods
    _bench(workspace, tmp_path, True, methods=more, shots=3).run()  # other splits: every run again
    assert [method for method, _, _ in trained[1:]] == ["coop_mt", "vpt_mt"]


def test_a_cut_run_resumes_under_its_own_settings_only(workspace, tmp_path, monkeypatch):
    def cut(model, datasets, config, **kwargs):
        train(model, datasets, dataclasses.replace(config, max_steps=1), **kwargs)  # writes a checkpoint
        raise RuntimeError("cut")

    for epochs in (1, 2):
        monkeypatch.setattr(bench_module, "train", cut)
        settings = {"methods": ["coop_mt"], "train": dataclasses.replace(QUICK, epochs=epochs)}
        with pytest.raises(RuntimeError, match="cut"):
            _bench(workspace, tmp_path, True, **settings).run()
        trained = _record_training(monkeypatch)
        _bench(workspace, tmp_path, **settings).run()
        assert trained == [("coop_mt", epochs, True)]  # the same settings: resumed
    monkeypatch.setattr(bench_module, "train", cut)
    with pytest.raises(RuntimeError, match="cut"):
        _bench(workspace, tmp_path, True, methods=["coop_mt"]).run()
    trained = _record_training(monkeypatch)
    _bench(workspace, tmp_path, True, methods=["coop_mt"], shots=3).run()
    assert trained == [("coop_mt", 1, False)]  # the cut run had other settings: not resumed


def test_training_set_accuracy_before_and_after_training_is_recorded(workspace, tmp_path):
    from peft_mmap.evaluate import evaluate
    from peft_mmap.multitask import MultiTaskMmAP

    bench = _bench(workspace, tmp_path, methods=["zeroshot", "mmap"], seeds=[1, 2])
    results = bench.run()
    assert "train_accuracy" not in results["methods"]["zeroshot"]  # nothing trained
    runs = {s: json.loads(bench.run_file("mmap", s).read_text())["train_accuracy"] for s in (1, 2)}
    mean = results["methods"]["mmap"]["train_accuracy"]
    for when in ("before", "after"):
        assert mean[when] == pytest.approx((runs[1][when] + runs[2][when]) / 2)
    train_sets = bench.seed_data(1).train
    torch.manual_seed(1)  # as the run built it: the untrained model
    options = bench.spec.recipe("mmap", 1)[1]
    untrained = bench.build("mmap", 1, bench.seed_data(1).splits, results["grouping"], options)
    assert evaluate(untrained, train_sets)[AVERAGE] == pytest.approx(runs[1]["before"], abs=1e-6)
    adapters = bench.run_file("mmap", 1).with_suffix("") / "adapters"
    trained = MultiTaskMmAP.from_pretrained(str(workspace / "model"), adapters)
    assert evaluate(trained, train_sets)[AVERAGE] == pytest.approx(runs[1]["after"], abs=1e-6)
    table = (tmp_path / "results.md").read_text()
    assert "Training-set accuracy, before → after training" in table
    row = f"| `mmap` | {mean['before']:.1f} | {mean['after']:.1f} | {mean['after'] - mean['before']:+.1f} |"
    assert row in table and "| `zeroshot` |" not in table.split("Training-set accuracy")[1]


def test_accuracy_vs_params_figure_has_one_point_per_trained_method(workspace, tmp_path):
    entry = {"average": 50.0, "std": {AVERAGE: 1.0}, "runs": [{}]}
    methods = {"zeroshot": {**entry, "trainable_params": 0}, "coop_mt": {**entry, "trainable_params": 512},
               "mmap": {**entry, "average": 48.0, "trainable_params": 1920}}  # fmt: skip
    data = bench_module.accuracy_vs_params(methods)
    assert data.points == [("coop_mt", 512, 50.0, 1.0), ("mmap", 1920, 48.0, 1.0)]
    assert data.references == [("zeroshot", 50.0)]
    path = bench_module.plot_accuracy_vs_params(methods, tmp_path / "figure.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_of_other_shot_counts_is_refused_before_any_run(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"shots": [1, 3], "methods": {}}))
    with pytest.raises(FileExistsError, match=r"shots: \[1, 3\] in the folder, \[1\] in this run"):
        bench_module.run_shot_sweep(tmp_path / "no-model", {}, spec(), tmp_path, shots=[1])


def test_bench_command_refuses_other_settings_until_overwrite(workspace, tmp_path, capsys):
    from peft_mmap.apps.cli import main

    argv = ["bench", "--model", str(workspace / "model"), "--data", str(workspace / "data"), "--shots", "2",
            "--device", "cpu", "--methods", "zeroshot", "--seeds", "1", "--output", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert "accuracy_vs_params.png" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--template", "a sketch of a {}."])
    assert exit_info.value.code == 2
    assert "template: " in capsys.readouterr().err
    assert main([*argv, "--template", "a sketch of a {}.", "--overwrite"]) == 0
    assert json.loads((tmp_path / "settings.json").read_text())["template"] == "a sketch of a {}."
