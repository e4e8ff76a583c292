"""The output kernels in plain numpy (no per-cell Python): the fallback without numba.

Same numbers as :mod:`scmf_loader.outputs.compiled`. Per-cell orders come from one sort
of the whole batch by ``(cell, key, position)``: packed into one ``uint64`` when the bits
fit (one ``np.sort``), else ``np.lexsort``. Inputs are validated by the caller
(:func:`scmf_loader.outputs._common.validate`) before anything is indexed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from scmf_loader import buffers

_CLS, _PAD = 3, 0
_SIGN64 = np.uint64(1 << 63)


class Entries(NamedTuple):
    """The kept entries of a batch after the fused preprocessing, cell-major."""

    indptr: np.ndarray  # int64, per cell
    genes: np.ndarray  # int64 token ids
    values: np.ndarray  # compute dtype, -0.0 folded into +0.0
    pos: np.ndarray  # int64 position in the cell's stored entries (the random hash's input)
    cell: np.ndarray  # int64 cell of each entry


def entries(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, divisors: np.ndarray | None,
            log1p: bool, f32: bool, colmap: np.ndarray | None, keep: np.ndarray | None = None) -> Entries:
    """Kept entries: gene subset (``colmap >= 0``), then the caller's ``keep`` mask over the
    stored entries (e.g. non-zeros), values divided by their cell's divisor and ``log1p``."""
    s, e = int(indptr[0]), int(indptr[-1])
    n = len(indptr) - 1
    lengths = np.diff(indptr)
    cell = np.repeat(np.arange(n, dtype=np.int64), lengths)
    pos = np.arange(e - s, dtype=np.int64) - np.repeat(indptr[:-1] - s, lengths)
    genes = indices[s:e].astype(np.int64)
    dt = np.float32 if f32 else np.float64
    vals = values[s:e].astype(dt)
    if divisors is not None:
        np.divide(vals, divisors.astype(dt)[cell], out=vals)
    if log1p:
        np.log1p(vals, out=vals)
    vals += dt(0.0)  # -0.0 -> +0.0
    mask = None if colmap is None else colmap[genes] >= 0
    if keep is not None:
        mask = keep if mask is None else mask & keep
    if mask is not None:
        genes, vals, pos, cell = genes[mask], vals[mask], pos[mask], cell[mask]
        lengths = np.bincount(cell, minlength=n)
    new_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_ptr[1:])
    return Entries(new_ptr, genes, vals, pos, cell)


def value_keys(values: np.ndarray, descending: bool) -> np.ndarray:
    """Unsigned keys whose order is the values' order (uint32 for float32, else uint64)."""
    bits = values.view(np.uint32 if values.dtype == np.float32 else np.uint64)
    top = bits.dtype.type(1 << (8 * bits.dtype.itemsize - 1))
    keys = np.where(bits & top, ~bits, bits | top)
    return ~keys if descending else keys


def random_keys(seed: int, cell: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The top 32 bits of splitmix64 of ``(seed, cell, position)`` (as the compiled kernels)."""
    z = np.uint64(seed) + (cell.astype(np.uint64) << np.uint64(32)) + pos.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(32)).astype(np.uint32)


def cell_order(cell: np.ndarray, keys: np.ndarray, n_cells: int) -> np.ndarray:
    """Entry indices sorted by ``(cell, key)``, ties in entry order (``cell`` is sorted)."""
    total = len(cell)
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    cb, ib = max(int(n_cells - 1).bit_length(), 1), max(int(total - 1).bit_length(), 1)
    if keys.dtype == np.uint32 and cb + 32 + ib <= 64:
        packed = (cell.astype(np.uint64) << np.uint64(32 + ib)) | (keys.astype(np.uint64) << np.uint64(ib))
        packed |= np.arange(total, dtype=np.uint64)
        packed.sort()
        return (packed & np.uint64((1 << ib) - 1)).astype(np.int64)
    return np.lexsort((keys, cell))


def rank_in_cell(order: np.ndarray, indptr: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """For each entry, its place in its cell's order (``order`` sorted by cell first)."""
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order), dtype=np.int64) - indptr[cell[order]]
    return ranks


def _layout(n: int, width: int, cls: int, expr_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    gene = buffers.empty((n, width), np.int64)
    gene.fill(_PAD)
    gene[:, :cls] = _CLS
    return gene, buffers.zeros((n, width), expr_dtype)


def _mask(counts: np.ndarray, width: int, cls: int) -> np.ndarray:
    return np.less(np.arange(width), (counts + cls)[:, None], out=buffers.empty((len(counts), width), np.bool_))


def scatter(ent: Entries, chosen: np.ndarray, rank: np.ndarray, expr: np.ndarray | None, k: int, cls: int,
            expr_dtype: type) -> dict[str, np.ndarray]:
    """Write the chosen entries of each cell at ``cls + rank`` of its row."""
    n = len(ent.indptr) - 1
    gene, out = _layout(n, k + cls, cls, expr_dtype)
    dest = ent.cell[chosen] * (k + cls) + cls + rank[chosen]
    gene.reshape(-1)[dest] = ent.genes[chosen]
    if expr is not None:
        out.reshape(-1)[dest] = expr[chosen]
    counts = np.minimum(np.diff(ent.indptr), k)
    return {"gene_indices": gene, "expression": out, "attention_mask": _mask(counts, k + cls, cls)}


def truncate(ent: Entries, k: int, random: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen entries, their place in the row): all of a short cell; of a longer one the
    ``k`` largest values (ties: lower position) or those with the ``k`` largest hashes,
    in vocabulary order either way."""
    lengths = np.diff(ent.indptr)
    long = lengths[ent.cell] > k
    place = np.arange(len(ent.cell), dtype=np.int64) - ent.indptr[ent.cell]
    if not long.any():
        return np.arange(len(ent.cell)), place
    sel = np.flatnonzero(long)
    keys = random_keys(seed, ent.cell[sel], ent.pos[sel]) if random else value_keys(ent.values[sel], True)
    sub_ptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.where(lengths > k, lengths, 0), out=sub_ptr[1:])
    order = cell_order(ent.cell[sel], ~keys if random else keys, len(lengths))
    keep = np.ones(len(ent.cell), dtype=bool)
    keep[sel] = rank_in_cell(order, sub_ptr, ent.cell[sel]) < k
    chosen = np.flatnonzero(keep)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.bincount(ent.cell[chosen], minlength=len(lengths)), out=starts[1:])
    return chosen, np.arange(len(chosen), dtype=np.int64) - starts[ent.cell[chosen]]


def padded(ent: Entries, k: int, cls: int, random: bool, seed: int) -> dict[str, np.ndarray]:
    """Padded tokens (``expression`` float32)."""
    chosen, place = truncate(ent, k, random, seed)
    ranks = np.zeros(len(ent.cell), dtype=np.int64)
    ranks[chosen] = place
    return scatter(ent, chosen, ranks, ent.values, k, cls, np.float32)


def rank(ent: Entries, medians: np.ndarray, k: int, cls: int) -> dict[str, np.ndarray]:
    """Rank-value tokens (no ``expression``): value / median, descending."""
    ratio = ent.values / medians[ent.genes].astype(ent.values.dtype)
    order = cell_order(ent.cell, value_keys(ratio, True), len(ent.indptr) - 1)
    ranks = rank_in_cell(order, ent.indptr, ent.cell)
    out = scatter(ent, np.flatnonzero(ranks < k), ranks, None, k, cls, np.float32)
    del out["expression"]
    return out


def _edges(sorted_nz: np.ndarray, nz_ptr: np.ndarray, qs: np.ndarray, f32: bool) -> np.ndarray:
    """Per cell ``np.quantile(non-zeros, qs)`` (method "linear"), numpy's arithmetic."""
    a = np.diff(nz_ptr)
    vi = (a - 1)[:, None].astype(np.float64) * qs[None, :]
    prev = np.floor(vi)
    above = vi >= (a - 1)[:, None]
    last = nz_ptr[1:] - 1
    lo_i = np.where(above, last[:, None], nz_ptr[:-1, None] + prev.astype(np.int64))
    lo_i = np.clip(lo_i, 0, max(len(sorted_nz) - 1, 0))
    hi_i = np.where(above, lo_i, np.minimum(lo_i + 1, max(len(sorted_nz) - 1, 0)))
    if not len(sorted_nz):
        return np.zeros(vi.shape)
    lo, hi = sorted_nz[lo_i], sorted_nz[hi_i]
    diff = (hi - lo).astype(np.float64)  # in the compute dtype, as numpy's _lerp
    t = np.where(above, vi - (-1.0), vi - prev)
    lo64, hi64 = lo.astype(np.float64), hi.astype(np.float64)
    return np.where(t >= 0.5, hi64 - diff * (1 - t), lo64 + diff * t)


def digits(ent: Entries, n_bins: int) -> np.ndarray:
    """Per entry its bin: 0 for a zero, else the number of its cell's edges <= value."""
    n = len(ent.indptr) - 1
    qs = np.linspace(0, 1, n_bins - 1)
    nz = np.flatnonzero(ent.values != 0)
    ncell = ent.cell[nz]
    order = nz[cell_order(ncell, value_keys(ent.values[nz], False), n)]
    nz_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(ncell, minlength=n), out=nz_ptr[1:])
    edges = _edges(ent.values[order], nz_ptr, qs, ent.values.dtype == np.float32)
    # merge: edges before equal values (side="right"), counted per cell
    m = len(qs)
    vals = np.concatenate([edges.reshape(-1), ent.values[nz].astype(np.float64)])
    cells = np.concatenate([np.repeat(np.arange(n, dtype=np.int64), m), ncell])
    is_edge = np.concatenate([np.ones(n * m, dtype=np.int64), np.zeros(len(nz), dtype=np.int64)])
    merged = np.lexsort((1 - is_edge, vals, cells))
    seen = np.cumsum(is_edge[merged]) - cells[merged] * m
    dig = np.zeros(len(ent.values), dtype=np.int64)
    elem = merged >= n * m
    dig[nz[merged[elem] - n * m]] = seen[elem]
    return dig


def binned(ent: Entries, n_bins: int, k: int, cls: int, random: bool, seed: int) -> dict[str, np.ndarray]:
    """Binned tokens (``expression`` int64 bins)."""
    dig = digits(ent, n_bins)
    chosen, place = truncate(ent, k, random, seed)
    ranks = np.zeros(len(ent.cell), dtype=np.int64)
    ranks[chosen] = place
    return scatter(ent, chosen, ranks, dig, k, cls, np.int64)


def dense(ent: Entries, width: int, colmap: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    """Dense ``(cells, width)``: each kept value at its column."""
    n = len(ent.indptr) - 1
    out = buffers.zeros((n, width), dtype)
    cols = ent.genes if colmap is None else colmap[ent.genes]
    out.reshape(-1)[ent.cell * width + cols] = ent.values
    return out
