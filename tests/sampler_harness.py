"""Reusable checks for every batch sampler: coverage, padding, determinism, epochs, resume.

``make(rank, world_size)`` builds a fresh sampler. DataLoader workers are simulated the way a
``DataLoader`` hands a map-style sampler's items out (item ``i`` to worker ``i % workers``,
results merged back in order), using the worker split of :func:`scmf_loader.world.partition`;
``tests/test_dataloader.py`` checks the same against real worker processes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from scmf_loader.samplers import BatchSampler

MakeSampler = Callable[[int, int], BatchSampler]


def rank_batches(sampler: BatchSampler, epoch: int, workers: int = 0) -> list[np.ndarray]:
    """One rank's batches of ``epoch``; with ``workers`` the per-worker shares merged in order."""
    sampler.set_epoch(epoch)
    direct = list(sampler)
    if workers <= 1:
        return direct
    shares = [list(sampler.batches(epoch, 0, workers, w)) for w in range(workers)]
    merged = [shares[i % workers][i // workers] for i in range(sum(map(len, shares)))]
    assert len(merged) == len(direct)
    for a, b in zip(merged, direct, strict=True):
        np.testing.assert_array_equal(a, b)
    return merged


def global_order(make: MakeSampler, world_size: int, epoch: int, workers: int = 0) -> tuple[list[np.ndarray], BatchSampler]:
    """All ranks' batches put back into the (padded or cut) epoch order: each rank reads one
    contiguous stretch of it, rank 0 first."""
    per_rank = [rank_batches(make(r, world_size), epoch, workers) for r in range(world_size)]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, f"ranks get different batch counts: {[len(b) for b in per_rank]}"
    return [b for batches in per_rank for b in batches], make(0, world_size)


def check_coverage(make: MakeSampler, world_size: int, epoch: int, workers: int, *, exact: bool = True) -> None:
    """drop_last=False: the first ``n_batches`` of the order hold every cell once and the rest
    repeat the order's start (torch's padding); drop_last=True: full batches, no cell twice,
    fewer than ``world_size`` batches plus the partial one dropped."""
    order, s = global_order(make, world_size, epoch, workers)
    n, bs, cells = s.n_batches, s.batch_size, s.n_cells
    for b in order:
        assert b.dtype == np.int64
        assert 0 < len(b) <= bs
        assert b.min() >= 0
        assert b.max() < cells
    if s.drop_last:
        assert len(order) == (cells // bs) // world_size * world_size
        assert all(len(b) == bs for b in order)
        if exact:
            ids = np.concatenate(order) if order else np.zeros(0, np.int64)
            assert len(np.unique(ids)) == len(ids)
    else:
        assert len(order) == -(-n // world_size) * world_size
        if exact:
            ids = np.concatenate(order[:n])
            np.testing.assert_array_equal(np.sort(ids), np.arange(cells))
        for p in range(n, len(order)):
            np.testing.assert_array_equal(order[p], order[(p - n) % n])


def check_determinism_and_epochs(make: MakeSampler, world_size: int, *, shuffles: bool | None = True) -> None:
    """Same seed and epoch: same batches; next epoch: a different order when ``shuffles``
    (the same when False; not checked when None, for epochs too small to tell)."""
    a, _ = global_order(make, world_size, 3)
    b, _ = global_order(make, world_size, 3)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c, _ = global_order(make, world_size, 4)
    same = len(a) == len(c) and all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    if shuffles is not None:
        assert same != shuffles


def check_resume(make: MakeSampler, world_size: int, rng: np.random.Generator, points: int = 2) -> None:
    """A state taken after any batch resumes the rest of that epoch, then the next epoch."""
    for rank in range(world_size):
        ref = make(rank, world_size)
        epoch0 = rank_batches(ref, 1)
        epoch1 = rank_batches(ref, 2)
        for k in sorted({0, len(epoch0), *rng.integers(0, len(epoch0) + 1, size=points).tolist()}):
            first = make(rank, world_size)
            first.set_epoch(1)
            it = iter(first)
            for _ in range(k):
                next(it)
            state = first.state_dict()
            assert state["epoch"] == 1
            assert state["batches_done"] == k
            resumed = make(rank, world_size)
            resumed.load_state_dict(state)
            resumed.set_epoch(1)  # the usual per-epoch call keeps the resume point
            rest = list(resumed)
            assert len(rest) == len(epoch0) - k
            for x, y in zip(rest, epoch0[k:], strict=True):
                np.testing.assert_array_equal(x, y)
            for x, y in zip(rank_batches(resumed, 2), epoch1, strict=True):
                np.testing.assert_array_equal(x, y)


def run_all(make: MakeSampler, *, exact: bool = True, shuffles: bool | None = True, seed: int = 0) -> None:
    """Every check over world sizes 1–8 × workers 0–3 × the sampler's ``drop_last``."""
    rng = np.random.default_rng(seed)
    for world_size in range(1, 9):
        for workers in range(4):
            check_coverage(make, world_size, epoch=workers, workers=workers, exact=exact)
        check_determinism_and_epochs(make, world_size, shuffles=shuffles)
        check_resume(make, world_size, rng, points=1)
