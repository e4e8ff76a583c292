"""Reads of a Census ``X`` layer as CSR arrays, in bounded pieces (numpy only).

The SOMA array is handed in open; these functions turn its COO tables into CSR arrays whose
rows follow the requested (sorted, unique) joinids and whose columns are positions in the
query's sorted var joinids. ``READ_CELLS`` cells are read per SOMA call, so memory follows the
piece, not the request.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["READ_CELLS", "positions", "read_csr", "row_sums"]

READ_CELLS = 4096  # cells per SOMA read


def positions(part: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Position of each joinid of ``rows`` in the sorted ``part``: a lookup table when
    ``part`` spans a narrow range of joinids, a binary search otherwise."""
    lo, span = int(part[0]), int(part[-1] - part[0]) + 1
    if span == part.size:
        return rows - lo
    if span <= 16 * part.size:
        table = np.empty(span, dtype=np.int64)
        table[part - lo] = np.arange(part.size)
        return table[rows - lo]
    return np.searchsorted(part, rows)


def _coo(x: Any, coords: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...] | None:
    """``(rows, var joinids, values)`` of one SOMA read, or ``None`` when it is empty."""
    rows_p, cols_p, vals_p = [], [], []
    for table in x.read(coords=coords).tables():
        rows_p.append(table.column("soma_dim_0").to_numpy())
        cols_p.append(table.column("soma_dim_1").to_numpy())
        vals_p.append(table.column("soma_data").to_numpy())
    if not rows_p:
        return None
    return np.concatenate(rows_p), np.concatenate(cols_p), np.concatenate(vals_p)


def _piece(
    x: Any, part: np.ndarray, var: np.ndarray, all_genes: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Row positions in ``part``, column positions in ``var`` and values of one piece,
    sorted by (row, column); ``None`` when the piece holds nothing."""
    coo = _coo(x, (part,) if all_genes else (part, var))
    if coo is None:
        return None
    rows, var_ids, vals = coo
    if var.size and var[0] == 0 and var[-1] == var.size - 1:
        cols = var_ids  # var joinids 0..n-1: the joinid is the position
    else:
        cols = np.searchsorted(var, var_ids)
        keep = cols < var.size
        keep[keep] = var[cols[keep]] == var_ids[keep]
        if not keep.all():
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
    pos = positions(part, rows)
    key = pos * np.int64(var.size + 1) + cols
    if key.size > 1 and np.any(np.diff(key) <= 0):
        order = np.argsort(key, kind="stable")  # long sorted runs: fast
        pos, cols, vals = pos[order], cols[order], vals[order]
    return pos, cols, vals


def read_csr(
    x: Any, joinids: np.ndarray, var: np.ndarray, *, all_genes: bool, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays ``(indptr int64, indices int32, data dtype)`` of the cells ``joinids``
    (sorted, unique) of the SOMA array ``x``, over the genes ``var`` (sorted var joinids;
    ``all_genes``: they are every gene of ``x``, so rows are read whole)."""
    counts = np.zeros(joinids.size, dtype=np.int64)
    cols_parts: list[np.ndarray] = []
    data_parts: list[np.ndarray] = []
    for lo in range(0, joinids.size, READ_CELLS):
        part = joinids[lo : lo + READ_CELLS]
        piece = _piece(x, part, var, all_genes)
        if piece is None:
            continue
        pos, cols, vals = piece
        counts[lo : lo + part.size] = np.bincount(pos, minlength=part.size)
        cols_parts.append(cols.astype(np.int32))
        data_parts.append(vals)
    indptr = np.zeros(joinids.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.concatenate(cols_parts) if cols_parts else np.zeros(0, np.int32)
    data = np.concatenate(data_parts) if data_parts else np.zeros(0, dtype)
    return indptr, indices, data.astype(dtype, copy=False)


def row_sums(x: Any, joinids: np.ndarray) -> np.ndarray:
    """Sum of each whole row ``joinids`` (sorted, unique) of the SOMA array ``x`` (float64)."""
    out = np.zeros(joinids.size, dtype=np.float64)
    for lo in range(0, joinids.size, READ_CELLS):
        part = joinids[lo : lo + READ_CELLS]
        for table in x.read(coords=(part,)).tables():
            rows = table.column("soma_dim_0").to_numpy()
            vals = table.column("soma_data").to_numpy().astype(np.float64)
            out[lo : lo + part.size] += np.bincount(
                positions(part, rows), weights=vals, minlength=part.size)
    return out
