"""An existing scmf dataset directory as the input of a new conversion (another vocabulary,
preprocessing or shard size).

The cells are the parent's, in its row order (shard 0, shard 1 ...); the genes are the
parent vocabulary's tokens without the special tokens (column ``j`` is vocabulary id
``j + 4``); values are the stored ones (raw counts, or what the parent baked: its
``preprocessing`` is recorded in the new manifest). Cell ids are the original ones; obs
columns are the parent's kept columns, its ``source`` as ``parent_source``. The parent's per-cell
``library_size`` (totals over every gene of its own inputs) is passed on, so normalising
again uses the original totals. Rows are read from the memory-mapped shards through
:func:`scmf_loader.open_dataset`. The new manifest names the parent's ``dataset_id``
(``parent_dataset_id`` in the source entry), which is also what identifies this input in the
new ``dataset_id``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scmf_loader.errors import InvalidInputError
from scmf_loader.vocab import SPECIAL_TOKENS
from scmf_shards.sources.base import RowChunk, is_url, local_path

__all__ = ["PARENT_SOURCE", "DatasetSource", "is_dataset_dir"]

_N_SPECIAL = len(SPECIAL_TOKENS)
#: the parent's ``source`` column (which input each cell came from), under the name it takes
#: as an obs column of this source (``source`` of the new dataset names the parent itself)
PARENT_SOURCE = "parent_source"


def is_dataset_dir(path: str) -> bool:
    """True when ``path`` is a directory (local, or at an fsspec URL) holding an scmf
    ``manifest.json``."""
    if is_url(path):
        from scmf_loader.streaming.fs import filesystem

        fs, root = filesystem(path.rstrip("/"))
        return bool(fs.isfile(f"{root}/manifest.json"))
    p = local_path(path)
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, "manifest.json"))


class DatasetSource:
    """A dataset directory read as a conversion input (picklable; shards mapped lazily).

    ``matrix`` must be ``"X"`` and ``gene_column`` ``"var_names"``: a dataset has one matrix,
    whose columns are its vocabulary.
    """

    kind = "scmf_dataset"
    layout = "csr"

    def __init__(self, path: str | os.PathLike[str], matrix: str = "X", gene_column: str = "var_names") -> None:
        from scmf_loader import open_dataset

        self.path = os.fspath(path)
        if matrix != "X" or gene_column != "var_names":
            raise InvalidInputError(
                f"{self.path}: is an scmf dataset, which has one matrix over its vocabulary: "
                "--matrix and --gene-column do not apply"
            )
        self.matrix, self.gene_column = matrix, gene_column
        # a URL is read through the node-local, verified shard cache of scmf_loader.streaming
        self.store = open_dataset(self.path if is_url(self.path) else Path(local_path(self.path)))
        m = self.store.manifest
        self.dataset_id = m.dataset_id
        self.n_cells = int(m.n_cells)
        self.n_genes = len(self.store.vocab) - _N_SPECIAL
        self.dtype = np.dtype(m.dtype)
        self.obs_columns = tuple(PARENT_SOURCE if c == "source" else c for c in self.store.categories)
        if self.n_cells == 0:
            raise InvalidInputError(f"{self.path}: holds no cells")

    @property
    def genes(self) -> list[str]:
        """The parent vocabulary's gene tokens (ids 4 ...), in id order."""
        return list(self.store.vocab.tokens[_N_SPECIAL:])

    def check_obs_columns(self, columns: Sequence[str]) -> None:
        """Raise if any requested obs column is not kept in the parent dataset."""
        missing = [c for c in columns if c not in self.obs_columns]
        if missing:
            raise InvalidInputError(
                f"{self.path}: obs has no column(s) {missing}; available: {list(self.obs_columns)}")

    def obs_values(self, column: str) -> np.ndarray:
        """All values of one obs column (strings, None = NA)."""
        return self._obs(column, 0, self.n_cells)

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(shard, first row, end row) within each shard overlapping ``[start, stop)``."""
        offsets = np.asarray(self.store.shard_offsets, dtype=np.int64)
        out = []
        for s in range(int(np.searchsorted(offsets, start, side="right")) - 1, len(offsets) - 1):
            lo, hi = max(start, int(offsets[s])), min(stop, int(offsets[s + 1]))
            if lo >= stop:
                break
            if hi > lo:
                out.append((s, lo - int(offsets[s]), hi - int(offsets[s])))
        return out

    def _obs(self, column: str, start: int, stop: int) -> np.ndarray:
        self.check_obs_columns([column])
        column = "source" if column == PARENT_SOURCE else column
        cats = np.asarray(list(self.store.categories[column]) + [None], dtype=object)
        parts = [np.asarray(self.store.obs_codes(s, column)[a:b], dtype=np.int64)
                 for s, a, b in self._pieces(start, stop)]
        codes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return cats[np.where(codes < 0, len(cats) - 1, codes)]

    def read_rows(self, start: int, stop: int, obs_columns: Sequence[str] = (),
                  reuse: bool = False) -> RowChunk:
        """Rows ``[start, stop)`` of the parent as a CSR matrix over :attr:`genes`, with the
        original cell ids, obs values and the parent's library sizes (when stored)."""
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"row range [{start}, {stop}) outside [0, {self.n_cells})")
        pieces = self._pieces(start, stop)
        ptrs, idx, vals, names, lib = [np.zeros(1, dtype=np.int64)], [], [], [], []
        nnz = 0
        for s, a, b in pieces:
            csr = self.store.csr(s)
            p = np.asarray(csr.indptr[a : b + 1], dtype=np.int64)
            lo, hi = int(p[0]), int(p[-1])
            ptrs.append(p[1:] - lo + nnz)
            idx.append(np.asarray(csr.indices[lo:hi]) - _N_SPECIAL)
            vals.append(np.array(csr.data[lo:hi]))
            nnz += hi - lo
            names.append(np.asarray(self.store.cell_names(s)[a:b], dtype=object))
            if "library_size" in self.store.cell_stats:
                lib.append(np.asarray(self.store.cell_stat(s, "library_size")[a:b], dtype=np.float64))
        indices = np.concatenate(idx).astype(np.int32) if idx else np.zeros(0, dtype=np.int32)
        if indices.size and int(indices.min()) < 0:
            raise InvalidInputError(f"{self.path}: rows [{start}, {stop}) hold a special token as a gene")
        data = np.concatenate(vals) if vals else np.zeros(0, dtype=self.dtype)
        matrix = sp.csr_matrix((data, indices, np.concatenate(ptrs)), shape=(stop - start, self.n_genes))
        cell_ids = np.concatenate(names) if names else np.zeros(0, dtype=object)
        obs = {c: self._obs(c, start, stop) for c in obs_columns}
        library_size = np.concatenate(lib) if lib else None
        return RowChunk(start=start, stop=stop, matrix=matrix, cell_ids=np.asarray([str(c) for c in cell_ids], dtype=object),
                        obs=obs, library_size=library_size)

    def fingerprint(self) -> dict[str, object]:
        """The parent's ``dataset_id`` (a content hash of its inputs and options) and size."""
        return {"kind": self.kind, "dataset_id": self.dataset_id, "n_cells": self.n_cells,
                "n_genes": self.n_genes, "vocab_sha256": self.store.manifest.vocab.get("sha256")}

    def manifest_fields(self, fingerprint: dict[str, object]) -> dict[str, object]:
        """Provenance: the parent's ``dataset_id``, value dtype and preprocessing."""
        m: Any = self.store.manifest
        return {"parent_dataset_id": self.dataset_id, "layout": self.layout, "dtype": str(self.dtype),
                "parent_preprocessing": dict(m.preprocessing)}
