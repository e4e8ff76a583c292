"""Every sampler serves every cell with the same probability per epoch with drop_last=True.

Per-cell frequencies over 200 epochs, counted over all ranks and DataLoader workers (a
worker's share is what ``batches(epoch, 0, workers, w)`` hands it, as in the loader), must
stay within ±0.05 of the expected share ``cells served / cells`` for several shard layouts,
batch sizes, world sizes and worker counts. Before, the tail of each shard was almost never
served (issue 19: one 600-cell shard, batch 256: frequencies 0.01 to 1.00).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from scmf_loader.samplers import (
    BatchAwareSampler,
    BatchSampler,
    BlockShuffleSampler,
    SequentialSampler,
)

EPOCHS = 200
TOLERANCE = 0.05


class FakeDataset:
    """Shard offsets and one obs column (random codes, a rare category) without files."""

    def __init__(self, sizes: list[int], seed: int = 0) -> None:
        self.shard_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.categories = {"batch": ["a", "b", "c"]}
        rng = np.random.default_rng(seed)
        self._codes = [rng.choice(3, size=n, p=[0.6, 0.3, 0.1]).astype(np.int8) for n in sizes]

    def obs_codes(self, shard: int, key: str) -> np.ndarray:
        assert key == "batch"
        return self._codes[shard]


MAKERS = {
    "block": lambda d, bs, **kw: BlockShuffleSampler(d, bs, **kw),
    "block-mix4": lambda d, bs, **kw: BlockShuffleSampler(d, bs, block_size=bs // 4, **kw),
    "sequential": lambda d, bs, **kw: SequentialSampler(d, bs, **kw),
    "batch-aware": lambda d, bs, **kw: BatchAwareSampler(d, "batch", bs, **kw),
}

# shard layouts: one shard (the issue's), balanced shards as the converter writes them, shards
# whose remainders differ wildly (255 vs 256 with batch 256: all or nothing before), a tiny one
LAYOUTS = {
    "one-600": [600],
    "balanced": [187, 187, 188, 188],
    "uneven": [255, 256, 300, 41],
    "many-small": [50] * 12 + [7],
}


def frequencies(make: callable, world_size: int, workers: int) -> tuple[np.ndarray, float]:
    """Per-cell fraction of epochs served, and the expected share (cells served / cells)."""
    samplers = [make(r, world_size) for r in range(world_size)]
    n_cells, bs = samplers[0].n_cells, samplers[0].batch_size
    counts = np.zeros(n_cells, dtype=np.int64)
    served = None
    for epoch in range(EPOCHS):
        ids = [
            b
            for s in samplers
            for w in range(max(workers, 1))
            for b in s.batches(epoch, 0, workers, w)
        ]
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        assert len(np.unique(flat)) == len(flat), "a cell twice in one epoch with drop_last"
        assert all(len(b) == bs for b in ids)
        served = len(flat) if served is None else served
        assert len(flat) == served  # the same number every epoch
        counts += np.bincount(flat, minlength=n_cells)
    return counts / EPOCHS, served / n_cells


@pytest.mark.parametrize("batch_size", [256, 64])
def test_the_issues_case_one_600_cell_shard(batch_size: int) -> None:
    freq, expected = frequencies(lambda r, w: BlockShuffleSampler(600, batch_size, drop_last=True, rank=r, world_size=w), 1, 0)
    assert expected == pytest.approx(600 // batch_size * batch_size / 600)
    assert np.abs(freq - expected).max() <= TOLERANCE, (freq.min(), freq.max(), expected)


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_cell_is_served_equally_often(name: str, layout: str) -> None:
    ds = FakeDataset(LAYOUTS[layout], seed=len(layout))
    for bs, world, workers in [(16, 1, 0), (64, 1, 2), (32, 3, 0), (16, 4, 3), (100, 2, 2)]:
        if ds.shard_offsets[-1] < bs * world:
            continue
        make = lambda r, w, bs=bs: MAKERS[name](ds, bs, drop_last=True, seed=7, rank=r, world_size=w)  # noqa: E731
        freq, expected = frequencies(make, world, workers)
        assert np.abs(freq - expected).max() <= TOLERANCE, (name, layout, bs, world, workers, freq.min(), freq.max(), expected)


@pytest.mark.parametrize("world", range(1, 9))
def test_batches_per_rank_match_torch_distributed_sampler(world: int) -> None:
    """The epoch keeps the most whole batches every rank can have: per rank, as many as torch's
    DistributedSampler gives for the epoch's full batches (drop_last) or all batches
    (padding); over all ranks, drop_last serves n_cells // (bs * world) * world batches."""
    for n_cells, bs in itertools.product([0, 5, 63, 600, 1001], [1, 16, 64]):
        for drop_last in (False, True):
            n_full = n_cells // bs if drop_last else -(-n_cells // bs)
            theirs = len(DistributedSampler(range(n_full), num_replicas=world, rank=0, shuffle=False, drop_last=drop_last))
            ours = [BlockShuffleSampler(n_cells, bs, drop_last=drop_last, rank=r, world_size=world) for r in range(world)]
            assert {len(s) for s in ours} == {theirs}
            if drop_last:
                assert ours[0].n_batches == n_cells // (bs * world) * world


def test_left_out_stretch_is_uniform_and_moves() -> None:
    """Each epoch leaves out one ring stretch whose start is uniform; consecutive epochs move
    it, and the same seed gives the same stretches."""
    s = BlockShuffleSampler(1000, 64, drop_last=True, seed=3)
    starts = [s.left_out(e)[0] for e in range(400)]
    assert {s.left_out(e)[1] for e in range(5)} == {1000 - 15 * 64}
    assert starts == [BlockShuffleSampler(1000, 64, drop_last=True, seed=3).left_out(e)[0] for e in range(400)]
    assert len(set(starts)) > 350
    hist = np.histogram(starts, bins=10, range=(0, 1000))[0]
    assert hist.min() >= 30  # 40 expected per bin; a golden-ratio sequence is near-even
    assert BlockShuffleSampler(1000, 64, drop_last=False).left_out(0) == (0, 0)
    assert BlockShuffleSampler(1024, 64, drop_last=True).left_out(0)[1] == 0


def test_without_drop_last_every_cell_once_per_epoch() -> None:
    ds = FakeDataset(LAYOUTS["uneven"])
    for name, make in MAKERS.items():
        s: BatchSampler = make(ds, 32, drop_last=False, seed=1)
        for epoch in range(3):
            ids = np.concatenate([s.batch(epoch, g) for g in range(s.n_batches)])
            np.testing.assert_array_equal(np.sort(ids), np.arange(s.n_cells), err_msg=name)


def test_balanced_batch_aware_is_the_documented_exception() -> None:
    """balanced=True oversamples rare categories by design (documented): coverage is not
    uniform, but every batch is full and balanced."""
    ds = FakeDataset([600, 600], seed=1)
    s = BatchAwareSampler(ds, "batch", 30, balanced=True, drop_last=True)
    codes = np.concatenate(ds._codes)
    for ids in s:
        got = np.bincount(codes[ids], minlength=3)
        assert len(ids) == 30
        assert got.max() - got.min() <= 1
