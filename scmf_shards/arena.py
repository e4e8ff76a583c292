"""One block of memory for the aligned rows a one-pass conversion holds, faulted in ahead of
use by a background thread.

Every page a process touches for the first time is zeroed by the kernel: for the ~1.7 GB a
one-pass conversion of 100k cells holds, that cost ~1.7 s of CPU on this VM (``clear_page``
in a profile), paid inside the alignment kernel. The conversion's start is mostly waiting on
the disk (the sources' checksum is its cold read), so the zeroing is moved there: an
:class:`Arena` is allocated as the conversion starts and a thread touches its pages while the
checksum runs; the scatter tasks then take their output arrays from it (:meth:`Arena.take`,
thread-safe, a bump allocator) and fall back to ordinary arrays once it is used up. The arena
never changes what is written, only where the held arrays live.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["Arena"]

_ALIGN = 64  # every array starts on a cache line
_PAGE = 4096
_STEP = 4 << 20  # pages touched per step, under the lock (~1 ms: take() waits at most that)


class Arena:
    """``nbytes`` of memory handed out as 1-d arrays by :meth:`take`; :meth:`prefault`
    starts a daemon thread touching its pages."""

    def __init__(self, nbytes: int) -> None:
        self._buf = np.empty(max(int(nbytes), _ALIGN) + _ALIGN, dtype=np.uint8)
        self._base = self._top = -self._buf.__array_interface__["data"][0] % _ALIGN  # a cache line
        self._last = -1  # offset of the last array taken
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def used(self) -> int:
        """Bytes handed out so far (from the first aligned byte)."""
        return self._top - self._base

    def prefault(self) -> None:
        """Touch every page in a background thread (stops at :meth:`stop`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._touch, name="scmf-prefault", daemon=True)
            self._thread.start()

    def _touch(self) -> None:
        # Touching writes a zero into each page, so it must never reach memory already
        # handed out: each step runs under the allocation lock and starts at the top of what
        # :meth:`take` has handed out so far (a page only partly handed out is touched at its
        # first free byte). Touching a page before it is handed out is harmless; after, it
        # would overwrite rows already written (seen at 100k cells with 2 workers: one zeroed
        # index per page in the shards, while the checksums matched the corrupted bytes).
        for lo in range(0, self._buf.size, _STEP):
            if self._stop.is_set():
                return
            with self._lock:
                start = max(lo, self._top)
                if start < lo + _STEP:
                    self._buf[start : lo + _STEP : _PAGE] = 0

    def stop(self) -> None:
        """Stop touching pages (the arena stays usable) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def take(self, n: int, dtype: np.dtype | str) -> np.ndarray | None:
        """An uninitialised array of ``n`` items of ``dtype`` from the arena, or None when it
        does not fit in what is left."""
        dtype = np.dtype(dtype)
        need = _rounded(int(n) * dtype.itemsize)
        with self._lock:
            if self._top + need > self._buf.size:
                return None
            lo = self._top
            self._top += need
            self._last = lo
        return self._buf[lo : lo + int(n) * dtype.itemsize].view(dtype)

    def give_back(self, a: np.ndarray, keep: int) -> None:
        """Return what follows the first ``keep`` items of ``a`` (an array :meth:`take` handed
        out, or a view starting where it starts) when it is still the last array taken (else
        nothing changes: that tail stays unused)."""
        start = a.__array_interface__["data"][0] - self._buf.__array_interface__["data"][0]
        with self._lock:
            if start == self._last and 0 <= start < self._top:
                self._top = min(self._top, start + _rounded(int(keep) * a.itemsize))


def _rounded(nbytes: int) -> int:
    return -(-max(nbytes, 1) // _ALIGN) * _ALIGN
