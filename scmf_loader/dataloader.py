"""``CellDataLoader``: a ``torch.utils.data.DataLoader`` set up for whole-batch reads.

The sampler yields whole batches (``batch_size=None`` in the DataLoader: no per-cell
collation); a worker reads one batch per request; the DataLoader hands requests to workers
round-robin and returns results in order, so workers split each rank's batches with no
duplicate and no loss. Epochs, the resume point and the shuffle live in the main process
(``set_epoch`` works with persistent workers).

Moving a batch between processes costs more than building it (DESIGN.md §7), so a worker
asked for a zero-copy CSR batch (one contiguous range of one shard, no preprocessing)
returns only a reference and the main process views its own memory map: the worker path
stays correct and cheap, and ``num_workers=0`` is the fast choice for ``output="csr"``.
With ``num_workers=0`` batches are read in the calling process, without the DataLoader's
per-batch bookkeeping.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from scmf_loader._loader_options import (
    OUTPUTS,
    WORKER_TYPES,
    auto_threads,
    check_worker_options,
    checked_options,
    fusable,
    resolve_worker_type,
)
from scmf_loader.batch import CSRBatch
from scmf_loader.dataset import CellDataset, range_of
from scmf_loader.errors import ConfigurationError
from scmf_loader.loader_requests import Feed, Hold, Ref, Request, Requests, feed_limit
from scmf_loader.queues import direct_context, threaded
from scmf_loader.readahead import DEFAULT_DEPTH, ReadAhead
from scmf_loader.samplers import BatchSampler, BlockShuffleSampler, SequentialSampler
from scmf_loader.transport import (
    LoaderRing,
    Packed,
    RingFlags,
    Slotted,
    WorkerRing,
    install_arena,
)

__all__ = ["OUTPUTS", "WORKER_TYPES", "CellDataLoader"]

#: ``prefetch_factor`` of worker processes running a ``transform`` (torch's default, 2,
#: otherwise). A 3 ms pure-Python transform, 2 processes on 2 cores: 2 -> 3 took the epoch
#: from 1.63x to 1.71x the speed of no workers (torch ops: 1.68x -> 1.69x), fewer idle
#: wake-ups (tree CPU 1.45 -> 1.41 s); 4 gained nothing more (docs/benchmarks.md, issue 11)
TRANSFORM_PREFETCH = 3
#: how long a worker process waits before answering a hold (see :class:`Feed`)
_HOLD_SECONDS = 0.0005
#: the DataLoader can hand results over as they come (torch >= 2.6); the loader restores
#: the order itself, so a worker that got less CPU does not stall the others
_UNORDERED = "in_order" in inspect.signature(torch.utils.data.DataLoader.__init__).parameters


def _identity(x: Any) -> Any:
    return x


def _pin(item: Any) -> Any:
    """A loader output (CSRBatch, tensors in dicts, lists or tuples) in page-locked memory."""
    if isinstance(item, (torch.Tensor, CSRBatch)):
        return item.pin_memory()
    if isinstance(item, dict):
        return {k: _pin(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)) and type(item) in (list, tuple):
        return type(item)(_pin(v) for v in item)
    return item


class _Fetcher(torch.utils.data.Dataset):
    """What workers run: read one requested batch and convert it to the chosen output."""

    def __init__(self, dataset: CellDataset, output: str, max_genes: int | None, add_cls: bool,
                 truncation: str, seed: int, rank: int, n_bins: int = 51, *,
                 transform: Callable[[Any], Any] | None = None, flags: RingFlags | None = None) -> None:
        self.dataset = dataset
        self.raw, self.pipeline = fusable(dataset)
        self.transform = transform
        self.flags = flags
        self.tagged = False  # worker processes answer (position, worker, result): results come as they are done
        self._ring: WorkerRing | None = None  # made in the worker process
        self.output = output
        self.n_bins = n_bins
        self.max_genes = max_genes
        self.add_cls = add_cls
        self.truncation = truncation
        self.seed = seed
        self.rank = rank

    def __len__(self) -> int:
        return len(self.dataset)

    def zero_copy_possible(self) -> bool:
        """True when some batches are views of the memory map (CSR output, nothing applied)."""
        ds = self.dataset
        return (self.output == "csr" and self.transform is None and getattr(ds, "preprocessing", None) is None
                and getattr(ds, "store", None) is not None and hasattr(ds, "shard_of_range"))

    def _zero_copy(self, ids: np.ndarray | tuple[int, int]) -> bool:
        ds = self.dataset
        if not self.zero_copy_possible():
            return False
        as_range = ids if isinstance(ids, tuple) else range_of(ids)
        return as_range is not None and ds.shard_of_range(*as_range) >= 0

    def read(self, request: Request) -> Any:
        """The requested batch in the loader's output form, read in this process."""
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:  # datasets with per-epoch draws (matched controls) follow it
            set_epoch(request.epoch)
        ids = request.ids
        # a dataset's recorded pipeline is fused into the output kernel: read raw counts
        source = self.dataset if self.pipeline is None else self.raw
        batch = source.get_range(*ids) if isinstance(ids, tuple) else source.__getitems__(ids)
        out = self.convert(batch, request, self.pipeline)
        return out if self.transform is None else self.transform(out)

    def __getitem__(self, request: Request | Hold) -> Any:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.read(request)
        if isinstance(request, Hold):
            time.sleep(_HOLD_SECONDS)
            return None, None, None
        out = self._produce(request, info.id)
        return (request.position, info.id, out) if self.tagged else out

    def _produce(self, request: Request, worker: int) -> Any:
        if self._zero_copy(request.ids):
            return Ref(request)
        if self.flags is None:
            return Packed(self.read(request))
        if self._ring is None:
            install_arena()
            self._ring = WorkerRing(self.flags, worker)
        return self._ring.produce(lambda: self.read(request), request.tag, self._mapped())

    def _mapped(self) -> Callable[[torch.Tensor], Any] | None:
        """How a worker names leaves that are views of the store's map (None without one)."""
        return self.dataset.store.map_ref if type(self.dataset) is CellDataset and self.dataset.store else None

    def resolve(self, ref: Any) -> torch.Tensor:
        """A worker's map reference as a view of this process's map."""
        return self.dataset.store.from_map_ref(ref)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ring"] = None
        return state

    def convert(self, batch: CSRBatch, request: Request, preprocessing: Any = None) -> Any:
        """The batch in the loader's output form. ``preprocessing`` (a pipeline not yet
        applied to ``batch``) is fused into the output kernel (:mod:`scmf_loader.outputs`)."""
        if self.output == "csr":
            return batch if preprocessing is None else batch.preprocessed(preprocessing)
        fused = {"preprocessing": preprocessing}
        generator = None
        if self.truncation == "random" and self.output in ("padded", "binned"):
            state = np.random.SeedSequence([self.seed, request.epoch, self.rank, request.position])
            generator = torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))
        if self.output == "dense":
            out: dict[str, Any] = {"expression": batch.to_dense(**fused)}
        elif self.output == "padded":
            out = batch.to_padded(self.max_genes, self.add_cls, self.truncation, generator, **fused)
        elif self.output == "rank":
            out = batch.to_rank(self.dataset.gene_nonzero_median, self.max_genes, self.add_cls, **fused)
        else:
            out = batch.to_binned(self.n_bins, self.max_genes, self.add_cls, self.truncation, generator, **fused)
        out["cell_ids"] = batch.cell_ids
        out["obs"] = batch.obs
        return out


def _sampler_for(dataset: Any, sampler: BatchSampler | None, batch_size: int, shuffle: bool,
                 block_size: int | None, drop_last: bool, common: dict[str, Any]) -> BatchSampler:
    """The sampler a loader uses: the given one (through a copy when its ``drop_last``
    differs from the loader's), the dataset's own (``make_sampler``, e.g. a
    :class:`~scmf_loader.mixture.MixtureDataset`), or a block-shuffle / sequential one."""
    if sampler is not None:
        if sampler.drop_last != bool(drop_last):
            sampler = sampler.with_drop_last(drop_last)
    elif getattr(dataset, "make_sampler", None) is not None:
        sampler = dataset.make_sampler(batch_size, shuffle=shuffle, block_size=block_size,
                                       drop_last=drop_last, **common)
    elif shuffle:
        sampler = BlockShuffleSampler(dataset, batch_size, block_size, drop_last=drop_last, **common)
    else:
        sampler = SequentialSampler(dataset, batch_size, drop_last=drop_last, **common)
    if int(sampler.shard_offsets[-1]) != len(dataset):
        raise ConfigurationError(
            f"the sampler covers {int(sampler.shard_offsets[-1])} cells but the dataset has {len(dataset)}"
        )
    return sampler


class CellDataLoader:
    """Batches of a :class:`~scmf_loader.dataset.CellDataset` for training.

    ``shuffle=True`` uses a :class:`~scmf_loader.samplers.BlockShuffleSampler`
    (``block_size`` defaults to ``batch_size``: zero-copy batches; a divisor mixes
    ``batch_size // block_size`` blocks per batch), ``shuffle=False`` a
    :class:`~scmf_loader.samplers.SequentialSampler`; ``sampler=`` takes any
    :class:`~scmf_loader.samplers.BatchSampler` instead (e.g. a
    :class:`~scmf_loader.samplers.BatchAwareSampler`), whose own batch size, seed and rank
    then apply; the loader's ``drop_last`` applies to every sampler, given or built (a
    given sampler with another ``drop_last`` is used through a copy, the original kept). ``output`` is ``"csr"`` (a
    :class:`~scmf_loader.batch.CSRBatch`), ``"padded"`` (``CSRBatch.to_padded`` with
    ``max_genes``, ``add_cls`` and ``truncation``, plus ``cell_ids`` and ``obs``),
    ``"dense"`` (``expression`` of shape ``(cells, n_genes)``, plus ``cell_ids`` and ``obs``),
    ``"rank"`` (``CSRBatch.to_rank`` with the dataset's ``gene_nonzero_median``,
    ``max_genes`` and ``add_cls``) or ``"binned"`` (``CSRBatch.to_binned`` with ``n_bins``,
    ``max_genes``, ``add_cls`` and ``truncation``), each plus ``cell_ids`` and ``obs``.

    Epochs advance by themselves when an iteration runs to its end; ``set_epoch`` selects
    one explicitly. ``state_dict()`` taken after any batch and given to
    ``load_state_dict()`` makes the next iteration yield exactly the rest of that epoch.
    ``pin_memory`` is skipped silently without CUDA.

    ``transform``: a callable applied to every output (in the worker that built it); its
    result may be tensors in dicts, lists and tuples, CSR batches, numpy arrays or plain
    values. Workers hand batches over through ``slots_per_worker`` reused shared-memory
    slots each (default ``prefetch_factor + 3``; 0: a fresh segment per batch), see
    :mod:`scmf_loader.transport`: the output kernels write straight into a slot, and a slot
    is reused once nothing views its batch any more. ``prefetch_factor``: batches requested
    ahead per worker process (default 2; with a ``transform`` :data:`TRANSFORM_PREFETCH`);
    results come back as they are done and are put back in order here (torch >= 2.6; a
    worker's results held early are bounded so that they fit its slots). With CUDA and ``pin_memory`` the slots
    are page-locked, so ``batch.to("cuda", non_blocking=True)`` copies from them directly.
    ``worker_type="thread"`` runs the ``num_workers`` workers as threads of this process
    (no hand-over at all; the output kernels and torch ops release the GIL, pure-Python
    transforms do not); ``"process"`` as DataLoader worker processes; ``"auto"`` (the
    default) threads for every output of a dataset directory with no ``transform``, no
    preprocessing but its recorded pipeline and no pinning, processes otherwise (:func:`~scmf_loader._loader_options.resolve_worker_type`; csr gathers use
    at most one thread per core but the caller's); :attr:`worker_type` holds the choice.
    ``read_ahead``: batches that background threads keep ahead of the reader, mapping and
    checking the next shard and asking the kernel for the next batches' pages
    (:mod:`scmf_loader.readahead`; 0 turns it off).
    """

    def __init__(
        self,
        dataset: CellDataset,
        batch_size: int = 64,
        num_workers: int = 4,
        shuffle: bool = True,
        drop_last: bool = True,
        pin_memory: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        block_size: int | None = None,
        output: str = "csr",
        max_genes: int | None = None,
        *,
        n_bins: int = 51,
        add_cls: bool = True,
        truncation: str = "top",
        sampler: BatchSampler | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        multiprocessing_context: Any = None,
        timeout: float = 0,
        transform: Callable[[Any], Any] | None = None,
        slots_per_worker: int | None = None,
        read_ahead: int = DEFAULT_DEPTH,
        worker_type: str = "auto",
    ) -> None:
        max_genes = checked_options(dataset, output, n_bins, truncation, max_genes, num_workers)
        sampler = _sampler_for(dataset, sampler, batch_size, shuffle, block_size, drop_last,
                               {"seed": seed, "rank": rank, "world_size": world_size})
        self.dataset, self.sampler, self.output = dataset, sampler, output
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        check_worker_options(transform, read_ahead, worker_type)
        self.read_ahead = int(read_ahead)
        self.worker_type = chosen = resolve_worker_type(worker_type, dataset, output, transform, self.pin_memory)
        auto = worker_type != "thread"
        self._threads = (auto_threads(num_workers, output) if auto else num_workers) if chosen == "thread" else 0
        num_workers = 0 if chosen == "thread" else num_workers
        self._epoch, self._done = 0, 0
        self._resume: int | None = None
        self._requests = Requests(sampler)
        extra: dict[str, Any] = {}
        flags = self._ring = None
        if num_workers > 0:
            extra, flags = self._worker_processes(num_workers, transform, persistent_workers, prefetch_factor,
                                                  multiprocessing_context, slots_per_worker)
        self._fetcher = _Fetcher(dataset, output, max_genes, add_cls, truncation, sampler.seed, sampler.rank, n_bins,
                                 transform=transform, flags=flags)
        self._fetcher.tagged = bool(self._requests.feed_limit)
        # pinning happens here, after a worker's output is unpacked (pinned memory would not
        # survive the trip anyway), so the DataLoader's pinning thread is not used
        self._loader = torch.utils.data.DataLoader(
            self._fetcher, sampler=self._requests, batch_size=None, collate_fn=_identity,
            num_workers=num_workers, pin_memory=False, timeout=timeout, **extra,
        )

    def _worker_processes(self, num_workers: int, transform: Any, persistent_workers: bool,
                          prefetch_factor: int | None, context: Any,
                          slots_per_worker: int | None) -> tuple[dict[str, Any], RingFlags | None]:
        """The DataLoader's options for worker processes, and the ring's flags (None: a
        fresh segment per batch); sets up the loader's side of the ring and the feed."""
        if prefetch_factor is None:  # a transform: one more batch ahead per worker (measured,
            prefetch_factor = TRANSFORM_PREFETCH if transform is not None else 2  # see TRANSFORM_PREFETCH)
        extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor,
                 # requests in flight per worker, plus a resume and a stop sentinel
                 "multiprocessing_context": direct_context(context, prefetch_factor + 2)}
        per_worker = prefetch_factor + 3 if slots_per_worker is None else int(slots_per_worker)
        if _UNORDERED:  # results as they come, put back in order by _ordered; a worker's
            extra["in_order"] = False  # early ones held while its slots last (see feed_limit)
            self._requests.feed_limit = feed_limit(prefetch_factor, per_worker)
        flags = RingFlags(num_workers, per_worker) if per_worker > 0 else None  # 0: a segment per batch
        self._ring = LoaderRing(flags, self.pin_memory) if flags is not None else None
        return extra, flags

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return self._epoch

    @property
    def batch_size(self) -> int:
        """Cells per batch (the last batch may hold fewer when ``drop_last=False``)."""
        return self.sampler.batch_size

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next (from its start, unless a loaded state points into it)."""
        if epoch < 0:
            raise ConfigurationError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._resume = None
        self._epoch = int(epoch)
        self.sampler.set_epoch(self._epoch)

    def __iter__(self) -> Iterator[Any]:
        epoch = self._epoch
        start, self._resume = (self._resume or 0), None
        self.sampler.set_epoch(epoch)
        self._requests.epoch, self._requests.start = epoch, start
        self._requests.tag = tag = self._requests.tag % (1 << 30) + 1
        self._done = start
        items = self._items(tag)
        ahead = self._read_ahead(epoch, start, tag)
        try:
            for item in items:
                item = self._receive(item)
                self._done += 1
                if ahead is not None:
                    ahead.consumed()
                yield item
                if self._ring is not None:  # before the DataLoader asks a worker for more
                    self._ring.reclaim()
        finally:
            if ahead is not None:
                ahead.stop()
        self._epoch, self._done = epoch + 1, 0

    def _items(self, tag: int) -> Iterator[Any]:
        """This iteration's batches, as read here, by worker threads or by worker processes.
        Zero-copy batches cost nothing to build: this process makes them itself whatever the
        workers, which only see the others (gathers across blocks or shards)."""
        direct = self._fetcher.zero_copy_possible()
        self._requests.skip = self._fetcher._zero_copy if direct and (self._threads or self._loader.num_workers) else None
        if self._threads:  # worker threads: the output kernels release the GIL
            from scmf_loader.outputs._threads import worker_thread_default

            items: Iterator[Any] = threaded(self._fetcher.read, iter(self._requests), self._threads,
                                            initializer=worker_thread_default, initargs=(self._threads,))
        elif self._loader.num_workers == 0:
            # in-process: the DataLoader would only add its per-batch bookkeeping (~0.1 ms)
            return (self._fetcher[r] for r in self._requests)
        else:
            self._warm_kernels()
            items = iter(self._loader)  # an earlier, unfinished iteration is drained here
            if self._ring is not None:
                self._ring.forget_stale(tag)
            if self._requests.feed is not None:
                items = self._ordered(items, self._requests.feed)
        return self._merged(items) if direct else items

    @staticmethod
    def _ordered(results: Iterator[Any], feed: Feed) -> Iterator[Any]:
        """Worker results, which come as they are done as ``(position, worker, result)``, in
        the order the requests went out (``feed.sent``); holds are dropped. A result that
        comes early waits in ``feed.pending`` (while a worker has ``feed.limit`` waiting, the
        feed sends holds)."""
        sent, pending, early = feed.sent, feed.pending, feed.early
        for position, worker, item in results:
            if position is None:
                continue
            if position != sent[0]:
                pending[position] = (worker, item)
                early[worker] = early.get(worker, 0) + 1
                continue
            sent.popleft()
            yield item
            while sent and sent[0] in pending:
                worker, item = pending.pop(sent.popleft())
                early[worker] -= 1
                yield item

    def _read_ahead(self, epoch: int, start: int, tag: int) -> ReadAhead | None:
        """Read-ahead threads for this iteration (:mod:`scmf_loader.readahead`), or None."""
        store = getattr(self.dataset, "store", None)
        offsets = getattr(self.dataset, "shard_offsets", None)
        if not self.read_ahead or store is None or offsets is None or not hasattr(store, "advise"):
            return None
        return ReadAhead(store, offsets, lambda: self._requests.all(epoch, start, tag), self.read_ahead)

    def _warm_kernels(self) -> None:
        """Convert one cell here before worker processes fork, so that they share the loaded
        output kernels (numba) copy-on-write instead of each loading its own (~100 MB)."""
        if self.__dict__.get("_warm") or self.output == "csr" or not len(self.dataset):
            return
        self._warm = True
        f = self._fetcher
        try:
            batch = (f.raw if f.pipeline is not None else self.dataset).__getitems__(np.zeros(1, np.int64))
            f.convert(batch, Request(0, 0, (0, 1)), f.pipeline)
        except Exception:  # noqa: BLE001 -- best effort: the workers meet and report any error
            pass

    def _merged(self, from_workers: Iterator[Any]) -> Iterator[Any]:
        """The epoch in order: zero-copy batches as references read here, the rest from the
        workers (which were given exactly those, in the same order)."""
        for request in self._requests.all():
            yield Ref(request) if self._fetcher._zero_copy(request.ids) else next(from_workers)

    def _receive(self, item: Any) -> Any:
        """A worker's answer as the batch: views of its ring slot (page-locked already when
        pinning), a zero-copy batch read here, or an unpacked fallback buffer."""
        if isinstance(item, Slotted):
            self._ring.reclaim()
            item = self._ring.unpack(item, self._fetcher.resolve)
            return _pin(item) if self.pin_memory and not self._ring.pin else item
        if isinstance(item, Ref):
            item = self._fetcher.read(item.request)
        elif isinstance(item, Packed):
            item = item.unpack()
        return _pin(item) if self.pin_memory else item

    def state_dict(self) -> dict[str, Any]:
        """The resume point: ``epoch`` and ``batches_done`` (batches this rank has handed
        out in it), with the settings a resumed loader must share."""
        return {**self.sampler.state_dict(), "epoch": self._epoch, "batches_done": self._done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration yields the rest of its epoch,
        later ones the same epochs as an uninterrupted run."""
        self.sampler.load_state_dict(state)
        self._epoch = int(state["epoch"])
        self._done = self._resume = int(state["batches_done"])

    def __repr__(self) -> str:
        return (
            f"CellDataLoader(batches={len(self)}, batch_size={self.batch_size}, "
            f"sampler={type(self.sampler).__name__}, output={self.output!r}, "
            f"workers={self._threads or self._loader.num_workers})"
        )
