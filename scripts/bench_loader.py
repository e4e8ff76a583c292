#!/usr/bin/env python
"""Benchmark of the loader against raw numpy on the same shard files (not a test).

Generates a realistic dataset (default 100k cells x 20k genes, ~2,000 non-zeros per cell,
log-normal library sizes, obs cell_type/batch/donor; the .h5ad is written with h5py for
speed), converts it with ``convert_h5ad``, then measures in one run, median of ``--reps``
repetitions with a warm page cache:

* raw numpy: contiguous 256-cell slices of the memory-mapped shard files, every value and
  index read (the machine's limit), and a plain ``np.copyto`` of the same bytes;
* the loader: contiguous zero-copy batches (no reads), the same full epoch reading every
  value and index, mixed-block batches (8 blocks of 32 cells: a gather per batch) against
  ``np.copyto`` of the very same byte ranges, padded output, ``num_workers`` 0/1/2;
* private memory: peak RssAnon (and PSS of anonymous memory) of the process tree;
* opening a synthetic 100M-cell, 2,000-shard directory (sparse files).

Prints a table and writes everything as JSON to ``--out``::

    python scripts/bench_loader.py --out bench-out/loader.json

Workers, transforms, the first and the cold epoch, on-the-fly preprocessing and every
output against ``num_workers`` are measured by ``scripts/bench_workers.py`` (issue 11).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 256


# ---- data -----------------------------------------------------------------------------------
def generate_h5ad(path: Path, n_cells: int, n_genes: int, nnz: int, seed: int = 0) -> None:
    """A CSR .h5ad of counts: per cell ~``nnz`` distinct genes, log-normal library size."""
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice([f"type{i}" for i in range(12)], n_cells, p=np.r_[[0.3, 0.2], [0.05] * 10])),
            "batch": pd.Categorical(rng.choice([f"batch{i}" for i in range(6)], n_cells)),
            "donor": pd.Categorical(rng.choice([f"donor{i}" for i in range(40)], n_cells)),
        },
        index=[f"cell{i:07d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"GENE{i:05d}" for i in range(n_genes)])
    ad.AnnData(X=None, obs=obs, var=var).write_h5ad(path)
    popularity = rng.lognormal(0, 1.0, n_genes)
    cdf = np.cumsum(popularity / popularity.sum())
    inverse = np.searchsorted(cdf, (np.arange(1 << 20) + 0.5) / (1 << 20)).clip(max=n_genes - 1)  # inverse CDF table
    with h5py.File(path, "r+") as f:
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, n_genes]})
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 20,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 20,))
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        step = 5_000
        for lo in range(0, n_cells, step):
            m = min(lo + step, n_cells) - lo
            library = rng.lognormal(np.log(6_000), 0.5, m)
            draws = np.clip((nnz * 1.12 * (library / 6_000) ** 0.6).astype(np.int64), 200, n_genes // 2)
            genes = inverse[rng.integers(0, 1 << 20, int(draws.sum()))]
            key = np.sort(np.repeat(np.arange(m, dtype=np.int64), draws) * n_genes + genes)
            key = key[np.r_[True, key[1:] != key[:-1]]]  # unique (np.unique hashes: far slower)
            cell, gene = key // n_genes, key % n_genes  # sorted by cell, then gene
            counts = np.bincount(cell, minlength=m)
            lam = np.maximum(library - counts, 0) / np.maximum(counts, 1)
            values = (1 + np.floor(rng.standard_exponential(len(key), dtype=np.float32) * lam[cell])).astype(np.float32)
            indptr[lo + 1 : lo + m + 1] = indptr[lo] + np.cumsum(counts)
            n0 = data.shape[0]
            data.resize((n0 + len(key),))
            indices.resize((n0 + len(key),))
            data[n0:] = values
            indices[n0:] = gene.astype(np.int32)
        x.create_dataset("indptr", data=indptr)


def synthetic_big_dataset(root: Path, n_shards: int = 2_000, cells: int = 50_000, nnz: int = 2_000) -> Path:
    """A 100M-cell directory whose shard files are sparse (sized, no blocks on disk)."""
    from scmf_loader.format import ArrayEntry, Manifest, ShardEntry, write_manifest
    from scmf_loader.vocab import GeneVocab

    sizes = {"data": cells * nnz * 4, "indices": cells * nnz * 4, "indptr": (cells + 1) * 8}
    dtypes = {"data": "float32", "indices": "int32", "indptr": "int64"}
    shards = []
    for s in range(n_shards):
        rel = f"shards/{s:06d}.zarr"
        arrays = {}
        for name, size in sizes.items():
            d = root / rel / "X" / name / "c"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "0", "wb") as f:
                f.truncate(size)
            arrays[name] = ArrayEntry(path=f"X/{name}/c/0", nbytes=size, sha256="0" * 64, dtype=dtypes[name])
        shards.append(ShardEntry(path=rel, n_cells=cells, nnz=cells * nnz, arrays=arrays))
    vocab = GeneVocab.from_genes([f"GENE{i:05d}" for i in range(20_000)])
    vocab.save(root / "vocab.json")
    write_manifest(root, Manifest(
        dataset_id="sha256:synthetic", n_cells=n_shards * cells, n_genes=len(vocab), nnz=n_shards * cells * nnz,
        dtype="float32", vocab={"path": "vocab.json", "sha256": vocab.sha256()}, preprocessing={}, sources=[],
        obs_columns=[], shuffle={}, shards=shards,
    ))
    return root


# ---- memory ---------------------------------------------------------------------------------
_PROBE = r"""
import os, sys, time
root, interval, me = int(sys.argv[1]), float(sys.argv[2]), os.getpid()

def tree():
    children = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(e))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p != me:
            out.append(p)
            todo.extend(children.get(p, []))
    return out

def kb(path, key):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

peak_rss = peak_pss = peak_shm = 0.0
import select
while True:
    pids = tree()
    peak_rss = max(peak_rss, sum(kb(f"/proc/{p}/status", "RssAnon:") for p in pids) / 1024)
    peak_pss = max(peak_pss, sum(kb(f"/proc/{p}/smaps_rollup", "Pss_Anon:") for p in pids) / 1024)
    peak_shm = max(peak_shm, sum(kb(f"/proc/{p}/smaps_rollup", "Pss_Shmem:") for p in pids) / 1024)
    if select.select([sys.stdin], [], [], interval)[0]:
        break
print(peak_rss, peak_pss, peak_shm, flush=True)
"""


class MemoryProbe:
    """Peak RssAnon, Pss_Anon and Pss_Shmem (MB: the workers' shared-memory slots) summed
    over this process and its children, sampled by a separate process (so sampling never
    competes with the timed code for the GIL)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_rss_anon = 0.0
        self.peak_pss_anon = 0.0
        self.peak_pss_shmem = 0.0

    def __enter__(self) -> MemoryProbe:
        import subprocess

        self._proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE, str(os.getpid()), str(self.interval)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate("stop\n")
        self.peak_rss_anon, self.peak_pss_anon, self.peak_pss_shmem = (float(v) for v in out.split())


def rss_anon_mb() -> float:
    """This process's RssAnon now (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---- timing ---------------------------------------------------------------------------------
def median_time(fn: Callable[[], Any], reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def touch(values: np.ndarray, indices: np.ndarray) -> float:
    """Read every value and every index once (max: the fastest full read numpy has here)."""
    if not len(values):
        return 0.0
    return float(np.maximum.reduce(values)) + float(np.maximum.reduce(indices.view(np.uint32)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--workdir", default="/tmp/scmf-bench-loader", help="where data is generated (reused)")
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=2_000)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    from scmf_loader import BlockShuffleSampler, CellDataLoader, CellDataset, open_dataset

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.cells}x{args.genes}x{args.nnz}"
    h5ad, ds_dir = work / f"cells-{tag}.h5ad", work / f"ds-{tag}"
    res: dict[str, Any] = {"cells": args.cells, "genes": args.genes, "batch_size": BATCH, "reps": args.reps,
                           "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
                                       "load_average_at_start": os.getloadavg()}}
    if not h5ad.exists():
        t = time.perf_counter()
        generate_h5ad(h5ad, args.cells, args.genes, args.nnz)
        res["generate_s"] = time.perf_counter() - t
    if not (ds_dir / "manifest.json").exists():
        from scmf_shards.convert import convert_h5ad

        t = time.perf_counter()
        convert_h5ad([h5ad], ds_dir, vocab="union", obs_columns=("cell_type", "batch", "donor"),
                     shard_size=50_000, quiet=True, overwrite=True)
        res["convert_s"] = time.perf_counter() - t

    ds = CellDataset(ds_dir)
    store = ds.store  # the very maps the loader reads: raw numpy and loader share page tables
    n = store.n_cells
    res["nnz_per_cell"] = store.manifest.nnz / n
    res["bytes_per_cell"] = store.manifest.nnz * 8 / n + 8
    maps = [store.csr(s) for s in range(store.n_shards)]
    for m in maps:  # warm the page cache and this process's page tables
        touch(m.data, m.indices)
    slices = [(m, a, min(a + BATCH, len(m.indptr) - 1)) for m in maps for a in range(0, len(m.indptr) - 1, BATCH)]
    vbuf = np.empty(BATCH * args.genes, dtype=np.float32)
    ibuf = np.empty(BATCH * args.genes, dtype=np.int32)
    vbuf.fill(0)
    ibuf.fill(0)

    def raw_numpy_read() -> None:
        for m, a, b in slices:
            lo, hi = m.indptr[a], m.indptr[b]
            touch(m.data[lo:hi], m.indices[lo:hi])

    def raw_np_copyto() -> None:
        for m, a, b in slices:
            lo, hi = m.indptr[a], m.indptr[b]
            np.copyto(vbuf[: hi - lo], m.data[lo:hi])
            np.copyto(ibuf[: hi - lo], m.indices[lo:hi])

    contiguous = CellDataLoader(ds, batch_size=BATCH, num_workers=0, drop_last=False)
    def byte_ranges(batches: Any) -> list[tuple[Any, int, int]]:
        """(shard map, first, last value) of every contiguous run of cells of ``batches``
        (arrays of global row ids), in order: what a loader reading them touches."""
        out = []
        for ids in batches:
            shards = np.searchsorted(ds.shard_offsets, ids, side="right") - 1
            cut = np.flatnonzero((np.diff(ids) != 1) | (np.diff(shards) != 0)) + 1
            for first, last in zip(np.r_[0, cut].tolist(), np.r_[cut, len(ids)].tolist(), strict=True):
                s = int(shards[first])
                m, lo = maps[s], int(ids[first] - ds.shard_offsets[s])
                out.append((m, int(m.indptr[lo]), int(m.indptr[lo + last - first])))
        return out

    # one epoch of the contiguous loader (a batch is one range, except tails spanning shards)
    epoch_ranges = byte_ranges(b.cell_ids.numpy() for b in contiguous)

    def raw_numpy_read_loader_order() -> None:
        """An epoch of the loader's reads (its batches' byte ranges, in its block-shuffled
        order) done with raw numpy: the reference for the loader's own overhead. (The plain
        ``raw_numpy_read`` walks the shards sequentially, which the page cache and TLB favour.)"""
        for m, lo, hi in epoch_ranges:
            touch(m.data[lo:hi], m.indices[lo:hi])

    def loader_zero_copy() -> None:
        for _ in contiguous:
            pass

    def loader_read_epoch() -> None:
        for b in contiguous:
            touch(b.values.numpy(), b.indices.numpy())

    mixed = CellDataLoader(ds, batch_size=BATCH, block_size=32, num_workers=0, drop_last=False)
    # the byte ranges of the mixed loader's epoch, for np.copyto
    runs = byte_ranges(BlockShuffleSampler(ds, BATCH, block_size=32, drop_last=False).batches(0))

    def np_copyto_mixed_ranges() -> None:
        pos = 0
        for m, lo, hi in runs:
            if pos + hi - lo > len(vbuf):
                pos = 0
            np.copyto(vbuf[pos : pos + hi - lo], m.data[lo:hi])
            np.copyto(ibuf[pos : pos + hi - lo], m.indices[lo:hi])
            pos += hi - lo

    def loader_mixed_blocks() -> None:
        for _ in mixed:
            pass

    padded = {g: CellDataLoader(ds, batch_size=BATCH, num_workers=0, output="padded", max_genes=g) for g in (2048, 1024)}

    def loader_padded_2048() -> None:
        for _ in padded[2048]:
            pass

    def loader_padded_1024() -> None:
        for _ in padded[1024]:
            pass

    tasks = [raw_numpy_read, raw_numpy_read_loader_order, raw_np_copyto, loader_zero_copy, loader_read_epoch, np_copyto_mixed_ranges,
             loader_mixed_blocks, loader_padded_2048, loader_padded_1024]
    for f in tasks:  # one untimed round: first-touch costs out of the way
        f()
    cpu: dict[str, list[float]] = {f.__name__: [] for f in tasks}
    wall: dict[str, list[float]] = {f.__name__: [] for f in tasks}
    with MemoryProbe() as probe:
        for _ in range(args.reps):  # interleaved, so that a busy machine slows every measure alike
            for f in tasks:
                c, w = time.process_time(), time.perf_counter()
                f()
                cpu[f.__name__].append(time.process_time() - c)
                wall[f.__name__].append(time.perf_counter() - w)
    res["main_process_memory_mb"] = {"rss_anon": probe.peak_rss_anon, "pss_anon": probe.peak_pss_anon}
    rate = {k: n / statistics.median(v) for k, v in cpu.items()}
    rate_wall = {k: n / statistics.median(v) for k, v in wall.items()}
    res["cells_per_s_cpu_time"] = rate
    res["cells_per_s_wall_time"] = rate_wall
    res["raw_seconds"] = {"cpu": cpu, "wall": wall}

    workers: dict[str, Any] = {}
    for w in (0, 1, 2):
        for kind, kw in (("zero_copy_read", {}), ("mixed_read", {"block_size": 32}), ("padded_2048", {"output": "padded", "max_genes": 2048})):
            loader = CellDataLoader(ds, batch_size=BATCH, num_workers=w, drop_last=False, **kw)

            def run(loader: CellDataLoader = loader, kind: str = kind) -> None:
                for b in loader:
                    if kind != "padded_2048":
                        touch(b.values.numpy(), b.indices.numpy())

            with MemoryProbe() as probe:
                run()  # worker start-up and first epoch excluded from the timing
                t = median_time(run, args.reps)[0]
            workers[f"{kind}_workers{w}"] = {"cells_per_s": n / t, "rss_anon_mb": probe.peak_rss_anon, "pss_anon_mb": probe.peak_pss_anon}
            del loader
    res["workers"] = workers

    big = work / "synthetic-100M"
    if not (big / "manifest.json").exists():
        synthetic_big_dataset(big)
    rss0 = rss_anon_mb()
    t = time.perf_counter()
    big_store = open_dataset(big)
    res["open_100M_cells"] = {"seconds": time.perf_counter() - t, "shards": big_store.n_shards,
                              "cells": big_store.n_cells, "rss_anon_delta_mb": rss_anon_mb() - rss0}
    def paired(a: str, b: str) -> float:
        """Median over repetitions of the ratio of two measures taken back to back."""
        return statistics.median(x / y for x, y in zip(cpu[b], cpu[a], strict=True))

    res["ratios_cpu_time"] = {
        "loader_read_vs_raw_numpy": paired("loader_read_epoch", "raw_numpy_read_loader_order"),
        "loader_read_vs_raw_numpy_sequential": paired("loader_read_epoch", "raw_numpy_read"),
        "loader_mixed_vs_np_copyto_same_ranges": paired("loader_mixed_blocks", "np_copyto_mixed_ranges"),
        "loader_mixed_vs_np_copyto_contiguous": paired("loader_mixed_blocks", "raw_np_copyto"),
    }
    res["ratios_wall_time"] = {
        "loader_read_vs_raw_numpy": rate_wall["loader_read_epoch"] / rate_wall["raw_numpy_read_loader_order"],
        "loader_read_vs_raw_numpy_sequential": rate_wall["loader_read_epoch"] / rate_wall["raw_numpy_read"],
        "loader_mixed_vs_np_copyto_same_ranges": rate_wall["loader_mixed_blocks"] / rate_wall["np_copyto_mixed_ranges"],
    }
    res["machine"]["load_average_at_end"] = os.getloadavg()
    ratios = res["ratios_cpu_time"]
    bars = {
        "zero_copy >= 1,000,000 cells/s": rate["loader_zero_copy"] >= 1e6,
        "mixed >= 50% of np.copyto": ratios["loader_mixed_vs_np_copyto_same_ranges"] >= 0.5,
        "read epoch >= 80% of raw numpy": ratios["loader_read_vs_raw_numpy"] >= 0.8,
        "RssAnon (num_workers=0) <= 500 MB": res["main_process_memory_mb"]["rss_anon"] <= 500,
        "open 100M cells < 1 s": res["open_100M_cells"]["seconds"] < 1,
    }
    res["bars_met"] = bars

    gbps = res["bytes_per_cell"] / 1e9
    print(f"\n{args.cells:,} cells x {args.genes:,} genes, {res['nnz_per_cell']:.0f} nnz/cell, batch {BATCH}, "
          f"median of {args.reps}, load average {res['machine']['load_average_at_start'][0]:.1f}")
    print(f"{'measure (one process)':40s} {'cells/s cpu':>12s} {'GB/s':>6s} {'cells/s wall':>13s}")
    for k, v in rate.items():
        print(f"{k:40s} {v:12,.0f} {v * gbps:6.2f} {rate_wall[k]:13,.0f}")
    print(f"{'workers (wall time)':40s} {'cells/s':>12s}")
    for k, v in workers.items():
        print(f"{k:40s} {v['cells_per_s']:12,.0f} {v['cells_per_s'] * gbps:6.2f}   RssAnon {v['rss_anon_mb']:6.0f} MB  PSS-anon {v['pss_anon_mb']:6.0f} MB")
    for k, v in ratios.items():
        print(f"{k + ' (cpu, paired)':40s} {v:12.2f}")
    for k, v in res["ratios_wall_time"].items():
        print(f"{k + ' (wall)':40s} {v:12.2f}")
    m = res["main_process_memory_mb"]
    print(f"{'main process peak RssAnon / Pss_Anon':40s} {m['rss_anon']:8.0f} MB / {m['pss_anon']:.0f} MB")
    o = res["open_100M_cells"]
    print(f"{'open 100M cells, 2,000 shards':40s} {o['seconds']:8.3f} s, +{o['rss_anon_delta_mb']:.1f} MB")
    for k, ok in bars.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {k}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
