"""The pure streaming plan over many world shapes, without processes: DistributedSampler
coverage and padding, equal batch counts per rank, cells independent of the worker count,
seeded shard order, shuffle windows, and the round-robin arithmetic behind exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from scmf_loader.errors import ConfigurationError
from scmf_loader.streaming.plan import (
    RankPlan,
    assign_workers,
    consumed_per_worker,
    plan_rank,
    remaining_after,
    shard_order,
    worker_ranges,
)

SIZES = [
    [10],
    [7, 0, 13, 5],
    [100, 100, 100, 100, 100, 100],
    [33, 1, 64, 17, 90, 2, 45],
]


def ids_of(runs: tuple[tuple[int, int, int], ...], offsets: np.ndarray) -> list[int]:
    return [int(offsets[s]) + i for s, lo, hi in runs for i in range(lo, hi)]


def rank_cells(plan: RankPlan, offsets: np.ndarray) -> list[list[int]]:
    """The rank's batches as lists of global cell ids, window by window."""
    return [ids_of(b, offsets) for w in range(plan.n_windows) for b in plan.window_batches(w)]


def reference(sizes: list[int], order: np.ndarray, batch: int, world: int, drop_last: bool) -> tuple[list[int], list[int]]:
    """torch's DistributedSampler over the batches of the stream (shards in ``order``):
    the multiset of cells over all ranks, and the batches per rank."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    stream = [c for s in order for c in range(int(offsets[s]), int(offsets[s + 1]))]
    batches = [stream[i:i + batch] for i in range(0, len(stream), batch)]
    if drop_last and batches and len(batches[-1]) < batch:
        batches.pop()
    cells: list[int] = []
    counts = []
    for r in range(world):
        picked = list(DistributedSampler(range(len(batches)), num_replicas=world, rank=r, shuffle=False,
                                         drop_last=drop_last))
        counts.append(len(picked))
        cells += [c for i in picked for c in batches[i]]
    return sorted(cells), counts


CASES = list(itertools.product(range(len(SIZES)), (1, 2, 3, 5), (1, 4, 16), (False, True), (False, True)))


@pytest.mark.parametrize(("case", "world", "batch", "drop_last", "shuffle"), CASES)
def test_ranks_cover_like_distributed_sampler(case: int, world: int, batch: int, drop_last: bool, shuffle: bool) -> None:
    sizes = SIZES[case]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for epoch in (0, 1):
        plans = [plan_rank(sizes, batch_size=batch, world_size=world, rank=r, epoch=epoch, seed=3,
                           shuffle=shuffle, drop_last=drop_last, window_shards=2) for r in range(world)]
        order = shard_order(len(sizes), 3, epoch, shuffle)
        want_cells, want_counts = reference(sizes, order, batch, world, drop_last)
        got = [rank_cells(p, offsets) for p in plans]
        assert [len(b) for b in got] == [p.n_batches for p in plans] == want_counts
        assert sorted(c for batches in got for b in batches for c in b) == want_cells
        for batches in got:  # all batches full but a rank's last one
            assert all(len(b) == batch for b in batches[:-1])
            assert not batches or 0 < len(batches[-1]) <= batch
            if drop_last:
                assert all(len(b) == batch for b in batches)
        if not drop_last:  # every cell at least once; padding below one batch per rank
            flat = [c for batches in got for b in batches for c in b]
            assert set(flat) == set(range(int(offsets[-1])))
            assert len(flat) - int(offsets[-1]) < world * batch


@pytest.mark.parametrize(("case", "world"), list(itertools.product(range(len(SIZES)), (1, 2, 4))))
def test_batches_are_the_rank_segments_reshuffled(case: int, world: int) -> None:
    """A rank's batches hold exactly the cells of its segments; without shuffle in stream
    order, with shuffle permuted within windows only."""
    sizes = SIZES[case]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for r in range(world):
        kw = {"batch_size": 4, "world_size": world, "rank": r, "epoch": 2, "seed": 1, "window_shards": 2}
        flat_plan = plan_rank(sizes, shuffle=False, **kw)
        seg_cells = [int(offsets[s]) + i for s, lo, hi in flat_plan.segments for i in range(lo, hi)]
        assert [c for b in rank_cells(flat_plan, offsets) for c in b] == seg_cells
        mixed = plan_rank(sizes, shuffle=True, **kw)
        for w in range(mixed.n_windows):
            ours = sorted(c for b in mixed.window_batches(w) for c in ids_of(b, offsets))
            b0, b1 = int(mixed.windows[w]), int(mixed.windows[w + 1])
            stream = [c for b in range(b0, b1) for c in ids_of(plan_rank(sizes, shuffle=True, **kw).batch(b), offsets)]
            assert ours == sorted(stream)


def test_blocks_mix_within_a_window_and_zero_copy_by_default() -> None:
    sizes = [64] * 8
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    plan = plan_rank(sizes, batch_size=8, world_size=1, rank=0, epoch=0, seed=5, window_shards=4)
    assert plan.n_windows == 2
    assert all(len(b) == 1 for w in range(2) for b in plan.window_batches(w))  # one run each
    shards = [{s for s, _, _ in b} for b in plan.window_batches(0)]
    assert len({next(iter(s)) for s in shards}) == 4  # batches from the window's four shards
    first = [b[0][0] for b in plan.window_batches(0)[:8]]
    assert len(set(first)) > 1  # interleaved, not shard by shard
    mixed = plan_rank(sizes, batch_size=8, world_size=1, rank=0, epoch=0, seed=5, window_shards=4, block_size=2)
    runs = [len(b) for w in range(2) for b in mixed.window_batches(w)]
    assert max(runs) > 1
    assert all(len(ids_of(b, offsets)) == 8 for b in mixed.window_batches(0))
    assert {s for b in mixed.window_batches(1) for s, _, _ in b} == set(plan.window_shards(1))


def test_seeded_shard_order() -> None:
    a = [shard_order(50, 7, e, True).tolist() for e in range(3)]
    assert a == [shard_order(50, 7, e, True).tolist() for e in range(3)]
    assert len({tuple(x) for x in a}) == 3
    assert sorted(a[0]) == list(range(50))
    assert shard_order(5, 7, 0, False).tolist() == [0, 1, 2, 3, 4]
    assert shard_order(50, 8, 0, True).tolist() != a[0]


@pytest.mark.parametrize("workers", [0, 1, 2, 3, 4, 7])
def test_worker_split_covers_the_rank_once_and_cuts_at_windows(workers: int) -> None:
    for sizes, world in itertools.product(SIZES + [[50] * 12], (1, 2, 3)):
        for r in range(world):
            plan = plan_rank(sizes, batch_size=5, world_size=world, rank=r, epoch=1, window_shards=1)
            ranges = worker_ranges(plan.windows, plan.n_batches, workers)
            assert len(ranges) == max(workers, 1)
            assert [p for a, b in ranges for p in range(a, b)] == list(range(plan.n_batches))
            windows = set(plan.windows.tolist())
            if all(b > a for a, b in ranges) and plan.n_windows >= max(workers, 1) * 2:
                counts = [b - a for a, b in ranges]
                if all(c + 0 for c in counts):
                    assert {a for a, _ in ranges} <= windows or max(counts) - min(counts) <= 1


def test_whole_shards_per_worker() -> None:
    plan = plan_rank([40] * 8, batch_size=10, world_size=2, rank=1, epoch=0, window_shards=1)
    ranges = worker_ranges(plan.windows, plan.n_batches, 2)
    shards = [{s for p in range(a, b) for s, _, _ in plan.batch(p)} for a, b in ranges]
    assert all(len(s) == 2 for s in shards)
    assert not shards[0] & shards[1]


def round_robin(assignment: list[list[tuple[int, int]]]) -> list[int]:
    """What a DataLoader returns: one batch per worker in turn, exhausted workers skipped."""
    queues = [[p for a, b in ranges for p in range(a, b)] for ranges in assignment]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def test_consumed_per_worker_matches_round_robin() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = rng.integers(0, 7, rng.integers(1, 6)).tolist()
        order = [w for r in range(max(counts, default=0)) for w in range(len(counts)) if counts[w] > r]
        for k in range(sum(counts) + 1):
            assert consumed_per_worker(counts, k) == [order[:k].count(w) for w in range(len(counts))]
    with pytest.raises(ConfigurationError, match="batches_done=9"):
        consumed_per_worker([2, 3], 9)


def test_chained_resume_yields_exactly_the_rest() -> None:
    """Resume after k batches with one worker count, then again with another: the batches
    returned overall are every position exactly once."""
    rng = np.random.default_rng(1)
    for sizes in SIZES + [[37] * 9]:
        plan = plan_rank(sizes, batch_size=3, world_size=2, rank=0, epoch=0, window_shards=2)
        n = plan.n_batches
        for _ in range(20):
            remaining = [(0, n)]
            seen: list[int] = []
            for workers in rng.integers(0, 5, 3).tolist() + [2]:
                assignment = assign_workers(remaining, plan.windows, n, workers)
                order = round_robin(assignment)
                k = int(rng.integers(0, len(order) + 1))
                seen += order[:k]
                remaining = remaining_after(assignment, k)
                assert sorted(seen + [p for a, b in remaining for p in range(a, b)]) == list(range(n))
            seen += round_robin(assign_workers(remaining, plan.windows, n, 3))
            assert sorted(seen) == list(range(n))


def test_dataloader_merges_iterable_workers_round_robin() -> None:
    """The assumption behind consumed_per_worker, checked against torch itself."""

    class Uneven(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            info = torch.utils.data.get_worker_info()
            counts = [2, 5]
            yield from ((info.id, i) for i in range(counts[info.id]))

    got = [(int(w), int(i)) for w, i in torch.utils.data.DataLoader(Uneven(), batch_size=None, num_workers=2)]
    order = [w for r in range(5) for w in range(2) if [2, 5][w] > r]
    assert [w for w, _ in got] == order


def test_bad_settings() -> None:
    with pytest.raises(ConfigurationError, match="block_size"):
        plan_rank([10], batch_size=8, world_size=1, rank=0, epoch=0, block_size=3)
    with pytest.raises(ConfigurationError, match="batch_size"):
        plan_rank([10], batch_size=0, world_size=1, rank=0, epoch=0)
    with pytest.raises(ConfigurationError, match="rank"):
        plan_rank([10], batch_size=2, world_size=2, rank=2, epoch=0)


def test_plan_is_o_shards() -> None:
    plan = plan_rank([10**6] * 1000, batch_size=256, world_size=8, rank=3, epoch=0)
    assert plan.n_batches == -(-125 * 10**6 // 256)
    assert len(plan.segments) <= 127
    assert len(plan.window_batches(plan.n_windows - 1)) > 0
