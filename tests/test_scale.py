"""100M+ cells: opening is O(shards) in time and memory, samplers never hold a permutation
of the cells, and reading across 10,000 shards keeps file descriptors bounded.

Datasets are built cheaply by :mod:`scale_fixtures` (one non-zero per cell, chunk files
linked, not copied): 2,000 shards of 50,000 cells (the converter's default shard size) and
10,000 shards of 10,000 cells, both 100M cells.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from scale_fixtures import expected_row, write_synthetic_dataset

from scmf_loader.dataset import CellDataset
from scmf_loader.opening import open_dataset
from scmf_loader.samplers import BlockShuffleSampler
from scmf_loader.store import DEFAULT_MAX_OPEN_SHARDS

N_GENES = 64
MB = 2**20

# Opens a dataset in a fresh interpreter: wall and CPU seconds of each of ``repeats`` opens,
# the resident-memory peak of the first over the RSS before it (VmHWM reset through
# /proc/self/clear_refs), and optionally the Python heap an open allocates (tracemalloc:
# peak and kept; slow, it traces every allocation).
_OPEN_PROBE = r"""
import json, sys, time, tracemalloc
from scmf_loader.opening import open_dataset

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

wall, cpu = [], []
for i in range(int(sys.argv[2])):
    if i == 0:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = status_kb("VmRSS")
    w, c = time.perf_counter(), time.process_time()
    store = open_dataset(sys.argv[1])
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
    if i == 0:
        rss_kb = status_kb("VmHWM") - before
        n_cells, n_shards = store.n_cells, store.n_shards
    del store
kept = peak = float("nan")
if sys.argv[3] == "1":
    tracemalloc.start()
    store = open_dataset(sys.argv[1])
    kept, peak = tracemalloc.get_traced_memory()
print(json.dumps({"wall": wall, "cpu": cpu, "rss_mb": rss_kb / 1024, "kept_mb": kept / 2**20,
                  "peak_mb": peak / 2**20, "n_cells": n_cells, "n_shards": n_shards}))
"""


@pytest.fixture(scope="module")
def cells_100m_2k_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100M cells in 2,000 real shard directories of 50,000 cells (hard-linked chunk files)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("scale") / "ds2k", 2_000, 50_000, N_GENES)


@pytest.fixture(scope="module")
def cells_100m_10k_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100M cells in 10,000 shards of 10,000 cells (shard directories are symlinks)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("scale") / "ds10k", 10_000, 10_000, N_GENES,
                                   symlink_shards=True)


def _probe_open(path: Path, repeats: int, traced: bool = True) -> dict[str, float]:
    args = [str(path), str(repeats), "1" if traced else "0"]
    done = subprocess.run([sys.executable, "-c", _OPEN_PROBE, *args], capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(done.stdout)


@pytest.mark.slow
def test_open_100m_cells_under_1s_and_200mb(cells_100m_2k_shards: Path) -> None:
    r = _probe_open(cells_100m_2k_shards, repeats=3)
    assert (r["n_cells"], r["n_shards"]) == (100_000_000, 2_000)
    assert min(r["wall"]) < 1.0, r
    assert r["rss_mb"] < 200, r
    assert r["peak_mb"] < 200, r
    assert r["kept_mb"] * MB / r["n_shards"] < 8192, r  # a few KB per shard, nothing per cell


@pytest.mark.slow
def test_open_10k_shards_memory_is_per_shard(cells_100m_10k_shards: Path) -> None:
    r = _probe_open(cells_100m_10k_shards, repeats=1, traced=False)
    assert (r["n_cells"], r["n_shards"]) == (100_000_000, 10_000)
    assert r["rss_mb"] < 200, r
    assert r["rss_mb"] * MB / r["n_shards"] < 8192, r
    assert min(r["cpu"]) < 5.0, r  # O(shards); per-cell work would take minutes


@pytest.mark.slow
@pytest.mark.parametrize(("world_size", "rank", "block_size"), [(1, 0, None), (8, 3, None), (8, 7, 32)])
def test_sampler_epoch_memory_is_shards_plus_one_shard(
    cells_100m_2k_shards: Path, world_size: int, rank: int, block_size: int | None
) -> None:
    """Setting up an epoch and reading batches from it allocates O(shards + one shard's
    blocks): kilobytes per shard, never a permutation of the 100M cells (800 MB)."""
    store = open_dataset(cells_100m_2k_shards)
    sampler = BlockShuffleSampler(store, 256, block_size, seed=5, rank=rank, world_size=world_size)
    sampler.set_epoch(3)
    tracemalloc.start()
    try:
        it = iter(sampler)
        first = [next(it) for _ in range(300)]  # crosses into a second shard
        last = sampler.batch(3, sampler.n_batches - 1)  # the tail stream, at the epoch's end
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000 * 4096 + 50_000 * 8 * 4, peak  # ~4 KB per shard + one shard's plan
    assert len(sampler) == sampler.n_batches // world_size or not sampler.drop_last
    ids = np.concatenate(first)
    assert ids.min() >= 0
    assert ids.max() < 100_000_000
    assert len(np.unique(ids)) == len(ids)
    assert 0 < len(last) <= 256


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_reading_across_10k_shards_keeps_file_descriptors_bounded(cells_100m_10k_shards: Path) -> None:
    """Every 19th batch of an epoch touches every one of the 10,000 shards (each shard's 38 or
    39 batches lie together in the epoch order); the store keeps at most ``max_open_shards``
    shards mapped (three files each), so open files stay bounded far below the 30,000 that
    mapping every shard would need."""
    ds = CellDataset(cells_100m_10k_shards)
    sampler = BlockShuffleSampler(ds, 256, seed=1)
    base = _open_fds()
    most = base
    shards: set[int] = set()
    for i, index in enumerate(range(0, sampler.n_batches, 19)):
        ids = sampler.batch(0, index)
        batch = ds[ids]
        shards.add(int(ids[0]) // 10_000)
        if i % 50 == 0:
            most = max(most, _open_fds())
            local = batch.cell_ids.numpy() % 10_000
            genes, values = expected_row(local, N_GENES)
            assert np.array_equal(batch.lengths().numpy(), np.ones(len(ids)))
            assert np.array_equal(batch.indices.numpy(), genes)
            assert np.array_equal(batch.values.numpy(), values)
        del batch
    assert len(shards) == 10_000
    assert most - base <= 3 * DEFAULT_MAX_OPEN_SHARDS + 16, (base, most)
    ds.store.close()  # type: ignore[union-attr]
    assert _open_fds() <= base
