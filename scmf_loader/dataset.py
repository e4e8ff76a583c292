"""``CellDataset``: a map-style dataset over a dataset directory or AnnData inputs.

``ds[i]`` returns one cell as the seed's dict; ``ds[ids]`` / ``ds.__getitems__(ids)`` return
one :class:`~scmf_loader.batch.CSRBatch`, which is how the loader reads (whole batches at a
time). Over a dataset directory the batch of one contiguous range of one shard views the
memory map (zero copy). Over AnnData (the quick path for small data, see
:mod:`scmf_loader.adata`) rows are aligned to the vocabulary on the fly.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scmf_loader.batch import CSRBatch, as_tensor, gather_rows
from scmf_loader.errors import ConfigurationError, ScmfError, VocabularyError
from scmf_loader.opening import open_dataset
from scmf_loader.store import DEFAULT_MAX_OPEN_SHARDS, DatasetStore
from scmf_loader.vocab import GeneVocab

__all__ = ["CellDataset"]

_CACHED_COLUMN_SHARDS = 4


def range_of(ids: np.ndarray) -> tuple[int, int] | None:
    """``(start, stop)`` when ``ids`` are exactly ``start, start + 1, ..., stop - 1``."""
    n = len(ids)
    # n ids from first to first + n - 1, strictly increasing: exactly that range
    if n and int(ids[-1]) - int(ids[0]) == n - 1 and (n == 1 or (ids[1:] > ids[:-1]).all()):
        return int(ids[0]), int(ids[-1]) + 1
    return None


def _is_dataset_dir(source: Any) -> bool:
    if isinstance(source, DatasetStore):
        return True
    if not isinstance(source, (str, os.PathLike)):
        return False
    p = Path(source)
    return p.is_dir() or (not p.exists() and p.suffix != ".h5ad")


def _apply(preprocessing: Any, batch: CSRBatch) -> CSRBatch:
    if hasattr(preprocessing, "divisors_for"):  # a PreprocessingPipeline: one fused pass
        return batch.preprocessed(preprocessing)
    if hasattr(preprocessing, "apply_batch"):
        return preprocessing.apply_batch(batch)
    return preprocessing(batch)


def _read_nonzero_median(store: DatasetStore | None, n_genes: int) -> np.ndarray:
    """Shard 0's ``var/nonzero_median`` (every shard stores the same dataset-wide array)."""
    fix = "re-convert with a version that stores var/nonzero_median"
    if store is None or store.n_shards == 0:
        raise ScmfError(f"per-gene non-zero medians exist only in a converted dataset directory; {fix}")
    import zarr  # lazily: only this read needs it

    shard_dir = store.shard_dir(0)
    try:
        med = np.asarray(zarr.open_group(str(shard_dir), mode="r")["var"]["nonzero_median"][...])
    except (KeyError, FileNotFoundError):
        raise ScmfError(f"{shard_dir}: var has no 'nonzero_median' (the per-gene non-zero medians the "
                        f"rank output needs); {fix}") from None
    if med.shape != (n_genes,):
        raise ScmfError(f"{shard_dir}: var/nonzero_median holds {med.shape} values, expected ({n_genes},)")
    return med.astype(np.float32, copy=False)


def _checked_preprocessing(preprocessing: Any) -> Any:
    """``None``/``"raw"`` (nothing applied), or an object with ``apply_batch`` / a callable."""
    if isinstance(preprocessing, str):
        if preprocessing != "raw":
            raise ConfigurationError(f"preprocessing={preprocessing!r}: the only string accepted is 'raw'")
        return None
    if preprocessing is not None and not (hasattr(preprocessing, "apply_batch") or callable(preprocessing)):
        raise ConfigurationError("preprocessing must have an apply_batch(batch) method or be callable")
    return preprocessing


def _open_store(source: Any, gene_vocab: GeneVocab | None, verify: bool, max_open_shards: int,
                remote: dict[str, Any]) -> DatasetStore:
    """The store of a dataset directory, URL (through a node-local cache) or open store,
    checked against ``gene_vocab`` when one is given."""
    if isinstance(source, DatasetStore):
        store = source
    elif isinstance(source, str) and "://" in source:
        store = open_dataset(source, verify=verify, max_open_shards=max_open_shards, **remote)
    else:
        store = open_dataset(source, verify=verify, max_open_shards=max_open_shards)
    if gene_vocab is not None and gene_vocab != store.vocab:
        raise VocabularyError(
            f"{store.path}: the dataset was built with vocabulary {store.vocab!r}, not the "
            f"given {gene_vocab!r}; pass gene_vocab=None or re-convert with that vocabulary"
        )
    return store


class CellDataset(torch.utils.data.Dataset):
    """Cells of a dataset directory, or of AnnData objects / ``.h5ad`` paths.

    ``source``: a dataset directory (or an opened :class:`~scmf_loader.store.DatasetStore`),
    or an AnnData, an ``.h5ad`` path, or a list of them (aligned to ``gene_vocab``, default
    the union of their genes). ``gene_vocab`` must equal a directory's own vocabulary when
    given. ``preprocessing`` is applied to every batch: an object with ``apply_batch(batch)``
    (e.g. a ``PreprocessingPipeline``) or any callable ``batch -> batch``. For a dataset
    directory, ``None`` (the default) applies the pipeline its manifest records when the
    shards were converted without baking (raw counts + per-cell stats), and nothing when
    the values are final; ``"raw"`` skips it and yields the stored values. ``max_genes``
    truncates the genes of a single cell (``ds[i]``) to its highest-expressed ones.
    ``obs_columns`` restricts the kept obs columns carried in batches (default: all).
    ``registry``: a registry file; ``source`` is then ``"name@version"``, refused when the
    manifest found there has another ``dataset_id`` (:mod:`scmf_loader.registry`).
    A ``source`` at an fsspec URL (``s3://``, ``gs://``, ``https://``, ...) is read through
    a node-local cache: each shard fetched and verified on first access, then memory-mapped
    from ``cache_dir`` (kept under ``cache_limit`` bytes); ``storage_options`` go to fsspec
    (:mod:`scmf_loader.streaming`).
    """

    def __init__(
        self,
        source: Any,
        gene_vocab: GeneVocab | None = None,
        preprocessing: Any = None,
        max_genes: int | None = None,
        *,
        obs_columns: Sequence[str] | None = None,
        gene_column: str = "var_names",
        verify: bool = False,
        max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS,
        registry: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | str = "20GB",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if registry is not None:  # source is "name@version" (see scmf_loader.registry)
            from scmf_loader.registry import open_registered

            source = open_registered(source, registry, verify=verify, max_open_shards=max_open_shards)
        if max_genes is not None and (isinstance(max_genes, bool) or max_genes < 1):
            raise ConfigurationError(f"max_genes must be >= 1 or None, got {max_genes!r}")
        use_recorded = preprocessing is None
        self.max_genes = max_genes
        self.preprocessing = _checked_preprocessing(preprocessing)
        if _is_dataset_dir(source):
            remote = {"cache_dir": cache_dir, "cache_limit": cache_limit, "storage_options": storage_options}
            store = _open_store(source, gene_vocab, verify, max_open_shards, remote)
            self.store: DatasetStore | None = store
            self._source: Any = store
            if use_recorded:
                # Shards converted with --no-bake hold raw counts plus per-cell stats; the
                # manifest records the pipeline the loader must apply to every batch.
                from scmf_loader.preprocess import PreprocessingPipeline

                self.preprocessing = PreprocessingPipeline.for_loader(store.manifest.preprocessing)
        else:
            from scmf_loader.adata import AnnDataStore

            self.store = None
            self._source = AnnDataStore(source, gene_vocab, obs_columns, gene_column)
        self.vocab: GeneVocab = self._source.vocab
        self.shard_offsets: np.ndarray = self._source.shard_offsets
        all_columns = tuple(self._source.categories)
        if obs_columns is None:
            obs_columns = all_columns
        unknown = [c for c in obs_columns if c not in all_columns]
        if unknown:
            raise ConfigurationError(f"obs column(s) {unknown} not kept in this dataset; kept: {list(all_columns)}")
        self.obs_columns = tuple(obs_columns)
        self.categories = {c: self._source.categories[c] for c in self.obs_columns}
        self.cell_stats = tuple(self._source.cell_stats)
        self._offsets: list[int] = self.shard_offsets.tolist()  # for bisect: O(shards)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # ---- shape --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._offsets[-1]

    @property
    def n_genes(self) -> int:
        """Vocabulary size (the column space of every batch)."""
        return len(self.vocab)

    @property
    def organisms(self) -> list[str]:
        """The organisms the vocabulary maps (``["homo_sapiens", "mus_musculus"]`` for
        ``human+mouse``; ``[]`` when it names none); each cell's is its ``organism`` obs column."""
        return self.vocab.organisms

    @property
    def gene_nonzero_median(self) -> np.ndarray:
        """Per token, the median of its non-zero values over the whole dataset (float32),
        read once from the shards' ``var["nonzero_median"]`` (the ``rank`` output divides
        by it). Raises :class:`~scmf_loader.errors.ScmfError` for a dataset without it."""
        cached = self.__dict__.get("_nonzero_median")
        if cached is None:
            cached = self.__dict__["_nonzero_median"] = _read_nonzero_median(self.store, self.n_genes)
        return cached

    @property
    def n_shards(self) -> int:
        """Number of shards (inputs, on the quick path)."""
        return len(self.shard_offsets) - 1

    def obs_codes(self, shard: int, column: str) -> np.ndarray:
        """Codes of obs ``column`` for every cell of ``shard`` (samplers use this)."""
        return self._source.obs_codes(shard, column)

    def decode(self, column: str, codes: Any) -> list[str | None]:
        """Category names of ``codes`` of obs ``column`` (``None`` for -1 = missing)."""
        cats = self.categories[column]
        return [cats[c] if c >= 0 else None for c in np.asarray(codes).ravel().tolist()]

    def cell_names(self, ids: Any) -> list[str]:
        """Original cell ids of global row ids ``ids``."""
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        shards = np.searchsorted(self.shard_offsets, ids, side="right") - 1
        return [str(self._source.cell_names(s)[i - self.shard_offsets[s]]) for s, i in zip(shards.tolist(), ids.tolist(), strict=True)]

    # ---- batches --------------------------------------------------------------------------
    def __getitems__(self, ids: Any) -> CSRBatch:
        """One :class:`~scmf_loader.batch.CSRBatch` of the cells ``ids`` (global row ids), in
        that order, after ``preprocessing``. Zero copy when ``ids`` is one contiguous range
        inside one shard of a dataset directory."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(ids)
        if n:
            as_range = range_of(ids)
            shard = self.shard_of_range(*as_range) if as_range else -1
            if shard >= 0:
                return self._range(ids, shard)
            if ids.min() < 0 or ids.max() >= len(self):
                raise IndexError(f"cell ids must lie in [0, {len(self)}); got [{ids.min()}, {ids.max()}]")
        offsets = self.shard_offsets
        shards = np.searchsorted(offsets, ids, side="right") - 1
        breaks = np.flatnonzero((np.diff(ids) != 1) | (np.diff(shards) != 0)) + 1
        run_first = np.concatenate([[0], breaks]).astype(np.int64) if n else np.zeros(0, np.int64)
        run_len = np.diff(np.append(run_first, n))
        run_shard = shards[run_first]
        local = ids - offsets[shards]
        cut = np.flatnonzero(np.diff(run_shard)) + 1
        groups = []
        for a, b in zip(np.concatenate([[0], cut]).tolist(), np.append(cut, len(run_first)).tolist(), strict=True):
            starts = local[run_first[a:b]]
            cells = slice(int(run_first[a]), int(run_first[b - 1] + run_len[b - 1]))
            groups.append((int(run_shard[a]), starts, starts + run_len[a:b], local[cells]))
        return self._finish(ids, groups)

    def shard_of_range(self, start: int, stop: int) -> int:
        """The shard holding every cell of ``[start, stop)`` (non-empty), or -1."""
        if not 0 <= start < stop <= self._offsets[-1]:
            return -1
        shard = bisect.bisect_right(self._offsets, start) - 1
        return shard if stop <= self._offsets[shard + 1] else -1

    def get_range(self, start: int, stop: int) -> CSRBatch:
        """The batch of cells ``[start, stop)``; zero copy inside one shard of a dataset
        directory (the loader reads contiguous batches this way)."""
        shard = self.shard_of_range(start, stop)
        ids = np.arange(start, stop, dtype=np.int64)
        return self._range(ids, shard) if shard >= 0 else self.__getitems__(ids)

    def _range(self, ids: np.ndarray, shard: int) -> CSRBatch:
        lo = int(ids[0]) - self._offsets[shard]
        return self._finish(ids, [(shard, (lo,), (lo + len(ids),), slice(lo, lo + len(ids)))])

    def _columns(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Kept obs codes (int64, one column each) and cell stats (float64) of ``shard``,
        cached for the few most recent shards (the epoch order visits shards in turn)."""
        block = self._blocks.get(shard)
        if block is None:
            n = int(self.shard_offsets[shard + 1] - self.shard_offsets[shard])
            codes = np.zeros((n, len(self.obs_columns)), dtype=np.int64)
            for j, c in enumerate(self.obs_columns):
                codes[:, j] = self._source.obs_codes(shard, c)
            stats = np.zeros((n, len(self.cell_stats)), dtype=np.float64)
            for j, k in enumerate(self.cell_stats):
                stats[:, j] = self._source.cell_stat(shard, k)
            block = self._blocks[shard] = (codes, stats)
            if len(self._blocks) > _CACHED_COLUMN_SHARDS:
                self._blocks.pop(next(iter(self._blocks)), None)  # thread workers may race here
        return block

    def _zero_copy(self, shard: int, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Rows ``[start, stop)`` of ``shard``: a rebased ``indptr`` and slices of the shard's
        tensors (views of the copy-on-write map that share its version counter, so a write
        through the batch makes the store remap before the next read; see
        :meth:`DatasetStore.tensors`)."""
        indptr = self.store.csr(shard).indptr[start : stop + 1]
        indices, data = self.store.tensors(shard)
        lo, hi = int(indptr[0]), int(indptr[-1])
        return torch.from_numpy(indptr - lo), indices[lo:hi], data[lo:hi]

    def _gather(self, groups: list[tuple[int, Any, Any, Any]]) -> tuple[np.ndarray, ...]:
        if self.store is not None:
            return gather_rows([(self.store.csr(s), a, b) for s, a, b, _ in groups])
        if not groups:
            return np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
        parts = [self._source.fetch(s, np.asarray(a), np.asarray(b)) for s, a, b, _ in groups]
        lengths = np.concatenate([p[0] for p in parts])
        indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = np.concatenate([p[1] for p in parts]).astype(np.int32, copy=False)
        return indptr, indices, np.concatenate([p[2] for p in parts])

    def _finish(self, ids: np.ndarray, groups: list[tuple[int, Any, Any, Any]]) -> CSRBatch:
        """Assemble the batch from ``(shard, run starts, run stops, cell selector)`` groups."""
        if self.store is not None and len(groups) == 1 and len(groups[0][1]) == 1:
            arrays = self._zero_copy(groups[0][0], int(groups[0][1][0]), int(groups[0][2][0]))
        else:
            arrays = tuple(as_tensor(a) for a in self._gather(groups))
        # obs codes and cell stats: copies (never aliasing the cached columns), made only when
        # the batch's obs or stats are first read; a shard's columns are decoded only then
        # too (an epoch that never asks for obs never reads them)
        selectors = [(s, sel) for s, _, _, sel in groups]

        def rows(j: int, names: tuple[str, ...], dtype: type) -> Any:
            if not selectors:
                return lambda: (names, torch.zeros((0, len(names)), dtype=dtype))
            return lambda: (names, torch.from_numpy(np.concatenate([self._columns(s)[j][sel] for s, sel in selectors])))

        batch = CSRBatch(
            *arrays, torch.from_numpy(ids), self.n_genes,
            rows(0, self.obs_columns, torch.int64), rows(1, self.cell_stats, torch.float64),
        )
        return batch if self.preprocessing is None else _apply(self.preprocessing, batch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_blocks"] = {}  # rebuilt lazily where the dataset lands
        return state

    def __getitem__(self, index: Any) -> Any:
        """``ds[i]``: one cell as a dict of ``expression`` (float32), ``gene_indices`` (int64
        vocabulary ids), ``n_genes`` and ``metadata`` (kept obs columns as strings, ``None``
        if missing). ``ds[ids]`` with a sequence or array of ids: a :class:`CSRBatch`."""
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"cell {index} out of range for {len(self)} cells")
            return self._cell(self.__getitems__([i]))
        if isinstance(index, slice):
            return self.__getitems__(np.arange(len(self))[index])
        return self.__getitems__(index)

    def _cell(self, batch: CSRBatch) -> dict[str, Any]:
        values = batch.values.numpy().astype(np.float32)  # a copy: callers may write to it
        genes = batch.indices.numpy().astype(np.int64)
        if self.max_genes is not None and len(values) > self.max_genes:
            top = np.sort(np.argsort(-values, kind="stable")[: self.max_genes])
            values, genes = values[top], genes[top]
        metadata = {c: self.decode(c, batch.obs[c])[0] for c in self.obs_columns}
        return {
            "expression": torch.from_numpy(values),
            "gene_indices": torch.from_numpy(genes),
            "n_genes": len(values),
            "metadata": metadata,
        }

    def __repr__(self) -> str:
        where = self.store.path if self.store is not None else "AnnData"
        return f"CellDataset({str(where)!r}, n_cells={len(self)}, n_genes={self.n_genes}, obs={list(self.obs_columns)})"
