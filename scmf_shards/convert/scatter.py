"""The scatter stage: one task per read chunk reads rows of one source, validates them,
aligns them to the vocabulary, and groups them by destination shard: written into a bucket
directory (two-stage conversions: temporary name, renamed into place when complete) or held
in memory as a :class:`MemoryBucket` (one-pass conversions, :func:`scatter_to_memory`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scmf_loader.errors import InvalidInputError
from scmf_shards import faults
from scmf_shards.align import StoredAlignment, align_rows_held, align_rows_with_totals
from scmf_shards.medians import chunk_histogram
from scmf_shards.plan import ReadChunk, chunk_destinations
from scmf_shards.values import check_values
from scmf_shards.write import attempt_name

__all__ = ["MemoryBucket", "ScatterTask", "run_scatter", "scatter_to_memory"]


@dataclass(frozen=True)
class ScatterTask:
    """Everything one scatter task needs (small and picklable)."""

    chunk: ReadChunk
    source: Any  # a picklable reader with .path, .n_genes and .read_rows (e.g. H5adSource)
    matrix: str
    alignment: StoredAlignment  # a reference: the arrays are loaded where the task runs
    obs_columns: tuple[str, ...]
    categories: Mapping[str, Sequence[str]]
    counts: np.ndarray
    seed: int
    shuffle: bool
    dtype: str
    bucket_dir: str
    transform: Any = None  # preprocessing of the chunk (scmf_shards.preprocess.stats.ChunkTransform)
    allow_negative: bool = False  # data stated as normalised, no log1p (see scmf_shards.values)
    n_genes: int = 0  # vocabulary size: the length of the chunk's non-zero histogram
    histogram_path: str = ""  # where the chunk's non-zero histogram goes (Workspace.histogram)
    #: one-pass conversions: where the held arrays come from (scmf_shards.arena.Arena, in-process)
    arena: Any = field(default=None, repr=False, compare=False)

    @property
    def where(self) -> str:
        """The chunk, named for error messages."""
        return f"{self.source.path}: rows [{self.chunk.start}, {self.chunk.stop}) of '{self.matrix}'"


@dataclass
class _Bucket:
    """One chunk's rows in bucket order (grouped by destination shard)."""

    aligned: Any  # HeldRows, or scipy CSR with preprocessing (maybe in this thread's scratch buffers)
    library_size: np.ndarray
    extra_stats: dict[str, np.ndarray]
    cells: np.ndarray
    codes: np.ndarray
    offsets: np.ndarray


def obs_codes(values: np.ndarray, categories: Sequence[str], column: str, where: str) -> np.ndarray:
    """Category code of each value (int32); a missing value (None) is -1. A value outside
    the categories the driver collected before any work means the input changed since."""
    import pandas as pd  # a vectorised hash lookup

    codes = pd.Index(list(categories), dtype=object).get_indexer(np.asarray(values, dtype=object))
    if not (codes < 0).any():
        return codes.astype(np.int32)
    bad = [v for v, c in zip(values.tolist(), codes.tolist(), strict=True) if c < 0 and v is not None]
    if bad:
        raise InvalidInputError(
            f"{where}: obs column {column!r} holds {bad[0]!r}, which was not among its values "
            f"when the conversion was planned ({len(categories)} categories); the input changed "
            "during the conversion? Re-run the command"
        )
    return codes.astype(np.int32)


@dataclass
class MemoryBucket:
    """One chunk's rows in bucket order, held in memory (what a bucket directory holds):
    CSR arrays in the stored dtypes, per-cell arrays, and each shard's row range
    ``offsets[s]:offsets[s + 1]``."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    cells: np.ndarray
    library_size: np.ndarray
    extra_stats: dict[str, np.ndarray]
    codes: np.ndarray
    offsets: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        arrays = [self.data, self.indices, self.indptr, self.cells, self.library_size, self.codes,
                  self.offsets, *self.extra_stats.values()]
        return sum(a.nbytes for a in arrays)


def held_dtypes(n_genes: int, dtype: str | np.dtype, small_counts: bool) -> tuple[np.dtype, np.dtype]:
    """``(values, indices)`` dtypes a chunk's aligned rows are held in between the scatter
    and the gather (memory or bucket files), when no preprocessing is baked: ``uint16`` ids
    when the vocabulary has at most 65,536 (every id fits), ``uint16`` values when every
    value of the chunk is a whole count in ``[0, 65535]`` (``small_counts``) and the shards
    store float32 or float64 (which hold such counts exactly); otherwise int32 ids and the
    shards' dtype. The gather widens them back while it copies rows (``kernels.fill_rows``),
    so the shards' bytes are the same either way; the held bytes of raw counts are halved
    (less memory to zero and hold in one pass, half the bucket files in two stages)."""
    target = np.dtype(dtype)
    compact_values = small_counts and target.kind == "f" and target.itemsize >= 4
    return (np.dtype(np.uint16) if compact_values else target,
            np.dtype(np.uint16) if 0 < n_genes <= 1 << 16 else np.dtype(np.int32))


def _read_and_align(task: ScatterTask, reuse: bool = True) -> _Bucket:
    """Read the chunk, check its values, align and order its rows by destination shard
    (``reuse``: the aligned arrays in this thread's scratch buffers, else owned arrays);
    without preprocessing, in the compact dtypes of :func:`held_dtypes`."""
    rows = task.source.read_rows(task.chunk.start, task.chunk.stop, task.obs_columns, reuse=True)
    raw = rows.matrix
    small_counts = check_values(raw.data, task.dtype, task.where, allow_negative=task.allow_negative)
    alignment = task.alignment.load()
    dest = chunk_destinations(task.counts, task.seed, task.chunk.index, task.shuffle)
    order = np.argsort(dest, kind="stable")  # rows grouped by destination shard
    arena = task.arena if not reuse and task.transform is None else None
    allocate = arena.take if arena is not None else None  # else reuse: scratch buffers, written
    aligned: Any                                           # out before this task returns
    if task.transform is None:
        value_dtype, index_dtype = held_dtypes(task.n_genes, task.dtype, small_counts)
        aligned, library_size = align_rows_held(raw, alignment, value_dtype, index_dtype, row_order=order,
                                                reuse=reuse, allocate=allocate)
    else:
        aligned, library_size = align_rows_with_totals(raw, alignment, row_order=order, reuse=reuse)
    if arena is not None:
        arena.give_back(aligned.data, aligned.nnz)  # the dropped genes' slack, when last taken
    if rows.library_size is not None:  # the source knows totals over genes it did not return
        library_size = np.asarray(rows.library_size, dtype=np.float64)[order]
    extra_stats: dict[str, np.ndarray] = {}
    if task.transform is not None:  # HVG restriction, baked normalisation, size factors
        aligned, extra_stats = task.transform.apply(raw, aligned, library_size, task.where, order=order)
    if task.obs_columns:
        codes = np.stack([obs_codes(rows.obs[c], task.categories[c], c, task.where)[order]
                          for c in task.obs_columns], axis=1)
    else:
        codes = np.zeros((len(order), 0), dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(task.counts)]).astype(np.int64)
    if task.histogram_path:  # before the bucket is complete: a reused bucket has its histogram
        chunk_histogram(aligned.indices, _stored(aligned.data, task.dtype), task.n_genes).save(task.histogram_path)
    return _Bucket(aligned, library_size, extra_stats, np.asarray(rows.cell_ids[order], dtype=str),
                   codes, offsets)


def _stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """Held values as they are (compact ``uint16`` counts, which equal the stored ones), or
    cast to the shards' dtype."""
    values = np.asarray(values)
    return values if values.dtype == np.uint16 else values.astype(dtype, copy=False)


def _held_indices(indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices)
    return indices if indices.dtype == np.uint16 else indices.astype(np.int32, copy=False)


def _save(tmp: Path, bucket: _Bucket, dtype: str) -> None:
    """Write a bucket's files (the fault points name the crash points tests use)."""
    np.save(tmp / "data.npy", _stored(bucket.aligned.data, dtype))
    faults.fault_point("scatter:partial")
    np.save(tmp / "indices.npy", _held_indices(bucket.aligned.indices))
    np.save(tmp / "indptr.npy", bucket.aligned.indptr.astype(np.int64, copy=False))
    np.save(tmp / "cells.npy", bucket.cells)
    np.save(tmp / "library_size.npy", bucket.library_size)  # already in bucket order, as are
    for stat_name, stat in bucket.extra_stats.items():       # the aligned rows and extra stats
        np.save(tmp / f"{stat_name}.npy", stat)
    np.save(tmp / "codes.npy", bucket.codes)
    np.save(tmp / "offsets.npy", bucket.offsets)
    faults.fault_point("scatter:written")


def scatter_to_memory(task: ScatterTask) -> MemoryBucket:
    """Scatter task of a one-pass conversion: read, validate and align one chunk, grouped by
    shard, into arrays of its own (no file written)."""
    bucket = _read_and_align(task, reuse=False)
    held = MemoryBucket(
        data=_stored(bucket.aligned.data, task.dtype),
        indices=_held_indices(bucket.aligned.indices),
        indptr=np.asarray(bucket.aligned.indptr).astype(np.int64, copy=False),
        cells=bucket.cells, library_size=bucket.library_size, extra_stats=bucket.extra_stats,
        codes=bucket.codes, offsets=bucket.offsets,
    )
    faults.fault_point("scatter:held")
    return held


def run_scatter(task: ScatterTask) -> int:
    """Scatter task: read, validate and align one chunk; write it grouped by shard.
    Returns the number of shard offsets (shards + 1); a complete bucket is reused."""
    out = Path(task.bucket_dir)
    if out.is_dir() and (not task.histogram_path or Path(task.histogram_path).is_file()):
        return int(np.load(out / "offsets.npy").shape[0])  # complete from an earlier run
    bucket = _read_and_align(task)
    tmp = attempt_name(out)
    tmp.mkdir(parents=True)
    _save(tmp, bucket, task.dtype)
    try:
        os.replace(tmp, out)
    except OSError:  # another attempt of this task finished first: same bytes, keep its bucket
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    faults.fault_point("scatter:renamed")
    return len(bucket.offsets)
