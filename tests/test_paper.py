"""The paper's Tables 1 and 2 as data, and ``peft-mmap compare`` printing results beside them."""

from __future__ import annotations

import json

import pytest

from peft_mmap.apps.cli import main
from peft_mmap.apps.paper import (
    AVERAGE_ROW,
    comparison_markdown,
    load_paper_tables,
    paper_split,
)
from peft_mmap.apps.params import PAPER_PARAMETERS
from peft_mmap.baselines import METHODS

TABLES = load_paper_tables()
SPLITS = [(d, s) for d, table in TABLES["datasets"].items() for s in table["splits"]]


@pytest.mark.parametrize(("dataset", "split"), SPLITS)
def test_every_average_is_the_mean_of_its_tasks_but_the_marked_misprints(dataset, split):
    paper = paper_split(dataset, split)
    tasks = list(paper.rows.values())
    assert list(paper.accuracy) == TABLES["columns"]
    assert set(paper.std) == set(TABLES["columns"]) - {"ZeroShot"}  # zero-shot has no spread
    off = {}
    for column, row in paper.accuracy.items():
        assert list(row) == [*tasks, AVERAGE_ROW]
        assert list(paper.std.get(column, row)) == [*tasks, AVERAGE_ROW]
        mean = sum(row[t] for t in tasks) / len(tasks)
        # Each printed number is rounded to 0.1: the mean of four of them is within 0.1 of the printed mean.
        if abs(row[AVERAGE_ROW] - mean) > 0.1 + 1e-9:
            off[column, AVERAGE_ROW] = round(mean, 2)
    assert set(off) == set(paper.misprints)


def test_the_misprint_is_kept_as_printed():
    paper = paper_split("officehome", "20%")
    assert paper.accuracy["BitFit"][AVERAGE_ROW] == 85.5
    assert "81.3" in paper.misprints["BitFit", AVERAGE_ROW]


def test_the_columns_are_the_registry_methods_paper_columns_and_the_splits_the_papers_shots():
    assert set(TABLES["columns"]) == {m.paper_column for m in METHODS.values() if m.paper_column}
    shots = {(d, s): paper_split(d, s).shots for d, s in SPLITS}
    assert shots == {
        ("officehome", "10%"): 6,
        ("officehome", "20%"): 12,
        ("minidomainnet", "1%"): 3,
        ("minidomainnet", "2%"): 6,
    }
    printed = (
        "598.48 M 0.04 M 0.68 M 19.2 M 149.62 M 0.53 M 0.17 M 0.01 M 0.17 M 4.8 M 0.13 M"  # Table 1's row
    )
    assert (
        dict(zip(TABLES["columns"][1:], printed.replace(" M", "M").split(), strict=True)) == PAPER_PARAMETERS
    )


def test_a_split_is_found_by_name_shots_or_fraction_and_bad_ones_are_named():
    assert paper_split("officehome", shots=12).name == "20%"
    assert paper_split("minidomainnet", fraction=0.01).name == "1%"
    assert paper_split("minidomainnet", "2%", shots=3).name == "2%"  # the name wins
    with pytest.raises(ValueError, match=r"Unknown dataset 'domainnet'.*minidomainnet"):
        paper_split("domainnet", "1%")
    with pytest.raises(ValueError, match=r"Unknown split '5%' of Table 2; its splits: 1% \(3 shots"):
        paper_split("minidomainnet", "5%")
    with pytest.raises(ValueError, match=r"results at 1 shots match no split of Table 1"):
        paper_split("officehome", shots=1)
    with pytest.raises(ValueError, match="no recorded shots or fraction"):
        paper_split("officehome")


def results(tasks: dict[str, float], **methods: tuple[float, int]) -> dict:
    """A results.json with ``method=(offset, params)``: each task's accuracy is ``tasks[t] + offset``."""
    entries = {}
    for name, (offset, params) in methods.items():
        accs = {t: a + offset for t, a in tasks.items()}
        entries[name] = {"tasks": accs, "average": sum(accs.values()) / len(accs), "trainable_params": params}
    return {"methods": entries, "shots": 12, "fraction": None}


def table_row(table: str, column: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {column} "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_comparison_puts_our_numbers_beside_the_papers_with_the_footnote():
    tasks = {"art": 80.0, "clipart": 70.0, "product": 90.0, "real_world": 88.0}
    ours = results(tasks, mmap=(1.0, 130_000), bitfit=(0.0, 170_000), mmap_task_only=(0.5, 80_000))
    table = comparison_markdown(ours, paper_split("officehome", shots=12))
    assert "Table 1 (20%, 12 shots per class in the paper" in table
    assert table_row(table, "Ours") == [
        "Ours (`mmap`)", "81.0 / 88.2", "71.0 / 77.1", "91.0 / 93.5", "89.0 / 92.4", "83.0 / 87.8", "-4.8",
        "0.13M / 0.13M",
    ]  # fmt: skip
    assert table_row(table, "BitFit")[5] == "82.0 / 85.5 (1)"
    assert (
        "(1) as printed in Table 1; its four task accuracies (81.7, 69.6, 87.2, 86.7) average 81.3." in table
    )
    assert table_row(table, "CoOp-MT") == [
        "CoOp-MT", "- / 86.0", "- / 73.9", "- / 92.9", "- / 92.0", "- / 86.3", "-", "- / 0.01M"
    ]  # fmt: skip
    assert "Not in the paper's table: `mmap_task_only`." in table
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == [
        c if c not in ("BitFit", "Ours") else {"BitFit": "BitFit (`bitfit`)", "Ours": "Ours (`mmap`)"}[c]
        for c in TABLES["columns"]
    ]
    other = results({"painting": 80.0, "sketch": 70.0}, mmap=(0.0, 1))
    with pytest.raises(ValueError, match="none of Table 1's"):
        comparison_markdown(other, paper_split("officehome", "10%"))


def test_compare_command_prints_and_writes_the_table_and_refuses_a_bad_split(tmp_path, capsys):
    tasks = {"clipart": 80.0, "painting": 80.0, "real": 90.0, "sketch": 75.0}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**results(tasks, zeroshot=(0.0, 0)), "shots": 3}))
    assert (
        main(
            [
                "compare",
                "--results",
                str(path),
                "--dataset",
                "minidomainnet",
                "--output",
                str(tmp_path / "c.md"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Table 2 (1%" in printed and "| ZeroShot (`zeroshot`) | 80.0 / 82.6 |" in printed
    assert (tmp_path / "c.md").read_text() == printed
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--results", str(path), "--dataset", "minidomainnet", "--split", "10%"])
    assert exit_info.value.code == 2
    assert "Unknown split '10%' of Table 2" in capsys.readouterr().err
