"""Row-level pieces of the compiled output kernels (:mod:`scmf_loader.outputs.compiled`):
the batch's indptr checked, a cell's entries loaded (fused preprocessing, a gene subset), the
kept entries of a truncated row chosen, and a padded row written straight from the batch."""

from __future__ import annotations

import numpy as np
from numba import njit

from scmf_loader.outputs._fast import (
    _compute,
    copy_genes,
    cutoff,
    genes_ok,
    increasing_lut,
    transform_row,
    write_kept,
)
from scmf_loader.outputs._simd import WIDTH as SIMD_WIDTH
from scmf_loader.outputs._sort import splitmix, stable_sort, threshold, value_keys

_CLS, _PAD = 3, 0
_MAX_BUCKETS = (1 << 16) + 1
_SIGN = np.uint64(1) << np.uint64(63)
_MEMO = 64


@njit(nogil=True, cache=True)
def _check_indptr(indptr: np.ndarray, nnz: int) -> tuple[int, int]:
    """``(first bad cell or -1, longest cell)``: starts >= 0, non-decreasing, ends <= nnz."""
    longest = 0
    if len(indptr) and indptr[0] < 0:
        return 0, 0
    for c in range(len(indptr) - 1):
        s, e = indptr[c], indptr[c + 1]
        if e < s or e > nnz:
            return c, 0
        longest = max(longest, e - s)
    return -1, longest


@njit(nogil=True, cache=True, inline="always")
def _value(v, d, has_div, log1p, f32, memo, stamp, tag):  # noqa: ANN001, ANN202
    """One value through the fused preprocessing, in the compute dtype (held in a float64).

    ``log1p`` of a small whole count is remembered per cell (``stamp[count] == tag``): raw
    counts repeat a few small values, and ``log1p`` costs more than everything else here.
    The remembered number is the very one computed, so results do not depend on it."""
    if log1p and v >= 0 and v < len(memo) and v == np.floor(v):
        i = np.int64(v)
        if stamp[i] == tag:
            return memo[i]
        x = _compute(v, d, has_div, log1p, f32)
        memo[i] = x
        stamp[i] = tag
        return x
    return _compute(v, d, has_div, log1p, f32)


@njit(nogil=True, cache=True)
def _load(indptr, indices, values, c, n_genes, div, log1p, f32, colmap, drop_zero, sg, sv, sp, memo, stamp) -> int:  # noqa: ANN001
    """Cell ``c``'s kept entries into ``sg`` (gene), ``sv`` (value), ``sp`` (position in the
    cell): the count, or ``-1 - j`` for an out-of-range gene id at entry ``j``."""
    s, e = indptr[c], indptr[c + 1]
    has_div, has_map = len(div) > 0, len(colmap) > 0
    d = div[c] if has_div else 1.0
    m = 0
    for j in range(s, e):
        g = indices[j]
        if g < 0 or g >= n_genes:
            return -1 - j
        if has_map and colmap[g] < 0:
            continue
        if drop_zero and values[j] == 0:
            continue
        x = _value(values[j], d, has_div, log1p, f32, memo, stamp, c + 1)
        sg[m] = g
        sv[m] = x
        sp[m] = j - s
        m += 1
    return m


@njit(nogil=True, cache=True)
def _order(sv, sp, m, c, random, seed, keys, order, skeys, counts) -> None:  # noqa: ANN001
    """``order[:m]``: positions by value descending (ties: lower position), or by the top 32
    bits of the seeded hash of ``(cell, position)`` descending, for random truncation."""
    if random:
        for i in range(m):
            keys[i] = ~(splitmix(seed, c, sp[i]) >> np.uint64(32))
    else:
        value_keys(sv, m, keys, True)
    stable_sort(keys, m, order, skeys, counts)


@njit(nogil=True, cache=True)
def _pad_row(gene, mask, c, first) -> None:  # noqa: ANN001
    for j in range(first, gene.shape[1]):
        gene[c, j] = _PAD
        mask[c, j] = False


@njit(nogil=True, cache=True)
def _scratch(longest):  # noqa: ANN001, ANN202
    """Per-call scratch: one cell's genes, values, positions, sort keys and order."""
    return (np.empty(longest, np.int64), np.empty(longest, np.float64), np.empty(longest, np.int64),
            np.empty(longest, np.uint64), np.empty(longest, np.int64), np.empty(longest, np.uint64),
            np.empty(_MAX_BUCKETS, np.int64), np.empty(_MEMO, np.float64), np.zeros(_MEMO, np.int64))


@njit(nogil=True, cache=True)
def _direct_row(indices, values, s, e, n_genes, d, has_div, log1p, f32, memo, stamp, tag, gr, er, w) -> bool:  # noqa: ANN001
    """Cell entries ``[s, e)`` straight into row views at ``w`` (no subset, no truncation);
    False if a gene id is out of range."""
    bad = False
    for j in range(s, e):
        g = indices[j]
        bad |= (g < 0) | (g >= n_genes)
        gr[w + j - s] = g
    if has_div or log1p:
        for j in range(s, e):
            er[w + j - s] = _value(values[j], d, has_div, log1p, f32, memo, stamp, tag)
    else:
        for j in range(s, e):
            er[w + j - s] = values[j]
    return not bad


@njit(nogil=True, cache=True)
def _first_bad(indices, s, e, n_genes) -> int:  # noqa: ANN001
    for j in range(s, e):
        if indices[j] < 0 or indices[j] >= n_genes:
            return j
    return s


@njit(nogil=True, cache=True)
def _keep_first(order, m, k, keep) -> None:  # noqa: ANN001
    keep[:m] = False
    for i in range(k):
        keep[order[i]] = True


@njit(nogil=True, cache=True)
def _keep_top(sv, sp, m, k, c, random, seed, keys, tmp, counts, keep) -> None:  # noqa: ANN001
    """``keep[:m]``: the ``k`` entries first in :func:`_order`'s order, by selection (no sort)."""
    if random:
        for i in range(m):
            keys[i] = ~(splitmix(seed, c, sp[i]) >> np.uint64(32))
    else:
        value_keys(sv, m, keys, True)
    t, below = threshold(keys, m, k, counts, tmp)
    ties, cut, seen = k - below, m, 0
    for i in range(m):  # the ties kept are the first keys equal to t: find where they end
        seen += keys[i] == t
        if seen == ties:
            cut = i + 1
            break
    for i in range(m):
        keep[i] = (keys[i] < t) | ((keys[i] == t) & (i < cut))


@njit(nogil=True, cache=True)
def _direct_top(indices, values, s, e, n_genes, d, has_div, log1p, f32, memo, stamp, c, k, random, seed,
                sv, keys, tmp, counts, gr, er, w) -> bool:  # noqa: ANN001
    """A cell longer than ``k`` (no subset) straight into row views: values and keys in one
    pass, the threshold, then one pass writing the kept entries; False for a bad gene id."""
    m = e - s
    bits = sv.view(np.uint64)
    bad = False
    for i in range(m):
        g = indices[s + i]
        bad |= (g < 0) | (g >= n_genes)
        sv[i] = _value(values[s + i], d, has_div, log1p, f32, memo, stamp, c + 1)
        if random:
            keys[i] = ~(splitmix(seed, c, i) >> np.uint64(32))
        else:
            b = bits[i]
            keys[i] = b if b & _SIGN else ~(b | _SIGN)  # descending: value_keys, complemented
    if bad:
        return False
    t, below = threshold(keys, m, k, counts, tmp)
    ties, cut, seen = k - below, m, 0
    for i in range(m):
        seen += keys[i] == t
        if seen == ties:
            cut = i + 1
            break
    last = w + k
    for i in range(m):  # branch-free: a dropped entry is overwritten by the next kept one
        if w == last:
            break
        gr[w], er[w] = indices[s + i], sv[i]
        w += (keys[i] < t) | ((keys[i] == t) & (i < cut))
    return True


@njit(nogil=True, cache=True)
def _cut_write(indices, s, src, bits, m, k, lut, vec, gr, er, w) -> bool:  # noqa: ANN001
    """The ``k`` top values of a longer row written from ``w`` (through ``lut``: see
    :func:`_fast.write_kept`; ``vec``: its counts are below 128); False: not a case for
    :func:`cutoff`."""
    t, ties, below, ok = cutoff(bits, m, m - k)
    if ok:
        write_kept(indices, s, src, bits, m, t, ties, below, lut, vec, gr, er, w)
    return ok


@njit(nogil=True, cache=True)
def _padded_fast(indices, values, vbits, s, e, n_genes, k, d, has_div, log1p, plain, table, tab, ix, row, lut, gr, er, w) -> int:  # noqa: ANN001
    """A cell without subset or random truncation, float32 compute dtype: the genes kept
    (``-1`` a bad gene id, ``-2`` a truncation :func:`_fast.cutoff` leaves to the caller, or
    with ``log1p`` a row that is not small whole counts: see :func:`_fast.transform_row`).
    ``vbits``: the float32 values' bits (empty for other dtypes); a longer row of raw counts
    whose preprocessing is strictly increasing is cut on its counts' bits and only its kept
    entries are preprocessed (``lut``), else the whole row is preprocessed first."""
    m = e - s
    if m <= k:
        if not copy_genes(indices, s, e, n_genes, gr, w):
            return -1
        if plain:
            src, dst = values[s:e], er[w : w + m]
            for j in range(m):
                dst[j] = src[j]
        elif not transform_row(values, s, e, d, has_div, log1p, True, table, tab, ix, er, w):
            return -2
        return m
    if not genes_ok(indices, s, e, n_genes):
        return -1
    top = -1 if plain or not len(vbits) else increasing_lut(values[s:e], d, has_div, log1p, tab, lut)
    if plain:
        ok = _cut_write(indices, s, values[s:e], vbits[s:e], m, k, lut[:0], True, gr, er, w)
    elif top >= 0:
        ok = _cut_write(indices, s, values[s:e], vbits[s:e], m, k, lut, top < SIMD_WIDTH, gr, er, w)
    elif not transform_row(values, s, e, d, has_div, log1p, True, table, tab, ix, row, 0):
        return -2
    else:
        ok = _cut_write(indices, s, row[:m], row.view(np.int32)[:m], m, k, lut[:0], True, gr, er, w)
    return k if ok else -2


@njit(nogil=True, cache=True)
def _subset_row(indptr, indices, values, c, n_genes, div, log1p, f32, colmap, sg, sv, sp, memo, stamp, k, first,
                random, seed, keys, skeys, counts, keep, gr, er, cls):  # noqa: ANN001, ANN202
    """A padded row through the gene subset ``colmap``: its kept entries written from
    ``cls`` on; returns how many (negative: :func:`_load`'s bad-index code)."""
    m = _load(indptr, indices, values, c, n_genes, div, log1p, f32, colmap, False, sg, sv, sp, memo, stamp)
    if m < 0:
        return m
    n = min(m, k)
    if m > k:
        _keep_top(sv, sp, m, k, first + c, random, seed, keys, skeys, counts, keep)
    else:
        keep[:m] = True
    w, last = cls, cls + n
    for i in range(m):  # branch-free: a dropped entry is overwritten by the next kept one
        if w == last:
            break
        gr[w], er[w] = sg[i], sv[i]
        w += keep[i]
    return n
