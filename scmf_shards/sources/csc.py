"""Rows of a CSC matrix in linear time: one conversion step stores the matrix again as CSR.

Reading rows ``[start, stop)`` of a CSC matrix touches every column, so reading a file
chunk by chunk that way costs O(nnz × chunks): quadratic at scale. Instead the matrix is
transposed once, out of core, into three ``.npy`` files (``data``, ``indices``, ``indptr``)
that row ranges are then read from:

1. one pass over the stored row indices, in blocks of at most ``block_nnz`` entries, counts
   the entries of every row (the CSR ``indptr``);
2. one pass over the columns, in blocks of about ``max(block_nnz, n_cells)`` entries read
   through ``anndata.io.sparse_dataset`` (``matrix[:, a:b]``, the CSC major axis): each
   block is sorted by row (scipy's CSC to CSR) and its entries written at their rows' next
   free positions of memory-mapped output arrays, in increasing position order. Blocks are
   visited in column order, so each row's columns come out sorted.

Time O(nnz + n_cells + n_genes), memory O(n_cells + block_nnz) besides the page cache (a
few tens of bytes per cell); the copy takes the matrix's size on disk. The driver runs this step once per CSC input
(:func:`scmf_shards.sources.prepare_sources`), in the conversion's workspace; a source not
prepared makes its own copy in a temporary directory of the process on its first read.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["DEFAULT_BLOCK_NNZ", "CsrCopy", "transpose_csc"]

DEFAULT_BLOCK_NNZ = 1 << 24
_FILES = ("data.npy", "indices.npy", "indptr.npy")


def _column_blocks(indptr: np.ndarray, block_nnz: int) -> list[tuple[int, int]]:
    """Column ranges holding at most ``block_nnz`` entries each (at least one column)."""
    n = len(indptr) - 1
    blocks, col = [], 0
    while col < n:
        end = int(np.searchsorted(indptr, indptr[col] + block_nnz, side="right")) - 1
        end = min(max(end, col + 1), n)
        blocks.append((col, end))
        col = end
    return blocks


def transpose_csc(node: Any, shape: tuple[int, int], dtype: np.dtype, out_dir: str | os.PathLike[str],
                  block_nnz: int = DEFAULT_BLOCK_NNZ) -> Path:
    """Write the CSC element ``node`` (an anndata sparse group, HDF5 or zarr) as CSR ``.npy``
    files into ``out_dir`` (written under a temporary name, renamed when complete; an
    existing complete ``out_dir`` is reused). Returns ``out_dir``."""
    from anndata.io import sparse_dataset

    out = Path(out_dir)
    if all((out / f).is_file() for f in _FILES):
        return out
    n_cells, n_genes = shape
    col_ptr = np.asarray(node["indptr"][:], dtype=np.int64)
    nnz = int(col_ptr[-1])
    rows_elem = node["indices"]
    counts = np.zeros(n_cells, dtype=np.int64)
    for lo in range(0, nnz, block_nnz):  # pass 1: entries per row
        counts += np.bincount(np.asarray(rows_elem[lo : lo + block_nnz]), minlength=n_cells)[:n_cells]
    row_ptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent if out.parent.exists() else None))
    data = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=dtype, shape=(nnz,))
    indices = np.lib.format.open_memmap(tmp / "indices.npy", mode="w+", dtype=np.int32, shape=(nnz,))
    fill = row_ptr[:-1].copy()
    matrix = sparse_dataset(node)
    # blocks of at least n_cells entries: the O(n_cells) part of each block's conversion
    # then costs at most O(nnz) over all blocks
    for c0, c1 in _column_blocks(col_ptr, max(block_nnz, n_cells)):  # pass 2
        block = sp.csr_matrix(matrix[:, c0:c1])  # this block's entries by row (scipy, C++)
        counts = np.diff(block.indptr)
        # entry e of row r goes to fill[r] + (e - block.indptr[r]): increasing positions
        pos = np.repeat(fill - block.indptr[:-1], counts) + np.arange(block.nnz, dtype=np.int64)
        indices[pos] = block.indices + c0
        data[pos] = block.data
        fill += counts
    data.flush()
    indices.flush()
    del data, indices
    np.save(tmp / "indptr.npy", row_ptr)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same copy first: keep its files
        shutil.rmtree(tmp, ignore_errors=True)
        if not all((out / f).is_file() for f in _FILES):
            raise
    return out


class CsrCopy:
    """Row ranges of a CSR copy written by :func:`transpose_csc` (picklable: a path)."""

    def __init__(self, directory: str | os.PathLike[str], n_genes: int) -> None:
        self.directory = str(directory)
        self.n_genes = n_genes

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` as a CSR matrix (arrays copied out of the memory map)."""
        d = Path(self.directory)
        indptr = np.array(np.load(d / "indptr.npy", mmap_mode="r")[start : stop + 1], dtype=np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = np.array(np.load(d / "data.npy", mmap_mode="r")[lo:hi])
        indices = np.array(np.load(d / "indices.npy", mmap_mode="r")[lo:hi])
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.n_genes))


_PROCESS_COPIES: dict[tuple[str, str], str] = {}


def process_copy(key: tuple[str, str], make: Any) -> str:
    """The directory of this process's own CSR copy for ``key`` (made by ``make(dir)`` on
    first use; removed when the process exits)."""
    found = _PROCESS_COPIES.get(key)
    if found is not None and Path(found).is_dir():
        return found
    base = tempfile.mkdtemp(prefix="scmf-csc-")
    atexit.register(shutil.rmtree, base, True)
    out = str(make(Path(base) / "csr"))
    _PROCESS_COPIES[key] = out
    return out
