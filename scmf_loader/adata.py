"""The quick path (:class:`AnnDataStore`): AnnData objects or ``.h5ad`` files served without
conversion.

For small data. Inputs are held in memory (``.h5ad`` files are read with
``anndata.read_h5ad``); each batch's rows are sliced straight from the CSR arrays with numpy
(never through ``scipy.sparse`` row indexing, which copies the whole ``indices`` array on every
slice when ``indptr`` and ``indices`` dtypes differ), then aligned to the gene vocabulary on
the fly: columns outside the vocabulary and explicit zeros are dropped and each row's genes
are sorted by vocabulary id, exactly as the converter writes them. anndata, pandas and
scipy are imported only here, only when this path is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scmf_loader.align import build_alignment, column_map
from scmf_loader.batch import gather_rows
from scmf_loader.errors import InvalidInputError
from scmf_loader.vocab import GeneVocab, normalize_gene_id

__all__ = ["AnnDataStore"]


def _load(item: Any) -> tuple[str, Any]:
    import anndata as ad

    if isinstance(item, ad.AnnData):
        if item.isbacked:
            raise InvalidInputError(
                "a backed AnnData is not supported by the quick path: load it with "
                "adata.to_memory() or convert it with scmf-convert"
            )
        return "adata", item
    path = Path(os.fspath(item))
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such .h5ad file (or a directory without manifest.json)")
    try:
        return path.name, ad.read_h5ad(path)
    except OSError as exc:
        raise InvalidInputError(f"{path}: not an .h5ad file ({exc})") from exc


def _categorical_columns(adata: Any) -> list[str]:
    import pandas as pd

    return [
        c for c, dt in adata.obs.dtypes.items()
        if isinstance(dt, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dt)
    ]


class _Input:
    """One input: CSR (or dense) matrix arrays, its column → vocabulary id table, obs codes."""

    def __init__(self, name: str, adata: Any, vocab: GeneVocab, gene_column: str) -> None:
        import scipy.sparse as sp

        genes = adata.var_names if gene_column == "var_names" else adata.var[gene_column]
        self.alignment = build_alignment([str(g) for g in genes], vocab, name)
        self.lut = column_map(self.alignment).astype(np.int64)
        x = adata.X
        if x is None:
            raise InvalidInputError(f"{name}: AnnData has no X")
        if sp.issparse(x):
            x = x if x.format == "csr" else x.tocsr()
            self.dense = None
            self.arrays = (np.asarray(x.indptr, dtype=np.int64), x.indices, x.data)
            self.library_size = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
        else:
            self.dense = np.asarray(x)
            self.library_size = self.dense.sum(axis=1, dtype=np.float64)
        self.n_cells = adata.n_obs

    def fetch(self, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``[start, stop)`` of each run, aligned: ``(lengths, vocabulary ids, values)``."""
        if self.dense is not None:
            rows = np.concatenate([np.arange(a, b) for a, b in zip(starts.tolist(), stops.tolist(), strict=True)])
            sub = self.dense[rows][:, self.alignment.keep_columns]
            r, c = np.nonzero(sub)
            return np.bincount(r, minlength=len(rows)), self.alignment.vocab_ids[c], sub[r, c]
        indptr, indices, data = gather_rows([(self.arrays, starts, stops)])
        ids = self.lut[indices]
        keep = (ids >= 0) & (data != 0)
        kept = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept[1:])
        lengths = kept[indptr[1:]] - kept[indptr[:-1]]
        ids, values = ids[keep], data[keep]
        if not self.alignment.is_identity_order:
            row = np.repeat(np.arange(len(lengths)), lengths)
            order = np.lexsort((ids, row))
            ids, values = ids[order], values[order]
        return lengths, ids.astype(np.int32), values


class AnnDataStore:
    """AnnData inputs (objects or ``.h5ad`` paths) as the shards of a dataset: the seed's
    lazy ``.h5ad`` store, what ``CellDataset(adata_or_h5ad_path)`` reads from.

    ``gene_vocab`` defaults to the union of the inputs' genes; ``obs_columns`` defaults to
    the categorical or string obs columns every input has. ``source`` (the input's name) is
    always kept, first, as in a converted dataset.
    """

    def __init__(
        self,
        inputs: Any,
        gene_vocab: GeneVocab | None = None,
        obs_columns: Sequence[str] | None = None,
        gene_column: str = "var_names",
    ) -> None:
        import pandas as pd

        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if not items:
            raise InvalidInputError("no inputs given")
        loaded = [_load(i) for i in items]
        names = [n if n != "adata" else f"adata{i}" for i, (n, _) in enumerate(loaded)]
        adatas = [a for _, a in loaded]
        for n, a in zip(names, adatas, strict=True):
            if gene_column != "var_names" and gene_column not in a.var.columns:
                raise InvalidInputError(f"{n}: var has no column {gene_column!r}")
        if gene_vocab is None:
            genes = [a.var_names if gene_column == "var_names" else a.var[gene_column] for a in adatas]
            gene_vocab = GeneVocab.union([[normalize_gene_id(str(g)) for g in gs] for gs in genes])
        self.vocab = gene_vocab
        if obs_columns is None:
            common = set.intersection(*(set(_categorical_columns(a)) for a in adatas))
            obs_columns = [c for c in _categorical_columns(adatas[0]) if c in common]
        obs_columns = [c for c in obs_columns if c != "source"]  # always kept, from the input names
        for n, a in zip(names, adatas, strict=True):
            missing = [c for c in obs_columns if c not in a.obs.columns]
            if missing:
                raise InvalidInputError(f"{n}: obs has no column(s) {missing}")
        self.inputs = [_Input(n, a, gene_vocab, gene_column) for n, a in zip(names, adatas, strict=True)]
        counts = [i.n_cells for i in self.inputs]
        self.shard_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.categories: dict[str, tuple[str, ...]] = {"source": tuple(names)}
        self._codes: dict[str, list[np.ndarray]] = {
            "source": [np.full(c, i, dtype=np.int64) for i, c in enumerate(counts)]
        }
        for col in obs_columns:
            values = [a.obs[col].astype(object).where(a.obs[col].notna(), None) for a in adatas]
            cats = sorted({str(v) for vs in values for v in vs if v is not None})
            self.categories[col] = tuple(cats)
            self._codes[col] = [
                pd.Categorical([None if v is None else str(v) for v in vs], categories=cats).codes.astype(np.int64)
                for vs in values
            ]
        self.cell_stats = ("library_size",)
        self._cell_names = [np.asarray(a.obs_names, dtype=str) for a in adatas]

    @property
    def n_genes(self) -> int:
        """Vocabulary size."""
        return len(self.vocab)

    def fetch(self, shard: int, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Aligned rows of input ``shard``: ``(lengths, vocabulary ids, values)``."""
        return self.inputs[shard].fetch(starts, stops)

    def obs_codes(self, shard: int, column: str) -> np.ndarray:
        """Categorical codes of ``column`` for the cells of input ``shard``."""
        return self._codes[column][shard]

    def cell_stat(self, shard: int, name: str) -> np.ndarray:
        """Per-cell ``library_size`` (row sums of the input matrix before alignment)."""
        if name != "library_size":
            raise KeyError(f"no cell stat {name!r}; available: ['library_size']")
        return self.inputs[shard].library_size

    def cell_names(self, shard: int) -> np.ndarray:
        """The original cell ids (obs names) of input ``shard``."""
        return self._cell_names[shard]
