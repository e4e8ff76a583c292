"""Open a dataset directory: manifest, vocabulary and lazily memory-mapped shards.

:func:`open_dataset` reads ``manifest.json`` and ``vocab.json`` through
:mod:`scmf_loader.format` (the one owner of the format), checks every shard array file's
size against the manifest with one ``stat`` each, and optionally every checksum
(``verify=True``). Nothing is mapped on open: a shard's three CSR files are memory-mapped on
first use and kept in a small LRU (``max_open_shards``), because each ``np.memmap`` holds a
duplicated file descriptor for as long as it lives; obs columns, read through zarr, are
cached for the :data:`OBS_CACHE_SHARDS` most recent shards. Opening is O(number of shards) in time
and memory, never O(number of cells).

The global row id of a cell is its position in the dataset: the rows of shard 0, then
shard 1, ... in manifest order (:attr:`DatasetStore.shard_offsets`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scmf_loader.errors import (
    ChecksumMismatchError,
    ManifestError,
    ShardNotFoundError,
    ShardSizeError,
)
from scmf_loader.format import (
    ARRAY_NAMES,
    INDEX_DTYPE,
    INDPTR_DTYPE,
    Manifest,
    other_files_digest,
    read_manifest,
    sha256_file,
)
from scmf_loader.vocab import GeneVocab

__all__ = ["DatasetStore", "ShardArrays", "open_dataset"]

DEFAULT_MAX_OPEN_SHARDS = 128
OBS_CACHE_SHARDS = 8  # obs columns are read whole per shard: keep only the most recent


class ShardArrays(NamedTuple):
    """The CSR arrays of one shard: read-only views of its memory-mapped chunk files."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


def _expected_dtypes(manifest: Manifest) -> dict[str, str]:
    return {"data": manifest.dtype, "indices": INDEX_DTYPE, "indptr": INDPTR_DTYPE}


def _check_manifest_arrays(manifest: Manifest, where: Path) -> None:
    """Array entries must agree with the shard's cell and non-zero counts (cheap, no I/O)."""
    expected = _expected_dtypes(manifest)
    for i, shard in enumerate(manifest.shards):
        sizes = {
            "data": shard.nnz * np.dtype(manifest.dtype).itemsize,
            "indices": shard.nnz * np.dtype(INDEX_DTYPE).itemsize,
            "indptr": (shard.n_cells + 1) * np.dtype(INDPTR_DTYPE).itemsize,
        }
        for name in ARRAY_NAMES:
            entry = shard.arrays[name]
            if entry.dtype != expected[name] or entry.nbytes != sizes[name]:
                raise ManifestError(
                    f"{where}: shards[{i}] ({shard.path}) array {name!r} is listed as "
                    f"{entry.nbytes} bytes of {entry.dtype}; expected {sizes[name]} bytes of "
                    f"{expected[name]} for {shard.n_cells} cells and {shard.nnz} non-zeros"
                )


class DatasetStore:
    """A dataset directory opened for reading. Build one with :func:`open_dataset`.

    Holds the :class:`~scmf_loader.format.Manifest`, the
    :class:`~scmf_loader.vocab.GeneVocab`, the cumulative cell offsets of the shards, and
    caches (bounded LRUs) of memory maps and obs columns. Picklable: caches are dropped and
    rebuilt lazily in the receiving process, so no open file crosses a process boundary.
    """

    def __init__(self, path: Path, manifest: Manifest, vocab: GeneVocab, max_open_shards: int) -> None:
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self.path = path
        self.manifest = manifest
        self.vocab = vocab
        self.max_open_shards = max_open_shards
        counts = np.fromiter((s.n_cells for s in manifest.shards), dtype=np.int64, count=len(manifest.shards))
        self.shard_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.shard_offsets[1:])
        self.categories: dict[str, tuple[str, ...]] = {c.name: tuple(c.categories) for c in manifest.obs_columns}
        self._maps: OrderedDict[int, ShardArrays] = OrderedDict()
        self._obs: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

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
        """The CSR arrays of ``shard``, memory-mapped on first use (LRU of open maps)."""
        maps = self._maps.get(shard)
        if maps is not None:
            self._maps.move_to_end(shard)
            return maps
        maps = self._map(shard)
        self._maps[shard] = maps
        if len(self._maps) > self.max_open_shards:
            self._maps.popitem(last=False)  # views handed out keep their map alive
        return maps

    def _map(self, shard: int) -> ShardArrays:
        entry = self.manifest.shards[shard]
        dtypes = _expected_dtypes(self.manifest)
        arrays = {}
        for name in ARRAY_NAMES:
            a = entry.arrays[name]
            if a.nbytes == 0:
                arrays[name] = np.empty(0, dtype=dtypes[name])
                continue
            f = self.shard_dir(shard) / a.path
            try:
                # copy-on-write (MAP_PRIVATE): reads stay zero copy, and an in-place write
                # through a torch view (torch ignores numpy's read-only flag) copies only the
                # touched pages of this process instead of crashing on a read-only map; the
                # file never changes. numpy views stay read-only.
                mm = np.memmap(f, dtype=dtypes[name], mode="c", shape=(a.nbytes // np.dtype(dtypes[name]).itemsize,))
            except FileNotFoundError:
                raise ShardNotFoundError(f"{f}: shard array file is missing (listed in the manifest)") from None
            except ValueError as exc:  # file shorter than the requested shape
                raise ShardSizeError(f"{f}: shorter than the {a.nbytes} bytes the manifest says ({exc})") from None
            view = mm.view(np.ndarray)  # plain ndarray: slicing is ~20x cheaper
            view.flags.writeable = False
            arrays[name] = view
        maps = ShardArrays(indptr=arrays["indptr"], indices=arrays["indices"], data=arrays["data"])
        if maps.indptr.size and (maps.indptr[0] != 0 or maps.indptr[-1] != entry.nnz):
            raise ChecksumMismatchError(
                f"{self.shard_dir(shard)}: X/indptr runs from {int(maps.indptr[0])} to "
                f"{int(maps.indptr[-1])}; the manifest says 0 to {entry.nnz}. The shard is "
                "corrupt: re-run the conversion"
            )
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

    def _read_obs(self, shard: int, key: str, read: Any) -> np.ndarray:
        cache = self._obs_cache(shard)
        values = cache.get(key)
        if values is None:
            import zarr  # imported lazily: only obs reads need it

            group = zarr.open_group(str(self.shard_dir(shard)), mode="r")
            try:
                values = cache[key] = np.asarray(read(group["obs"]))
            except KeyError:
                raise ShardNotFoundError(f"{self.shard_dir(shard)}: obs has no {key!r}") from None
        return values

    def obs_codes(self, shard: int, column: str) -> np.ndarray:
        """Categorical codes of obs ``column`` in ``shard`` (index :attr:`categories`; -1 =
        missing), in the stored integer dtype."""
        if column not in self.categories:
            raise KeyError(f"no obs column {column!r}; kept columns: {list(self.categories)}")
        return self._read_obs(shard, column, lambda obs: obs[column]["codes"][...])

    def cell_stat(self, shard: int, name: str) -> np.ndarray:
        """A numeric per-cell column (see :attr:`cell_stats`) of ``shard``, as float64."""
        if name not in self.cell_stats:
            raise KeyError(f"no cell stat {name!r}; stored: {list(self.cell_stats)}")
        return self._read_obs(shard, "stat:" + name, lambda obs: obs[name][...])

    def cell_names(self, shard: int) -> np.ndarray:
        """The original cell ids (obs index) of ``shard``."""
        return self._read_obs(shard, "index:", lambda obs: obs[obs.attrs.get("_index", "_index")][...])

    # ---- checks -------------------------------------------------------------------------
    def check_sizes(self) -> None:
        """``stat`` every shard array file: present, and exactly the size the manifest says."""
        for i, shard in enumerate(self.manifest.shards):
            base = self.path / shard.path
            if not base.is_dir():
                raise ShardNotFoundError(
                    f"{base}: shard {i} listed in the manifest is missing; the dataset is "
                    "incomplete (copy it again or re-run the conversion)"
                )
            for name in ARRAY_NAMES:
                a = shard.arrays[name]
                if a.nbytes == 0:
                    continue
                f = base / a.path
                try:
                    size = os.stat(f).st_size
                except FileNotFoundError:
                    raise ShardNotFoundError(f"{f}: array file of shard {i} is missing") from None
                if size != a.nbytes:
                    what = "shorter" if size < a.nbytes else "longer"
                    raise ShardSizeError(
                        f"{f}: is {size} bytes, {what} than the {a.nbytes} bytes the manifest "
                        "says (truncated copy or modified file); re-copy or re-convert"
                    )

    def verify(self) -> None:
        """Check the sha256 of every shard array file, and the digest of each shard's other files
    (obs, var, zarr metadata) where the manifest has one, against the manifest (reads
    everything)."""
        self.check_sizes()
        for i, shard in enumerate(self.manifest.shards):
            for name in ARRAY_NAMES:
                a = shard.arrays[name]
                if a.nbytes == 0:
                    continue
                f = self.path / shard.path / a.path
                digest = sha256_file(f)
                if digest != a.sha256:
                    raise ChecksumMismatchError(
                        f"{f}: sha256 {digest} differs from the manifest's {a.sha256} "
                        f"(shard {i}); the file is corrupt: re-copy or re-convert"
                    )
            if shard.other_files is not None:
                found = other_files_digest(self.path / shard.path)
                if found != shard.other_files:
                    raise ChecksumMismatchError(
                        f"{self.path / shard.path}: its obs/var/zarr metadata files differ from "
                        f"the manifest (shard {i}: {found.n_files} files, sha256 "
                        f"{found.sha256[:12]}…; expected {shard.other_files.n_files} files, "
                        f"{shard.other_files.sha256[:12]}…): re-copy or re-convert"
                    )

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Drop every cached map and obs column (batches already handed out stay valid)."""
        self._maps.clear()
        self._obs.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        state["_obs"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (
            f"DatasetStore({str(self.path)!r}, n_cells={self.n_cells}, n_genes={self.n_genes}, "
            f"n_shards={self.n_shards})"
        )


def open_dataset(
    path: str | os.PathLike[str],
    *,
    verify: bool = False,
    max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS,
) -> DatasetStore:
    """Open the dataset directory ``path`` for reading.

    Reads and validates the manifest (format and version) and the vocabulary, and checks
    each shard array file's size with one ``stat``; ``verify=True`` also checks every
    sha256 (reads every byte). Raises :class:`~scmf_loader.errors.ManifestNotFoundError`,
    :class:`~scmf_loader.errors.FormatVersionError`,
    :class:`~scmf_loader.errors.ShardNotFoundError`,
    :class:`~scmf_loader.errors.ShardSizeError` or
    :class:`~scmf_loader.errors.ChecksumMismatchError`, each naming the file.
    """
    root = Path(path)
    manifest = read_manifest(root)
    _check_manifest_arrays(manifest, root)
    vocab = GeneVocab.from_file(root / manifest.vocab["path"])
    if len(vocab) != manifest.n_genes:
        raise ManifestError(
            f"{root}: vocabulary has {len(vocab)} tokens but the manifest says n_genes={manifest.n_genes}"
        )
    expected = manifest.vocab.get("sha256")
    if expected is not None and vocab.sha256() != expected:
        raise ChecksumMismatchError(
            f"{root / manifest.vocab['path']}: vocabulary hash {vocab.sha256()} differs from the "
            f"manifest's {expected}; the dataset was modified: re-convert it"
        )
    store = DatasetStore(root, manifest, vocab, max_open_shards)
    if verify:
        store.verify()
    else:
        store.check_sizes()
    return store

