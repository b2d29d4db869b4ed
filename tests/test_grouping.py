"""Tests for peft_mmap.grouping: exactness against brute force, validation, properties, heuristic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_mmap.grouping import EXACT_MAX_TASKS, group_tasks, grouping_score


def _names(n: int) -> list[str]:
    return [f"task{i}" for i in range(n)]


def _random_symmetric(n: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return (a + a.T) / 2


def _set_partitions(items: list[str]):
    """All set partitions of ``items`` (reference enumeration, independent of the library's)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _set_partitions(rest):
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]
        yield [[first], *partition]


def _brute_force_best(sim: np.ndarray, names: list[str], num_groups: int | None) -> float:
    return max(
        grouping_score(sim, p, names)
        for p in _set_partitions(names)
        if num_groups is None or len(p) == num_groups
    )


def _assert_canonical_partition(groups: list[list[str]], names: list[str]) -> None:
    assert all(groups), "empty group"
    flat = [t for g in groups for t in g]
    assert sorted(flat) == sorted(names) and len(flat) == len(names)
    position = {name: i for i, name in enumerate(names)}
    for g in groups:
        assert [position[t] for t in g] == sorted(position[t] for t in g)
    firsts = [position[g[0]] for g in groups]
    assert firsts == sorted(firsts)


def test_set_partitions_reference_counts_bell_numbers():
    assert [sum(1 for _ in _set_partitions(_names(n))) for n in range(1, 7)] == [1, 2, 5, 15, 52, 203]


@pytest.mark.parametrize("n", range(1, 8))
def test_matches_brute_force_any_number_of_groups(n):
    names = _names(n)
    for seed in range(3):
        sim = _random_symmetric(n, seed + 10 * n)
        groups = group_tasks(sim, names)
        _assert_canonical_partition(groups, names)
        assert grouping_score(sim, groups, names) == pytest.approx(_brute_force_best(sim, names, None))


@pytest.mark.parametrize("n", range(1, 8))
def test_matches_brute_force_fixed_number_of_groups(n):
    names = _names(n)
    sim = _random_symmetric(n, 100 + n)
    for k in range(1, n + 1):
        groups = group_tasks(sim, names, num_groups=k)
        _assert_canonical_partition(groups, names)
        assert len(groups) == k
        assert grouping_score(sim, groups, names) == pytest.approx(_brute_force_best(sim, names, k))


def test_obvious_two_clusters():
    names = ["art", "clipart", "product", "real_world"]
    sim = [[0, 1, -1, -1], [1, 0, -1, -1], [-1, -1, 0, 2], [-1, -1, 2, 0]]
    assert group_tasks(sim, names) == [["art", "clipart"], ["product", "real_world"]]
    assert group_tasks(sim, names, num_groups=1) == [names]
    assert group_tasks(sim, names, num_groups=4) == [[n] for n in names]


def test_output_ordered_by_task_names_order():
    names = ["d", "c", "b", "a"]
    sim = [[0, -1, 5, -1], [-1, 0, -1, 5], [5, -1, 0, -1], [-1, 5, -1, 0]]
    assert group_tasks(sim, names) == [["d", "b"], ["c", "a"]]


def test_ties_are_deterministic_and_prefer_earlier_groups():
    names = _names(4)
    zeros = np.zeros((4, 4))
    assert group_tasks(zeros, names) == [names]
    assert group_tasks(zeros, names, num_groups=2) == [names[:3], names[3:]]
    assert group_tasks(zeros, names, num_groups=2) == group_tasks(zeros.tolist(), names, num_groups=2)


def test_accepts_lists_numpy_and_torch_and_ignores_diagonal():
    names = _names(5)
    sim = _random_symmetric(5, 3)
    expected = group_tasks(sim, names)
    assert group_tasks(sim.tolist(), names) == expected
    assert group_tasks(torch.tensor(sim, dtype=torch.float32), names) == expected
    assert group_tasks(sim + np.diag(np.arange(5) * 100.0), names) == expected


def test_exact_ten_tasks_runs():
    names = _names(EXACT_MAX_TASKS)
    sim = _random_symmetric(EXACT_MAX_TASKS, 7)
    for k in (None, 2, 5, 9):
        groups = group_tasks(sim, names, num_groups=k)
        _assert_canonical_partition(groups, names)
        assert k is None or len(groups) == k
    positive = np.abs(sim)  # the weakest pruning: every merge looks promising
    assert len(group_tasks(positive, names, num_groups=5)) == 5


@pytest.mark.parametrize(
    ("sim", "match"),
    [
        ([[0, float("nan")], [float("nan"), 0]], r"finite.*\[0\]\[1\]"),
        ([[0, 1], [1, float("inf")]], r"finite.*\[1\]\[1\]"),
        ([[0, 1], [2, 0]], r"symmetric.*S\[0\]\[1\] = 1.0.*S\[1\]\[0\] = 2.0"),
        ([[0, 1, 2], [1, 0, 3]], r"N x N.*\(2, 3\)"),
        ([1, 2], r"N x N"),
        ([[0, 1], [1]], r"N x N"),
        ([[0, "x"], ["x", 0]], r"N x N"),
    ],
)
def test_invalid_similarity(sim, match):
    with pytest.raises(ValueError, match=match):
        group_tasks(sim, ["a", "b"])


def test_invalid_names_and_num_groups():
    sim = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"unique.*'a'"):
        group_tasks(sim, ["a", "a", "b"])
    with pytest.raises(ValueError, match="3 x 3 but 2 task names"):
        group_tasks(sim, ["a", "b"])
    with pytest.raises(ValueError, match="at least one task"):
        group_tasks(np.zeros((0, 0)), [])
    for bad in (0, 4, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_groups"):
            group_tasks(sim, ["a", "b", "c"], num_groups=bad)


def test_grouping_score_and_its_validation():
    names = ["a", "b", "c"]
    sim = [[9, 1, 2], [1, 9, 3], [2, 3, 9]]
    assert grouping_score(sim, [["a", "b", "c"]], names) == 6
    assert grouping_score(sim, [["a"], ["b", "c"]], names) == 3
    assert grouping_score(sim, [["a"], ["b"], ["c"]], names) == 0
    with pytest.raises(ValueError, match="missing"):
        grouping_score(sim, [["a", "b"]], names)
    with pytest.raises(ValueError, match="more than one"):
        grouping_score(sim, [["a", "b"], ["b", "c"]], names)
    with pytest.raises(ValueError, match="unknown task 'z'"):
        grouping_score(sim, [["a", "b", "z"], ["c"]], names)
    with pytest.raises(ValueError, match="non-empty"):
        grouping_score(sim, [["a", "b", "c"], []], names)


@st.composite
def _symmetric_matrices(draw, max_n: int = EXACT_MAX_TASKS):
    n = draw(st.integers(1, max_n))
    values = st.floats(-10, 10, allow_nan=False, allow_infinity=False)
    upper = draw(st.lists(values, min_size=n * n, max_size=n * n))
    a = np.array(upper).reshape(n, n)
    return np.triu(a) + np.triu(a, 1).T


@settings(max_examples=60, deadline=None)
@given(_symmetric_matrices(max_n=8), st.data())
def test_property_partition_and_optimality_bounds(sim, data):
    n = sim.shape[0]
    names = _names(n)
    num_groups = data.draw(st.one_of(st.none(), st.integers(1, n)))
    groups = group_tasks(sim, names, num_groups=num_groups)
    _assert_canonical_partition(groups, names)
    score = grouping_score(sim, groups, names)
    tol = 1e-9 * max(1.0, float(np.abs(sim).sum()))
    if num_groups is None:
        assert len(groups) <= n
        assert score >= grouping_score(sim, [names], names) - tol
        assert score >= grouping_score(sim, [[t] for t in names], names) - tol
    else:
        assert len(groups) == num_groups
        if num_groups == 1:
            assert groups == [names]
        if num_groups == n:
            assert groups == [[t] for t in names]
    assert group_tasks(sim, names, num_groups=num_groups) == groups
    if n <= 6:
        assert score >= _brute_force_best(sim, names, num_groups) - tol


@pytest.mark.parametrize("n", [EXACT_MAX_TASKS + 1, 16, 30])
def test_heuristic_beyond_exact_limit(n):
    names = _names(n)
    sim = _random_symmetric(n, n)
    singletons = [[t] for t in names]
    for k in (None, 1, 3, n):
        groups = group_tasks(sim, names, num_groups=k)
        _assert_canonical_partition(groups, names)
        assert k is None or len(groups) == k
        assert groups == group_tasks(sim, names, num_groups=k)  # deterministic
    best = grouping_score(sim, group_tasks(sim, names), names)
    assert best >= grouping_score(sim, singletons, names)
    assert best >= grouping_score(sim, [names], names) - 1e-9


def test_heuristic_recovers_planted_clusters():
    n = 15
    names = _names(n)
    clusters = [list(range(0, 5)), list(range(5, 9)), list(range(9, 15))]
    sim = -np.ones((n, n))
    for c in clusters:
        sim[np.ix_(c, c)] = 1.0
    sim += 0.05 * _random_symmetric(n, 1)
    expected = [[names[i] for i in c] for c in clusters]
    assert group_tasks(sim, names) == expected
    assert group_tasks(sim, names, num_groups=3) == expected


def test_heuristic_close_to_exact_on_ten_tasks():
    """The heuristic's building blocks, run below the exact limit, stay near the optimum."""
    from peft_mmap.grouping import _heuristic, _labels_score

    for seed in range(5):
        sim = _random_symmetric(EXACT_MAX_TASKS, 50 + seed)
        names = _names(EXACT_MAX_TASKS)
        exact = grouping_score(sim, group_tasks(sim, names), names)
        approx = _labels_score(sim.tolist(), _heuristic(sim, None))
        assert approx <= exact + 1e-9
        assert approx >= 0.9 * exact or math.isclose(approx, exact)
