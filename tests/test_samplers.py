"""Samplers through the shared harness: every sampler, world sizes 1–8, workers 0–3,
drop_last both ways; plus block layout, batch-aware composition and bounded memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sampler_harness import check_resume, global_order, run_all

from scmf_loader.dataset import CellDataset
from scmf_loader.errors import ConfigurationError
from scmf_loader.samplers import (
    BatchAwareSampler,
    BatchSampler,
    BlockShuffleSampler,
    SequentialSampler,
)


@pytest.fixture(scope="module")
def ds(loader_dataset: Path) -> CellDataset:
    return CellDataset(loader_dataset)


SAMPLERS = {
    "sequential": (lambda d, **kw: SequentialSampler(d, 32, **kw), False, True),
    "block": (lambda d, **kw: BlockShuffleSampler(d, 32, **kw), True, True),
    "block-mix4": (lambda d, **kw: BlockShuffleSampler(d, 32, block_size=8, **kw), True, True),
    "batch-aware": (lambda d, **kw: BatchAwareSampler(d, "cell_type", 32, **kw), True, True),
    "batch-aware-balanced": (lambda d, **kw: BatchAwareSampler(d, "batch", 30, balanced=True, **kw), True, False),
}


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_harness(ds: CellDataset, name: str, drop_last: bool) -> None:
    build, shuffles, exact = SAMPLERS[name]
    if name == "sequential" and drop_last:
        shuffles = None  # the same order, but the left-out stretch moves every epoch
    run_all(
        lambda r, w: build(ds, drop_last=drop_last, seed=5, rank=r, world_size=w),
        exact=exact, shuffles=shuffles, seed=len(name),
    )


def test_plain_cell_count_and_tiny_epochs() -> None:
    # fewer batches than ranks: padding repeats; drop_last leaves ranks empty but equal
    for drop_last in (False, True):
        run_all(lambda r, w, d=drop_last: BlockShuffleSampler(5, 2, drop_last=d, rank=r, world_size=w), shuffles=None)
    assert len(SequentialSampler(0, 4)) == 0
    assert list(SequentialSampler(0, 4)) == []


def _tail_positions(s: BatchSampler, epoch: int) -> set[int]:
    layout = s._layout(epoch)
    return {g for g in range(s.n_batches) if layout.locate(g)[0] < 0}


def test_tail_batches_follow_the_shards_they_draw_from(ds: CellDataset) -> None:
    s = BlockShuffleSampler(ds, 32, seed=4)
    layout = s._layout(0)
    seen: list[int] = []  # shards in the order the epoch first reads them
    for g in range(s.n_batches):
        shards = np.unique(np.searchsorted(ds.shard_offsets, s.batch(0, g), side="right") - 1)
        if layout.locate(g)[0] < 0:
            assert set(shards.tolist()) <= set(seen), "a tail batch reads a shard not visited yet"
        seen.extend(x for x in shards.tolist() if x not in seen)
    assert seen == layout.order.tolist()


def test_block_batches_are_contiguous_ranges_inside_one_shard(ds: CellDataset) -> None:
    s = BlockShuffleSampler(ds, 32, drop_last=True)
    order, _ = global_order(lambda r, w: BlockShuffleSampler(ds, 32, drop_last=True, rank=r, world_size=w), 1, 0)
    tail = _tail_positions(s, 0)
    # only the tail stream gathers: under two batches per shard (its grid offset and its end)
    assert 0 < len(tail) < 2 * ds.n_shards
    wraps = 0
    for g, b in enumerate(order):
        if g in tail:
            continue
        shard = np.searchsorted(ds.shard_offsets, b, side="right") - 1
        assert shard.min() == shard.max()
        if not np.all(np.diff(b) == 1):
            # a batch wrapping around the end of the shard the left-out stretch cut: two runs
            runs = np.split(b, np.flatnonzero(np.diff(b) != 1) + 1)
            assert len(runs) == 2
            assert runs[0][0] == ds.shard_offsets[shard[0]]
            assert runs[1][-1] == ds.shard_offsets[shard[0] + 1] - 1
            wraps += 1
    assert wraps <= 2
    starts = {int(b[0]) for b in order}
    starts1 = {int(b[0]) for b in global_order(lambda r, w: BlockShuffleSampler(ds, 32, drop_last=True), 1, 1)[0]}
    assert starts != starts1  # the block grid moves between epochs


def test_mixed_blocks_are_k_blocks_of_one_shard(ds: CellDataset) -> None:
    s = BlockShuffleSampler(ds, 32, block_size=8, seed=3)
    tail = _tail_positions(s, 0)
    for g in range(s.n_batches):
        if g in tail:
            continue
        b = s.batch(0, g)
        shard = np.searchsorted(ds.shard_offsets, b, side="right") - 1
        assert shard.min() == shard.max()
        assert len(b) == 32
        runs = np.split(b, np.flatnonzero(np.diff(b) != 1) + 1)
        assert sum(len(r) for r in runs) == 32
        assert all(len(r) % 8 == 0 for r in runs)


def test_batch_aware_proportions(ds: CellDataset) -> None:
    s = BatchAwareSampler(ds, "cell_type", 40, seed=1, drop_last=True)
    codes = np.concatenate([ds.obs_codes(i, "cell_type") for i in range(ds.n_shards)])
    share = np.bincount(codes, minlength=4) / len(codes)
    tail = _tail_positions(s, 0)
    for g, ids in enumerate(s):
        if g in tail:
            continue
        got = np.bincount(codes[ids], minlength=4)
        assert np.all(np.abs(got - share * 40) <= 4), (got, share * 40)


def test_batch_aware_balanced(ds: CellDataset) -> None:
    s = BatchAwareSampler(ds, "batch", 30, balanced=True, seed=2, drop_last=True)
    codes = np.concatenate([ds.obs_codes(i, "batch") for i in range(ds.n_shards)])
    tail = _tail_positions(s, 0)
    n = 0
    for g, ids in enumerate(s):
        if g in tail:
            continue
        got = np.bincount(codes[ids], minlength=3)
        assert got.max() - got.min() <= 1, got
        n += 1
    assert n > 10


def test_batch_aware_needs_a_kept_column(ds: CellDataset) -> None:
    with pytest.raises(ConfigurationError, match="donor"):
        BatchAwareSampler(ds, "donor", 32)


def test_sampler_memory_is_per_shard_not_per_cell() -> None:
    # 100M cells in 2,000 shards: an epoch layout and a shard plan stay small and fast
    class Big:
        shard_offsets = np.arange(0, 100_000_001, 50_000, dtype=np.int64)

    s = BlockShuffleSampler(Big(), 64, rank=3, world_size=8)
    assert len(s) == -(-(100_000_000 // 64 + 1) // 8)
    it = iter(s)
    first = [next(it) for _ in range(5)]
    assert all(len(b) == 64 for b in first)
    layout = s._layout(0)
    assert layout.order.nbytes + layout.first.nbytes + layout.tail_cum.nbytes < 200_000
    assert s._shard_plan(0, int(layout.order[0])).nbytes <= 50_000 // 64 * 8


def test_errors() -> None:
    with pytest.raises(ConfigurationError, match="rank"):
        BlockShuffleSampler(10, 2, rank=4, world_size=4)
    with pytest.raises(ConfigurationError, match="block_size"):
        BlockShuffleSampler(10, 8, block_size=3)
    with pytest.raises(ConfigurationError, match="batch_size"):
        SequentialSampler(10, 0)
    a = BlockShuffleSampler(100, 8, seed=1)
    with pytest.raises(ConfigurationError, match="seed"):
        BlockShuffleSampler(100, 8, seed=2).load_state_dict(a.state_dict())
    with pytest.raises(ConfigurationError, match="kind"):
        SequentialSampler(100, 8, seed=1).load_state_dict(a.state_dict())


def test_rank_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    s = BlockShuffleSampler(90, 10)
    assert (s.rank, s.world_size) == (2, 3)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigurationError, match="rank"):
        BlockShuffleSampler(90, 10)


def test_resume_from_another_ranks_state(ds: CellDataset) -> None:
    # ranks step in lockstep: rank 0's checkpointed state resumes rank 1 exactly
    r0 = BlockShuffleSampler(ds, 16, rank=0, world_size=2)
    it = iter(r0)
    for _ in range(7):
        next(it)
    r1 = BlockShuffleSampler(ds, 16, rank=1, world_size=2)
    full = list(BlockShuffleSampler(ds, 16, rank=1, world_size=2))
    r1.load_state_dict(r0.state_dict())
    rest = list(r1)
    assert all(np.array_equal(a, b) for a, b in zip(rest, full[7:], strict=True))
    check_resume(lambda r, w: SequentialSampler(ds, 50, rank=r, world_size=w), 3, np.random.default_rng(0))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_random_access_is_repeatable(ds: CellDataset, name: str) -> None:
    s = SAMPLERS[name][0](ds, seed=1)
    for g in (0, 3, 3, 0, s.n_batches - 1, 3):
        np.testing.assert_array_equal(s.batch(0, g), s.batch(0, g))
    np.testing.assert_array_equal(np.concatenate(list(s)), np.concatenate([s.batch(0, g) for g in range(s.n_batches)]))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_range_form_matches_ids(ds: CellDataset, name: str) -> None:
    s = SAMPLERS[name][0](ds, seed=2)
    ranges = 0
    for g in range(s.n_batches):
        item = s.batch_or_range(1, g)
        if isinstance(item, tuple):
            ranges += 1
            item = np.arange(*item)
        np.testing.assert_array_equal(item, s.batch(1, g))
    assert (ranges > 0) == (name in ("sequential", "block"))
