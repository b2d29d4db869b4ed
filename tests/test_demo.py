"""`peft-mmap demo --quick` end to end: the shipped tiny CLIP on the generated benchmark, as in the README."""

from __future__ import annotations

import json

import pytest

from peft_mmap.apps.cli import main
from peft_mmap.apps.demo import QUICK_METHODS


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(output), "--data-dir", str(tmp_path / "data")]) == 0
    results = json.loads((output / "results.json").read_text())
    assert set(results["methods"]) == set(QUICK_METHODS)
    assert results["seeds"] == [1]
    tasks = {"clipart", "painting", "photo", "sketch"}
    for name, entry in results["methods"].items():
        assert set(entry["tasks"]) == tasks, name
        assert 0 <= entry["average"] <= 100
    assert results["methods"]["zeroshot"]["trainable_params"] == 0
    assert results["methods"]["mmap"]["trainable_params"] > 0
    assert sorted(t for g in results["grouping"] for t in g) == sorted(tasks)
    switching = results["task_switching"]
    assert {row["task"] for row in switching} == tasks
    assert (output / "runs" / "mmap" / "seed1" / "adapters" / "mmap_manifest.json").is_file()
    out = capsys.readouterr().out
    assert "Average" in out and "task switching" in out
    verdict = results["verdict"]  # MmAP against zero-shot and the best baseline, mean ± std over seeds
    assert verdict["mmap"][0] == results["methods"]["mmap"]["average"]
    assert verdict["best_baseline"]["method"] in ("coop_mt", "vpt_mt")
    assert verdict["line"] in out and "verdict: MmAP" in out
    assert f"MmAP adapters: {output / 'runs' / 'mmap' / 'seed1' / 'adapters'}" in out
