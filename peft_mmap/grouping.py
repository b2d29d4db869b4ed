"""Partition tasks into groups that maximise the total within-group similarity.

Given a symmetric task-similarity matrix ``S`` (e.g. the averaged gradient dot products of the paper's
Eq. 8), the score of a partition is the sum of ``S[i][j]`` over all pairs ``i < j`` that share a group.
:func:`group_tasks` returns the best partition:

* up to :data:`EXACT_MAX_TASKS` tasks the search is exact (depth-first enumeration of set partitions as
  restricted-growth strings, with an incremental score and a branch-and-bound cut);
* beyond that a deterministic heuristic is used: greedy agglomerative merging of the pair of groups with
  the largest gain, followed by a single-task-move local search (see :func:`group_tasks`).

In the exact search, ties (scores within ``1e-9`` relative) go to the partition found first in the
enumeration order, in which a task tries the existing groups before opening a new one: the tied partition
whose group-label sequence (tasks in ``task_names`` order, groups numbered by first appearance) is
lexicographically smallest wins, e.g. an all-zero matrix gives a single group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

EXACT_MAX_TASKS = 10
"""Largest number of tasks for which :func:`group_tasks` searches exhaustively."""

_SYMMETRY_RTOL = 1e-5
_SYMMETRY_ATOL = 1e-8
_TIE_RTOL = 1e-9


def _as_matrix(similarity: Any) -> np.ndarray:
    """Convert a nested list / numpy array / torch tensor to a finite float64 square matrix."""
    if hasattr(similarity, "detach"):  # torch.Tensor, without importing torch here
        similarity = similarity.detach().cpu().double().numpy()
    try:
        matrix = np.asarray(similarity, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"similarity must be an N x N matrix of numbers: {err}") from err
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"similarity must be an N x N matrix, got shape {tuple(matrix.shape)}")
    bad = np.argwhere(~np.isfinite(matrix))
    if bad.size:
        i, j = (int(v) for v in bad[0])
        raise ValueError(f"similarity must be finite, found {matrix[i, j]} at position [{i}][{j}]")
    asym = np.argwhere(~np.isclose(matrix, matrix.T, rtol=_SYMMETRY_RTOL, atol=_SYMMETRY_ATOL))
    if asym.size:
        i, j = (int(v) for v in asym[0])
        raise ValueError(
            f"similarity must be symmetric: S[{i}][{j}] = {float(matrix[i, j])} "
            f"but S[{j}][{i}] = {float(matrix[j, i])}"
        )
    return (matrix + matrix.T) / 2.0


def _validate(similarity: Any, task_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Validate the matrix and the task names together; return the symmetrised matrix and the names."""
    matrix = _as_matrix(similarity)
    names = list(task_names)
    if not names:
        raise ValueError("task_names must name at least one task")
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"task names must be strings, got {name!r}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"task_names must be unique, duplicated: {dupes}")
    if matrix.shape[0] != len(names):
        raise ValueError(
            f"similarity is {matrix.shape[0]} x {matrix.shape[1]} but {len(names)} task names were given"
        )
    return matrix, names


def _labels_score(sim: list[list[float]], labels: Sequence[int]) -> float:
    """Total within-group similarity of a partition given as one group label per task."""
    n = len(labels)
    return math.fsum(sim[i][j] for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j])


def _better(score: float, best: float) -> bool:
    """Whether ``score`` beats ``best`` by more than the tie tolerance."""
    return score > best + _TIE_RTOL * max(1.0, abs(best))


def _exact(sim: list[list[float]], num_groups: int | None) -> list[int]:
    """Exhaustive branch-and-bound search over restricted-growth strings; returns group labels."""
    n = len(sim)
    # Upper bound on what tasks d..n-1 can still add: every pair (j < i) with i >= d at most max(0, S).
    optimistic = [sum(max(0.0, sim[i][j]) for j in range(i)) for i in range(n)]
    remaining_bound = [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        remaining_bound[i] = remaining_bound[i + 1] + optimistic[i]
    max_groups = n if num_groups is None else num_groups
    min_groups = 1 if num_groups is None else num_groups

    labels = [0] * n
    members: list[list[int]] = []
    best_labels: list[int] = []
    best_score = -math.inf

    def search(depth: int, score: float) -> None:
        nonlocal best_labels, best_score
        if depth == n:
            if len(members) >= min_groups and (not best_labels or _better(score, best_score)):
                best_labels, best_score = labels.copy(), score
            return
        if best_labels and not _better(score + remaining_bound[depth], best_score):
            return
        row = sim[depth]
        tasks_left = n - depth
        # Join an existing group (only if the remaining tasks can still open the groups still needed).
        if len(members) + tasks_left - 1 >= min_groups:
            for group, group_members in enumerate(members):
                labels[depth] = group
                group_members.append(depth)
                search(depth + 1, score + sum(row[j] for j in group_members[:-1]))
                group_members.pop()
        if len(members) < max_groups:
            labels[depth] = len(members)
            members.append([depth])
            search(depth + 1, score)
            members.pop()

    search(0, 0.0)
    return best_labels


def _relabel(labels: Sequence[int]) -> list[int]:
    """Renumber groups by first appearance (restricted-growth form)."""
    mapping: dict[int, int] = {}
    return [mapping.setdefault(label, len(mapping)) for label in labels]


def _local_search(sim: np.ndarray, labels: list[int], fixed_count: bool) -> list[int]:
    """Apply the best single-task move while it improves the score; returns group labels.

    A task may move to another existing group, or (unless ``fixed_count``) to a new group of its own.
    With ``fixed_count`` a move may not empty a group, so the number of groups is preserved.
    """
    n = len(labels)
    labels = list(labels)
    while True:
        groups = sorted(set(labels))
        sizes = {g: labels.count(g) for g in groups}
        # link[i][g]: similarity of task i to the members of group g (excluding i itself).
        link = {g: sim[:, [j for j in range(n) if labels[j] == g]].sum(axis=1) for g in groups}
        best_gain, best_move = 0.0, None
        for i in range(n):
            own = labels[i]
            if fixed_count and sizes[own] == 1:
                continue
            leave = link[own][i] - sim[i, i]
            targets: list[int | None] = [g for g in groups if g != own]
            if not fixed_count and sizes[own] > 1:
                targets.append(None)  # a new singleton group
            for target in targets:
                gain = (0.0 if target is None else float(link[target][i])) - float(leave)
                if _better(gain, best_gain):
                    best_gain, best_move = gain, (i, target)
        if best_move is None:
            return _relabel(labels)
        i, target = best_move
        labels[i] = max(labels) + 1 if target is None else target


def _greedy(sim: np.ndarray, num_groups: int | None) -> list[int]:
    """Agglomerative merging from singletons; returns group labels.

    With ``num_groups=None`` the pair of groups with the largest positive gain (sum of cross similarities)
    is merged until no merge gains; otherwise merging continues, even at a loss, down to ``num_groups``.
    Equal gains go to the pair with the smallest first-task indices.
    """
    n = sim.shape[0]
    groups = [[i] for i in range(n)]
    target = 1 if num_groups is None else num_groups
    while len(groups) > target:
        best_gain, best_pair = -math.inf, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                gain = float(sim[np.ix_(groups[a], groups[b])].sum())
                if best_gain == -math.inf or _better(gain, best_gain):
                    best_gain, best_pair = gain, (a, b)
        if num_groups is None and best_gain <= 0:
            break
        a, b = best_pair
        groups[a] = sorted(groups[a] + groups.pop(b))
    labels = [0] * n
    for g, members in enumerate(groups):
        for i in members:
            labels[i] = g
    return _relabel(labels)


def _heuristic(sim: np.ndarray, num_groups: int | None) -> list[int]:
    """Greedy merging + local search; with ``num_groups=None`` also polishes the all-in-one partition."""
    fixed = num_groups is not None
    candidates = [_local_search(sim, _greedy(sim, num_groups), fixed)]
    if num_groups is None:
        candidates.append(_local_search(sim, [0] * sim.shape[0], fixed))
    rows = sim.tolist()
    best = candidates[0]
    for candidate in candidates[1:]:
        if _better(_labels_score(rows, candidate), _labels_score(rows, best)):
            best = candidate
    return best


def group_tasks(similarity: Any, task_names: Sequence[str], num_groups: int | None = None) -> list[list[str]]:
    """Partition ``task_names`` into groups maximising the total within-group pairwise similarity.

    Args:
        similarity: ``N x N`` symmetric, finite matrix (nested lists, numpy array or torch tensor);
            ``similarity[i][j]`` relates ``task_names[i]`` and ``task_names[j]``. The diagonal is ignored.
        task_names: the ``N`` unique task names.
        num_groups: exact number of non-empty groups (``1 <= num_groups <= N``); ``None`` picks the best
            partition over any number of groups.

    Returns:
        The groups, each listing its tasks in ``task_names`` order, sorted by the position of their first
        task. Exact for ``N <= EXACT_MAX_TASKS``; for larger ``N`` a deterministic heuristic (greedy
        agglomerative merging, then single-task moves while they improve the score; with
        ``num_groups=None`` the better of that and a local search started from one group) that is never
        worse than all-singletons when ``num_groups`` is ``None``.

    Raises:
        ValueError: malformed, non-finite or asymmetric ``similarity``; mismatched or duplicate names;
            ``num_groups`` out of range.
    """
    matrix, names = _validate(similarity, task_names)
    n = len(names)
    if num_groups is not None and (
        isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= n
    ):
        raise ValueError(
            f"num_groups must be None or an integer between 1 and {n} (the number of tasks), "
            f"got {num_groups!r}"
        )
    labels = _exact(matrix.tolist(), num_groups) if n <= EXACT_MAX_TASKS else _heuristic(matrix, num_groups)
    groups: list[list[str]] = [[] for _ in range(max(labels) + 1)]
    for name, label in zip(names, labels, strict=True):
        groups[label].append(name)
    return groups


def grouping_score(similarity: Any, groups: Sequence[Sequence[str]], task_names: Sequence[str]) -> float:
    """Total within-group pairwise similarity of ``groups``, which must partition ``task_names``.

    Raises:
        ValueError: invalid ``similarity``/``task_names`` (as in :func:`group_tasks`), an empty group, an
            unknown task, or a task missing from or repeated across ``groups``.
    """
    matrix, names = _validate(similarity, task_names)
    index = {name: i for i, name in enumerate(names)}
    labels = [-1] * len(names)
    for g, group in enumerate(groups):
        if isinstance(group, str) or not list(group):
            raise ValueError(f"group {g} must be a non-empty list of task names, got {group!r}")
        for name in group:
            if name not in index:
                raise ValueError(f"group {g} names unknown task {name!r}; known tasks: {names}")
            if labels[index[name]] != -1:
                raise ValueError(f"task {name!r} appears in more than one place in groups")
            labels[index[name]] = g
    missing = [name for name, label in zip(names, labels, strict=True) if label == -1]
    if missing:
        raise ValueError(f"groups must cover every task; missing: {missing}")
    return _labels_score(matrix.tolist(), labels)
