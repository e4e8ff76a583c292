"""The conversion plan: chunks, shard sizes and the seeded global shuffle (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scmf_shards.plan import (
    assignment_table,
    chunk_destinations,
    plan_chunks,
    shard_permutation,
    shard_sizes,
)


def test_plan_chunks_covers_every_row_once() -> None:
    chunks = plan_chunks([5, 0, 7], 3)
    assert [(c.source, c.start, c.stop) for c in chunks] == [
        (0, 0, 3), (0, 3, 5), (2, 0, 3), (2, 3, 6), (2, 6, 7)
    ]
    assert [c.index for c in chunks] == list(range(5))


@pytest.mark.parametrize(("n", "size", "expected"), [(10, 3, [3, 3, 2, 2]), (9, 3, [3, 3, 3]), (0, 5, [0]), (4, 10, [4])])
def test_shard_sizes_are_balanced(n: int, size: int, expected: list[int]) -> None:
    assert shard_sizes(n, size).tolist() == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=12), st.integers(1, 40), st.integers(0, 2**31), st.booleans())
def test_table_margins(chunk_sizes: list[int], shard_size: int, seed: int, shuffle: bool) -> None:
    sizes = shard_sizes(sum(chunk_sizes), shard_size)
    table = assignment_table(chunk_sizes, sizes, seed, shuffle)
    assert table.sum(axis=1).tolist() == chunk_sizes
    assert table.sum(axis=0).tolist() == sizes.tolist()
    assert (table >= 0).all()


def _global_permutation(chunk_sizes: list[int], shard_size: int, seed: int, shuffle: bool) -> np.ndarray:
    """Compose the plan into the explicit output order of global input rows."""
    sizes = shard_sizes(sum(chunk_sizes), shard_size)
    table = assignment_table(chunk_sizes, sizes, seed, shuffle)
    starts = np.concatenate([[0], np.cumsum(chunk_sizes)])
    per_shard: list[list[int]] = [[] for _ in sizes]
    for c, _n in enumerate(chunk_sizes):
        dest = chunk_destinations(table[c], seed, c, shuffle)
        order = np.argsort(dest, kind="stable")
        for row in order:
            per_shard[dest[row]].append(int(starts[c] + row))
    out = []
    for s, rows in enumerate(per_shard):
        perm = shard_permutation(len(rows), seed, s, shuffle)
        out.extend(np.asarray(rows, dtype=np.int64)[perm].tolist())
    return np.asarray(out)


def test_without_shuffle_order_is_preserved() -> None:
    perm = _global_permutation([5, 9, 3], 4, seed=1, shuffle=False)
    assert perm.tolist() == list(range(17))


def test_shuffle_is_a_permutation_and_seed_dependent() -> None:
    a = _global_permutation([30, 50, 20], 16, seed=1, shuffle=True)
    b = _global_permutation([30, 50, 20], 16, seed=1, shuffle=True)
    c = _global_permutation([30, 50, 20], 16, seed=2, shuffle=True)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_shuffle_is_uniform_over_positions() -> None:
    # Where does input row r land? Over many seeds each row is equally likely at each
    # output position: check the mean position of the first and last input rows.
    n, trials = 40, 600
    first = np.empty(trials)
    last = np.empty(trials)
    for seed in range(trials):
        perm = _global_permutation([10, 10, 20], 8, seed=seed, shuffle=True)
        inv = np.argsort(perm)
        first[seed], last[seed] = inv[0], inv[n - 1]
    # uniform on 0..39: mean 19.5, sd of mean = 11.5 / sqrt(600) = 0.47
    assert abs(first.mean() - 19.5) < 2.5
    assert abs(last.mean() - 19.5) < 2.5


def test_blocks_of_sorted_inputs_are_well_mixed() -> None:
    # Inputs sorted by label (two chunks, one label each): every output shard mixes both.
    chunk_sizes = [500, 500]
    perm = _global_permutation(chunk_sizes, 100, seed=7, shuffle=True)
    labels = (perm >= 500).astype(int)
    for s in range(10):
        frac = labels[s * 100 : (s + 1) * 100].mean()
        assert 0.3 < frac < 0.7
