"""Batch samplers: which cells form each batch, per epoch, rank and resume point.

Every sampler yields whole batches (int64 arrays of global row ids) and follows one plan:

* An epoch is an ordered list of ``n_batches`` batches (the same number every epoch),
  reachable by random access (:meth:`BatchSampler.batch`), all of ``batch_size`` cells but
  a final partial one with ``drop_last=False``.
* With ``drop_last=True`` an epoch serves the most cells that fill whole batches on every
  rank (``n_cells // (batch_size * world_size) * world_size`` batches). The cells left out
  are one stretch of the dataset seen as a ring (:meth:`BatchSampler.left_out`), its start
  drawn from ``seed`` and moved by a golden-ratio step each epoch: every cell is left out
  with the same probability (as with torch's ``DistributedSampler``) and, over epochs,
  equally often.
* Each shard serves its kept cells (all of them unless the left-out stretch touches it), in
  shards visited in an order drawn from ``(seed, epoch)``. Each shard contributes the full
  batches that fit in it; its left-over cells (at most a batch or so per shard) join a
  *tail stream* cut into batches, each read right after the shards it draws from.
* Ranks and DataLoader workers split the epoch by :func:`~scmf_loader.world.partition`
  (``DistributedSampler`` semantics on whole batches, a contiguous stretch per rank).
* ``state_dict()`` / ``load_state_dict()`` store ``(epoch, batches_done)``; iteration
  resumes at exactly the next batch of that epoch.

Memory is O(shards) for an epoch's layout plus O(one shard's blocks) for the shard being
read, never O(cells): no permutation of the whole dataset is ever built.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from scmf_loader.errors import ConfigurationError
from scmf_loader.world import Partition, partition, resolve_world

__all__ = ["BatchAwareSampler", "BatchSampler", "BlockShuffleSampler", "SequentialSampler"]


def _offsets_of(source: Any) -> np.ndarray:
    """Cumulative shard offsets of a dataset, a store, or a plain cell count (one shard)."""
    if isinstance(source, (int, np.integer)):
        return np.array([0, int(source)], dtype=np.int64)
    return np.asarray(source.shard_offsets, dtype=np.int64)


def _rng(seed: int, epoch: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, *keys]))


_GOLDEN, _DROP_KEY = 0.6180339887498949, 0x5C3F  # the left-out stretch: step per epoch, seed key


def _ring_pieces(base: int, n: int, shift: int, p0: int, p1: int) -> list[tuple[int, int]]:
    """Global ``(first id, length)`` runs of kept positions ``[p0, p1)`` of a shard of ``n``
    cells at global id ``base`` (position ``p`` is local cell ``(shift + p) % n``)."""
    lo, hi = shift + p0, shift + p1
    if hi <= n or lo >= n:
        return [(base + lo % n, p1 - p0)]
    return [(base + lo, n - lo), (base, hi - n)]


class _Layout:
    """One epoch's layout, all O(shards): the shard ``order``, ``full`` batches per shard, a
    per-shard ``grid`` offset (the sampler's own use), the tail stream's pieces ``(shard,
    first global id, length)`` in stream order, and per shard the ``kept`` cells served from
    local cell ``shift`` on (kept position ``p`` is local cell ``(shift + p) % size``).

    The epoch order visits shards in ``order``; after a shard's full batches come the tail
    batches its pieces complete, so a tail batch is read right after the shards it draws
    from (memory maps and obs columns are still cached). A final partial tail batch, if
    any, comes last.
    """

    def __init__(
        self, order: np.ndarray, full: np.ndarray, grid: np.ndarray, tails: list[tuple[int, int, int]],
        batch_size: int, kept: tuple[np.ndarray, np.ndarray],
    ) -> None:
        self.order = order
        self.full = full
        self.grid = grid
        self.shift, self.kept = kept
        tail = np.asarray(tails, dtype=np.int64).reshape(-1, 3)
        self.tail_starts = tail[:, 1]  # global id of each tail piece's first cell
        self.tail_cum = np.zeros(len(tail) + 1, dtype=np.int64)
        np.cumsum(tail[:, 2], out=self.tail_cum[1:])
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        cells = np.bincount(position[tail[:, 0]], weights=tail[:, 2], minlength=len(order))
        done = np.cumsum(cells.astype(np.int64)) // batch_size  # tail batches complete by each shard
        self.tail_before = np.concatenate([[0], done[:-1]]).astype(np.int64)
        self.n_tail_full = int(done[-1]) if len(done) else 0
        self.first = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(full[order] + np.diff(np.concatenate([[0], done])), out=self.first[1:])

        # Python lists for the per-batch lookups (bisect on a list beats numpy on scalars)
        self._first, self._order, self._full = self.first.tolist(), order.tolist(), full.tolist()
        self._tail_before, self._shift = self.tail_before.tolist(), self.shift.tolist()

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard, batch within it)`` of batch ``index``, or ``(-1, tail batch number)``."""
        first = self._first
        if index >= first[-1]:
            return -1, self.n_tail_full + index - first[-1]
        i = bisect.bisect_right(first, index) - 1
        shard, b = self._order[i], index - first[i]
        if b < self._full[shard]:
            return shard, b
        return -1, self._tail_before[i] + b - self._full[shard]


class BatchSampler(torch.utils.data.Sampler[np.ndarray]):
    """Base of the samplers: distributed split, epochs, random access and resume.

    ``dataset`` is a :class:`~scmf_loader.dataset.CellDataset`, a
    :class:`~scmf_loader.store.DatasetStore` or a number of cells. ``rank`` and
    ``world_size`` come from the arguments, else ``torch.distributed``, else the
    ``RANK``/``WORLD_SIZE`` environment, else ``(0, 1)``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"seed must be an integer >= 0, got {seed!r}")
        self.shard_offsets = _offsets_of(dataset)
        self.shard_sizes = np.diff(self.shard_offsets)
        self._offsets: list[int] = self.shard_offsets.tolist()
        self.n_cells = int(self.shard_offsets[-1])
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.seed = seed
        self.rank, self.world_size = resolve_world(rank, world_size)
        self.epoch = self._start = self._done = 0
        self._layout_cache: tuple[int, _Layout] | None = None
        self._shard_cache: tuple[tuple[int, int], Any] | None = None

    # ---- epoch arithmetic ---------------------------------------------------------------
    @property
    def n_batches(self) -> int:
        """Batches in one epoch's order, before the split over ranks (the same every epoch);
        with ``drop_last`` a multiple of ``world_size``, all full."""
        if self.drop_last:
            return self.n_cells // (self.batch_size * self.world_size) * self.world_size
        return -(-self.n_cells // self.batch_size)

    def left_out(self, epoch: int) -> tuple[int, int]:
        """``(start, count)``: ``epoch`` leaves out global ids ``start, start + 1, ...`` modulo
        ``n_cells`` (``count`` is 0 without ``drop_last``); ``start`` is uniform over the
        cells and moves by a golden-ratio step each epoch."""
        count = self.n_cells - self.n_batches * self.batch_size
        if count <= 0:
            return 0, 0
        u = np.random.default_rng(np.random.SeedSequence([self.seed, _DROP_KEY])).random()
        start = int((u + epoch * _GOLDEN) % 1.0 * self.n_cells)
        return min(start, self.n_cells - 1), count

    def _kept(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per shard, ``(shift, kept)``: ``epoch`` serves ``kept`` local cells from ``shift``
        on (modulo its size): all but those :meth:`left_out` drops."""
        sizes = self.shard_sizes
        shift, kept = np.zeros(len(sizes), dtype=np.int64), sizes.copy()
        start, count = self.left_out(epoch)
        if count == 0:
            return shift, kept
        base, n = self.shard_offsets[:-1], self.n_cells
        for g0, g1 in ((start, min(start + count, n)), (0, max(start + count - n, 0))):
            lo, hi = np.clip(g0 - base, 0, sizes), np.clip(g1 - base, 0, sizes)
            kept -= hi - lo
            shift = np.where((hi > lo) & (hi < sizes), hi, shift)  # kept cells start after the cut
        return shift, kept

    def with_drop_last(self, drop_last: bool) -> BatchSampler:
        """A copy of this sampler with ``drop_last`` set (what a loader given it uses)."""
        other = copy.copy(self)
        other.drop_last, other._layout_cache, other._shard_cache = bool(drop_last), None, None
        return other

    def partition(self, num_workers: int = 0, worker_id: int = 0) -> Partition:
        """The positions of the epoch order this rank (and worker) reads."""
        return partition(
            self.n_batches, self.world_size, self.rank, drop_last=self.drop_last,
            num_workers=num_workers, worker_id=worker_id,
        )

    def __len__(self) -> int:
        return len(self.partition())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (the shuffle is drawn from ``(seed, epoch)``). Setting the epoch a
        resume state points at keeps the resume point."""
        if epoch < 0:
            raise ConfigurationError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self._start = self._done = 0
        self.epoch = int(epoch)

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Global row ids (int64) of batch ``index`` of the epoch order (random access)."""
        layout = self._layout(epoch)
        shard, b = layout.locate(index)
        if shard >= 0:
            return self._shard_batch(epoch, shard, b) + self._offsets[shard]
        lo = b * self.batch_size
        return self._stream(layout, lo, min(lo + self.batch_size, int(layout.tail_cum[-1])))

    def batch_or_range(self, epoch: int, index: int) -> np.ndarray | tuple[int, int]:
        """Batch ``index`` as ``(start, stop)`` when it is the range of global ids
        ``[start, stop)``, else as its ids (what :meth:`batch` returns). Readers use the
        range form to skip building and checking ids."""
        return self.batch(epoch, index)

    def batches_or_ranges(
        self, epoch: int, start: int = 0, num_workers: int = 0, worker_id: int = 0
    ) -> Iterator[np.ndarray | tuple[int, int]]:
        """This rank's (and worker's) batches of ``epoch`` from its ``start``-th on, in the
        form of :meth:`batch_or_range`."""
        part = self.partition(num_workers, worker_id)
        for i in range(start, len(part)):
            yield self.batch_or_range(epoch, part[i])

    def batches(self, epoch: int, start: int = 0, num_workers: int = 0, worker_id: int = 0) -> Iterator[np.ndarray]:
        """This rank's (and worker's) batches of ``epoch`` from its ``start``-th on (ids)."""
        for item in self.batches_or_ranges(epoch, start, num_workers, worker_id):
            yield np.arange(*item, dtype=np.int64) if isinstance(item, tuple) else item

    def __iter__(self) -> Iterator[np.ndarray]:
        start, self._start = self._start, 0
        self._done = start
        for ids in self.batches(self.epoch, start):
            self._done += 1
            yield ids

    # ---- resume -------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__, "n_cells": self.n_cells, "batch_size": self.batch_size,
            "drop_last": self.drop_last, "seed": self.seed, "world_size": self.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """``epoch``, ``batches_done`` (this rank's batches yielded in that epoch) and the
        settings a resumed sampler must share (ranks step in lockstep, so any rank's state
        resumes every rank)."""
        return {"epoch": self.epoch, "batches_done": self._done, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration starts at batch ``batches_done`` of ``epoch``."""
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: state {a!r} vs sampler {b!r}" for k, (a, b) in diff.items())
            raise ConfigurationError(f"cannot resume from a state taken with other settings ({detail})")
        done = int(state["batches_done"])
        if not 0 <= done <= len(self):
            raise ConfigurationError(f"batches_done={done} is outside [0, {len(self)}]")
        self.epoch = int(state["epoch"])
        self._start = self._done = done

    # ---- plan pieces (subclasses) -------------------------------------------------------
    def _layout(self, epoch: int) -> _Layout:
        if self._layout_cache is None or self._layout_cache[0] != epoch:
            self._layout_cache = (epoch, self._make_layout(epoch))
        return self._layout_cache[1]

    def _shard_plan(self, epoch: int, shard: int) -> Any:
        key = (epoch, shard)
        if self._shard_cache is None or self._shard_cache[0] != key:
            self._shard_cache = (key, self._make_shard_plan(epoch, shard))
        return self._shard_cache[1]

    def _make_layout(self, epoch: int) -> _Layout:
        raise NotImplementedError

    def _make_shard_plan(self, epoch: int, shard: int) -> Any:
        raise NotImplementedError

    def _shard_batch(self, epoch: int, shard: int, b: int) -> np.ndarray:
        """Local row ids (int64) of batch ``b`` of ``shard``."""
        raise NotImplementedError

    def _stream(self, layout: _Layout, lo: int, hi: int) -> np.ndarray:
        """Global ids of cells ``[lo, hi)`` of the tail stream."""
        cum = layout.tail_cum
        i = int(np.searchsorted(cum, lo, side="right")) - 1
        j = int(np.searchsorted(cum, hi, side="left"))
        parts = []
        for p in range(i, j):
            a = max(lo, int(cum[p])) - int(cum[p]) + int(layout.tail_starts[p])
            b = min(hi, int(cum[p + 1])) - int(cum[p]) + int(layout.tail_starts[p])
            parts.append(np.arange(a, b, dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class SequentialSampler(BatchSampler):
    """Batches of consecutive cells in dataset order (for evaluation), the same every epoch
    with ``drop_last=False``. With ``drop_last=True`` the cells skipped are the stretch of
    :meth:`~BatchSampler.left_out`, which moves every epoch so that no cell is skipped more
    often than another; the batch that spans it is two runs. A batch crossing a shard
    boundary is two runs too; every other batch is zero copy."""

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """Global row ids of batch ``index``: the ``index``-th ``batch_size`` kept cells."""
        item = self.batch_or_range(epoch, index)
        return np.arange(*item, dtype=np.int64) if isinstance(item, tuple) else item

    def batch_or_range(self, epoch: int, index: int) -> np.ndarray | tuple[int, int]:
        """A range, but for the batch that spans the left-out stretch (ids)."""
        lo = index * self.batch_size
        hi = min(lo + self.batch_size, self.n_cells)
        start, count = self.left_out(epoch)
        wrap = max(start + count - self.n_cells, 0)  # > 0: the stretch wraps, kept is [wrap, start)
        if wrap or hi <= start or count == 0:
            return lo + wrap, hi + wrap
        if lo >= start:
            return lo + count, hi + count
        return np.concatenate([np.arange(lo, start, dtype=np.int64), np.arange(start + count, hi + count, dtype=np.int64)])


class BlockShuffleSampler(BatchSampler):
    """Shuffled batches of contiguous blocks (the default when ``shuffle=True``).

    Each epoch draws from ``(seed, epoch)`` a shard order, a random grid offset per shard
    (so block boundaries move between epochs) and an order of each shard's blocks. A batch
    is ``batch_size // block_size`` blocks of one shard; with ``block_size == batch_size``
    (the default) every batch is one contiguous range: a zero-copy view of the memory map.
    Smaller blocks mix more cells per batch at the cost of one gather. The pre-shuffle of the
    converter makes any contiguous block a near-uniform sample of the dataset.
    """

    def __init__(self, dataset: Any, batch_size: int, block_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size, **kwargs)
        block_size = batch_size if block_size is None else block_size
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or batch_size % block_size:
            raise ConfigurationError(
                f"block_size must be a positive divisor of batch_size={batch_size}, got {block_size!r}"
            )
        self.block_size = block_size

    def _fingerprint(self) -> dict[str, Any]:
        return {**super()._fingerprint(), "block_size": self.block_size}

    def _make_layout(self, epoch: int) -> _Layout:
        rng = _rng(self.seed, epoch, 0)
        sizes = self.shard_sizes
        order = rng.permutation(len(sizes))
        offset = rng.integers(0, self.block_size, size=len(sizes))
        shift, kept = self._kept(epoch)
        full = np.maximum(kept - offset, 0) // self.batch_size
        offset = np.where(full > 0, offset, 0)
        tails = []
        for s in order.tolist():
            base, n, o, m, at = (int(x[s]) for x in (self.shard_offsets, sizes, offset, kept, shift))
            end = o + int(full[s]) * self.batch_size
            for p0, p1 in ((0, o), (end, m)):  # kept positions before and after the grid
                if p1 > p0:
                    tails.extend((s, g, length) for g, length in _ring_pieces(base, n, at, p0, p1))
        return _Layout(order, full, offset, tails, self.batch_size, (shift, kept))

    def _make_shard_plan(self, epoch: int, shard: int) -> np.ndarray:
        layout = self._layout(epoch)
        k = self.batch_size // self.block_size
        n_full = int(layout.full[shard])
        starts = int(layout.grid[shard]) + self.block_size * np.arange(n_full * k, dtype=np.int64)
        starts = starts[_rng(self.seed, epoch, 1, shard).permutation(len(starts))]
        return np.sort(starts.reshape(n_full, k), axis=1)

    def batch_or_range(self, epoch: int, index: int) -> np.ndarray | tuple[int, int]:
        """With one block per batch, a shard's batch is a range (but for one that wraps
        around the end of a shard the left-out stretch cut: ids)."""
        if self.block_size == self.batch_size:
            layout = self._layout(epoch)
            shard, b = layout.locate(index)
            if shard >= 0:
                n = self._offsets[shard + 1] - self._offsets[shard]
                lo = layout._shift[shard] + int(self._shard_plan(epoch, shard)[b, 0])
                if lo + self.batch_size <= n or lo >= n:
                    start = self._offsets[shard] + lo % n
                    return start, start + self.batch_size
        return self.batch(epoch, index)

    def _shard_batch(self, epoch: int, shard: int, b: int) -> np.ndarray:
        starts = self._shard_plan(epoch, shard)[b]
        shift = self._layout(epoch)._shift[shard]
        if len(starts) == 1 and not shift:
            s = int(starts[0])
            return np.arange(s, s + self.block_size, dtype=np.int64)
        ids = (starts[:, None] + np.arange(self.block_size, dtype=np.int64)).ravel()
        if shift:  # kept positions -> local cells, in increasing order
            ids += shift
            ids %= self._offsets[shard + 1] - self._offsets[shard]
            ids.sort()
        return ids


class BatchAwareSampler(BatchSampler):
    """Batches whose composition follows an obs column ``key`` (e.g. ``"batch"``, ``"donor"``).

    ``balanced=False``: every batch holds the key's categories in proportion to its shard
    (a systematic, stratified draw), which after the converter's pre-shuffle is the
    proportion in the dataset; every cell is still read exactly once per epoch.
    ``balanced=True``: every batch holds the categories present in its shard in equal
    numbers (±1); rare categories repeat and common ones are subsampled within an epoch,
    so per-epoch coverage is not exact (nor uniform over cells). Batches are gathers (one
    copy per batch). Missing values (code -1) form a category of their own. ``drop_last``
    and the tail batches work as in every sampler (a loader applies its own ``drop_last``).
    """

    def __init__(self, dataset: Any, key: str = "batch", batch_size: int = 64, *, balanced: bool = False, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size, **kwargs)
        categories = getattr(dataset, "categories", {})
        if key not in categories:
            raise ConfigurationError(f"obs column {key!r} is not kept in this dataset; kept: {list(categories)}")
        self.dataset = dataset
        self.key = key
        self.balanced = bool(balanced)

    def _fingerprint(self) -> dict[str, Any]:
        return {**super()._fingerprint(), "key": self.key, "balanced": self.balanced}

    def _make_layout(self, epoch: int) -> _Layout:
        rng = _rng(self.seed, epoch, 0)
        sizes = self.shard_sizes
        order = rng.permutation(len(sizes))
        shift, kept = self._kept(epoch)
        rest = kept % self.batch_size
        hole = (rng.random(len(sizes)) * (kept - rest + 1)).astype(np.int64)  # kept positions
        tails = []
        for s in order.tolist():
            if rest[s]:
                pieces = _ring_pieces(int(self.shard_offsets[s]), int(sizes[s]), int(shift[s]),
                                      int(hole[s]), int(hole[s] + rest[s]))
                tails.extend((s, g, length) for g, length in pieces)
        return _Layout(order, kept // self.batch_size, hole, tails, self.batch_size, (shift, kept))

    def _make_shard_plan(self, epoch: int, shard: int) -> np.ndarray:
        layout, bs = self._layout(epoch), self.batch_size
        m, lo = int(layout.kept[shard]), int(layout.grid[shard])
        hi = lo + m % bs
        cells = np.concatenate([np.arange(lo, dtype=np.int64), np.arange(hi, m, dtype=np.int64)])
        shift = int(layout.shift[shard])
        if shift:  # kept positions -> local cells
            cells = (cells + shift) % int(self.shard_sizes[shard])
        codes = np.asarray(self.dataset.obs_codes(shard, self.key))[cells].astype(np.int64)
        rng = _rng(self.seed, epoch, 2, shard)
        perm = rng.permutation(len(cells))
        cells, codes = cells[perm], codes[perm]
        if self.balanced:
            chosen = self._balanced(cells, codes, len(cells) // bs, rng)
        else:
            chosen = cells[self._stratified(codes, rng)]
        return np.sort(chosen.reshape(-1, bs), axis=1)

    @staticmethod
    def _stratified(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Order that spreads each category evenly: cell ``i`` of a category of ``m`` cells
        gets key ``(i + u) / m`` (``u`` uniform per category); sort by key."""
        by_cat = np.argsort(codes, kind="stable")
        cats, first, counts = np.unique(codes[by_cat], return_index=True, return_counts=True)
        rank = np.empty(len(codes), dtype=np.float64)
        rank[by_cat] = np.arange(len(codes)) - np.repeat(first, counts)
        u = rng.random(len(cats))
        where = np.searchsorted(cats, codes)
        return np.argsort((rank + u[where]) / counts[where], kind="stable")

    def _balanced(self, cells: np.ndarray, codes: np.ndarray, n_batches: int, rng: np.random.Generator) -> np.ndarray:
        """``n_batches * batch_size`` cells, each batch with equal numbers (±1) of every
        category present; each category's cells are drawn cyclically in shuffled order."""
        bs = self.batch_size
        cats = np.unique(codes)
        quota = np.full((n_batches, len(cats)), bs // len(cats), dtype=np.int64)
        extra = bs % len(cats)
        if extra:
            pick = np.argsort(rng.random((n_batches, len(cats))), axis=1)[:, :extra]
            np.put_along_axis(quota, pick, bs // len(cats) + 1, axis=1)
        batch_of, drawn = [], []
        for j, c in enumerate(cats.tolist()):
            pool = cells[codes == c]
            need = int(quota[:, j].sum())
            drawn.append(np.resize(pool, need))
            batch_of.append(np.repeat(np.arange(n_batches), quota[:, j]))
        order = np.argsort(np.concatenate(batch_of), kind="stable")
        return np.concatenate(drawn)[order]

    def _shard_batch(self, epoch: int, shard: int, b: int) -> np.ndarray:
        return self._shard_plan(epoch, shard)[b]  # a view: the caller adds the offset (a copy)
