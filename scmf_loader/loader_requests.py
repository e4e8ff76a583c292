"""What a :class:`~scmf_loader.dataloader.CellDataLoader` hands its workers: one
:class:`Request` per batch (:class:`Requests`, the torch sampler), and, for worker processes
whose results come as they are done, the :class:`Feed` that records the order the requests
went out in and sends :data:`HOLD` while a worker has too many results waiting."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scmf_loader.samplers import BatchSampler

__all__ = ["HOLD", "Feed", "Hold", "Ref", "Request", "Requests", "feed_limit"]


@dataclass(frozen=True)
class Request:
    """One batch to read: its epoch, its position in this rank's share, and its cell ids
    (or ``(start, stop)`` for a range, see ``BatchSampler.batch_or_range``)."""

    epoch: int
    position: int
    ids: np.ndarray | tuple[int, int]
    tag: int = 1  # the loader's iteration (worker slots are claimed under it)


@dataclass(frozen=True)
class Ref:
    """A worker's answer for a zero-copy batch: the main process builds the views."""

    request: Request


@dataclass(frozen=True)
class Hold:
    """What the DataLoader sends a worker while the loader holds too many results that
    arrived ahead of the one it waits for: the worker answers after :data:`scmf_loader.dataloader._HOLD_SECONDS`."""


HOLD = Hold()


class Feed:
    """The requests of one iteration as the DataLoader takes them (worker processes, results
    as they come): it records the order they went out in, so that :meth:`CellDataLoader._ordered`
    can restore it, and sends holds instead while some worker has ``limit`` results waiting in
    ``pending`` (they came before the one awaited), so that a stalled worker does not make
    the others run out of ring slots or fill memory."""

    def __init__(self, requests: Iterator[Request], limit: int) -> None:
        self.requests = requests
        self.limit = limit
        self.sent: deque[int] = deque()  # positions sent to workers and not yet handed out, in order
        self.pending: dict[int, tuple[int, Any]] = {}  # position: (worker, result) came early
        self.early: dict[int, int] = {}  # worker: its results in pending

    def __iter__(self) -> Feed:
        return self

    def __next__(self) -> Request | Hold:
        if self.sent and self.early and max(self.early.values()) >= self.limit:
            return HOLD
        request = next(self.requests)
        self.sent.append(request.position)
        return request


def feed_limit(prefetch: int, slots: int) -> int:
    """Results of one worker that may wait for an earlier one before the feed sends holds.
    A worker's slots hold its waiting results, the one the caller has, and the one it
    builds; up to ``prefetch`` more of its requests may still come after holds begin: so
    ``slots - prefetch - 1`` keeps it within its slots (2 by default). Without slots
    (``slots_per_worker=0``), ``prefetch``."""
    return max(1, slots - prefetch - 1) if slots > 0 else prefetch


class Requests(torch.utils.data.Sampler[Request]):
    """Tags the wrapped sampler's batches of one epoch, from a start position on; what the
    workers see leaves out the batches ``skip`` says the loader's process reads itself."""

    def __init__(self, sampler: BatchSampler) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.start = 0
        self.tag = 1
        self.skip: Callable[[Any], bool] | None = None
        self.feed_limit = 0  # > 0: iterate as a Feed holding at most this many early results
        self.feed: Feed | None = None

    def __len__(self) -> int:
        return len(self.sampler) - self.start

    def all(self, epoch: int | None = None, start: int | None = None, tag: int | None = None) -> Iterator[Request]:
        """Every request of the epoch from the start position, skipped ones included (of
        the given epoch, start and tag, default the current ones)."""
        epoch = self.epoch if epoch is None else epoch
        start = self.start if start is None else start
        tag = self.tag if tag is None else tag
        for i, ids in enumerate(self.sampler.batches_or_ranges(epoch, start), start=start):
            yield Request(epoch, i, ids, tag)

    def __iter__(self) -> Iterator[Any]:
        skip = self.skip
        requests = self.all() if skip is None else (r for r in self.all() if not skip(r.ids))
        if self.feed_limit:
            self.feed = Feed(requests, self.feed_limit)
            return self.feed
        return requests
