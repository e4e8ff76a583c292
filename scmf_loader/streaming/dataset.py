"""``StreamingCellDataset``: an ``IterableDataset`` over a dataset at any fsspec URL.

What each rank and DataLoader worker reads is planned by :mod:`scmf_loader.streaming.plan`
(whole shards, DistributedSampler semantics, the same number of batches on every rank, a
seeded shuffle window across the shards in flight); shards come through the node-local
cache (:mod:`scmf_loader.streaming.cache`), fetched in the background ``prefetch_shards``
ahead (:mod:`scmf_loader.streaming.prefetch`); batches are read by a
:class:`~scmf_loader.dataset.CellDataset` over the cache, so they are exactly what the local
loader yields for the same cells, in the same output forms.

The epoch and a loaded resume point live in a small shared-memory tensor, so ``set_epoch`` and
``load_state_dict`` reach DataLoader workers, persistent ones included.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from scmf_loader.dataloader import OUTPUTS, _Fetcher
from scmf_loader.dataset import CellDataset
from scmf_loader.errors import ConfigurationError
from scmf_loader.loader_requests import Request
from scmf_loader.streaming.plan import (
    Range,
    RankPlan,
    assign_workers,
    plan_rank,
    remaining_after,
)
from scmf_loader.streaming.prefetch import Prefetcher
from scmf_loader.world import resolve_world

__all__ = ["StreamingCellDataset"]

_EPOCH, _N_RANGES, _WORKERS, _RANGES = 0, 1, 2, 3
MAX_RANGES = 256  # a resume point is at most this many ranges of batch positions
_SETTINGS = ("batch_size", "block_size", "shuffle", "shuffle_shards", "seed", "rank", "world_size",
             "drop_last", "n_cells", "dataset_id")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class StreamingCellDataset(torch.utils.data.IterableDataset):
    """Batches of a dataset at ``source`` (an fsspec URL such as ``s3://bucket/atlas/v1``,
    ``gs://``, ``https://``, ``memory://``, ``file://``, or a local path), streamed through a
    node-local cache.

    Iterating yields this rank's batches of the epoch chosen by :meth:`set_epoch` (call it
    at the start of every epoch, as with ``DistributedSampler``), in the forms of
    :class:`~scmf_loader.dataloader.CellDataLoader` (``output="csr"``: a
    :class:`~scmf_loader.batch.CSRBatch` with global ``cell_ids``). Use it directly or in
    ``torch.utils.data.DataLoader(ds, batch_size=None, num_workers=N)``: a rank's cells do
    not depend on ``N``, and every rank yields ``len(ds)`` batches.

    ``shuffle`` draws the shard order from ``(seed, epoch)`` and permutes blocks of
    ``block_size`` cells (default ``batch_size``: each batch one contiguous, zero-copy range)
    within windows of ``shuffle_shards`` shards (default ``max(prefetch_shards, 1)``).
    ``rank``/``world_size`` default to ``torch.distributed``, then ``RANK``/``WORLD_SIZE``.
    ``cache_dir`` (default ``$SCMF_CACHE_DIR`` or ``~/.cache/scmf``) is shared by every
    process of a node; ``cache_limit`` bounds its bytes (LRU). ``storage_options`` go to
    fsspec unchanged (credentials otherwise come from the store's usual environment and
    config files). ``preprocessing``, ``obs_columns``, ``max_genes``, ``add_cls``,
    ``truncation`` and ``n_bins`` mean what they mean for ``CellDataset`` and
    ``CellDataLoader``.

    ``state_dict()`` / ``load_state_dict()`` resume exactly: the next iteration yields the
    rest of the epoch, nothing repeated, nothing lost. In-process iteration counts the
    batches itself; through DataLoader workers pass ``state_dict(batches_done=k)``, the
    batches your loop consumed this epoch (workers run ahead of the loop, so only it knows).
    """

    def __init__(
        self,
        source: Any,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        output: str = "csr",
        cache_dir: Any = None,
        cache_limit: int | str = "20GB",
        prefetch_shards: int = 2,
        storage_options: dict[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        *,
        block_size: int | None = None,
        shuffle_shards: int | None = None,
        preprocessing: Any = None,
        obs_columns: Any = None,
        max_genes: int | None = None,
        add_cls: bool = True,
        truncation: str = "top",
        n_bins: int = 51,
        verify: bool = False,
    ) -> None:
        if output not in OUTPUTS:
            raise ConfigurationError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.seed = _check_int("seed", seed, 0)
        self.prefetch_shards = _check_int("prefetch_shards", prefetch_shards, 0)
        window = max(self.prefetch_shards, 1) if shuffle_shards is None else shuffle_shards
        self.shuffle_shards = _check_int("shuffle_shards", window, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.block_size = self.batch_size if block_size is None else _check_int("block_size", block_size, 1)
        self.shuffle, self.drop_last, self.output = bool(shuffle), bool(drop_last), output
        self.rank, self.world_size = resolve_world(rank, world_size)
        if isinstance(source, CellDataset):
            self.dataset = source
        else:
            self.dataset = CellDataset(
                source, preprocessing=preprocessing, max_genes=max_genes, obs_columns=obs_columns,
                verify=verify, max_open_shards=self.shuffle_shards + self.prefetch_shards + 4,
                cache_dir=cache_dir, cache_limit=cache_limit, storage_options=storage_options,
            )
        self.store = self.dataset.store
        self.cache = getattr(self.store, "cache", None)  # None: a local dataset, read in place
        self.url = getattr(self.store, "url", str(getattr(self.store, "path", "AnnData")))
        self._sizes = np.diff(self.dataset.shard_offsets)
        self._plans: dict[int, RankPlan] = {}
        self.n_batches = self._plan(0).n_batches  # the same every epoch
        self._check_budget()
        self._fetcher = _Fetcher(self.dataset, output, max_genes if max_genes is not None else self.dataset.max_genes,
                                 add_cls, truncation, self.seed, self.rank, n_bins)
        self._shared = torch.zeros(_RANGES + 2 * MAX_RANGES, dtype=torch.int64).share_memory_()
        self._shared[_N_RANGES] = -1  # -1: the whole epoch
        self._base = 0  # batches of the epoch done before the loaded resume point
        self._done = 0  # batches of the epoch done, counted by in-process iteration

    # ---- planning -----------------------------------------------------------------------
    def _plan(self, epoch: int) -> RankPlan:
        plan = self._plans.get(epoch)
        if plan is None:
            plan = plan_rank(self._sizes, batch_size=self.batch_size, world_size=self.world_size,
                             rank=self.rank, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                             drop_last=self.drop_last, block_size=self.block_size,
                             window_shards=self.shuffle_shards)
            self._plans = {epoch: plan}
        return plan

    def _check_budget(self) -> None:
        if self.cache is None:
            return
        from scmf_loader.streaming.cache import format_size
        from scmf_loader.streaming.errors import CacheError

        held = self.shuffle_shards + 2  # a window's shards, plus partial ones at its two ends
        need = int(np.sort(self.cache._sizes)[::-1][:held].sum())
        if need > self.cache.limit:
            raise CacheError(
                f"{self.url}: cache_limit {format_size(self.cache.limit)} is too small: a shuffle "
                f"window of {self.shuffle_shards} shard(s) holds up to {held} shards at once "
                f"({format_size(need)}); raise cache_limit or lower shuffle_shards"
            )

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (the same on every rank)."""
        return self.n_batches

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return int(self._shared[_EPOCH])

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next, from its start unless a loaded state points into it."""
        epoch = _check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self._shared[_N_RANGES] = -1
            self._base = self._done = 0
        self._shared[_EPOCH] = epoch

    def _remaining(self) -> list[Range]:
        n = int(self._shared[_N_RANGES])
        if n < 0:
            return [(0, self.n_batches)]
        flat = self._shared[_RANGES:_RANGES + 2 * n].tolist()
        return [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]

    # ---- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info is not None else (0, 0)
        if me == 0:
            self._shared[_WORKERS] = workers
        epoch = self.epoch
        plan = self._plan(epoch)
        mine = assign_workers(self._remaining(), plan.windows, plan.n_batches, workers)[me]
        if info is None:
            self._done = self._base
        for item in self._stream(plan, mine):
            if info is None:
                self._done += 1  # counted when handed out: a consumer that stops here has it
            yield item

    def _pieces(self, plan: RankPlan, ranges: list[Range]) -> list[tuple[int, int, int]]:
        """``(window, first, stop)`` pieces of the positions in ``ranges``, in order."""
        out = []
        for a, b in ranges:
            w = plan.window_of(a) if a < b else 0
            while a < b:
                stop = min(b, int(plan.windows[w + 1]))
                out.append((w, a, stop))
                a, w = stop, w + 1
        return out

    def _stream(self, plan: RankPlan, ranges: list[Range]) -> Iterator[Any]:
        pieces = self._pieces(plan, ranges)
        shards = [plan.window_shards(w) for w, _, _ in pieces]
        prefetch = Prefetcher(self.cache, self.prefetch_shards) if self.cache is not None else None
        held: set[int] = set()
        try:
            for k, (w, a, b) in enumerate(pieces):
                if prefetch is not None:
                    for s in shards[k]:
                        if s not in held:
                            prefetch.acquire(s)
                            held.add(s)
                    prefetch.want(self._ahead(shards, k, held))
                batches = plan.window_batches(w)
                first = int(plan.windows[w])
                for p in range(a, b):
                    yield self._read(plan.epoch, p, batches[p - first])
                if prefetch is not None:
                    keep = set(shards[k + 1]) if k + 1 < len(shards) else set()
                    for s in held - keep:
                        prefetch.release(s)
                    held &= keep
        finally:
            if prefetch is not None:
                prefetch.close()
                for s in held:
                    prefetch.release(s)

    def _ahead(self, shards: list[list[int]], k: int, held: set[int]) -> list[int]:
        """The next ``prefetch_shards`` shards after piece ``k`` not yet held, in order."""
        out: list[int] = []
        for later in shards[k + 1:]:
            for s in later:
                if s not in held and s not in out:
                    out.append(s)
                    if len(out) >= self.prefetch_shards:
                        return out
        return out

    def _read(self, epoch: int, position: int, runs: tuple[tuple[int, int, int], ...]) -> Any:
        offsets = self.dataset.shard_offsets
        if len(runs) == 1:
            s, lo, hi = runs[0]
            start = int(offsets[s]) + lo
            batch = self.dataset.get_range(start, start + hi - lo)
            ids: Any = (start, start + hi - lo)
        else:
            ids = np.concatenate([np.arange(int(offsets[s]) + lo, int(offsets[s]) + hi) for s, lo, hi in runs])
            batch = self.dataset.__getitems__(ids)
        return self._fetcher.convert(batch, Request(epoch, position, ids))

    # ---- resume ---------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        values = {k: getattr(self, k, None) for k in _SETTINGS}
        values["n_cells"] = len(self.dataset)
        values["dataset_id"] = self.store.manifest.dataset_id if self.store is not None else None
        return values

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """The resume point: the epoch, ``batches_done`` in it and the batch positions still
        to read (plus the settings a resumed dataset must share). ``batches_done``: the
        batches of this epoch your loop has consumed; needed when DataLoader workers read
        (in-process iteration counts them itself)."""
        workers = int(self._shared[_WORKERS])
        if batches_done is None:
            if workers > 0:
                raise ConfigurationError(
                    f"{self.url}: this dataset was read by {workers} DataLoader workers, which run "
                    "ahead of your loop: pass state_dict(batches_done=...) the number of batches "
                    "the loop consumed in this epoch"
                )
            batches_done = self._done
        batches_done = _check_int("batches_done", batches_done, 0)
        if batches_done < self._base:
            raise ConfigurationError(
                f"batches_done={batches_done} is before the loaded resume point ({self._base} batches)"
            )
        plan = self._plan(self.epoch)
        assignment = assign_workers(self._remaining(), plan.windows, plan.n_batches, workers)
        rest = remaining_after(assignment, batches_done - self._base)
        return {"epoch": self.epoch, "batches_done": batches_done, "remaining": [list(r) for r in rest],
                **self._settings()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration of its epoch yields exactly the
        batches not yet consumed. Settings that change the plan must match."""
        ours = self._settings()
        diff = {k: (state.get(k), v) for k, v in ours.items() if state.get(k) != v}
        if diff:
            raise ConfigurationError(
                "the state was taken with other settings (state vs. this dataset): "
                + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
            )
        rest = [(int(a), int(b)) for a, b in state["remaining"]]
        if len(rest) > MAX_RANGES or any(not 0 <= a < b <= self.n_batches for a, b in rest):
            raise ConfigurationError(f"the state's remaining batch ranges are invalid: {rest[:4]}...")
        self._shared[_EPOCH] = _check_int("epoch", state["epoch"], 0)
        self._shared[_N_RANGES] = len(rest)
        if rest:
            self._shared[_RANGES:_RANGES + 2 * len(rest)] = torch.tensor(rest, dtype=torch.int64).reshape(-1)
        self._base = self._done = int(state["batches_done"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_plans"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"StreamingCellDataset({self.url!r}, batches={self.n_batches}, batch_size={self.batch_size}, "
            f"rank={self.rank}/{self.world_size}, output={self.output!r}, shuffle={self.shuffle})"
        )
