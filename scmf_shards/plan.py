"""Conversion planning: read chunks, shard sizes and the seeded global shuffle (pure numpy).

The global permutation is never materialised. Cells are read in fixed chunks (by source and
row range); a seeded *assignment table* ``K[c, s]`` says how many cells of chunk ``c`` go to
shard ``s``, drawn as a sequence of multivariate hypergeometric samples so that the
row sums are the chunk sizes and the column sums the shard sizes. Inside each chunk the
destinations are randomly permuted; inside each shard the gathered cells are randomly
permuted. The composition is a uniformly random permutation of all cells, computed with
memory O(chunks × shards + chunk + shard), and it depends only on (seed, chunking, sizes) —
never on the number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ReadChunk",
    "assignment_table",
    "chunk_destinations",
    "plan_chunks",
    "rng_for",
    "shard_permutation",
    "shard_sizes",
]

_TAG_TABLE, _TAG_CHUNK, _TAG_SHARD = 1, 2, 3


@dataclass(frozen=True)
class ReadChunk:
    """Rows ``[start, stop)`` of source ``source``; ``index`` is its position in the plan."""

    index: int
    source: int
    start: int
    stop: int

    @property
    def n_cells(self) -> int:
        """Number of rows in this chunk."""
        return self.stop - self.start


def rng_for(seed: int, tag: int, index: int = 0) -> np.random.Generator:
    """A generator determined by (seed, tag, index) alone: portable and order-independent."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, tag, index])))


def plan_chunks(source_sizes: Sequence[int], chunk_size: int) -> list[ReadChunk]:
    """Split each source into row chunks of at most ``chunk_size`` rows, in source order."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks: list[ReadChunk] = []
    for src, n in enumerate(source_sizes):
        for start in range(0, n, chunk_size):
            chunks.append(ReadChunk(len(chunks), src, start, min(start + chunk_size, n)))
    return chunks


def shard_sizes(n_cells: int, shard_size: int) -> np.ndarray:
    """Sizes of ``ceil(n_cells / shard_size)`` shards, as equal as possible (differ by ≤ 1)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    n_shards = max(1, -(-n_cells // shard_size))
    base, extra = divmod(n_cells, n_shards)
    return np.array([base + (i < extra) for i in range(n_shards)], dtype=np.int64)


def assignment_table(
    chunk_sizes: Sequence[int], sizes: Sequence[int], seed: int, shuffle: bool
) -> np.ndarray:
    """``K[c, s]``: cells of chunk ``c`` that go to shard ``s``. Rows sum to the chunk sizes,
    columns to the shard sizes. Without shuffle, cells keep their order (contiguous ranges)."""
    chunk_sizes = np.asarray(chunk_sizes, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if chunk_sizes.sum() != sizes.sum():
        raise ValueError("chunk sizes and shard sizes must sum to the same number of cells")
    table = np.zeros((len(chunk_sizes), len(sizes)), dtype=np.int64)
    if not shuffle:
        c_edges = np.concatenate([[0], np.cumsum(chunk_sizes)])
        s_edges = np.concatenate([[0], np.cumsum(sizes)])
        for c in range(len(chunk_sizes)):
            lo = np.maximum(c_edges[c], s_edges[:-1])
            hi = np.minimum(c_edges[c + 1], s_edges[1:])
            table[c] = np.maximum(hi - lo, 0)
        return table
    rng = rng_for(seed, _TAG_TABLE)
    remaining = sizes.copy()
    for c, n in enumerate(chunk_sizes.tolist()):
        if n == 0:
            continue
        if n == remaining.sum():
            row = remaining.copy()
        else:
            row = rng.multivariate_hypergeometric(remaining, n, method="marginals")
        table[c] = row
        remaining -= row
    return table


def chunk_destinations(counts: np.ndarray, seed: int, chunk: int, shuffle: bool) -> np.ndarray:
    """Destination shard of each row of one chunk, given its row ``counts`` of the table."""
    dest = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    if shuffle:
        rng_for(seed, _TAG_CHUNK, chunk).shuffle(dest)
    return dest


def shard_permutation(n: int, seed: int, shard: int, shuffle: bool) -> np.ndarray:
    """Order of the cells gathered for one shard (identity without shuffle)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return rng_for(seed, _TAG_SHARD, shard).permutation(n)
