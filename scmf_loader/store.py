"""Open a dataset directory: manifest, vocabulary and lazily memory-mapped shards.

:func:`open_dataset` reads ``manifest.json`` and ``vocab.json`` through
:mod:`scmf_loader.format` (the one owner of the format) and checks every shard array file's
size against the manifest with one ``stat`` each, or everything (``verify=True``), with the
one checker, :mod:`scmf_loader.format.integrity`. Nothing is mapped on open: a shard's three
CSR files are memory-mapped (copy-on-write, see :func:`scmf_loader.format.shard.map_csr`) on
first use, checked once (zarr metadata, ``indptr`` and every index in range; see
:func:`scmf_loader.format.integrity.check_shard_on_map`), and kept in a small LRU
(``max_open_shards``), because each ``np.memmap`` holds a duplicated file descriptor for as
long as it lives; obs columns, read through zarr, are cached for the :data:`OBS_CACHE_SHARDS`
most recent shards. Opening is O(number of shards) in time and memory, never O(number of
cells).

Read-ahead (:mod:`scmf_loader.readahead`) runs in a thread next to the reader:
:meth:`DatasetStore.prepare` maps and checks a shard before it is asked for, and
:meth:`DatasetStore.advise` hands the kernel the byte ranges of a batch about to be read
(``madvise``: ``MADV_WILLNEED`` starts reading them from disk, ``MADV_POPULATE_READ`` maps
cached pages into this process, so the reader takes no page fault). The caches are
guarded by a lock (and mapping by one lock per shard), so a store is safe to share between
threads.

The global row id of a cell is its position in the dataset: the rows of shard 0, then
shard 1, ... in manifest order (:attr:`DatasetStore.shard_offsets`).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scmf_loader.errors import ConfigurationError, ObsColumnNotFoundError, ShardCorruptError
from scmf_loader.format import Manifest, read_manifest
from scmf_loader.format.integrity import (
    check_dataset,
    check_manifest_arrays,
    check_obs_codes,
    check_shard,
    check_shard_on_map,
    check_vocab,
)
from scmf_loader.format.shard import (
    ShardArrays,
    map_csr,
    read_obs_codes,
    read_obs_index,
    read_obs_values,
)
from scmf_loader.vocab import GeneVocab

__all__ = ["DatasetStore", "ShardArrays", "open_local_dataset"]

DEFAULT_MAX_OPEN_SHARDS = 128
OBS_CACHE_SHARDS = 8  # obs columns are read whole per shard: keep only the most recent
_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux >= 5.14; EINVAL before (then WILLNEED only)
_PAGE = mmap.PAGESIZE
_stores: weakref.WeakSet[DatasetStore] = weakref.WeakSet()


@functools.cache
def _libc_madvise() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise  # CDLL: the call releases the GIL
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_populate_ok = [True]


def _advise_range(array: np.ndarray, lo: int, hi: int, populate: bool) -> None:
    """``madvise`` entries ``[lo, hi)`` of a memory-mapped array (whole pages around them)."""
    madvise = _libc_madvise()
    if madvise is None or hi <= lo or not array.size:
        return
    base = array.ctypes.data
    start = (base + lo * array.itemsize) // _PAGE * _PAGE
    stop = base + hi * array.itemsize
    start = max(start, base // _PAGE * _PAGE)
    madvise(start, stop - start, _MADV_WILLNEED)
    failed = populate and _populate_ok[0] and madvise(start, stop - start, _MADV_POPULATE_READ) != 0
    if failed and ctypes.get_errno() == 22:  # EINVAL: this kernel has no MADV_POPULATE_READ
        _populate_ok[0] = False


def _resident_fraction(array: np.ndarray, samples: int | None = None) -> float:
    """Share of the pages of a memory-mapped array that are in the page cache (``mincore``).
    ``samples``: ask about that many single pages spread evenly instead of all of them (the
    kernel walks every page asked about: ~10 ms for a 400 MB array, 5-10% of a warm epoch)."""
    mincore = _libc_mincore()
    if mincore is None or not array.size:
        return 1.0
    base = array.ctypes.data
    start = base // _PAGE * _PAGE
    length = base + array.nbytes - start
    pages = -(-length // _PAGE)
    if samples is not None and pages > 4 * samples:
        one = np.zeros(1, dtype=np.uint8)
        out = one.ctypes.data  # once: numpy's ctypes attribute costs more than the call
        found = 0
        for k in np.linspace(0, pages - 1, samples).astype(np.int64).tolist():
            if mincore(start + k * _PAGE, _PAGE, out) != 0:
                return 0.0
            found += int(one[0] & 1)
        return found / samples
    vec = np.zeros(pages, dtype=np.uint8)
    if mincore(start, length, vec.ctypes.data) != 0:
        return 0.0
    return float(np.count_nonzero(vec & 1)) / len(vec)


@functools.cache
def _libc_mincore() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn




def _fresh_locks() -> None:
    """After ``fork``: a lock held by another thread of the parent would stay held forever."""
    for store in list(_stores):
        store._reset_locks()


@functools.cache
def _register_fork_hook() -> None:
    """Once, when the first store is made (importing the module changes nothing)."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_fresh_locks)


class DatasetStore:
    """A dataset directory opened for reading. Build one with :func:`open_dataset`.

    Holds the :class:`~scmf_loader.format.Manifest`, the
    :class:`~scmf_loader.vocab.GeneVocab`, the cumulative cell offsets of the shards, and
    caches (bounded LRUs) of memory maps and obs columns. Picklable: caches are dropped and
    rebuilt lazily in the receiving process, so no open file crosses a process boundary.
    """

    def __init__(self, path: Path, manifest: Manifest, vocab: GeneVocab, max_open_shards: int) -> None:
        if max_open_shards < 1:
            raise ConfigurationError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self.path = path
        self.manifest = manifest
        self.vocab = vocab
        self.max_open_shards = max_open_shards
        counts = np.fromiter((s.n_cells for s in manifest.shards), dtype=np.int64, count=len(manifest.shards))
        self.shard_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.shard_offsets[1:])
        self.categories: dict[str, tuple[str, ...]] = {c.name: tuple(c.categories) for c in manifest.obs_columns}
        self._maps: OrderedDict[int, ShardArrays] = OrderedDict()
        self._tensors: dict[int, tuple[Any, Any]] = {}  # torch views of the maps (see tensors())
        self._checked: set[int] = set()  # shards whose structure passed the cheap check
        self._obs: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._reset_locks()

    def _reset_locks(self) -> None:
        self._lock = threading.Lock()  # the caches (dict operations only, never held long)
        self._mapping: dict[int, threading.Lock] = {}  # one per shard being mapped
        _stores.add(self)
        _register_fork_hook()

    # ---- shape ------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        """Number of cells (rows) in the dataset."""
        return self.manifest.n_cells

    @property
    def n_genes(self) -> int:
        """Vocabulary size: the column space of every shard."""
        return self.manifest.n_genes

    @property
    def n_shards(self) -> int:
        """Number of shards."""
        return len(self.manifest.shards)

    @property
    def obs_columns(self) -> tuple[str, ...]:
        """Categorical obs columns kept in every shard (``source`` first)."""
        return self.manifest.obs_column_names

    @property
    def cell_stats(self) -> tuple[str, ...]:
        """Numeric per-cell columns stored in every shard's obs (e.g. ``library_size``)."""
        return tuple(self.manifest.cell_stats)

    def shard_dir(self, shard: int) -> Path:
        """Directory of shard ``shard``."""
        return self.path / self.manifest.shards[shard].path

    def locate(self, ids: np.ndarray) -> np.ndarray:
        """Shard number of each global row id (ids must lie in ``[0, n_cells)``)."""
        return np.searchsorted(self.shard_offsets, ids, side="right") - 1

    # ---- arrays -----------------------------------------------------------------------
    def csr(self, shard: int) -> ShardArrays:
        """The CSR arrays of ``shard``, memory-mapped on first use (LRU of open maps).

        Maps are copy-on-write (``MAP_PRIVATE``): an in-place write on a batch tensor never
        reaches the file, but it would stay visible to later reads of the same map. So a shard
        whose tensors (:meth:`tensors`, which zero-copy batches slice) were written through is
        mapped afresh here: the next read sees the file's bytes again, while batches already
        handed out keep the old map and their own edits.
        """
        with self._lock:
            maps = self._maps.get(shard)
            if maps is not None and not self._written(shard):
                self._maps.move_to_end(shard)
                return maps
        with self._shard_lock(shard):  # one thread maps (and checks) a shard at a time
            with self._lock:
                maps = self._maps.get(shard)
                if maps is not None and not self._written(shard):  # mapped meanwhile
                    self._maps.move_to_end(shard)
                    return maps
                self._tensors.pop(shard, None)
            maps = self._map(shard)  # outside the cache lock: other shards stay readable
            with self._lock:
                self._maps[shard] = maps
                self._maps.move_to_end(shard)
                if len(self._maps) > self.max_open_shards:
                    evicted, _ = self._maps.popitem(last=False)  # views handed out keep their map alive
                    self._tensors.pop(evicted, None)
            return maps

    def _shard_lock(self, shard: int) -> threading.Lock:
        with self._lock:
            lock = self._mapping.get(shard)
            if lock is None:
                lock = self._mapping[shard] = threading.Lock()
            return lock

    def prepare(self, shard: int) -> None:
        """Map and check ``shard`` now if it is not mapped (read-ahead: the first batch cut
        from it then waits for nothing)."""
        with self._lock:
            if shard in self._maps:
                return
        self.csr(shard)

    def will_need(self, shard: int) -> None:
        """Ask the kernel to read ``shard``'s ``indices`` and ``data`` files into the page
        cache in the background, whole and in file order (``posix_fadvise(WILLNEED)``):
        large sequential reads, however the batches then visit the shard. A no-op for
        cached pages; needs no map."""
        if not hasattr(os, "posix_fadvise"):
            return
        entry = self.manifest.shards[shard]
        for name in ("indices", "data"):
            try:
                fd = os.open(self.shard_dir(shard) / entry.arrays[name].path, os.O_RDONLY)
            except OSError:
                continue  # the reader reports a missing file itself
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def resident(self, shard: int, check: bool = True, samples: int | None = None) -> float:
        """Share of ``shard``'s ``indices`` and ``data`` pages in the page cache (``mincore``;
        1.0 where that cannot be asked; estimated from ``samples`` pages per array when
        given). Maps the shard if needed; with ``check=False`` a shard not yet mapped is
        mapped just for the question (not checked, not kept)."""
        with self._lock:
            maps = self._maps.get(shard)
        if maps is None and not check:
            entry = self.manifest.shards[shard]
            maps = map_csr(self.shard_dir(shard), entry, self.manifest.dtype)
        elif maps is None:
            maps = self.csr(shard)
        n = maps.indices.nbytes + maps.data.nbytes
        if not n:
            return 1.0
        return (_resident_fraction(maps.indices, samples) * maps.indices.nbytes
                + _resident_fraction(maps.data, samples) * maps.data.nbytes) / n

    def advise(self, shard: int, start: int, stop: int, populate: bool = False) -> None:
        """Tell the kernel that cells ``[start, stop)`` of ``shard`` (local rows) are read
        next: their ``indices`` and ``data`` pages are read from disk in the background
        (``MADV_WILLNEED``) and, with ``populate``, mapped into this process
        (``MADV_POPULATE_READ``, which waits for them). Maps the shard if needed."""
        maps = self.csr(shard)
        lo, hi = int(maps.indptr[start]), int(maps.indptr[stop])
        _advise_range(maps.indices, lo, hi, populate)
        _advise_range(maps.data, lo, hi, populate)

    def tensors(self, shard: int) -> tuple[Any, Any]:
        """``(indices, data)`` of ``shard`` as torch tensors over its map, made once per map.

        Zero-copy batches are slices of these, so they share one autograd version counter:
        any in-place op on any batch of the shard bumps it, and :meth:`csr` then remaps. An
        integer comparison per read is the whole cost of keeping later epochs exact."""
        maps = self.csr(shard)
        with self._lock:
            found = self._tensors.get(shard)
            if found is None:
                from scmf_loader.batch import as_tensor  # torch only where tensors are asked for

                found = self._tensors[shard] = (as_tensor(maps.indices), as_tensor(maps.data))
            return found

    def map_ref(self, t: Any) -> tuple[int, int, int, int] | None:
        """``(shard, 0 for indices / 1 for data, start, stop)`` when tensor ``t`` is a
        contiguous slice of one of :meth:`tensors` that nothing wrote through (version
        counter 0), else None: another process holding the same dataset finds the very same
        bytes with :meth:`from_map_ref` (worker processes send batches of the map this way)."""
        if t.dim() != 1 or not t.is_contiguous():
            return None
        ptr = t.untyped_storage().data_ptr()
        with self._lock:
            found = list(self._tensors.items())
        for shard, pair in found:
            for k, base in enumerate(pair):
                if base.untyped_storage().data_ptr() == ptr and base.dtype == t.dtype and base._version == 0:
                    start = t.storage_offset() - base.storage_offset()
                    return shard, k, start, start + t.numel()
        return None

    def from_map_ref(self, ref: tuple[int, int, int, int]) -> Any:
        """The slice of this process's map that :meth:`map_ref` described."""
        shard, k, start, stop = ref
        base = self.tensors(shard)[k]
        if not 0 <= start <= stop <= len(base):
            raise ConfigurationError(f"{self.shard_dir(shard)}: map reference [{start}, {stop}) outside the shard")
        return base[start:stop]

    def _written(self, shard: int) -> bool:
        found = self._tensors.get(shard)
        return found is not None and (found[0]._version != 0 or found[1]._version != 0)

    def _map(self, shard: int) -> ShardArrays:
        entry = self.manifest.shards[shard]
        maps = map_csr(self.shard_dir(shard), entry, self.manifest.dtype)
        if shard not in self._checked:  # once per shard and process: O(cells) + one pass over indices
            check_shard_on_map(self.shard_dir(shard), entry, maps, self.n_genes, self.manifest.dtype)
            self._checked.add(shard)
        return maps

    # ---- obs ----------------------------------------------------------------------------
    def _obs_cache(self, shard: int) -> dict[str, np.ndarray]:
        cache = self._obs.get(shard)
        if cache is None:
            cache = self._obs[shard] = {}
            if len(self._obs) > min(self.max_open_shards, OBS_CACHE_SHARDS):
                self._obs.popitem(last=False)
        else:
            self._obs.move_to_end(shard)
        return cache

    def _read_obs(self, shard: int, key: str, read: Callable[[Path], np.ndarray]) -> np.ndarray:
        cache = self._obs_cache(shard)
        values = cache.get(key)
        if values is None:
            values = cache[key] = read(self.shard_dir(shard))
            if len(values) != self.manifest.shards[shard].n_cells:
                raise ShardCorruptError(
                    f"{self.shard_dir(shard)}: obs {key!r} holds {len(values)} entries; the "
                    f"shard has {self.manifest.shards[shard].n_cells} cells"
                )
        return values

    def obs_codes(self, shard: int, column: str) -> np.ndarray:
        """Categorical codes of obs ``column`` in ``shard`` (index :attr:`categories`; -1 =
        missing), in the stored integer dtype. Codes outside the categories raise
        :class:`~scmf_loader.errors.ShardCorruptError`."""
        if column not in self.categories:
            raise ObsColumnNotFoundError(
                f"{self.path}: no obs column {column!r}; kept columns: {list(self.categories)}"
            )
        n_categories = len(self.categories[column])

        def read(shard_dir: Path) -> np.ndarray:
            codes = read_obs_codes(shard_dir, column)
            check_obs_codes(str(shard_dir), column, codes, n_categories)
            return codes

        return self._read_obs(shard, "codes:" + column, read)

    def cell_stat(self, shard: int, name: str) -> np.ndarray:
        """A numeric per-cell column (see :attr:`cell_stats`) of ``shard``, as float64."""
        if name not in self.cell_stats:
            raise ObsColumnNotFoundError(
                f"{self.path}: no cell stat {name!r}; stored: {list(self.cell_stats)}"
            )
        return self._read_obs(shard, "stat:" + name, lambda d: read_obs_values(d, name))

    def cell_names(self, shard: int) -> np.ndarray:
        """The original cell ids (obs index) of ``shard``."""
        return self._read_obs(shard, "index:", read_obs_index)

    # ---- checks -------------------------------------------------------------------------
    def check_sizes(self) -> None:
        """``stat`` every shard array file: present, and exactly the size the manifest says
        (:func:`scmf_loader.format.integrity.check_shard` at ``level="size"``)."""
        for i, entry in enumerate(self.manifest.shards):
            check_shard(self.path, entry, "size", index=i)

    def verify(self) -> None:
        """Check everything against the manifest (reads every byte): the vocabulary, every
        shard's sizes, sha256s and other-files digest, and its full structure (zarr metadata,
        ``indptr``, every index, obs codes). Raises the first problem found."""
        check_dataset(self.path, self.manifest, level="checksum", structure=True)

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Drop every cached map and obs column (batches already handed out stay valid)."""
        with self._lock:
            self._maps.clear()
            self._tensors.clear()
        self._obs.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        state["_tensors"] = {}
        state["_obs"] = OrderedDict()
        del state["_lock"], state["_mapping"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_locks()

    def __repr__(self) -> str:
        return (
            f"DatasetStore({str(self.path)!r}, n_cells={self.n_cells}, n_genes={self.n_genes}, "
            f"n_shards={self.n_shards})"
        )


def open_local_dataset(
    path: str | os.PathLike[str],
    *,
    verify: bool = False,
    max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS,
) -> DatasetStore:
    """Open the local dataset directory ``path``: what :func:`scmf_loader.open_dataset`
    (the public entry, which also takes URLs) does for a local path; its checks and errors
    are described there."""
    root = Path(path)
    manifest = read_manifest(root)
    check_manifest_arrays(manifest, root)
    vocab = check_vocab(root, manifest)
    store = DatasetStore(root, manifest, vocab, max_open_shards)
    if verify:
        store.verify()
    else:
        store.check_sizes()
    return store
