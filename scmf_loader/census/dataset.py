"""``CensusDataset``: stream batches straight from a CELLxGENE Census query, no conversion.

An :class:`~torch.utils.data.IterableDataset` with the batch format of
:class:`~scmf_loader.dataset.CellDataset`: each item is a
:class:`~scmf_loader.batch.CSRBatch` over the gene vocabulary (``indices`` are vocabulary
ids, ``values`` the raw counts of ``X["raw"]``, ``cell_ids`` the cells' Census
``soma_joinid``, ``obs`` int64 codes into :attr:`CensusDataset.categories`, ``stats``
``library_size`` = the cell's total raw count over all genes of the Census, also with a
``var_filter``: Census obs ``raw_sum``, or whole rows summed where a root lacks it), or with
``batch_size=None`` one cell at a time as the seed's dict (``expression``, ``gene_indices``,
``n_genes``, ``metadata``). Genes are aligned to the vocabulary by
:func:`scmf_loader.align.build_alignment`, the same alignment as the converter's.

Which cells form each batch follows the loader's samplers on the query's cells in sorted
``soma_joinid`` order: :class:`~scmf_loader.samplers.BlockShuffleSampler` (blocks of
``block_size`` consecutive joinids, ``batch_size // block_size`` blocks per batch, drawn
from ``(seed, epoch)``; :meth:`CensusDataset.set_epoch`) or, with ``shuffle=False``,
:class:`~scmf_loader.samplers.SequentialSampler`. Ranks (explicit ``rank``/``world_size``,
else ``torch.distributed``, else ``RANK``/``WORLD_SIZE``, else one process) and DataLoader
workers split the epoch's batches with ``DistributedSampler`` semantics
(:func:`~scmf_loader.world.partition`): with ``drop_last=False`` a rank's share is padded
by repeating batches from the start of the epoch, as torch does.

Needs the ``census`` extra; ``tiledbsoma``/``cellxgene_census`` are imported when a dataset
is created, and ``import scmf_loader`` never imports this module. Use it with
``DataLoader(ds, batch_size=None, num_workers=...)``; call ``ds.set_epoch(e)`` before each
epoch (with ``persistent_workers=False``, the default, so workers see the new epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from scmf_loader.align import build_alignment, column_map
from scmf_loader.batch import CSRBatch, as_tensor
from scmf_loader.census.filters import DEFAULT_OBS_COLUMNS, build_value_filter
from scmf_loader.census.query import CensusQuery, CensusSpec
from scmf_loader.errors import ConfigurationError
from scmf_loader.samplers import BatchSampler, BlockShuffleSampler, SequentialSampler
from scmf_loader.vocab import GeneVocab, resolve_vocab

__all__ = ["CensusDataset", "default_block_size"]

_CELL_READ_SIZE = 256  # cells read at a time when items are single cells


def default_block_size(batch_size: int) -> int:
    """The largest divisor of ``batch_size`` not above ``batch_size // 8`` (so a batch mixes
    at least 8 blocks of the Census, which is ordered by dataset); 1 for tiny batches."""
    for d in range(max(batch_size // 8, 1), 0, -1):
        if batch_size % d == 0:
            return d
    return 1  # pragma: no cover - d == 1 always divides


def _check_arguments(
    batch_size: int | None, max_genes: int | None, io_batches: int, preprocessing: Any
) -> None:
    """Raise :class:`~scmf_loader.errors.ConfigurationError` for a bad batching argument."""
    if isinstance(io_batches, bool) or not isinstance(io_batches, int) or io_batches < 1:
        raise ConfigurationError(f"io_batches must be an integer >= 1, got {io_batches!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ConfigurationError(f"batch_size must be >= 1 or None, got {batch_size!r}")
    if max_genes is not None and (isinstance(max_genes, bool) or max_genes < 1):
        raise ConfigurationError(f"max_genes must be >= 1 or None, got {max_genes!r}")
    if preprocessing is not None and not (
        hasattr(preprocessing, "apply_batch") or callable(preprocessing)
    ):
        raise ConfigurationError(
            "preprocessing must have an apply_batch(batch) method or be callable"
        )


def _make_sampler(
    n_cells: int, read_size: int, block_size: int | None, shuffle: bool, **world: Any
) -> BatchSampler:
    """The block-shuffled (or, with ``shuffle=False``, sequential) sampler over the query's
    cells; ``world``: ``drop_last``, ``seed``, ``rank``, ``world_size``."""
    if not shuffle:
        return SequentialSampler(n_cells, read_size, **world)
    bs = block_size if block_size is not None else default_block_size(read_size)
    return BlockShuffleSampler(n_cells, read_size, block_size=bs, **world)


def _take_rows(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays of ``rows`` (in that order) of a CSR matrix."""
    counts = np.diff(indptr)[rows]
    out = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    take = np.repeat(indptr[:-1][rows] - out[:-1], counts) + np.arange(int(out[-1]))
    return out, indices[take], data[take]


def _slice(batch: CSRBatch, a: int, b: int) -> CSRBatch:
    """Rows ``[a, b)`` of a batch (views, ``indptr`` rebased)."""
    lo, hi = int(batch.indptr[a]), int(batch.indptr[b])
    return CSRBatch(
        batch.indptr[a : b + 1] - lo, batch.indices[lo:hi], batch.values[lo:hi],
        batch.cell_ids[a:b], batch.n_genes, {k: v[a:b] for k, v in batch.obs.items()},
        {k: v[a:b] for k, v in batch.stats.items()},
    )


class CensusDataset(torch.utils.data.IterableDataset):
    """Batches of a Census query, streamed (see the module docstring).

    Query: ``organism``, ``filters`` (mapping: list → ``in``, scalar → ``==``), ``obs_filter``
    (SOMA value filter), ``var_filter``, ``census_version`` (date, or ``stable``/``latest``,
    resolved; :attr:`census_version` is the concrete date), ``uri`` (a Census-shaped SOMA
    root: local path or ``s3://``), ``tiledb_config``. Genes: ``gene_vocab`` (a
    :class:`~scmf_loader.vocab.GeneVocab`, a shipped name such as ``"human_protein_coding"``
    (:data:`~scmf_loader.vocab.BUILTIN_VOCABS`), ``"union"`` = the query's own genes, or a
    vocabulary file). Batches: ``batch_size`` (``None``: single-cell
    items), ``block_size`` (default :func:`default_block_size`), ``shuffle``, ``seed``,
    ``drop_last``, ``rank``, ``world_size``; ``obs_columns`` carried as codes;
    ``preprocessing`` applied per batch (``apply_batch(batch)`` or a callable); ``max_genes``
    truncates single-cell items to their highest-expressed genes; ``io_batches`` batches of
    one worker are read with one SOMA query (fewer, larger reads; memory ~ their size).

    Construction resolves the query, aligns its genes and reads the category lists of
    ``obs_columns``; every problem is raised then, not mid-epoch (an
    :class:`~scmf_loader.errors.InvalidInputError` for the query,
    :class:`~scmf_loader.errors.VocabularyError` when no gene is in the vocabulary,
    :class:`~scmf_loader.errors.ConfigurationError` for a bad argument), and what the query
    opened is closed before raising.
    """

    def __init__(
        self,
        organism: str = "homo_sapiens",
        *,
        filters: Mapping[str, Any] | None = None,
        obs_filter: str | None = None,
        var_filter: str | None = None,
        census_version: str | None = None,
        uri: str | None = None,
        gene_vocab: GeneVocab | str = "human_protein_coding",
        batch_size: int | None = 256,
        block_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        obs_columns: Sequence[str] = DEFAULT_OBS_COLUMNS,
        preprocessing: Any = None,
        max_genes: int | None = None,
        io_batches: int = 8,
        tiledb_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(batch_size, max_genes, io_batches, preprocessing)
        self.io_batches = io_batches
        self.batch_size = batch_size
        self.max_genes = max_genes
        self.preprocessing = preprocessing
        self.obs_columns = tuple(obs_columns)
        self.query = CensusQuery(CensusSpec(
            organism=organism, obs_filter=build_value_filter(filters, obs_filter),
            var_filter=var_filter, census_version=census_version, uri=uri,
            tiledb_config=tiledb_config,
        ))
        self.query.pickle_arrays = True  # one copy per worker beats re-running the query
        try:
            self._plan(gene_vocab)
            self.sampler: BatchSampler = _make_sampler(
                self.query.n_cells, batch_size if batch_size is not None else _CELL_READ_SIZE,
                block_size, shuffle, drop_last=drop_last, seed=seed, rank=rank,
                world_size=world_size,
            )
        except BaseException:
            self.query.close()  # now, not whenever the traceback is collected
            raise
        self.epoch = 0

    def _plan(self, gene_vocab: GeneVocab | str) -> None:
        """Check the obs columns, align the query's genes to the vocabulary (the loader's one
        alignment, :func:`~scmf_loader.align.build_alignment`) and read the categories."""
        self.query.check_obs_columns(self.obs_columns)
        genes = self.query.genes
        self.vocab = resolve_vocab(gene_vocab, [genes])
        organism = self.query.spec.organism if self.vocab.is_multi_species else None
        alignment = build_alignment(genes, self.vocab, self.query.describe(), organism=organism)
        #: query gene position -> vocabulary id, -1 outside the vocabulary
        self._col_map = column_map(alignment).astype(np.int64)
        self._monotone = alignment.is_identity_order
        self.categories: dict[str, list[str]] = {
            c: sorted({v for v in self.query.obs_values(c) if v is not None})
            for c in self.obs_columns
        }
        self._lookup = {c: {v: i for i, v in enumerate(cats)} for c, cats in self.categories.items()}

    # ---- description ----------------------------------------------------------------------
    @property
    def census_version(self) -> str:
        """The concrete Census release (build date) streamed."""
        return self.query.census_version

    @property
    def n_cells(self) -> int:
        """Cells selected by the query (all ranks together)."""
        return self.query.n_cells

    @property
    def n_genes(self) -> int:
        """Vocabulary size (the column space of every batch)."""
        return len(self.vocab)

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.sampler.rank

    @property
    def world_size(self) -> int:
        """Number of ranks the epoch is split over."""
        return self.sampler.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle is drawn (from ``(seed, epoch)``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigurationError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Items this rank yields per epoch: batches, or cells with ``batch_size=None``."""
        part = self.sampler.partition()
        if self.batch_size is not None:
            return len(part)
        full = self.sampler.batch_size
        last = self.sampler.n_batches - 1
        # with drop_last every batch is full; otherwise the last one holds the rest
        tail = full if self.sampler.drop_last else self.n_cells - last * full
        return sum(tail if b == last else full for b in part)

    def decode(self, column: str, codes: Any) -> list[str | None]:
        """Category names of ``codes`` of obs ``column`` (``None`` for -1 = missing)."""
        cats = self.categories[column]
        return [cats[c] if c >= 0 else None for c in np.asarray(codes).ravel().tolist()]

    def cell_names(self, ids: Any) -> list[str]:
        """Cell names of ``cell_ids`` (the joinid as a string, as the converter writes it)."""
        return [str(i) for i in np.atleast_1d(np.asarray(ids, dtype=np.int64)).tolist()]

    def __repr__(self) -> str:
        return (
            f"CensusDataset({self.query.describe()!r}, n_cells={self.n_cells}, "
            f"n_genes={self.n_genes}, batch_size={self.batch_size}, obs={list(self.obs_columns)})"
        )

    # ---- reading ----------------------------------------------------------------------------
    def read_positions(self, positions: np.ndarray) -> CSRBatch:
        """The batch of the query's cells at ``positions`` (indices into the sorted joinids),
        in that order, after ``preprocessing``."""
        return self._preprocess(self._read(positions))

    def _preprocess(self, batch: CSRBatch) -> CSRBatch:
        if self.preprocessing is None:
            return batch
        if hasattr(self.preprocessing, "apply_batch"):
            return self.preprocessing.apply_batch(batch)
        return self.preprocessing(batch)

    def _read(self, positions: np.ndarray) -> CSRBatch:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        joinids = self.query.obs_joinids[positions]
        order = np.argsort(joinids, kind="stable")
        in_order = bool(np.all(order == np.arange(order.size)))
        sorted_ids = joinids if in_order else joinids[order]
        if sorted_ids.size > 1 and np.any(np.diff(sorted_ids) == 0):
            raise ConfigurationError("a batch lists the same cell twice")
        indptr, indices, data = self.query.read(sorted_ids)
        lengths = np.diff(indptr)
        rows = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
        if self.query.spec.var_filter is None:  # the rows read are whole: sum them
            library = np.bincount(rows, weights=data.astype(np.float64), minlength=lengths.size)
        else:  # totals over all genes of the Census, not only the genes of the var filter
            library = self.query.library_sizes(sorted_ids)
        vocab_ids = self._col_map[indices]
        keep = vocab_ids >= 0
        rows, vocab_ids, data = rows[keep], vocab_ids[keep], data[keep]
        if not self._monotone:
            o = np.argsort(rows * np.int64(len(self.vocab)) + vocab_ids, kind="stable")
            rows, vocab_ids, data = rows[o], vocab_ids[o], data[o]
        out_indptr = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=lengths.size), out=out_indptr[1:])
        obs = self.query.read_obs(sorted_ids, self.obs_columns)
        codes = {
            c: np.fromiter((self._lookup[c].get(v, -1) if v is not None else -1 for v in obs[c]),
                           dtype=np.int64, count=sorted_ids.size)
            for c in self.obs_columns
        }
        if not in_order:  # back to the requested order: row i is sorted row inverse[i]
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            out_indptr, vocab_ids, data = _take_rows(out_indptr, vocab_ids, data, inverse)
            library = library[inverse]
            codes = {c: v[inverse] for c, v in codes.items()}
            sorted_ids = joinids
        batch = CSRBatch(
            as_tensor(out_indptr),
            as_tensor(vocab_ids.astype(np.int32)),
            as_tensor(np.ascontiguousarray(data)),
            torch.from_numpy(np.ascontiguousarray(sorted_ids, dtype=np.int64)),
            self.n_genes,
            {c: torch.from_numpy(v) for c, v in codes.items()},
            {"library_size": torch.from_numpy(library)},
        )
        return batch

    def batches(self, num_workers: int = 0, worker_id: int = 0) -> Iterator[CSRBatch]:
        """This rank's (and worker's) batches of the current epoch, in order. ``io_batches``
        consecutive batches are read with one SOMA query, then split."""
        part = self.sampler.partition(num_workers, worker_id)
        group: list[np.ndarray] = []
        for index in part:
            group.append(self.sampler.batch(self.epoch, index))
            if len(group) == self.io_batches:
                yield from self._read_group(group)
                group = []
        if group:
            yield from self._read_group(group)

    def _read_group(self, group: list[np.ndarray]) -> Iterator[CSRBatch]:
        if len(group) == 1:
            yield self._preprocess(self._read(group[0]))
            return
        whole = self._read(np.concatenate(group))
        start = 0
        for positions in group:
            yield self._preprocess(_slice(whole, start, start + len(positions)))
            start += len(positions)

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (0, 0)
        for batch in self.batches(num_workers, worker_id):
            if self.batch_size is not None:
                yield batch
            else:
                yield from self._cells(batch)

    def _cells(self, batch: CSRBatch) -> Iterator[dict[str, Any]]:
        indptr = batch.indptr.numpy()
        values_all = batch.values.numpy()
        genes_all = batch.indices.numpy()
        for r in range(len(batch)):
            lo, hi = int(indptr[r]), int(indptr[r + 1])
            values = values_all[lo:hi].astype(np.float32)
            genes = genes_all[lo:hi].astype(np.int64)
            if self.max_genes is not None and values.size > self.max_genes:
                top = np.sort(np.argsort(-values, kind="stable")[: self.max_genes])
                values, genes = values[top], genes[top]
            yield {
                "expression": torch.from_numpy(values),
                "gene_indices": torch.from_numpy(genes),
                "n_genes": int(values.size),
                "metadata": {c: self.decode(c, batch.obs[c][r : r + 1])[0] for c in self.obs_columns},
            }
