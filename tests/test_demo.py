"""`peft-mmap demo` end to end: the shipped tiny CLIP on the generated benchmark, as in the README."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from peft_mmap.apps.cli import main
from peft_mmap.apps.demo import QUICK_METHODS, TINY_CLIP_VERDICT_CONTEXT, demo_benchmark, verdict
from peft_mmap.evaluate import AVERAGE

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The demo's synthetic benchmark, generated once for this module's demos."""
    return demo_benchmark(tmp_path_factory.mktemp("demo-data") / "benchmark")


def printed_value(out: str, prefix: str) -> str:
    """The rest of the printed line that starts with ``prefix``."""
    return next(line for line in out.splitlines() if line.startswith(prefix)).removeprefix(prefix)


def test_verdict_puts_the_result_in_context_on_the_tiny_clip_only():
    def entry(average: float) -> dict:
        return {"average": average, "std": {AVERAGE: 0.0}, "runs": [{}]}

    methods = {"zeroshot": entry(51.8), "coop_mt": entry(51.9), "mmap": entry(47.0)}
    tiny = verdict(methods, tiny_clip=True)
    assert tiny["line"] == "verdict: MmAP 47.0 vs zero-shot 51.8 (-4.8); vs best baseline coop_mt 51.9 (-4.9)"
    assert tiny["context"] == (
        "MmAP is 4.8 points below zero-shot here: on the shipped 1.7 M-parameter tiny CLIP no prompt method "
        f"beats zero-shot by more than noise, while full fine-tuning does gain (see {TINY_CLIP_VERDICT_CONTEXT})."
    )
    assert verdict({**methods, "mmap": entry(53.0)}, tiny_clip=True)["context"].startswith(
        "MmAP is 1.2 points above zero-shot here: "
    )
    assert "context" not in verdict(methods)  # another model: no claim about it


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(demo_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--data-dir", str(demo_data)]) == 0
    output = Path("peft-mmap-demo-quick")  # the quick demo's own default folder
    results = json.loads((output / "results.json").read_text())
    assert set(results["methods"]) == set(QUICK_METHODS)
    assert results["seeds"] == [1]
    tasks = {"clipart", "painting", "photo", "sketch"}
    for name, entry in results["methods"].items():
        assert set(entry["tasks"]) == tasks, name
        assert 0 <= entry["average"] <= 100
        if name != "zeroshot":  # every trained method: training-set accuracy before and after training
            assert all(0 <= entry["train_accuracy"][when] <= 100 for when in ("before", "after")), name
    assert "train_accuracy" not in results["methods"]["zeroshot"]
    assert results["methods"]["zeroshot"]["trainable_params"] == 0
    assert results["methods"]["mmap"]["trainable_params"] > 0
    assert sorted(t for g in results["grouping"] for t in g) == sorted(tasks)
    switching = results["task_switching"]
    assert {row["task"] for row in switching} == tasks
    assert (output / "runs" / "mmap" / "seed1" / "adapters" / "mmap_manifest.json").is_file()
    out = capsys.readouterr().out
    assert "Average" in out and "task switching" in out and "Training-set accuracy" in out
    verdict = results["verdict"]  # MmAP against zero-shot and the best baseline, mean ± std over seeds
    assert verdict["mmap"][0] == results["methods"]["mmap"]["average"]
    assert verdict["best_baseline"]["method"] in ("coop_mt", "vpt_mt")
    assert verdict["line"] in out and "verdict: MmAP" in out
    assert f"\n  {verdict['context']}\n" in out and TINY_CLIP_VERDICT_CONTEXT in verdict["context"]
    assert f"MmAP adapters (seed 1): {output / 'runs' / 'mmap' / 'seed1' / 'adapters'}" in out


@pytest.mark.slow
def test_quick_then_full_demo_in_one_folder_never_mix_and_the_eval_command_reproduces(
    demo_data, tmp_path, capsys
):
    """The issue's sequence: a quick demo, then a full one with the same --output."""
    out = tmp_path / "D"
    quick = [
        "demo",
        "--quick",
        "--output",
        str(out),
        "--methods",
        "zeroshot",
        "mmap",
        "--data-dir",
        str(demo_data),
    ]
    assert main(quick) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["mmap"]["recipe"]["train"]["epochs"] == 2
    assert printed_value(printed, "split (seed 1): ") == str(out / "splits" / "seed1.json")

    figures = printed_value(printed, "figures: ")  # both figures exist and their paths are printed
    for path in (out / "accuracy_vs_params.png", out / "grouping" / "affinity.png"):
        assert str(path) in figures and path.read_bytes()[:8] == PNG

    command = shlex.split(printed_value(printed, "evaluate them again: "))  # run exactly as printed
    assert command[:2] == ["peft-mmap", "eval"] and str(out / "splits" / "seed1.json") in command
    assert main(command[1:]) == 0
    evaluated = json.loads(Path(printed_value(capsys.readouterr().out, "wrote ")).read_text())
    seed1 = results["methods"]["mmap"]["runs"][0][AVERAGE]
    assert evaluated["methods"]["mmap"]["average"] == pytest.approx(seed1, abs=0.1)  # under 1 of 576 images

    kept = {name: (out / name).read_bytes() for name in ("results.json", "results.md", "settings.json")}
    full = [
        "demo",
        "--output",
        str(out),
        "--seeds",
        "1",
        "--methods",
        "zeroshot",
        "mmap",
        "--data-dir",
        str(demo_data),
    ]
    assert main(full) == 0  # another demo in the same folder: its own subfolder, its own 5-epoch runs
    printed = capsys.readouterr().out
    assert "[mmap seed 1] training" in printed and "reusing" not in printed
    own = Path(printed_value(printed, "results: ").split(",")[0]).parent
    assert own.parent == out and own.name.startswith("settings-")
    assert f"{out} holds a demo of other settings" in printed
    results = json.loads((own / "results.json").read_text())
    assert results["methods"]["mmap"]["recipe"]["train"]["epochs"] == 5
    assert json.loads((own / "runs" / "mmap" / "seed1.json").read_text())["recipe"]["train"]["epochs"] == 5
    assert {name: (out / name).read_bytes() for name in kept} == kept  # the quick demo's results stay

    assert main(full) == 0  # the same demo again: the same subfolder, every run reused
    printed = capsys.readouterr().out
    assert "[mmap seed 1] training" not in printed and "finished before with the same settings" in printed
    assert printed_value(printed, "results: ").startswith(str(own / "results.json"))
