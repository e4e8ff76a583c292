"""The gather stage: one task per shard collects its rows from every bucket (bucket files of
a two-stage conversion, or the :class:`~scmf_shards.convert.scatter.MemoryBucket` of a
one-pass one), applies the in-shard permutation, writes the shard (temporary name, then
rename) and its completion record. The CSR arrays are streamed to their files block by block
from where the rows lie (:func:`_streamed_csr`). Memory: small per-cell arrays and 4 MiB blocks;
a bucket file is mapped only over this shard's stretch of it, while the shard is written."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from scmf_loader.errors import ScmfError
from scmf_loader.format import ShardEntry, shard_relpath
from scmf_loader.format._common import hasher
from scmf_loader.format.integrity import shard_ok
from scmf_loader.format.writer import ARRAY_CHECKSUM
from scmf_loader.vocab import GeneVocab
from scmf_shards import faults
from scmf_shards.convert.workspace import Workspace, bucket_path
from scmf_shards.kernels import block_bounds, fill_rows
from scmf_shards.medians import VAR_COLUMN, load_medians
from scmf_shards.plan import shard_permutation
from scmf_shards.scratch import map_items, scratch
from scmf_shards.scratch import release as scratch_release
from scmf_shards.write import ShardContent, StreamedArray, attempt_name, write_shard

__all__ = ["CELL_STATS", "BucketPiece", "GatherTask", "reusable_shard", "run_gather"]

CELL_STATS = ("library_size",)
#: held around the anndata part of a shard write (obs, var, zarr metadata): the writer silences
#: anndata/zarr warnings with ``warnings.catch_warnings``, which is not thread-safe (a second
#: task thread restoring the filters lets the first one's warnings through, as errors under
#: pytest); the CSR chunk files, nearly all of the bytes, are written outside it, in parallel
_WRITE_LOCK = threading.Lock()


@dataclass(frozen=True)
class GatherTask:
    """Everything one gather task needs (small and picklable)."""

    shard: int
    out_dir: str
    bucket_root: str  # where the buckets live (.scmf-tmp/buckets, or in --scratch-dir)
    vocab_sha256: str
    n_genes: int
    obs_columns: tuple[str, ...]
    categories: Mapping[str, Sequence[str]]
    seed: int
    shuffle: bool
    dtype: str
    cell_stats: tuple[str, ...] = CELL_STATS
    #: one-pass conversions: every chunk's bucket, held in memory (chunk index -> MemoryBucket)
    memory: Mapping[int, Any] | None = field(default=None, repr=False, compare=False)


@dataclass
class BucketPiece:
    """The rows one bucket holds for one shard: where they lie in its data/indices files,
    and their small per-cell arrays (read into memory)."""

    bucket: Path
    starts: np.ndarray
    stops: np.ndarray
    cells: np.ndarray
    library_size: np.ndarray
    codes: np.ndarray
    source: int
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    held: Any = None  # the MemoryBucket (one-pass), else None: values are read from files


def reusable_shard(out_dir: str | os.PathLike[str], shard: int) -> dict[str, Any] | None:
    """The manifest entry of shard ``shard`` when a completion record says it is done and
    the shard on disk verifies (every size and checksum), else None."""
    out = Path(out_dir)
    record, final = Workspace.at(out).record(shard), out / shard_relpath(shard)
    if record.is_file() and final.is_dir():
        entry = ShardEntry.from_dict(json.loads(record.read_text()), shard)
        if shard_ok(out, entry):
            return entry.to_dict()
    return None


def run_gather(task: GatherTask) -> dict[str, Any]:
    """Gather task: collect one shard's rows from every bucket, permute, write the shard.
    Returns the shard's manifest entry (as a dict); a shard that verifies is reused."""
    scratch_release("h5ad.", "align.")  # the scatter stage is over: its buffers are not needed
    out_dir = Path(task.out_dir)
    ws = Workspace.at(out_dir)
    relpath = shard_relpath(task.shard)
    record, final = ws.record(task.shard), out_dir / relpath
    done = reusable_shard(out_dir, task.shard)
    if done is not None:
        return done
    pieces = collect_pieces(task, ws)
    perm = shard_permutation(sum(len(p.starts) for p in pieces), task.seed, task.shard, task.shuffle)
    data, indices, indptr = _streamed_csr(task, pieces, perm)  # from held chunks or mapped buckets
    cells, codes, numeric = _gather_obs(task, pieces, perm)
    content = ShardContent(
        data=data, indices=indices, indptr=indptr, n_genes=task.n_genes, cell_ids=cells,
        obs_codes=codes,
        obs_categories={"source": task.categories["source"],
                        **{c: task.categories[c] for c in task.obs_columns}},
        var_names=_vocab_tokens(str(ws.vocab), task.vocab_sha256), numeric_obs=numeric,
        var_columns={VAR_COLUMN: load_medians(ws.medians, task.n_genes)},
    )
    entry = write_shard(final, relpath, content, after_step=faults.fault_point, lock=_WRITE_LOCK)
    faults.fault_point("gather:shard")
    d = entry.to_dict()
    tmp_record = attempt_name(record)
    tmp_record.write_text(json.dumps(d))
    faults.fault_point("gather:record-tmp")
    os.replace(tmp_record, record)
    faults.fault_point("gather:record")
    return d


def collect_pieces(task: GatherTask, ws: Workspace) -> list[BucketPiece]:
    """This shard's rows in every bucket, in chunk order. Only the small per-cell arrays
    are read here; values and indices are copied later, one bucket at a time."""
    extra_names = [k for k in task.cell_stats if k != "library_size"]
    chunks, chunk_sources = _shard_chunks(ws, task.shard)
    pieces = []
    for c, source_index in zip(chunks.tolist(), chunk_sources.tolist(), strict=True):
        if task.memory is not None:
            piece = _held_piece(task.memory[c], task.shard, source_index, extra_names)
        else:
            piece = _file_piece(bucket_path(task.bucket_root, c), task.shard, source_index, extra_names)
        if piece is not None:
            pieces.append(piece)
    return pieces


def _file_piece(b: Path, shard: int, source: int, extra_names: list[str]) -> BucketPiece | None:
    """A shard's rows in bucket directory ``b`` (None when it holds none)."""
    offsets = np.load(b / "offsets.npy")
    lo, hi = int(offsets[shard]), int(offsets[shard + 1])
    if hi == lo:
        return None
    indptr = _rows(b / "indptr.npy", lo, hi + 1)
    return BucketPiece(
        bucket=b, starts=indptr[:-1], stops=indptr[1:],
        cells=_rows(b / "cells.npy", lo, hi), library_size=_rows(b / "library_size.npy", lo, hi),
        codes=_rows(b / "codes.npy", lo, hi), source=source,
        extra={k: _rows(b / f"{k}.npy", lo, hi) for k in extra_names},
    )


def _held_piece(held: Any, shard: int, source: int, extra_names: list[str]) -> BucketPiece | None:
    """A shard's rows in a bucket held in memory (views, no copy; None when it holds none)."""
    lo, hi = int(held.offsets[shard]), int(held.offsets[shard + 1])
    if hi == lo:
        return None
    return BucketPiece(
        bucket=Path(), starts=held.indptr[lo:hi], stops=held.indptr[lo + 1 : hi + 1],
        cells=held.cells[lo:hi], library_size=held.library_size[lo:hi], codes=held.codes[lo:hi],
        source=source, extra={k: held.extra_stats[k][lo:hi] for k in extra_names}, held=held,
    )


#: items per block of a streamed shard array (4 MiB of int32/float32: cached between the gather
#: that fills it, its checksum and the write that copies it to the page cache)
STREAM_BLOCK = 1 << 20


def _streamed_csr(task: GatherTask, pieces: Sequence[BucketPiece],
                  perm: np.ndarray) -> tuple[StreamedArray, StreamedArray, np.ndarray]:
    """The shard's CSR arrays, ``data`` and ``indices`` as :class:`StreamedArray`: when the
    writer asks, the rows are copied in shard order from the buckets (held in memory, or bucket
    files memory-mapped read-only: only this shard's stretch of each is touched, from the page
    cache) into a small block buffer, hashed and written, block by block: no shard-sized copy."""
    if not pieces:  # a shard with no rows (only an empty input makes one)
        return (StreamedArray(np.dtype(task.dtype), 0, lambda f: ""), StreamedArray(np.dtype(np.int32), 0, lambda f: ""),
                np.zeros(1, dtype=np.int64))
    # a bucket file is mapped from this shard's first row on (_bucket_array): starts relative to it
    base = [0 if p.held is not None else int(p.starts[0]) for p in pieces]
    starts = np.concatenate([np.asarray(p.starts) - b for p, b in zip(pieces, base, strict=True)])[perm]
    length = (np.concatenate([np.asarray(p.stops) - b for p, b in zip(pieces, base, strict=True)])[perm]
              - starts).astype(np.int64)
    piece = np.concatenate([np.full(len(p.starts), k, dtype=np.int64) for k, p in enumerate(pieces)])[perm]
    by_piece = [np.flatnonzero(piece == k) for k in range(len(pieces))]
    indptr = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(length, out=indptr[1:])
    bounds = block_bounds(indptr, STREAM_BLOCK)
    size = 2 * STREAM_BLOCK + int(length.max(initial=0))  # holds any block (block_bounds)

    def stream(name: str, dtype: np.dtype) -> StreamedArray:
        def write(f: Any) -> str:
            sources = [_bucket_array(p, name) for p in pieces]
            buf = scratch(f"gather.block.{name}", size, dtype)
            h = hasher(ARRAY_CHECKSUM)
            for r0, r1 in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                w = fill_rows(sources, by_piece, starts, indptr, r0, r1, buf)
                view = memoryview(buf[:w]).cast("B")
                h.update(view)
                f.write(view)
            return str(h.hexdigest())

        return StreamedArray(np.dtype(dtype), int(indptr[-1]), write)

    return stream("data", np.dtype(task.dtype)), stream("indices", np.dtype(np.int32)), indptr


def _bucket_array(piece: BucketPiece, name: str) -> np.ndarray:
    """A held bucket's whole ``data`` or ``indices`` array, or the stretch of a bucket file that
    holds this shard's rows (items ``[starts[0], stops[-1])``: one contiguous stretch per
    bucket) memory-mapped read-only, so that the pages the gather touches, and the process's
    resident memory, stay within this shard's bytes."""
    if piece.held is not None:
        return np.asarray(getattr(piece.held, name))
    path = piece.bucket / f"{name}.npy"
    lo, hi = int(piece.starts[0]), int(piece.stops[-1])
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if len(shape) != 1 or not 0 <= lo <= hi <= shape[0]:
        raise ScmfError(f"{path}: expected a 1-d array holding items [{lo}, {hi}), found shape {shape}")
    return map_items(path, dtype, offset, lo, hi)


def _gather_obs(task: GatherTask, pieces: Sequence[BucketPiece], perm: np.ndarray
                ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cell ids, obs codes (``source`` first) and numeric per-cell stats, permuted."""
    def cat(arrays: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
        return np.concatenate(arrays)[perm] if arrays else empty

    cells = cat([np.asarray(p.cells) for p in pieces], np.zeros(0, str))
    codes = cat([np.asarray(p.codes) for p in pieces], np.zeros((0, len(task.obs_columns)), np.int32))
    obs_codes = {"source": cat([np.full(len(p.starts), p.source, dtype=np.int32) for p in pieces],
                               np.zeros(0, np.int32))}
    obs_codes.update({c: codes[:, j] for j, c in enumerate(task.obs_columns)})
    numeric = {"library_size": cat([np.asarray(p.library_size) for p in pieces], np.zeros(0))}
    for k in task.cell_stats:
        if k != "library_size":
            numeric[k] = cat([p.extra[k] for p in pieces], np.zeros(0))
    return cells, obs_codes, numeric


def _shard_chunks(ws: Workspace, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunks that send cells to ``shard`` and their sources, from the plan files (so a
    gather task carries no per-chunk lists: O(1) to submit whatever the dataset size)."""
    row = np.array(np.load(ws.table, mmap_mode="r")[shard])
    chunks = np.flatnonzero(row)
    plan = ws.read_plan()  # ~1 ms for 6,000 chunks
    if plan is None or "chunk_sources" not in plan:
        raise ScmfError(f"{ws.plan}: missing or unreadable; re-run the conversion")
    return chunks, np.asarray(plan["chunk_sources"], dtype=np.int64)[chunks]


def _rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a ``.npy`` file, copied into memory; the file is closed."""
    return np.array(np.load(path, mmap_mode="r")[start:stop])


@lru_cache(maxsize=4)
def _vocab_tokens(vocab_file: str, vocab_sha256: str) -> tuple[str, ...]:
    vocab = GeneVocab.from_file(vocab_file)
    if vocab.sha256() != vocab_sha256:
        raise ScmfError(f"{vocab_file}: vocabulary changed during the conversion")
    return tuple(vocab.tokens)
