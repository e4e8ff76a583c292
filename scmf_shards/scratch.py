"""Reusable per-thread scratch buffers for the converter's large, short-lived arrays.

A conversion task allocates arrays the size of a read chunk or of a shard, uses them, and
writes them out. Allocating fresh memory for each task costs a page fault per page on first
touch (measured here at 0.3–3 s per GB on a VM, more than the work itself); reusing one
buffer per role and thread costs it once. A buffer handed out by :func:`scratch` is valid
until the next call with the same ``role`` on the same thread: callers must not keep it
beyond their task.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

__all__ = ["csr_view", "map_items", "release", "release_all", "scratch"]

_local = threading.local()


def scratch(role: str, n: int, dtype: np.dtype | str) -> np.ndarray:
    """An uninitialised 1-d array of ``n`` items of ``dtype``, backed by this thread's buffer
    for ``role`` (grown when too small, never shrunk)."""
    dtype = np.dtype(dtype)
    pool: dict[str, np.ndarray] | None = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    need = max(int(n) * dtype.itemsize, 1)
    buf = pool.get(role)
    if buf is None or buf.nbytes < need:
        pool.pop(role, None)  # free the old buffer before taking the larger one
        buf = pool[role] = np.empty(need + need // 8, dtype=np.uint8)  # headroom: fewer regrowths
    return buf[: int(n) * dtype.itemsize].view(dtype)


def release(*prefixes: str) -> None:
    """Drop this thread's buffers whose role starts with any of ``prefixes`` (e.g. the read
    and alignment buffers of the scatter stage once the gather stage starts)."""
    pool: dict[str, np.ndarray] | None = getattr(_local, "pool", None)
    for role in [r for r in (pool or {}) if r.startswith(prefixes)]:
        del pool[role]  # type: ignore[union-attr]


def release_all() -> None:
    """Drop this thread's buffers (e.g. at the end of a conversion run in-process)."""
    _local.pool = {}


def csr_view(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> Any:
    """A scipy CSR matrix over ``data`` and ``indices`` as they are (no copy): scipy's own
    constructor copies any array that is a view of a much larger buffer (``prune``), which
    every scratch buffer view is, so the reuse would be lost. ``indptr`` is cast to the
    index dtype (a small copy) so that scipy's compiled routines accept the pair."""
    import scipy.sparse as sp

    indptr = np.asarray(indptr)
    if indices.dtype == np.int32 and (indptr.size == 0 or int(indptr[-1]) <= np.iinfo(np.int32).max):
        indptr = indptr.astype(np.int32, copy=False)
    else:
        indices, indptr = indices.astype(np.int64, copy=False), indptr.astype(np.int64, copy=False)
    m = sp.csr_matrix(shape, dtype=data.dtype)
    m.data, m.indices, m.indptr = data, indices, indptr
    return m


def map_items(path: str | os.PathLike[str], dtype: np.dtype, offset: int, lo: int, hi: int) -> np.ndarray:
    """Items ``[lo, hi)`` of an array of ``dtype`` stored raw from byte ``offset`` of a file,
    memory-mapped read-only over just those bytes (read from the page cache, no fresh memory;
    the pages count in the process's resident memory only while the array lives)."""
    dtype = np.dtype(dtype)
    if hi == lo:
        return np.zeros(0, dtype=dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=offset + lo * dtype.itemsize, shape=(hi - lo,)))
