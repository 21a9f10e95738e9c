"""The first-fit packer: exactly the rows of the former linear scan, on many random and edge-case
inputs, in O(n log n) time."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mlxtune.data.batching import Batching, _first_fit, plan_epoch


def first_fit_linear(lengths, order, capacity: int) -> list[list[int]]:
    """The reference: mlxtune's packer before the max-tree, a linear scan of the open rows."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(int(i))
                free[r] -= n
                break
        else:
            rows.append([int(i)])
            free.append(capacity - n)
    return rows


def cases(seed: int):
    """(lengths, order, capacity) of one random case: sizes from 0 to past the capacity, all
    equal, all the capacity, few distinct; longest first (stable, as plan_epoch), shortest
    first, shuffled, or a part of the examples only."""
    rng = np.random.default_rng(seed)
    capacity = int(rng.choice([1, 2, 7, 64, 1000, 1024, int(rng.integers(1, 5000))]))
    n = int(rng.choice([0, 1, 2, 3, int(rng.integers(4, 60)), int(rng.integers(60, 2000))]))
    kind = seed % 6
    if kind == 0:
        lengths = rng.integers(0, capacity + 1, n)  # 0 and the capacity itself included
    elif kind == 1:
        lengths = np.full(n, int(rng.integers(1, capacity + 1)))
    elif kind == 2:
        lengths = np.full(n, capacity)
    elif kind == 3:
        lengths = rng.choice([1, max(capacity // 3, 1), max(capacity // 2, 1), capacity], n)
    elif kind == 4:
        lengths = rng.integers(1, max(capacity // 4, 1) + 1, n)  # many per row
    else:
        lengths = rng.integers(0, 2 * capacity + 2, n)  # some past the capacity: rows alone
    lengths = lengths.astype(rng.choice([np.int64, np.int32]))
    which = seed // 6 % 4
    if which == 0:
        order = np.argsort(-lengths, kind="stable")
    elif which == 1:
        order = np.argsort(lengths, kind="stable")
    elif which == 2:
        order = rng.permutation(n)
    else:
        order = rng.permutation(n)[: n // 2]
    return lengths, order, capacity


@pytest.mark.parametrize("block", range(8))
def test_rows_equal_the_linear_first_fit_on_random_inputs(block):
    for seed in range(block * 150, (block + 1) * 150):
        lengths, order, capacity = cases(seed)
        assert _first_fit(lengths, order, capacity) == first_fit_linear(lengths, order, capacity), (
            seed
        )


def test_edge_cases_equal_the_linear_first_fit():
    empty = np.zeros(0, np.int64)
    assert _first_fit(empty, np.zeros(0, np.int64), 8) == [] == first_fit_linear(empty, [], 8)
    for lengths, capacity in [([8], 8), ([8, 8, 8], 8), ([4, 4, 4, 4, 4], 8), ([0, 0, 8, 0], 8),
                              ([1] * 100, 8), ([9, 1, 9, 1], 8), ([3, 5, 2, 6, 8, 1, 7], 8),
                              ([5, 4, 3, 3, 3, 2], 10)]:  # fmt: skip
        lengths = np.array(lengths)
        for order in (np.argsort(-lengths, kind="stable"), np.arange(len(lengths))):
            got = _first_fit(lengths, order, capacity)
            assert got == first_fit_linear(lengths, order, capacity), (lengths, order)
            assert sorted(i for row in got for i in row) == sorted(order.tolist())
            assert all(isinstance(i, int) for row in got for i in row)
    # The row that fits is the first, not the fullest: 5 goes in row 0 (room 6), not row 1 (5).
    assert _first_fit(np.array([4, 5, 5]), np.array([0, 1, 2]), 10) == [[0, 1], [2]]


def test_a_large_epoch_packs_in_n_log_n_time():
    """100,000 examples of 20 to 1,000 tokens in rows of 1,024 (the linear scan took over a
    minute; the tree a tenth of a second), and the plan keeps every example once."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 1001, 100_000)
    start = time.perf_counter()
    plan = plan_epoch(lengths, Batching(1024, True, rows=8), seed=0, epoch=0)
    assert time.perf_counter() - start < 5.0
    rows = [row for batch in plan for row in batch]
    assert sorted(i for row in rows for i in row) == list(range(100_000))
    assert max(int(lengths[row].sum()) for row in rows) <= 1024
