#!/usr/bin/env python
"""Benchmark of the model-ready output kernels against the CSR every-byte epoch (not a test).

Uses (or makes) bench_loader's generated dataset (default 100k cells x 20k genes, ~2,000
non-zeros per cell, raw counts, converted without preprocessing) and measures in one run,
interleaved, median of ``--reps``, in one process with a warm page cache:

* ``csr_read_epoch``: contiguous CSR batches of ``--batch`` cells, every value and index read
  (the bar's reference: bench_loader's ``loader_read_epoch``);
* each output built from those batches, with the compiled (numba) and the vectorised
  (numpy) kernels: ``padded`` (``--max-genes``), ``rank``, ``binned`` (51 bins), ``dense``;
* the same with on-the-fly preprocessing (library size to 1e4, log1p) fused into the kernel;
* the CSR output with that preprocessing: ``CSRBatch.preprocessed`` (one fused pass, what
  ``CellDataset`` applies) and ``PreprocessingPipeline.apply_batch`` (numpy, for reference),
  each value then read as in the CSR epoch.

Each compiled measure runs with ``--threads`` kernel threads (``SCMF_OUTPUT_THREADS``; the
batch's cells split across threads). Rates are cells per second of CPU time
(``time.process_time``: every thread of the process; on a shared machine, wall time mostly
measures the neighbours) and of wall time; ratios to the CSR epoch are paired per
repetition, for both. With one thread the CPU-time ratio is the kernel's cost; with two the
wall-time ratio is what a free second core buys. Slow measures (``dense``, the numpy
kernels) run on the first ``--slow-batches`` batches only. The rank medians are the
dataset's stored ``var/nonzero_median`` (for a dataset converted before they were stored:
the per-gene non-zero medians of the first 20,000 cells). ``--norm`` takes the fused
pipeline from an unbaked preprocessed conversion of the same data.

    python scripts/bench_outputs.py --out bench-out/outputs.json [--cells 20000]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import generate_h5ad, touch  # noqa: E402


def dataset_dir(work: Path, cells: int, genes: int, nnz: int) -> Path:
    """bench_loader's dataset directory for this size, generated and converted if missing."""
    tag = f"{cells}x{genes}x{nnz}"
    h5ad, ds_dir = work / f"cells-{tag}.h5ad", work / f"ds-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    if not h5ad.exists():
        generate_h5ad(h5ad, cells, genes, nnz)
    if not (ds_dir / "manifest.json").exists():
        from scmf_shards.convert import convert_h5ad

        convert_h5ad([h5ad], ds_dir, vocab="union", obs_columns=("cell_type", "batch", "donor"),
                     shard_size=50_000, quiet=True, overwrite=True)
    return ds_dir


def nonzero_medians(ds: Any, n_cells: int) -> np.ndarray:
    """Per-gene median of the non-zero values of the first ``n_cells`` cells (1 where none)."""
    b = ds.get_range(0, min(n_cells, int(ds.shard_offsets[1])))
    genes, values = b.indices.numpy().astype(np.int64), b.values.numpy()
    order = np.lexsort((values, genes))
    genes, values = genes[order], values[order]
    starts = np.searchsorted(genes, np.arange(ds.n_genes))
    ends = np.searchsorted(genes, np.arange(ds.n_genes), side="right")
    med = np.ones(ds.n_genes, dtype=np.float32)
    has = ends > starts
    lo, hi = (starts + ends - 1) // 2, (starts + ends) // 2
    med[has] = ((values[lo[has]].astype(np.float64) + values[hi[has]]) / 2).astype(np.float32)
    return med


def tasks_for(batches: list[Any], slow: int, max_genes: int, med: np.ndarray, pipe: Any,
              threads: list[int]) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one epoch over its batches, cells in it)."""

    def epoch(fn: Callable[[Any], Any], n_batches: int | None = None) -> tuple[Callable[[], None], int]:
        chosen = batches if n_batches is None else batches[:n_batches]

        def run() -> None:
            for b in chosen:
                fn(b)

        return run, sum(len(b) for b in chosen)

    def on(backend: str, fn: Callable[[Any], Any], n_threads: int = 1) -> Callable[[Any], Any]:
        def call(b: Any) -> Any:
            os.environ["SCMF_OUTPUT_BACKEND"] = backend
            os.environ["SCMF_OUTPUT_THREADS"] = str(n_threads)
            return fn(b)

        return call

    tasks = {"csr_read_epoch": epoch(lambda b: touch(b.values.numpy(), b.indices.numpy()))}
    outputs = {
        f"padded_{max_genes}": lambda b: b.to_padded(max_genes),
        "rank": lambda b: b.to_rank(med, max_genes),
        "binned": lambda b: b.to_binned(51, max_genes),
        f"padded_{max_genes}+preprocessing": lambda b: b.to_padded(max_genes, preprocessing=pipe),
        "rank+preprocessing": lambda b: b.to_rank(med, max_genes, preprocessing=pipe),
        "binned+preprocessing": lambda b: b.to_binned(51, max_genes, preprocessing=pipe),
        "dense": lambda b: b.to_dense(),
    }
    fused_csr = lambda b: touch(b.preprocessed(pipe).values.numpy(), b.indices.numpy())  # noqa: E731
    outputs["csr+preprocessing (fused)"] = fused_csr
    for t in threads:
        for name, fn in outputs.items():
            tasks[f"{name}[numba t{t}]"] = epoch(on("numba", fn, t), slow if name == "dense" else None)
    for name, fn in outputs.items():
        tasks[f"{name}[numpy]"] = epoch(on("numpy", fn), slow)
    tasks["csr+preprocessing (apply_batch)"] = epoch(lambda b: touch(pipe.apply_batch(b).values.numpy(), b.indices.numpy()))
    return tasks


def _avx512() -> bool:
    """Whether the compiled kernels use their AVX-512 paths here (scmf_loader.outputs._simd)."""
    from scmf_loader.outputs._simd import AVX512

    return bool(AVX512)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--workdir", default="/tmp/scmf-bench-loader", help="where data is generated (shared with bench_loader)")
    p.add_argument("--dataset", help="an already converted raw dataset (instead of generating one)")
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=2_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-genes", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--slow-batches", type=int, default=24, help="batches for dense and the numpy kernels")
    p.add_argument("--norm", help="the same data converted with --normalize ... --no-bake: its recorded pipeline is the "
                   "one fused (default: library size to 1e4, log1p)")
    p.add_argument("--threads", default="1,2", help="kernel threads to measure, comma-separated")
    args = p.parse_args(argv)

    from scmf_loader import CellDataLoader, CellDataset
    from scmf_loader.errors import ScmfError
    from scmf_loader.outputs import numba_available
    from scmf_loader.preprocess import PreprocessingPipeline

    if not numba_available():
        raise SystemExit("numba is needed to compare the two backends: pip install numba")
    ds_path = Path(args.dataset) if args.dataset else dataset_dir(Path(args.workdir), args.cells, args.genes, args.nnz)
    ds = CellDataset(ds_path)
    loader = CellDataLoader(ds, batch_size=args.batch, num_workers=0, drop_last=False, shuffle=True, seed=0)
    batches = list(loader)  # zero-copy views of the maps: the epoch's reads happen in the tasks
    try:
        med = ds.gene_nonzero_median
    except ScmfError:
        med = nonzero_medians(ds, 20_000)
    pipe = PreprocessingPipeline(normalize="library_size", target_sum=1e4, log1p=True)
    if args.norm:
        pipe = CellDataset(args.norm).preprocessing
    threads = [int(t) for t in args.threads.split(",")]
    tasks = tasks_for(batches, args.slow_batches, args.max_genes, med, pipe, threads)
    for run, _ in tasks.values():  # compile, fault pages in, warm the buffers
        run()
    load_start = os.getloadavg()
    cpu: dict[str, list[float]] = {k: [] for k in tasks}
    wall: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(args.reps):  # interleaved: a busy machine slows every measure alike
        for name, (run, _) in tasks.items():
            c, w = time.process_time(), time.perf_counter()
            run()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    cells = {k: n for k, (_, n) in tasks.items()}
    rate = {k: cells[k] / statistics.median(v) for k, v in cpu.items()}
    rate_wall = {k: cells[k] / statistics.median(v) for k, v in wall.items()}
    def paired(times: dict[str, list[float]]) -> dict[str, float]:
        ref = times["csr_read_epoch"]
        return {k: statistics.median((cells[k] / t) / (cells["csr_read_epoch"] / r) for t, r in zip(v, ref, strict=True))
                for k, v in times.items()}

    ratio, ratio_wall = paired(cpu), paired(wall)
    load_end = os.getloadavg()
    res = {"cells": args.cells, "genes": args.genes, "batch_size": args.batch, "max_genes": args.max_genes,
           "reps": args.reps, "nnz_per_cell": ds.store.manifest.nnz / len(ds), "load_average_start": load_start,
           "load_average_end": load_end, "pipeline": repr(pipe), "avx512_kernels": _avx512(),
           "cells_per_s_cpu_time": rate, "cells_per_s_wall_time": rate_wall, "ratio_to_csr_epoch_cpu": ratio,
           "ratio_to_csr_epoch_wall": ratio_wall,
           "raw_seconds": {"cpu": cpu, "wall": wall, "cells": cells}}
    print(f"\n{len(ds):,} cells x {ds.n_genes:,} genes, {res['nnz_per_cell']:.0f} nnz/cell, batch {args.batch}, "
          f"median of {args.reps}, load average {load_start} -> {load_end}, AVX-512 kernels: {res['avx512_kernels']}")
    print(f"{'measure (one process)':44s} {'cells/s cpu':>12s} {'vs CSR':>7s} {'cells/s wall':>13s} {'vs CSR':>7s}")
    for k in tasks:
        print(f"{k:44s} {rate[k]:12,.0f} {ratio[k]:7.2f} {rate_wall[k]:13,.0f} {ratio_wall[k]:7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
