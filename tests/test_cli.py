"""The ``peft-mmap`` CLI end to end on a generated image-folder dataset and a tiny local CLIP."""

from __future__ import annotations

import json

import pytest
from conftest import WORKSPACE_TASKS as TASKS

from peft_mmap.cli import SUBCOMMANDS, build_parser, main
from peft_mmap.multitask import MANIFEST_NAME


def data_args(root) -> list[str]:
    return ["--data", str(root / "data"), "--shots", "2", "--seed", "1", "--split-file", str(root / "split.json"),
            "--device", "cpu"]  # fmt: skip


def common(root) -> list[str]:
    return [
        "--model",
        str(root / "model"),
        *data_args(root),
        "--prompt-length",
        "2",
        "--source-shape",
        "1",
        "8",
    ]


def test_group_train_eval_end_to_end(workspace, capsys):
    root = workspace
    quick = ["--epochs", "1", "--batch-size", "2", "--max-steps", "2"]
    assert (
        main(
            [
                "group",
                *common(root),
                *quick,
                "--output",
                str(root / "grouping"),
                "--num-groups",
                "2",
                "--snapshots",
                "2",
            ]
        )
        == 0
    )
    groups = json.loads((root / "grouping" / "groups.json").read_text())["groups"]
    assert sorted(t for g in groups for t in g) == sorted(TASKS) and len(groups) == 2
    affinity = json.loads((root / "grouping" / "affinity.json").read_text())
    assert affinity["task_names"] == list(TASKS) and len(affinity["matrix"]) == 3
    assert (root / "grouping" / "affinity.png").is_file() and (root / "split.json").is_file()

    run = root / "run"
    train_args = [
        "train",
        *common(root),
        *quick,
        "--groups",
        str(root / "grouping" / "groups.json"),
        "--output",
        str(run),
    ]
    assert main(train_args) == 0
    manifest = json.loads((run / "adapters" / MANIFEST_NAME).read_text())
    assert manifest["groups"] == groups and (run / "checkpoint" / "trainer_state.json").is_file()
    assert main([*train_args[:-2], "--output", str(run), "--resume"]) == 0  # already done: nothing to train

    assert main(["eval", *data_args(root), "--adapters", str(run), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "Average" in out and "art" in out
    results = json.loads((run / "adapters" / "results.json").read_text())
    entry = results["methods"]["mmap"]
    assert set(entry["tasks"]) == set(TASKS) and 0 <= entry["average"] <= 100
    assert entry["trainable_params"] > 0 and results["grouping"] == groups and results["seeds"] == [1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochs", "0"], "expected a positive integer, got '0'"),
        (["train", "--fraction", "1.5"], "expected a number strictly between 0 and 1, got '1.5'"),
        (["train", "--layout", "mnist"], "invalid choice: 'mnist'"),
        (["eval", "--batch-size", "x"], "expected a positive integer, got 'x'"),
    ],
)
def test_bad_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_library_errors_become_usage_errors(workspace, tmp_path, capsys):
    argv = ["train", *common(workspace), "--groups-inline", "art;nope", "--output", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "unknown tasks ['nope']" in capsys.readouterr().err


def test_every_option_is_documented():
    parser = build_parser()
    assert {"group", "train", "eval", "bench", "params"} <= {c.name for c in SUBCOMMANDS}
    subparsers = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_bench_subcommand_writes_tables(workspace, tmp_path, capsys):
    argv = ["bench", "--model", str(workspace / "model"), "--data", str(workspace / "data"), "--shots", "2",
            "--device", "cpu", "--methods", "zeroshot", "mmap_task_only", "--seeds", "1", "--epochs", "1",
            "--batch-size", "4", "--max-steps", "1", "--prompt-length", "2", "--source-shape", "1", "8",
            "--output", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"zeroshot", "mmap_task_only"}
    assert "Parameters" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:-2], "--methods", "nope", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
