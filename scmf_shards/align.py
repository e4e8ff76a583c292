"""Converter-side gene alignment: stored alignments for tasks and the compiled row pass.

The gene -> token alignment itself (:class:`GeneAlignment`, :func:`build_alignment`) lives in
:mod:`scmf_loader.align`; it is re-exported here for the converter's modules."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scmf_loader.align import GeneAlignment, build_alignment, column_map
from scmf_loader.errors import ScmfError

__all__ = [
    "GeneAlignment",
    "HeldRows",
    "StoredAlignment",
    "align_rows",
    "align_rows_held",
    "align_rows_with_totals",
    "build_alignment",
    "column_map",
    "store_alignment",
]


@dataclass(frozen=True)
class StoredAlignment:
    """A :class:`GeneAlignment` saved in a ``.npz`` file: what tasks carry instead of the
    arrays (a task description stays a few hundred bytes, not ~2 × 20k ints: at 100M cells a
    conversion submits thousands of tasks). The arrays are loaded once per process."""

    path: str
    sha256: str
    n_source_genes: int

    def load(self) -> GeneAlignment:
        """The alignment (cached per process, keyed by path and content digest)."""
        keep, ids = _load_alignment(self.path, self.sha256)
        return GeneAlignment(keep, ids, self.n_source_genes)

    @property
    def keep_columns(self) -> np.ndarray:
        """See :class:`GeneAlignment`."""
        return self.load().keep_columns

    @property
    def vocab_ids(self) -> np.ndarray:
        """See :class:`GeneAlignment`."""
        return self.load().vocab_ids


def store_alignment(alignment: GeneAlignment, path: str | os.PathLike[str]) -> StoredAlignment:
    """Write ``alignment`` to ``path`` (atomically) and return its reference."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    keep = np.ascontiguousarray(alignment.keep_columns, dtype=np.int64)
    ids = np.ascontiguousarray(alignment.vocab_ids, dtype=np.int32)
    digest = hashlib.sha256(keep.tobytes() + b"|" + ids.tobytes()).hexdigest()
    tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, keep_columns=keep, vocab_ids=ids)
    os.replace(tmp, p)
    return StoredAlignment(str(p), digest, alignment.n_source_genes)


@lru_cache(maxsize=64)
def _load_alignment(path: str, sha256: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        keep, ids = z["keep_columns"], z["vocab_ids"]
    if hashlib.sha256(keep.tobytes() + b"|" + ids.tobytes()).hexdigest() != sha256:
        raise ScmfError(f"{path}: gene alignment changed during the conversion")
    return keep, ids


def align_rows(matrix: sp.csr_matrix, alignment: GeneAlignment) -> sp.csr_matrix:
    """Restrict a CSR chunk over source genes to the kept columns and renumber them to
    vocabulary ids. The result has sorted, vocabulary-id indices in every row, no explicit
    zeros and no duplicates; its column count is the largest vocabulary id + 1."""
    return align_rows_with_totals(matrix, alignment)[0]


def align_rows_with_totals(
    matrix: sp.csr_matrix,
    alignment: GeneAlignment,
    dtype: np.dtype | str | None = None,
    row_order: np.ndarray | None = None,
    reuse: bool = False,
    allocate: Any = None,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """:func:`align_rows` plus each row's total over *all* its source genes (float64, the
    library size before alignment), from the same compiled pass
    (:mod:`scmf_shards.kernels`); ``dtype`` casts the values on the way; ``row_order``
    reorders the rows in the same pass (output row ``i`` is input row ``row_order[i]``);
    ``reuse`` puts the result's arrays in per-thread scratch buffers (valid until the next
    reusing call on this thread: for a task that writes the result out before returning);
    otherwise ``allocate(n, dtype)`` may provide them (:func:`scmf_shards.kernels.align_csr`)."""
    from scmf_shards.scratch import csr_view

    n_rows = matrix.shape[0]
    n_cols = int(alignment.vocab_ids[-1]) + 1
    rows, totals = align_rows_held(matrix, alignment, dtype, row_order=row_order, reuse=reuse, allocate=allocate)
    out = csr_view(rows.data, rows.indices, rows.indptr, (n_rows, n_cols))  # scratch views stay views
    out.has_sorted_indices = True
    out.has_canonical_format = True
    return out, totals


@dataclass(frozen=True)
class HeldRows:
    """Aligned CSR rows as a conversion holds them between its stages (no scipy matrix:
    ``indices`` may be ``uint16``, which scipy would copy into a wider dtype)."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.indptr[-1]) if self.indptr.size else 0


def align_rows_held(
    matrix: sp.csr_matrix,
    alignment: GeneAlignment,
    dtype: np.dtype | str | None = None,
    index_dtype: np.dtype | str = np.int32,
    row_order: np.ndarray | None = None,
    reuse: bool = False,
    allocate: Any = None,
) -> tuple[HeldRows, np.ndarray]:
    """:func:`align_rows_with_totals` as plain arrays (:class:`HeldRows`), the indices in
    ``index_dtype`` (``uint16`` when the vocabulary has at most 65,536 ids), the values in
    ``dtype`` (an integer dtype only for values known to be whole counts that fit it)."""
    from scmf_shards.kernels import align_csr

    if not matrix.has_canonical_format:
        matrix = matrix.copy()
        matrix.sum_duplicates()  # duplicates summed, indices sorted
    indptr, indices, data, totals = align_csr(
        matrix.indptr, matrix.indices, matrix.data, column_map(alignment),
        presorted=alignment.is_identity_order,
        out_dtype=None if dtype is None else np.dtype(dtype), row_order=row_order, reuse=reuse,
        allocate=allocate, index_dtype=index_dtype,
    )
    return HeldRows(data, indices, indptr), totals
