"""Read-ahead in the sampler's own order, from background threads of the reading process.

The first epoch in a new process pays for mapping and checking each shard (one pass over
its ``indices``, see :meth:`~scmf_loader.store.DatasetStore.csr`) and for the page faults
of every first touch; an epoch whose pages are not in the page cache waits on the disk
batch by batch, in reads no larger than the kernel's fault read-around. :class:`ReadAhead`
walks the very requests the reader will ask for, ahead of it:

* a *shard* thread first asks whether the next shard of the sequence is in the page cache
  (``mincore`` on 256 sampled pages per array). If not, it asks the kernel for the shard
  whole (:meth:`~scmf_loader.store.DatasetStore.will_need`: ``posix_fadvise(WILLNEED)``,
  large reads in file order, whatever order the batches take) and maps and checks it
  (:meth:`~scmf_loader.store.DatasetStore.prepare`) while the reader is still in the
  current one. A cached shard is left to the reader: its check costs no more on the
  reader's path, and two memory-bound passes at once only contend (measured,
  docs/benchmarks.md);
* an *advise* thread keeps up to ``depth`` batches ahead of the reader (woken once per
  ``depth // 2`` batches) and, for a shard not wholly cached, hands each batch's byte ranges to
  :meth:`~scmf_loader.store.DatasetStore.advise` (``MADV_WILLNEED``: the kernel reads them
  from disk in the background, in large requests, while the reader works on earlier ones;
  with ``populate``, also ``MADV_POPULATE_READ``: the pages mapped into this process).
  A cached shard costs it nothing per batch: on this machine's kernel a fault on a cached
  page costs no more than the read itself (measured, docs/benchmarks.md), so populating
  cached pages would only add work.

Both threads spend their time in system calls and numpy reductions that release the GIL.
Read-ahead is best effort: any error there is dropped (the reader meets and reports it).
"""

from __future__ import annotations

import atexit
import bisect
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

__all__ = ["DEFAULT_DEPTH", "ReadAhead", "runs_of"]

#: batches the advise thread keeps ahead of the reader
DEFAULT_DEPTH = 8
#: pages per array whose residency decides whether a shard is in the page cache (an evicted
#: shard loses most of its pages, and a page the sample missed is only read on demand)
_SAMPLES = 256


def runs_of(ids: np.ndarray | tuple[int, int], offsets: np.ndarray) -> list[tuple[int, int, int]]:
    """``(shard, first local row, stop local row)`` of each contiguous run of cells of a
    request (a ``(start, stop)`` range or an array of global row ids), in order."""
    if isinstance(ids, tuple):
        ids = np.arange(ids[0], ids[1], dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return []
    shards = np.searchsorted(offsets, ids, side="right") - 1
    cut = np.flatnonzero((np.diff(ids) != 1) | (np.diff(shards) != 0)) + 1
    firsts, lasts = np.r_[0, cut], np.r_[cut, len(ids)]
    out = []
    for a, b in zip(firsts.tolist(), lasts.tolist(), strict=True):
        s = int(shards[a])
        lo = int(ids[a] - offsets[s])
        out.append((s, lo, lo + (b - a)))
    return out


#: read-aheads whose threads may still run (see :func:`_stop_all`)
_LIVE: set[ReadAhead] = set()
_LIVE_LOCK = threading.Lock()
#: seconds :func:`_stop_all` waits for each thread at interpreter exit
_EXIT_JOIN_SECONDS = 10.0


def _stop_all() -> None:
    """At interpreter exit, stop every read-ahead that still runs and wait for its threads.

    They must end before the interpreter finalizes: a thread still running then is ended with
    ``pthread_exit`` as it takes the GIL back, and with C++ frames on its stack that aborts the
    whole process ("terminate called without an active exception", status 134). A core dump
    of the quick start showed exactly that: the shard thread, in ``threading.Thread.run``'s
    final ``del self._target``, freeing the last reference to the loader and so a torch
    tensor, whose deallocation released and retook the GIL. So the threads are not daemons,
    and this runs from ``threading``'s own exit hook, before it joins them (an iterator the
    caller abandoned, ``next(iter(loader))``, still lets the program end)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for ahead in live:
        ahead.stop()
    for ahead in live:
        ahead.join(_EXIT_JOIN_SECONDS)


_register_exit = getattr(threading, "_register_atexit", atexit.register)  # runs before non-daemon joins
_register_exit(_stop_all)


class ReadAhead:
    """Background read-ahead over ``requests()`` (a fresh iterator of the epoch's requests,
    each with an ``ids`` attribute, on every call) of ``store``. Call :meth:`consumed` once
    per batch the reader takes, :meth:`stop` when it stops."""

    def __init__(self, store: Any, offsets: np.ndarray, requests: Callable[[], Iterable[Any]],
                 depth: int = DEFAULT_DEPTH, populate: bool = False) -> None:
        self.store = store
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._offsets = self.offsets.tolist()
        self.populate = populate
        self.depth = max(int(depth), 1)
        self._consumed = 0  # batches the reader took (it only ever increments this)
        self._wake_at: int | None = None  # the advise thread waits until _consumed reaches it
        self._stopped = threading.Event()
        self._entered = 0  # distinct shards the advise thread has entered so far
        self._cached: dict[int, bool] = {}  # shard -> wholly in the page cache (shard thread)
        self._moved = threading.Condition()
        self._threads = [
            threading.Thread(target=self._quietly, args=(self._advise, requests), name="scmf-advise"),
            threading.Thread(target=self._quietly, args=(self._prepare, requests), name="scmf-shards"),
        ]
        self._running = len(self._threads)
        with _LIVE_LOCK:
            _LIVE.add(self)
        for t in self._threads:
            t.start()

    def consumed(self) -> None:
        """The reader took one batch: the advise thread may go one further. An integer
        increment unless the advise thread waits (no wake-up per batch of a cached shard)."""
        self._consumed += 1
        wake = self._wake_at
        if wake is not None and self._consumed >= wake:
            with self._moved:
                self._moved.notify_all()

    def stop(self) -> None:
        """End both threads (they exit at their next step)."""
        self._stopped.set()
        with self._moved:
            self._moved.notify_all()

    def join(self, timeout: float | None = None) -> None:
        """Wait for both threads to end (tests, and :func:`_stop_all` at interpreter exit)."""
        for t in self._threads:
            t.join(timeout)

    def _quietly(self, fn: Callable[[Iterator[Any]], None], requests: Callable[[], Iterable[Any]]) -> None:
        try:
            fn(iter(requests()))
        except Exception:  # noqa: BLE001 -- best effort: the reader meets and reports any error
            self._stopped.set()
        finally:
            with _LIVE_LOCK:
                self._running -= 1
                if self._running == 0:
                    _LIVE.discard(self)

    def _first_shard(self, ids: np.ndarray | tuple[int, int]) -> int:
        first = ids[0] if isinstance(ids, tuple) else (int(ids[0]) if len(ids) else 0)
        return bisect.bisect_right(self._offsets, first) - 1

    def _shards(self, requests: Iterator[Any]) -> Iterator[int]:
        """The sequence of shards the requests start in (consecutive repeats dropped)."""
        last = -1
        for request in requests:
            shard = self._first_shard(request.ids)
            if shard != last:
                last = shard
                yield shard

    def _advise(self, requests: Iterator[Any]) -> None:
        last = -1
        for i, request in enumerate(requests):
            self._pace(i)  # the shard thread, which follows this one, must not run far ahead either
            if self._stopped.is_set():
                return
            shard = self._first_shard(request.ids)
            if shard != last:
                last = shard
                with self._moved:
                    self._entered += 1
                    self._moved.notify_all()
            if self.populate or not self._verdict(shard):  # a cached shard costs nothing
                for s, lo, hi in runs_of(request.ids, self.offsets):
                    self.store.advise(s, lo, hi, self.populate)

    def _pace(self, i: int) -> None:
        """Wait until request ``i`` is less than ``depth`` batches ahead of the reader; once
        waiting, until it is half a depth closer (one wake-up per ``depth // 2`` batches,
        not one per batch: each costs the reader a GIL hand-over)."""
        if i < self._consumed + self.depth:
            return
        with self._moved:
            self._wake_at = i - self.depth + 1 + self.depth // 2
            while self._consumed < self._wake_at and not self._stopped.is_set():
                self._moved.wait(0.05)  # bounded: a wake-up racing the flag is at worst late
            self._wake_at = None

    def _verdict(self, shard: int) -> bool:
        """Whether ``shard`` is wholly in the page cache, once the shard thread has asked
        (it does so as soon as the advise thread enters the shard)."""
        with self._moved:
            while shard not in self._cached and not self._stopped.is_set():
                self._moved.wait()
        return self._cached.get(shard, False)

    def _prepare(self, requests: Iterator[Any]) -> None:
        for k, shard in enumerate(self._shards(requests)):
            with self._moved:  # the k-th shard once the reader's read-ahead is in the one before
                while self._entered < k and not self._stopped.is_set():
                    self._moved.wait()
            if self._stopped.is_set():
                return
            cached = False
            try:
                cached = self.store.resident(shard, check=False, samples=_SAMPLES) >= 1.0  # no pass over it
            finally:  # the advise thread waits for this verdict
                with self._moved:
                    self._cached[shard] = cached
                    self._moved.notify_all()
            if cached:  # its check on the reader's path costs no more than here (measured): the
                continue  # two memory-bound passes at once only contend on a busy machine
            if hasattr(self.store, "will_need"):
                self.store.will_need(shard)  # the whole shard, read in file order, in the background
            self.store.prepare(shard)  # mapped and checked while its pages arrive
