"""Pure planning of a streaming epoch: which cells each (rank, worker) reads, in which batches.

No I/O, no processes: every function here is arithmetic over shard sizes, O(shards) per rank
and O(window) per shuffle window, and tested over many world shapes
(``tests/test_streaming_plan.py``).

One epoch, seen from one rank:

1. **Stream.** Shards are visited in an order drawn from ``(seed, epoch)`` (identity without
   shuffle); their cells, concatenated in that order, form the epoch's *stream*.
2. **Ranks.** The stream is cut into batches of ``batch_size`` cells (the last one partial),
   and :func:`scmf_loader.world.partition` gives each rank a contiguous stretch of them with
   ``DistributedSampler`` semantics: with ``drop_last=False`` every cell exactly once over all
   ranks plus padding (batches repeated from the stream's start) so every rank gets the same
   number of batches; with ``drop_last=True`` full batches only, the stream's tail dropped.
   A rank's stretch is a list of *segments* ``(shard, lo, hi)``: whole shards except at its
   two ends.
3. **Shuffle windows.** The rank's cells are grouped into windows of about
   ``window_shards`` segments, cut at batch boundaries. Inside a window, blocks of
   ``block_size`` cells (a divisor of ``batch_size``; by default the batch itself, so a
   batch is one contiguous range: zero copy) are permuted with a generator drawn from
   ``(seed, epoch, rank, window)`` and grouped into batches. This is the shuffle buffer
   across the shards in flight: a window's shards are the ones held in the cache while it
   is read. Every batch but the rank's last holds exactly ``batch_size`` cells, so the rank
   yields ``ceil(cells / batch_size)`` batches, the same on every rank.
4. **Workers.** A rank's batches (a list fixed by the above, whatever the number of
   DataLoader workers) are split into contiguous ranges, one per worker, cut at window
   boundaries where that keeps the split balanced, so a worker reads whole shards.
   A ``DataLoader`` returns its workers' batches round-robin (:func:`consumed_per_worker`),
   which is what makes an exact resume computable: :func:`remaining_after`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from scmf_loader.errors import ConfigurationError
from scmf_loader.world import partition

__all__ = [
    "Range",
    "RankPlan",
    "Run",
    "assign_workers",
    "consumed_per_worker",
    "plan_rank",
    "remaining_after",
    "shard_order",
    "worker_ranges",
]

Run = tuple[int, int, int]  # (shard, first local cell, stop): one contiguous run of a batch
Range = tuple[int, int]  # [start, stop) of a rank's batch positions

_WINDOW_KEY = 0x57AE  # seeds the block permutation of a window (apart from the shard order)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(keys)))


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order the epoch visits shards in: a permutation drawn from ``(seed, epoch)``, or
    ``0, 1, ...`` without shuffle."""
    if not shuffle:
        return np.arange(n_shards, dtype=np.int64)
    return _rng(seed, epoch).permutation(n_shards).astype(np.int64)


def _stream_ranges(n_cells: int, batch_size: int, world_size: int, rank: int,
                   drop_last: bool) -> list[Range]:
    """The rank's cells as ranges of the stream, padding included (DistributedSampler)."""
    n_batches = n_cells // batch_size if drop_last else -(-n_cells // batch_size)
    positions = partition(n_batches, world_size, rank, drop_last=drop_last).positions
    ranges: list[Range] = []
    p, stop = positions.start, positions.stop
    while p < stop:  # positions past n_batches wrap around to the stream's start
        q = p % n_batches
        run = min(stop - p, n_batches - q)
        ranges.append((q * batch_size, min((q + run) * batch_size, n_cells)))
        p += run
    return ranges


def _segments(sizes: np.ndarray, order: np.ndarray, ranges: list[Range]) -> np.ndarray:
    """``(shard, lo, hi)`` rows covering the stream ranges, adjacent pieces merged."""
    cum = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(sizes[order], out=cum[1:])
    rows: list[list[int]] = []
    for c0, c1 in ranges:
        i = int(np.searchsorted(cum, c0, side="right")) - 1
        while c0 < c1:
            shard, base = int(order[i]), int(cum[i])
            hi = min(c1, int(cum[i + 1])) - base
            if hi > c0 - base:
                if rows and rows[-1][0] == shard and rows[-1][2] == c0 - base:
                    rows[-1][2] = hi
                else:
                    rows.append([shard, c0 - base, hi])
            c0 = base + hi
            i += 1
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


@dataclass(frozen=True, eq=False)
class RankPlan:
    """One rank's epoch: its stream ``segments`` (rows ``(shard, lo, hi)``), their cell
    offsets ``starts``, ``n_batches`` (the same on every rank) and the shuffle ``windows``
    (batch positions where each window starts, ending with ``n_batches``)."""

    epoch: int
    rank: int
    seed: int
    shuffle: bool
    batch_size: int
    block_size: int
    segments: np.ndarray
    starts: np.ndarray
    n_batches: int
    windows: np.ndarray
    _cache: dict[int, list[tuple[Run, ...]]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_cells(self) -> int:
        """Cells this rank reads in the epoch (padding included)."""
        return int(self.starts[-1])

    @property
    def n_windows(self) -> int:
        """Number of shuffle windows."""
        return len(self.windows) - 1

    def window_of(self, position: int) -> int:
        """The window holding batch ``position``."""
        return int(np.searchsorted(self.windows, position, side="right")) - 1

    def _cells(self, window: int) -> Range:
        b0, b1 = int(self.windows[window]), int(self.windows[window + 1])
        return b0 * self.batch_size, min(b1 * self.batch_size, self.n_cells)

    def _runs(self, c0: int, c1: int) -> list[Run]:
        """Stream cells ``[c0, c1)`` as runs of shards."""
        out: list[Run] = []
        i = int(np.searchsorted(self.starts, c0, side="right")) - 1
        while c0 < c1:
            shard, lo, hi = (int(x) for x in self.segments[i])
            base = int(self.starts[i])
            stop = min(c1 - base + lo, hi)
            out.append((shard, c0 - base + lo, stop))
            c0 = base + stop - lo
            i += 1
        return out

    def window_shards(self, window: int) -> list[int]:
        """The shards window ``window`` reads, in stream order (each once)."""
        c0, c1 = self._cells(window)
        seen: dict[int, None] = {}
        for shard, _, _ in self._runs(c0, c1):
            seen.setdefault(shard)
        return list(seen)

    def window_batches(self, window: int) -> list[tuple[Run, ...]]:
        """The batches of window ``window`` in order, each a tuple of runs (adjacent runs of
        one shard merged). O(window); the last few windows are cached."""
        hit = self._cache.get(window)
        if hit is not None:
            return hit
        c0, c1 = self._cells(window)
        bs = self.block_size
        n_full, part = divmod(c1 - c0, bs)
        order = np.arange(n_full, dtype=np.int64)
        if self.shuffle:
            order = _rng(self.seed, self.epoch, _WINDOW_KEY, self.rank, window).permutation(n_full)
        blocks = [(c0 + int(k) * bs, c0 + int(k) * bs + bs) for k in order]
        if part:  # only a rank's very last window ends with a partial block: keep it last
            blocks.append((c0 + n_full * bs, c1))
        per_batch = self.batch_size // bs
        batches: list[tuple[Run, ...]] = []
        for j in range(0, len(blocks), per_batch):
            runs: list[Run] = []
            for a, b in blocks[j:j + per_batch]:
                for run in self._runs(a, b):
                    if runs and runs[-1][0] == run[0] and runs[-1][2] == run[1]:
                        runs[-1] = (run[0], runs[-1][1], run[2])
                    else:
                        runs.append(run)
            batches.append(tuple(runs))
        if len(self._cache) >= 4:
            self._cache.pop(next(iter(self._cache)))
        self._cache[window] = batches
        return batches

    def batch(self, position: int) -> tuple[Run, ...]:
        """The runs of the rank's batch at ``position``."""
        w = self.window_of(position)
        return self.window_batches(w)[position - int(self.windows[w])]


def _check_sizes(batch_size: int, block_size: int | None, window_shards: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    block = batch_size if block_size is None else block_size
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or batch_size % block:
        raise ConfigurationError(
            f"block_size must be a divisor of batch_size={batch_size}, got {block_size!r}"
        )
    if isinstance(window_shards, bool) or not isinstance(window_shards, int) or window_shards < 1:
        raise ConfigurationError(f"shuffle window must be >= 1 shard, got {window_shards!r}")
    return block


def plan_rank(
    shard_sizes: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    world_size: int,
    rank: int,
    epoch: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    block_size: int | None = None,
    window_shards: int = 2,
) -> RankPlan:
    """Plan ``rank``'s share of ``epoch`` over shards of ``shard_sizes`` cells (see the
    module docstring). O(shards) time and memory."""
    block = _check_sizes(batch_size, block_size, window_shards)
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    order = shard_order(len(sizes), seed, epoch, shuffle)
    ranges = _stream_ranges(int(sizes.sum()), batch_size, world_size, rank, drop_last)
    segments = _segments(sizes, order, ranges)
    starts = np.zeros(len(segments) + 1, dtype=np.int64)
    np.cumsum(segments[:, 2] - segments[:, 1], out=starts[1:])
    n_batches = -(-int(starts[-1]) // batch_size)
    inner = (starts[window_shards:-1:window_shards] + batch_size // 2) // batch_size
    windows = np.unique(np.concatenate([[0], np.clip(inner, 0, n_batches), [n_batches]]))
    return RankPlan(epoch=epoch, rank=rank, seed=seed, shuffle=bool(shuffle), batch_size=batch_size,
                    block_size=block, segments=segments, starts=starts, n_batches=n_batches,
                    windows=windows.astype(np.int64))


def worker_ranges(windows: np.ndarray, n_batches: int, num_workers: int) -> list[Range]:
    """Split batch positions ``[0, n_batches)`` into one contiguous range per worker
    (``num_workers=0``: one range), balanced, each cut moved to the nearest window boundary
    unless that would leave a worker empty while there are batches enough for all."""
    nw = max(int(num_workers), 1)
    targets = [n_batches * w // nw for w in range(nw + 1)]
    bounds = np.asarray(windows, dtype=np.int64)
    snapped = [0]
    for t in targets[1:-1]:
        i = int(np.searchsorted(bounds, t))
        near = [int(bounds[j]) for j in (i - 1, i) if 0 <= j < len(bounds)]
        snapped.append(max(snapped[-1], min(near, key=lambda b: (abs(b - t), b))))
    snapped.append(n_batches)
    cuts = snapped if n_batches < nw or all(b > a for a, b in zip(snapped, snapped[1:], strict=False)) else targets
    return [(cuts[w], cuts[w + 1]) for w in range(nw)]


def consumed_per_worker(counts: Sequence[int], k: int) -> list[int]:
    """How many batches of each worker are among the first ``k`` a ``DataLoader`` returns
    when worker ``w`` yields ``counts[w]``: round-robin over the workers in order, a worker
    that has run out skipped (torch's in-order iterator)."""
    c = np.asarray(counts, dtype=np.int64)
    if not 0 <= k <= int(c.sum()):
        raise ConfigurationError(f"batches_done={k} is outside [0, {int(c.sum())}] for this epoch")
    lo, hi = 0, int(c.max()) if len(c) else 0
    while lo < hi:  # the number of complete rounds
        mid = (lo + hi + 1) // 2
        if int(np.minimum(c, mid).sum()) <= k:
            lo = mid
        else:
            hi = mid - 1
    done = np.minimum(c, lo)
    rest = k - int(done.sum())
    for w in range(len(c)):
        if rest and c[w] > lo:
            done[w] += 1
            rest -= 1
    return done.tolist()


def _merge(ranges: Sequence[Range]) -> list[Range]:
    out: list[Range] = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def assign_workers(remaining: Sequence[Range], windows: np.ndarray, n_batches: int,
                   num_workers: int) -> list[list[Range]]:
    """Each worker's batch ranges. A whole epoch (``remaining == [(0, n_batches)]``) is
    split by :func:`worker_ranges`; the rest of a resumed epoch is split into contiguous,
    balanced pieces of its flattened order."""
    remaining = _merge(remaining)
    nw = max(int(num_workers), 1)
    if remaining == [(0, n_batches)]:
        return [[r] for r in worker_ranges(windows, n_batches, nw)]
    total = sum(b - a for a, b in remaining)
    cuts = [total * w // nw for w in range(nw + 1)]
    out: list[list[Range]] = []
    for w in range(nw):
        mine: list[Range] = []
        skip, want = cuts[w], cuts[w + 1] - cuts[w]
        for a, b in remaining:
            if want <= 0:
                break
            if skip >= b - a:
                skip -= b - a
                continue
            start = a + skip
            stop = min(b, start + want)
            mine.append((start, stop))
            want -= stop - start
            skip = 0
        out.append(mine)
    return out


def remaining_after(assignment: Sequence[Sequence[Range]], consumed: int) -> list[Range]:
    """The batch ranges not yet returned once a ``DataLoader`` over workers with these
    ranges has returned ``consumed`` batches (in order of position)."""
    counts = [sum(b - a for a, b in ranges) for ranges in assignment]
    done = consumed_per_worker(counts, consumed)
    rest: list[Range] = []
    for ranges, skip in zip(assignment, done, strict=True):
        for a, b in ranges:
            take = min(skip, b - a)
            skip -= take
            if a + take < b:
                rest.append((a + take, b))
    return _merge(sorted(rest))
