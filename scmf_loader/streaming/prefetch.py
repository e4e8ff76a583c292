"""Background shard fetching for one streaming reader (one process: a rank or a worker).

A small thread pool runs :meth:`ShardCache.ensure <scmf_loader.streaming.cache.ShardCache.ensure>`
for the next shards the reader will need, at most ``depth`` ahead, while the reader works on
the current window: downloads overlap reading, and several shards download at once (which
hides per-request latency). A prefetch that finds the cache budget full gives up (the
reader fetches that shard itself when it gets there) rather than waiting, so prefetching
never holds more than the budget allows. Every shard the reader holds is pinned; memory is
bounded by the depth (downloads stream to disk), never by the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["Prefetcher"]


class Prefetcher:
    """Fetch shards ahead of a reader; :meth:`acquire` / :meth:`release` pin and unpin."""

    def __init__(self, cache: Any, depth: int) -> None:
        self.cache = cache
        self.depth = max(int(depth), 0)
        self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="scmf-prefetch") if self.depth else None
        self._futures: dict[int, Future[Any]] = {}

    def want(self, shards: Sequence[int]) -> None:
        """Start fetching the first ``depth`` of ``shards`` (the reader's next ones, in
        order) that are not on their way yet."""
        if self._pool is None:
            return
        for shard in list(shards)[: self.depth]:
            if shard not in self._futures:
                self._futures[shard] = self._pool.submit(self.cache.ensure, shard, patient=False)

    def acquire(self, shard: int) -> None:
        """Return once ``shard`` is in the cache and pinned for the caller (fetching it now
        if no prefetch brought it). A prefetch's error (a shard refused after its checks, a
        store still failing after retries) is raised here."""
        future = self._futures.pop(shard, None)
        if future is not None and future.result() is not None:
            return  # the prefetch's pin is now the caller's
        self.cache.ensure(shard)

    def release(self, shard: int) -> None:
        """Unpin a shard the caller acquired."""
        self.cache.release(shard)

    def close(self) -> None:
        """Stop prefetching; pins taken by prefetches nobody acquired are dropped (now, or
        when a running download ends)."""
        futures, self._futures = self._futures, {}
        for shard, future in futures.items():
            if not future.cancel():
                future.add_done_callback(lambda f, s=shard: self._drop(f, s))
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _drop(self, future: Future[Any], shard: int) -> None:
        if future.exception() is None and future.result() is not None:
            self.cache.release(shard)
