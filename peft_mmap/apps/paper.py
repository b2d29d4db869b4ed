"""The paper's Tables 1 and 2, read from one data file, and a results file printed beside them.

`PAPER_TABLES_PATH` (``peft_mmap/assets/paper_tables.json``) holds every number of the two tables as printed:
per dataset (``officehome``: Table 1, ``minidomainnet``: Table 2) and split (10 %/20 %, 1 %/2 %), each column's
accuracy per task and on average, the std over 3 seeds, the parameter row, and the misprints (an entry kept as
printed, with what its tasks give). Our methods meet the paper's columns through the registry
(`peft_mmap.baselines.MethodSpec.paper_column`). `comparison_markdown` prints a ``results.json`` (of
``peft-mmap bench`` or ``eval``) beside one split of a table; ``peft-mmap compare`` is its command.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..files import read_json

PAPER_TABLES_PATH = Path(__file__).resolve().parents[1] / "assets" / "paper_tables.json"
AVERAGE_ROW = "Average"


@dataclass(frozen=True)
class PaperSplit:
    """One split of one of the paper's tables.

    Attributes:
        dataset: ``officehome`` or ``minidomainnet``.
        name: the split as the paper names it (``10%``, ``20%``, ``1%``, ``2%``).
        table: the table's number.
        rows: our task name -> the paper's row label (``real_world`` -> ``Real``).
        shots / fraction: training images per class, and the share of the data the paper says they are.
        accuracy: column -> row (tasks and ``Average``) -> accuracy (%).
        std: the same, for the columns with a std (all but zero-shot).
        parameters_m: column -> the paper's parameter count in millions (``None``: not given).
        misprints: ``(column, row)`` -> the note of an entry kept as printed.
    """

    dataset: str
    name: str
    table: int
    rows: dict[str, str]
    shots: int
    fraction: float
    accuracy: dict[str, dict[str, float]]
    std: dict[str, dict[str, float]]
    parameters_m: dict[str, float | None]
    misprints: dict[tuple[str, str], str]


def load_paper_tables(path: str | os.PathLike = PAPER_TABLES_PATH) -> dict:
    """The data file as JSON (see the module docstring)."""
    return read_json(path, "paper tables")


def paper_split(
    dataset: str,
    split: str | None = None,
    shots: int | None = None,
    fraction: float | None = None,
    path: str | os.PathLike = PAPER_TABLES_PATH,
) -> PaperSplit:
    """The split ``split`` of ``dataset``'s table, or else the one the paper gives ``shots`` or ``fraction`` for.

    Raises:
        ValueError: an unknown dataset or split, or ``shots``/``fraction`` that match no split (the message
            lists the splits with their shots and fractions).
    """
    tables = load_paper_tables(path)
    datasets = tables["datasets"]
    if dataset not in datasets:
        raise ValueError(f"Unknown dataset {dataset!r}; the paper's tables are of {sorted(datasets)}.")
    table = datasets[dataset]
    splits = table["splits"]
    known = ", ".join(f"{n} ({s['shots']} shots or fraction {s['fraction']:g})" for n, s in splits.items())
    if split is None:
        split = next((n for n, s in splits.items() if shots == s["shots"] or fraction == s["fraction"]), None)
        if split is None:
            amount = (
                f"{shots} shots" if shots is not None
                else f"fraction {fraction}" if fraction is not None
                else "no recorded shots or fraction"
            )  # fmt: skip
            raise ValueError(
                f"results at {amount} match no split of Table {table['table']} ({known}); name the split."
            )
    if split not in splits:
        raise ValueError(f"Unknown split {split!r} of Table {table['table']}; its splits: {known}.")
    entry = splits[split]
    misprints = {
        (m["column"], m["row"]): m["note"]
        for m in tables["misprints"]
        if m["dataset"] == dataset and m["split"] == split
    }
    return PaperSplit(
        dataset, split, table["table"], dict(table["rows"]), entry["shots"], entry["fraction"],
        entry["accuracy"], entry["std"], tables["parameters_m"], misprints,
    )  # fmt: skip


def paper_parameters(path: str | os.PathLike = PAPER_TABLES_PATH) -> dict[str, str]:
    """The paper's parameter row as printed, by column (``{"Full FT": "598.48M", ...}``; zero-shot has none)."""
    counts = load_paper_tables(path)["parameters_m"]
    return {column: f"{count:g}M" for column, count in counts.items() if count is not None}


def _millions(count: float) -> str:
    return f"{count / 1e6:.2f}M"


def comparison_markdown(results: Mapping, paper: PaperSplit) -> str:
    """A Markdown table of ``results`` (a ``results.json``: ``{"methods": {name: {"tasks", "average",
    "trainable_params"}}}``) beside ``paper``: one row per paper column, in the paper's order, each cell
    ``ours / paper`` (``-`` where we have no result), the average's difference, and the parameters. Methods
    of ``results`` that are not in the paper are named below the table.

    Raises:
        ValueError: ``results`` has none of the table's tasks (results of another dataset).
    """
    from ..baselines import METHODS

    methods = results["methods"]
    found = {task for entry in methods.values() for task in entry["tasks"]}
    if not found & set(paper.rows):
        raise ValueError(
            f"the results' tasks {sorted(found)} are none of Table {paper.table}'s {sorted(paper.rows)}: "
            "results of another dataset?"
        )
    ours = {METHODS[n].paper_column: n for n in methods if n in METHODS and METHODS[n].paper_column}
    marks: list[str] = []

    def paper_cell(column: str, row: str) -> str:
        value = f"{paper.accuracy[column][row]:.1f}"
        if (column, row) in paper.misprints:
            marks.append(paper.misprints[column, row])
            value += f" ({len(marks)})"
        return value

    def our_cell(name: str | None, task: str | None) -> str:
        if name is None:
            return "-"
        entry = methods[name]
        value = entry["average"] if task is None else entry["tasks"].get(task)
        return "-" if value is None else f"{value:.1f}"

    tasks = list(paper.rows)
    header = ["Method", *(paper.rows[t] for t in tasks), AVERAGE_ROW, "Δ average", "Parameters"]
    lines = [
        f"Ours / paper, Table {paper.table} ({paper.name}, {paper.shots} shots per class in the paper; "
        "accuracy %):",
        "",
        "| " + " | ".join(header) + " |",
        "|:---|" + "---:|" * (len(header) - 1),
    ]
    for column in paper.accuracy:
        name = ours.get(column)
        cells = [f"{our_cell(name, t)} / {paper_cell(column, paper.rows[t])}" for t in tasks]
        average = paper_cell(column, AVERAGE_ROW)
        delta = (
            "-" if name is None else f"{methods[name]['average'] - paper.accuracy[column][AVERAGE_ROW]:+.1f}"
        )
        count = paper.parameters_m.get(column)
        params = "-" if name is None else _millions(methods[name]["trainable_params"])
        method = f"{column} (`{name}`)" if name else column
        lines.append(
            f"| {method} | " + " | ".join(cells)
            + f" | {our_cell(name, None)} / {average} | {delta} | {params} / {'-' if count is None else f'{count:g}M'} |"
        )  # fmt: skip
    lines += ["", *(f"({i}) {note}." for i, note in enumerate(marks, start=1))]
    others = [name for name in methods if name not in ours.values()]
    if others:
        lines.append(f"Not in the paper's table: {', '.join(f'`{n}`' for n in others)}.")
    return "\n".join(lines).rstrip() + "\n"
