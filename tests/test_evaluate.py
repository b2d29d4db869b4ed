"""Evaluation: per-task accuracy, mean ± std over seeds, tables and the results JSON."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import colour_dataset, make_model

from peft_mmap.evaluate import (
    evaluate,
    method_result,
    results_table_markdown,
    results_table_text,
    summarize,
    write_results_json,
)


def test_accuracy_matches_argmax_of_the_logits(tokenizer):
    model = make_model(tokenizer).train()
    datasets = {"art": colour_dataset(7, 0), "clipart": colour_dataset(5, 1)}
    accuracies = evaluate(model, datasets, batch_size=3)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        for task, dataset in datasets.items():
            pixels, labels = dataset.tensors
            expected = 100.0 * (model(pixels, task).argmax(-1) == labels).float().mean().item()
            assert accuracies[task] == pytest.approx(expected)
    assert accuracies["average"] == pytest.approx((accuracies["art"] + accuracies["clipart"]) / 2)
    with pytest.raises(KeyError, match="Unknown task 'sketch'"):
        evaluate(model, {"sketch": colour_dataset(2, 0)})
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        evaluate(model, datasets, batch_size=0)


RUNS = [{"art": 80.0, "clipart": 70.0, "average": 75.0}, {"art": 90.0, "clipart": 70.0, "average": 80.0}]


def test_summarize_and_tables():
    stats = summarize(RUNS)
    assert stats == {"art": (85.0, 5.0), "clipart": (70.0, 0.0), "average": (77.5, 2.5)}
    with pytest.raises(ValueError, match="Run 1 reports"):
        summarize([RUNS[0], {"art": 1.0}])
    results = {"CoOp": stats, "Ours": {"art": 88.0, "clipart": 71.0, "average": 79.5}}
    markdown = results_table_markdown(results, ["art", "clipart"])
    lines = markdown.splitlines()
    assert lines[0] == "| Task | CoOp | Ours |"
    assert lines[2] == "| art | 85.0 ± 5.0 | 88.0 |"  # a single run has no spread to show
    assert lines[-1] == "| Average | 77.5 ± 2.5 | 79.5 |"
    text = results_table_text({"CoOp": stats, "Ours": {"art": 88.0}}, ["art", "clipart"])
    lines = text.splitlines()
    assert lines[2].split() == ["art", "85.0", "±", "5.0", "88.0"]
    assert lines[3].endswith(" -") and lines[-1].startswith("Average")


def test_results_json_schema(tmp_path):
    entry = method_result(RUNS, trainable_params=1234)
    path = write_results_json(
        tmp_path / "r.json", methods={"mmap": entry}, grouping=[["art", "clipart"]], seeds=[1, 2]
    )
    data = json.loads(path.read_text())
    assert data["grouping"] == [["art", "clipart"]] and data["seeds"] == [1, 2]
    mmap = data["methods"]["mmap"]
    assert mmap["tasks"] == {"art": 85.0, "clipart": 70.0} and mmap["average"] == 77.5
    assert mmap["trainable_params"] == 1234 and mmap["std"]["art"] == 5.0
    with pytest.raises(ValueError, match="lacks \\['trainable_params'\\]"):
        write_results_json(tmp_path / "bad.json", methods={"x": {"tasks": {}, "average": 1.0}})
    with pytest.raises(ValueError, match="non-finite"):
        write_results_json(tmp_path / "bad.json", methods={"x": {**entry, "average": float("nan")}})
