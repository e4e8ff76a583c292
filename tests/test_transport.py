"""Worker transport (a ring of reused shared-memory slots), transform=, the recorded
pipeline fused into the output kernels, and read-ahead (scmf_loader.transport,
scmf_loader.readahead, CellDataLoader)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scmf_loader import CellDataLoader, CellDataset, CSRBatch, dataloader, queues, transport
from scmf_loader._loader_options import resolve_worker_type
from scmf_loader.errors import ConfigurationError
from scmf_loader.readahead import ReadAhead, runs_of
from scmf_loader.transport import LoaderRing, Packed, RingFlags, Slotted, WorkerRing, build, flatten

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def ds(loader_dataset: Path) -> CellDataset:
    return CellDataset(loader_dataset)


def _equal(a: Any, b: Any) -> bool:
    """Deep equality of loader outputs (tensors by value)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, CSRBatch):
        return isinstance(b, CSRBatch) and a.n_genes == b.n_genes and all(
            _equal(x, y) for x, y in ((a.indptr, b.indptr), (a.indices, b.indices), (a.values, b.values),
                                      (a.cell_ids, b.cell_ids), (a.obs, b.obs), (a.stats, b.stats)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, CSRBatch):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


class _Counting(CellDataLoader):
    """A loader that counts what its workers sent (slot batches, fallbacks, storages)."""

    def _receive(self, item: Any) -> Any:
        counts = self.__dict__.setdefault("counts", Counter())
        counts[type(item).__name__] += 1
        if isinstance(item, Slotted) and item.storage is not None:
            counts["storages"] += 1
        return super()._receive(item)


# ---- the ring ----------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["padded", "dense", "rank", "binned", "csr"])
def test_workers_through_the_ring_equal_one_process(ds: CellDataset, output: str) -> None:
    kw: dict[str, Any] = {"batch_size": 40, "seed": 3, "output": output, "max_genes": 16, "block_size": 8,
                          "drop_last": False, "truncation": "random" if output == "padded" else "top"}
    one = CellDataLoader(ds, num_workers=0, **kw)
    refs = [[_clone(b) for b in one] for _ in range(2)]
    loader = _Counting(ds, num_workers=2, worker_type="process", **kw)  # most outputs default to threads
    for ref in refs:  # persistent workers: the second epoch reuses the slots
        got = [_clone(b) for b in loader]
        assert len(got) == len(ref)
        assert all(_equal(a, b) for a, b in zip(got, ref, strict=True))
    counts = loader.counts
    n = 2 * len(refs[0])
    assert counts["Slotted"] >= n - 4, counts  # a fresh segment only when every slot is held
    assert counts["storages"] <= 2 * loader._ring.flags.per_worker + 4, counts  # each slot sent once (or regrown)


def test_batches_kept_by_the_caller_are_never_overwritten(ds: CellDataset) -> None:
    kw: dict[str, Any] = {"batch_size": 30, "seed": 5, "output": "padded", "max_genes": 12, "block_size": 10}
    ref = [_clone(b) for b in CellDataLoader(ds, num_workers=0, **kw)]
    loader = _Counting(ds, num_workers=2, slots_per_worker=2, worker_type="process", **kw)
    kept = list(loader)  # every batch held: the ring runs dry and falls back, never reuses a held slot
    assert all(_equal(a, b) for a, b in zip(kept, ref, strict=True))
    assert loader.counts["Packed"] > 0
    loader.set_epoch(0)
    some = [b for i, b in enumerate(loader) if i % 3 == 0]  # some held, the rest reused
    assert all(_equal(a, b) for a, b in zip(some, ref[::3], strict=True))


def test_slots_come_back_after_an_iteration_stopped_early(ds: CellDataset) -> None:
    kw: dict[str, Any] = {"batch_size": 20, "seed": 1, "output": "padded", "max_genes": 8, "block_size": 5}
    loader = _Counting(ds, num_workers=1, worker_type="process", **kw)
    for _ in range(4):
        for i, _b in enumerate(loader):
            if i == 2:
                break  # batches in flight are discarded by the DataLoader, their slots freed
    loader.counts.clear()
    full = list(b["cell_ids"].clone() for b in loader)
    assert len(full) == len(loader)
    assert loader.counts["Packed"] <= 2, loader.counts  # the slots did come back
    flags = loader._ring.flags.array
    del full
    assert int(np.count_nonzero(flags)) <= loader._ring.flags.per_worker


def test_ring_parts_in_one_process() -> None:
    """WorkerRing/LoaderRing without processes: the output kernels' buffers are carved
    from the slot (no copy), other leaves copied once, a slot is reused only once free."""
    from scmf_loader import buffers, transport

    flags = RingFlags(1, 2)
    worker, loader = WorkerRing(flags, 0), LoaderRing(flags)
    original = buffers.empty
    transport.install_arena()
    try:
        def make(k: int) -> dict[str, Any]:
            big = buffers.empty((300, 100), np.float32)  # as the output kernels allocate
            big[:] = k
            return {"x": torch.from_numpy(big), "small": torch.arange(k, k + 3), "pair": (k, "s"), "a": np.ones(2)}

        first = worker.produce(lambda: make(1), tag=1)
        assert isinstance(first, Slotted)
        assert first.storage is not None
        out1 = loader.unpack(first)
        second = worker.produce(lambda: make(2), tag=1)
        assert isinstance(second, Slotted)
        assert second.slot != first.slot
        out2 = loader.unpack(second)
        assert worker.produce(lambda: make(3), tag=1).__class__ is Packed  # both slots held
        del out1
        loader.reclaim()
        third = worker.produce(lambda: make(4), tag=1)
        assert isinstance(third, Slotted)
        assert third.slot == first.slot
        assert third.storage is None
        slot = worker.slots[third.slot]
        assert third.layout[0][0] == 0  # carved from the slot's start: no copy
        assert slot.holds(torch.from_numpy(slot.mem[:4]))
        out4 = loader.unpack(third)
        assert float(out4["x"].mean()) == 4
        assert float(out2["x"].mean()) == 2  # the kept batch intact
        assert out4["pair"] == (4, "s")
        assert isinstance(out4["a"], np.ndarray)
        assert torch.equal(out4["small"], torch.arange(4, 7))
    finally:
        buffers.empty = original
        transport._original_empty = None


def test_flatten_build_round_trip(ds: CellDataset) -> None:
    b = ds[np.array([3, 1, 7])]
    item = {"csr": b, "t": (torch.ones(2), [torch.zeros(1), 5]), "s": "x", "n": None}
    leaves: list[torch.Tensor] = []
    assert _equal(build(flatten(item, leaves), leaves), item)
    one: list[torch.Tensor] = []
    flatten(ds[np.array([3, 1, 7])], one)  # obs and stats not read yet: each crosses as one 2-D block
    assert len(one) == 6
    assert [tuple(t.shape) for t in one[4:]] == [(3, len(b.obs)), (3, len(b.stats))]


# ---- transform ---------------------------------------------------------------------------
class _Busy:
    """A picklable transform: reshapes the output (a tuple with a numpy array and a tag)."""

    def __call__(self, out: dict[str, Any]) -> tuple[Any, ...]:
        return out["expression"] * 2, out["cell_ids"].numpy() + 1, "tag"


@pytest.mark.parametrize("workers", [0, 2])
def test_transform_runs_on_every_output(ds: CellDataset, workers: int) -> None:
    kw: dict[str, Any] = {"batch_size": 25, "seed": 2, "output": "padded", "max_genes": 10}
    ref = list(CellDataLoader(ds, num_workers=0, **kw))
    got = list(CellDataLoader(ds, num_workers=workers, transform=_Busy(), **kw))
    for (expr, ids, tag), r in zip(got, ref, strict=True):
        assert torch.equal(expr, r["expression"] * 2)
        np.testing.assert_array_equal(ids, r["cell_ids"].numpy() + 1)
        assert tag == "tag"


def test_transform_on_zero_copy_batches_in_workers(ds: CellDataset) -> None:
    """A transform turns off the zero-copy shortcut: it runs in the workers, on views."""
    ref = list(CellDataLoader(ds, batch_size=40, num_workers=0, seed=4))
    got = list(CellDataLoader(ds, batch_size=40, num_workers=1, seed=4, transform=lambda b: b.values.sum()))
    assert [float(g) for g in got] == pytest.approx([float(r.values.sum()) for r in ref])


def _plus_one_in_place(b: CSRBatch) -> CSRBatch:
    b.values.add_(1)  # through the copy-on-write map: the worker's pages, never the file
    return b


@pytest.mark.parametrize("transform", [lambda b: b, _plus_one_in_place, lambda b: (b.values[:5], b.indices, b.cell_ids)])
def test_transform_outputs_viewing_the_map_cross_as_references(ds: CellDataset, transform: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmodified views of the map a worker's transform returns are sent as references and
    viewed in the loader's own map; written ones are copied (the file's bytes differ)."""
    monkeypatch.setattr(transport, "_MIN_REF", 1)  # this dataset's batches are small (forked workers inherit it)
    kw: dict[str, Any] = {"batch_size": 40, "seed": 4, "drop_last": False}
    ref = [_clone(transform(b)) for b in CellDataLoader(ds, num_workers=0, **kw)]
    ds.store.close()  # the in-process run wrote through its map: map afresh for what follows
    loader = _Counting(ds, num_workers=2, transform=transform, **kw)
    assert loader.worker_type == "process"
    got = [_clone(b) for b in loader]
    assert all(_equal(a, b) for a, b in zip(got, ref, strict=True))
    assert len(got) == len(ref)
    assert loader.counts["Slotted"] >= len(ref) - 4
    contiguous = 0
    for out in CellDataLoader(ds, num_workers=1, transform=transform, **kw):
        values, ids = (out.values, out.cell_ids) if isinstance(out, CSRBatch) else (out[0], out[2])
        if ds.shard_of_range(int(ids[0]), int(ids[-1]) + 1) >= 0 and len(ids) == int(ids[-1] - ids[0]) + 1:
            contiguous += 1  # a view of the map in the worker (gathers are built in the slot)
            assert (ds.store.map_ref(values) is not None) == (transform is not _plus_one_in_place)
    assert contiguous > 10


class _Uneven:
    """A picklable transform taking 0-4 ms by batch (``stall``: 0.4 s for the batch whose
    first cell it is), so that worker processes finish out of order; it returns the cell ids
    and the worker's process id."""

    def __init__(self, stall: int | None = None) -> None:
        self.stall = stall

    def __call__(self, b: CSRBatch) -> tuple[torch.Tensor, int]:
        first = int(b.cell_ids[0])
        time.sleep(0.4 if first == self.stall else (first * 7919 % 5) * 1e-3)
        return b.cell_ids.clone(), os.getpid()


def _arrivals(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records the positions worker results arrive with (None: a hold) and the most early
    results of one worker the loader holds at each arrival."""
    seen: list[Any] = []
    ordered = CellDataLoader._ordered

    def spy(results: Any, feed: Any) -> Any:
        def tap() -> Any:
            for position, worker, item in results:
                seen.append((position, max(feed.early.values(), default=0)))
                yield position, worker, item
        return ordered(tap(), feed)

    monkeypatch.setattr(CellDataLoader, "_ordered", staticmethod(spy))
    return seen


@pytest.mark.skipif(not dataloader._UNORDERED, reason="torch without DataLoader(in_order=)")
def test_worker_results_come_as_done_and_are_handed_out_in_order(ds: CellDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes hand results over as they finish; the loader restores the order."""
    seen = _arrivals(monkeypatch)
    kw: dict[str, Any] = {"batch_size": 16, "seed": 5, "block_size": 4, "drop_last": False}
    one = CellDataLoader(ds, num_workers=0, **kw)
    refs = [[b.cell_ids.clone() for b in one] for _ in range(3)]  # epochs 0, 1, 2
    loader = CellDataLoader(ds, num_workers=3, transform=_Uneven(), **kw)
    for ref in refs[:2]:  # persistent workers: the second epoch too
        got = list(loader)
        assert len(got) == len(ref)
        for (ids, pid), r in zip(got, ref, strict=True):
            assert torch.equal(ids, r)
            assert pid != os.getpid()
    n = len(refs[0])
    positions = [p for p, _ in seen if p is not None]
    assert sorted(positions) == sorted(list(range(n)) * 2)
    assert positions != sorted(positions[:n]) + sorted(positions[n:])  # some came early
    # an iteration stopped early (epoch 2), then a full one: the abandoned results are dropped
    for i, _b in enumerate(loader):
        if i == 2:
            break
    got = [ids for ids, _ in loader]
    assert len(got) == n
    assert all(torch.equal(a, b) for a, b in zip(got, refs[2], strict=True))


@pytest.mark.skipif(not dataloader._UNORDERED, reason="torch without DataLoader(in_order=)")
def test_a_stalled_worker_does_not_let_the_others_fill_memory(ds: CellDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one worker is stuck on a batch, the others run ahead by at most the feed's
    limit (plus their requests already out), then get holds, within their slots; the order
    is kept."""
    seen = _arrivals(monkeypatch)
    kw: dict[str, Any] = {"batch_size": 4, "seed": 3, "block_size": 2, "drop_last": False}
    ref = [b.cell_ids.clone() for b in CellDataLoader(ds, num_workers=0, **kw)]
    assert len(ref) > 40
    default = CellDataLoader(ds, num_workers=2, transform=_Uneven(), **kw)
    assert default._loader.prefetch_factor == dataloader.TRANSFORM_PREFETCH == 3
    assert default._requests.feed_limit == 2  # 6 slots - 3 prefetch - 1
    assert default._ring.flags.per_worker == 6  # slots: prefetch + 3
    assert CellDataLoader(ds, num_workers=2, worker_type="process", **kw)._loader.prefetch_factor == 2
    loader = _Counting(ds, num_workers=2, prefetch_factor=2, transform=_Uneven(stall=int(ref[1][0])), **kw)
    got = [ids.clone() for ids, _ in loader]  # (keeping the views would hold every slot)
    assert len(got) == len(ref)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    limit = loader._requests.feed_limit
    assert limit == 2  # 5 slots - 2 prefetch - 1
    assert max(n for _, n in seen) <= limit + 2  # the limit, plus the worker's 2 requests already out
    assert loader.counts["Packed"] == 0  # and so every batch went through the worker's slots
    assert sum(p is None for p, _ in seen) >= 10  # the free worker waited on holds during the 0.4 s


class _Threads:
    """A picklable transform returning the names of the worker's threads."""

    def __call__(self, b: CSRBatch) -> tuple[torch.Tensor, list[str]]:
        return b.cell_ids.clone(), sorted(t.name for t in threading.enumerate())


@pytest.mark.parametrize("context", [None, "spawn"])
def test_worker_queues_have_no_feeder_threads(ds: CellDataset, context: str | None) -> None:
    """Requests and results are written to the pipes by the threads that put them (no
    queue feeder thread in the loader's process or in a worker); the epoch is intact."""
    kw: dict[str, Any] = {"batch_size": 32, "seed": 2, "block_size": 8, "drop_last": False}
    ref = [b.cell_ids.clone() for b in CellDataLoader(ds, num_workers=0, **kw)]
    feeders = {t.ident for t in threading.enumerate() if t.name == "QueueFeederThread"}  # other tests' loaders
    loader = CellDataLoader(ds, num_workers=2, transform=_Threads(), multiprocessing_context=context, **kw)
    assert isinstance(loader._loader.multiprocessing_context, multiprocessing.context.BaseContext)
    assert loader._loader.multiprocessing_context.get_start_method() == (context or multiprocessing.get_start_method())
    got = list(loader)
    assert len(got) == len(ref)
    assert all(torch.equal(ids, r) for (ids, _), r in zip(got, ref, strict=True))
    assert not any("QueueFeederThread" in n for _, names in got for n in names)
    assert {t.ident for t in threading.enumerate() if t.name == "QueueFeederThread"} <= feeders
    q = queues.direct_context("spawn").Queue()
    q.put({"x": torch.arange(3)})
    assert torch.equal(q.get(timeout=5)["x"], torch.arange(3))


def test_direct_queue_large_messages_go_through_the_feeder_in_order() -> None:
    ctx = queues.direct_context("fork", in_flight=4)
    q = ctx.Queue()
    assert q.max_direct == 16384
    q.put(("small", 1))
    assert q._thread is None  # written directly
    big = "x" * 100_000
    q.put(("big", big))
    assert q._thread is not None  # a message over max_direct: the feeder, from now on
    q.put(("small", 2))
    assert [q.get(timeout=5) for _ in range(3)] == [("small", 1), ("big", big), ("small", 2)]


class _Big:
    """A picklable transform returning 200 kB of plain Python per batch (pickled, not slotted)."""

    def __call__(self, b: CSRBatch) -> tuple[torch.Tensor, str]:
        return b.cell_ids.clone(), "y" * 200_000


def test_large_requests_and_results_do_not_deadlock(ds: CellDataset) -> None:
    """Gathered batches of 500 cells (4 kB of ids per request, over max_direct with 14 in
    flight: they go through the feeder) and 200 kB results (over it too): the epoch
    completes, in order, twice."""
    kw: dict[str, Any] = {"batch_size": 500, "seed": 9, "block_size": 1, "drop_last": False}
    one = CellDataLoader(ds, num_workers=0, **kw)
    refs = [[b.cell_ids.clone() for b in one] for _ in range(2)]
    loader = CellDataLoader(ds, num_workers=2, prefetch_factor=14, transform=_Big(), timeout=60, **kw)
    assert loader._loader.multiprocessing_context.max_direct == 4096
    for ref in refs:
        got = list(loader)
        assert len(got) == len(ref)
        assert all(torch.equal(ids, r) and len(text) == 200_000 for (ids, text), r in zip(got, ref, strict=True))
    assert len(ref) == 3
    assert any(t.name == "QueueFeederThread" for t in threading.enumerate())  # the requests took the feeder


def test_auto_worker_type(loader_dataset: Path, ds: CellDataset) -> None:
    """Threads for csr gathers of a dataset directory, processes for everything else."""
    assert CellDataLoader(ds, num_workers=2).worker_type == "thread"
    for output in ("padded", "dense", "rank", "binned"):
        assert CellDataLoader(ds, num_workers=2, output=output, max_genes=8).worker_type == "thread"
    assert CellDataLoader(ds, num_workers=2, output="padded", max_genes=8)._threads == 2  # compute: every thread
    assert resolve_worker_type("auto", ds, "padded", None, pinned=True) == "process"  # page-locked slots
    assert CellDataLoader(ds, num_workers=2, transform=lambda b: b).worker_type == "process"
    assert CellDataLoader(CellDataset(loader_dataset, preprocessing=lambda b: b), num_workers=2).worker_type == "process"
    assert CellDataLoader(ds, num_workers=2, worker_type="process").worker_type == "process"
    cores = len(os.sched_getaffinity(0))
    assert CellDataLoader(ds, num_workers=64)._threads == max(1, min(64, cores - 1))  # one core for the caller
    assert CellDataLoader(ds, num_workers=64, worker_type="thread")._threads == 64  # as asked


@pytest.mark.parametrize("output", ["csr", "padded", "dense", "rank", "binned"])
def test_thread_workers_equal_one_process_and_resume(ds: CellDataset, output: str) -> None:
    kw: dict[str, Any] = {"batch_size": 30, "seed": 7, "output": output, "max_genes": 12, "block_size": 10,
                          "drop_last": False}
    ref = [_clone(b) for b in CellDataLoader(ds, num_workers=0, **kw)]
    loader = CellDataLoader(ds, num_workers=2, worker_type="thread", **kw)
    got = [_clone(b) for b in loader]
    assert len(got) == len(ref)
    assert all(_equal(a, b) for a, b in zip(got, ref, strict=True))
    first = CellDataLoader(ds, num_workers=2, worker_type="thread", **kw)
    for i, _b in enumerate(first):
        if i == 4:
            state = first.state_dict()
            break
    again = CellDataLoader(ds, num_workers=2, worker_type="thread", **kw)
    again.load_state_dict(state)
    rest = [_clone(b) for b in again]
    assert all(_equal(a, b) for a, b in zip(rest, ref[5:], strict=True))
    assert len(rest) == len(ref) - 5


def test_bad_options(ds: CellDataset) -> None:
    with pytest.raises(ConfigurationError, match="transform"):
        CellDataLoader(ds, num_workers=0, transform=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="read_ahead"):
        CellDataLoader(ds, num_workers=0, read_ahead=-1)
    with pytest.raises(ConfigurationError, match="worker_type"):
        CellDataLoader(ds, num_workers=1, worker_type="fiber")


# ---- the recorded pipeline, fused ----------------------------------------------------------
@pytest.fixture(scope="module")
def unbaked(loader_sources: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scmf_shards.convert import convert_h5ad

    out = tmp_path_factory.mktemp("unbaked") / "ds"
    convert_h5ad(loader_sources, out, shard_size=200, chunk_size=256, vocab="union", quiet=True,
                 preprocessing={"normalize": "library_size", "log1p": True, "bake": False})
    return out


@pytest.mark.parametrize("output", ["padded", "dense", "rank", "binned", "csr"])
def test_recorded_pipeline_is_fused_and_equals_apply_batch(unbaked: Path, output: str) -> None:
    ds = CellDataset(unbaked)
    assert ds.preprocessing is not None
    loader = CellDataLoader(ds, batch_size=33, num_workers=0, output=output, max_genes=20, seed=6, drop_last=False)
    assert loader._fetcher.pipeline is ds.preprocessing
    raw = CellDataset(unbaked, preprocessing="raw")
    med = ds.gene_nonzero_median if output == "rank" else None
    for out in loader:
        ids = (out.cell_ids if output == "csr" else out["cell_ids"]).numpy()
        pre = ds[ids]  # the dataset's own per-batch path: apply_batch, then the plain converter
        if output == "csr":
            assert torch.equal(out.values, pre.values)
            assert torch.equal(out.indices, raw[ids].indices)
            continue
        if output == "padded":
            ref = pre.to_padded(20)
        elif output == "dense":
            ref = {"expression": pre.to_dense()}
        elif output == "rank":
            ref = pre.to_rank(med, 20)
        else:
            ref = pre.to_binned(51, 20)
        for k, v in ref.items():
            assert torch.equal(out[k], v), (output, k)


# ---- read-ahead ----------------------------------------------------------------------------
def test_runs_of_matches_a_brute_force_split() -> None:
    offsets = np.array([0, 10, 25, 40])
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = np.sort(rng.choice(40, rng.integers(1, 20), replace=False)) if rng.random() < 0.5 else \
            rng.permutation(40)[: rng.integers(1, 20)]
        runs = runs_of(ids, offsets)
        rebuilt = np.concatenate([np.arange(lo, hi) + offsets[s] for s, lo, hi in runs])
        np.testing.assert_array_equal(rebuilt, ids)
        assert all(0 <= lo < hi <= offsets[s + 1] - offsets[s] for s, lo, hi in runs)
    assert runs_of((8, 12), offsets) == [(0, 8, 10), (1, 0, 2)]


class _Recorder:
    """A store stand-in that records what read-ahead asks of it."""

    def __init__(self, cached: bool) -> None:
        self.cached = cached
        self.advised: list[tuple[int, int, int]] = []
        self.prepared: list[int] = []
        self.lock = threading.Lock()

    def prepare(self, shard: int) -> None:
        with self.lock:
            self.prepared.append(shard)

    def resident(self, shard: int, check: bool = True, samples: int | None = None) -> float:
        return 1.0 if self.cached else 0.0

    def advise(self, shard: int, start: int, stop: int, populate: bool = False) -> None:
        with self.lock:
            self.advised.append((shard, start, stop))


class _Req:
    def __init__(self, ids: Any) -> None:
        self.ids = ids


def test_read_ahead_follows_the_requests_and_stays_within_depth() -> None:
    offsets = np.array([0, 100, 200, 300])
    reqs = [_Req((a, a + 20)) for a in (40, 0, 60, 120, 100, 280, 200)] + [_Req(np.array([5, 150, 151]))]
    store = _Recorder(cached=False)
    ahead = ReadAhead(store, offsets, lambda: iter(reqs), depth=3)
    for _ in range(20):  # within depth: at most 3 requests advised before any is consumed
        with store.lock:
            assert len(store.advised) <= 3
        threading.Event().wait(0.005)
    for _ in reqs:
        ahead.consumed()
    ahead.join(5)
    ahead.stop()
    want = [r for q in reqs for r in runs_of(q.ids, offsets)]
    assert store.advised == want
    assert store.prepared == [0, 1, 2, 0]  # the shard sequence, each prepared once entered before


def test_read_ahead_skips_cached_shards_and_stops() -> None:
    offsets = np.array([0, 100])
    store = _Recorder(cached=True)
    ahead = ReadAhead(store, offsets, lambda: iter([_Req((i, i + 10)) for i in range(0, 100, 10)]), depth=2)
    for _ in range(3):
        ahead.consumed()
    ahead.stop()
    ahead.join(5)
    assert store.advised == []  # residency is known before the first batch of a shard is advised
    assert store.prepared == []  # a cached shard is checked on the reader's path, not twice at once
    assert not any(t.is_alive() for t in ahead._threads)


def test_read_aheads_still_running_are_stopped_and_joined_at_exit() -> None:
    """An abandoned iterator's read-ahead threads (daemons) must not still be inside a C/C++
    call when the interpreter finalizes (that aborted the quick start once: status 134):
    the exit hook stops every live read-ahead and waits for its threads."""
    from scmf_loader import readahead

    release = threading.Event()

    class Slow(_Recorder):
        def prepare(self, shard: int) -> None:  # busy in "native code" until released
            release.wait(5)
            super().prepare(shard)

    store = Slow(cached=False)
    ahead = ReadAhead(store, np.array([0, 100, 200]), lambda: iter([_Req((i, i + 10)) for i in range(0, 200, 10)]),
                      depth=4)
    assert ahead in readahead._LIVE
    threading.Event().wait(0.05)
    assert any(t.is_alive() for t in ahead._threads)  # the shard thread waits inside prepare
    threading.Timer(0.2, release.set).start()  # the call returns a little later, as C code would
    readahead._stop_all()  # what atexit runs
    assert not any(t.is_alive() for t in ahead._threads)
    assert store.prepared == [0]  # it finished the call it was in, then stopped


def test_a_script_abandoning_a_loader_iterator_exits_cleanly(loader_dataset: Path, tmp_path: Path) -> None:
    script = tmp_path / "abandon.py"
    script.write_text(
        "import sys\n"
        "from scmf_loader import CellDataLoader, CellDataset\n"
        "from scmf_loader import readahead\n"
        f"ds = CellDataset({str(loader_dataset)!r})\n"
        "it = iter(CellDataLoader(ds, batch_size=16, num_workers=0, output='padded', max_genes=64))\n"
        "next(it)\n"
        "assert len(readahead._LIVE) >= 1\n"
        "print('ok')\n"
    )
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"


def test_loader_with_read_ahead_on_a_real_store(ds: CellDataset) -> None:
    ref = [b.cell_ids.clone() for b in CellDataLoader(ds, batch_size=16, num_workers=0, seed=8, read_ahead=0)]
    got = [b.cell_ids.clone() for b in CellDataLoader(ds, batch_size=16, num_workers=0, seed=8, read_ahead=4)]
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    store = CellDataset(ds.store.path).store
    assert 0.0 <= store.resident(1, check=False) <= 1.0
    assert store._maps == {}  # asked without mapping (or checking) the shard for good
    assert store.resident(1, samples=2) == store.resident(1) == 1.0  # read just above: cached
    store.advise(0, 0, 5, populate=True)  # madvise on real maps: no error
    assert 0.0 <= store.resident(0) <= 1.0


def test_store_maps_each_shard_once_under_threads(loader_dataset: Path) -> None:
    store = CellDataset(loader_dataset).store
    seen: list[Any] = []

    def grab() -> None:
        for s in range(store.n_shards):
            seen.append((s, id(store.csr(s).data)))

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_shard = {s: {i for k, i in seen if k == s} for s in range(store.n_shards)}
    assert all(len(v) == 1 for v in per_shard.values())
    assert store._checked == set(range(store.n_shards))
