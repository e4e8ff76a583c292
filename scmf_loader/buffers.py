"""Reusable output buffers for batches that are copies (gathers, padded and dense outputs).

A fresh multi-megabyte array per batch is mapped by malloc and unmapped when the batch is
freed, so every batch pays a page fault per 4 KiB of output, which costs more than the
copy itself. :func:`empty` hands out arrays carved from a few retained buffers instead; a
buffer is reused only when nothing references it any more (its reference count shows no
live view), so a batch a caller keeps is never overwritten. Per process and thread-safe;
at most :data:`MAX_RETAINED_BYTES` are retained.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

__all__ = ["MAX_RETAINED_BYTES", "empty", "zeros"]

MAX_RETAINED_BYTES = 64 << 20
_MIN_BUFFER = 1 << 20
_buffers: list[np.ndarray] = []
_lock = threading.Lock()


def empty(shape: int | tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised array like ``np.empty``, backed by a retained buffer when one is free."""
    dtype = np.dtype(dtype)
    count = shape if isinstance(shape, (int, np.integer)) else math.prod(shape)  # np.prod: ~2.5 us a call
    nbytes = int(count) * dtype.itemsize
    if nbytes < _MIN_BUFFER // 4:
        return np.empty(shape, dtype)
    with _lock:
        for i in range(len(_buffers)):
            if sys.getrefcount(_buffers[i]) <= 2:  # the list and this call: no live view
                if _buffers[i].nbytes < nbytes:  # too small: replace it with a larger one
                    _buffers[i] = np.empty(nbytes + nbytes // 4, dtype=np.uint8)
                return _buffers[i][:nbytes].view(dtype).reshape(shape)
        buf = np.empty(max(nbytes + nbytes // 4, _MIN_BUFFER), dtype=np.uint8)
        if sum(b.nbytes for b in _buffers) + buf.nbytes <= MAX_RETAINED_BYTES:
            _buffers.append(buf)
        return buf[:nbytes].view(dtype).reshape(shape)


def zeros(shape: int | tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """Like ``np.zeros``, from :func:`empty`."""
    out = empty(shape, dtype)
    out.fill(0)
    return out
