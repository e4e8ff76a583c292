"""The output kernels compiled with numba (``nogil=True``: threads may run them in parallel).

Imported only when numba is importable (:func:`scmf_loader.outputs.numba_available`);
:mod:`scmf_loader.outputs.vectorised` computes the same numbers with numpy alone. Each
kernel walks the cells once, reading a cell's entries once into small scratch arrays (the
fused preprocessing happens there) and writing every byte of its row of the output once,
padding included. Bounds are checked as the data is read: a kernel returns ``(code,
where)``, ``code`` 0 for success, :data:`BAD_INDPTR` (``where`` = the cell) or
:data:`BAD_INDEX` (``where`` = the entry), and the caller raises.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from scmf_loader.outputs._binfast import binned_counts, digits
from scmf_loader.outputs._fast import (
    COUNTS,
    TABLE,
    count_index,
    descending_keys,
    genes_ok,
    rank_ratios,
    sort_asc,
    transform_row,
)
from scmf_loader.outputs._rankfast import rank_counts
from scmf_loader.outputs._rankfast import scratch as rank_scratch
from scmf_loader.outputs._rows import (
    _CLS,
    _MEMO,
    _PAD,
    _check_indptr,
    _direct_row,
    _direct_top,
    _first_bad,
    _keep_first,
    _load,
    _order,
    _pad_row,
    _padded_fast,
    _scratch,
    _subset_row,
    _value,
)
from scmf_loader.outputs._sort import stable_sort, value_keys

BAD_INDPTR, BAD_INDEX = 1, 2


@njit(nogil=True, cache=True)
def padded(indptr, indices, values, n_genes, div, log1p, f32, colmap, ltab, vbits, k, cls, random, seed, first, gene, expr,
           mask, flag):  # noqa: ANN001, ANN201
    """Padded tokens: per row ``<cls>``?, the kept genes in vocabulary order, padding.
    ``vbits``: the float32 values' bits (else empty); ``first``:
    the batch's index of cell 0 here (random truncation hashes the batch's cell index).
    ``ltab``/``flag``: see :func:`preprocess` (with ``log1p`` only rows of small whole counts
    are written here, in the float32 fast path)."""
    bad, longest = _check_indptr(indptr, min(len(indices), len(values)))
    if bad >= 0:
        return BAD_INDPTR, bad
    sg, sv, sp, keys, order, skeys, counts, memo, stamp = _scratch(longest)
    keep = np.empty(longest, np.bool_)
    table, ix, row = np.empty(TABLE, ltab.dtype), np.empty(longest, np.int32), np.empty(longest, np.float32)
    plain = len(vbits) > 0 and not (len(div) > 0 or log1p)
    lut = np.empty(TABLE, np.float32)
    has_div, direct = len(div) > 0, len(colmap) == 0
    fast = direct and f32 and not random
    for c in range(len(indptr) - 1):
        s, e = indptr[c], indptr[c + 1]
        gr, er, mr = gene[c], expr[c], mask[c]
        if cls:
            gr[0], er[0] = _CLS, 0.0
        d = div[c] if has_div else 1.0
        n = -2
        if fast:
            tab = ltab[c] if len(ltab) > 1 else ltab[0]
            n = _padded_fast(indices, values, vbits, s, e, n_genes, k, d, has_div, log1p, plain, table, tab, ix,
                             row, lut, gr, er, cls)
            if n == -1:
                return BAD_INDEX, _first_bad(indices, s, e, n_genes)
        if n < 0 and log1p:
            flag[c] = 1
            continue
        if n >= 0:
            pass
        elif direct and e - s <= k:
            if not _direct_row(indices, values, s, e, n_genes, d, has_div, log1p, f32, memo, stamp, c + 1, gr, er, cls):
                return BAD_INDEX, _first_bad(indices, s, e, n_genes)
            n = e - s
        elif direct:
            if not _direct_top(indices, values, s, e, n_genes, d, has_div, log1p, f32, memo, stamp, first + c, k, random, seed,
                               sv, keys, skeys, counts, gr, er, cls):
                return BAD_INDEX, _first_bad(indices, s, e, n_genes)
            n = k
        else:
            n = _subset_row(indptr, indices, values, c, n_genes, div, log1p, f32, colmap, sg, sv, sp, memo, stamp, k,
                            first, random, seed, keys, skeys, counts, keep, gr, er, cls)
            if n < 0:
                return BAD_INDEX, -1 - n
        mr[: cls + n] = True
        gr[cls + n :] = _PAD
        er[cls + n :] = 0.0
        mr[cls + n :] = False
    return 0, 0


@njit(nogil=True, cache=True)
def dense(indptr, indices, values, n_genes, div, log1p, f32, colmap, ltab, out, flag):  # noqa: ANN001, ANN201
    """Dense rows: zeros, then each kept value at its column (``colmap[gene]`` with a subset).
    ``ltab``/``flag``: see :func:`preprocess`."""
    bad, longest = _check_indptr(indptr, min(len(indices), len(values)))
    if bad >= 0:
        return BAD_INDPTR, bad
    memo, stamp = np.empty(_MEMO, np.float64), np.zeros(_MEMO, np.int64)
    ix = np.empty(longest if log1p else 0, np.int32)
    has_div, has_map, transform = len(div) > 0, len(colmap) > 0, len(div) > 0 or log1p
    for c in range(len(indptr) - 1):
        row = out[c]
        s, e = indptr[c], indptr[c + 1]
        if log1p:
            tab = ltab[c] if len(ltab) > 1 else ltab[0]
            if count_index(values[s:e], len(tab), ix) < 0:
                flag[c] = 1
                continue
        row[:] = 0
        d = div[c] if has_div else 1.0
        for j in range(s, e):
            g = indices[j]
            if g < 0 or g >= n_genes:
                return BAD_INDEX, j
            col = colmap[g] if has_map else g
            if col >= 0:
                if log1p:
                    row[col] = tab[ix[j - s]]
                elif transform:
                    row[col] = _value(values[j], d, has_div, log1p, f32, memo, stamp, c + 1)
                else:
                    row[col] = values[j]
    return 0, 0


@njit(nogil=True, cache=True)
def _ratios(sg, sv, m, medians, f32) -> int:  # noqa: ANN001
    """Values divided by their gene's median, in place; genes whose median is not a positive
    finite number are dropped. Returns the count kept."""
    w = 0
    for i in range(m):
        md = medians[sg[i]]
        if not (md > 0 and md < np.inf):
            continue
        sv[w] = np.float64(np.float32(sv[i]) / np.float32(md)) if f32 else sv[i] / np.float64(md)
        sg[w] = sg[i]
        w += 1
    return w


@njit(nogil=True, cache=True)
def _rank_sorted(indices, values, s, e, medians, med_ok, d, has_div, log1p, plain, table, tab, ix, rat, pay, k32, sk32,
                 spay, ucounts, k, out):  # noqa: ANN001, ANN202
    """A float32 row ranked by sorting its ratios: the first ``min(m, k)`` gene ids written
    to ``out``; returns how many (-1: a row of ``log1p`` that is not small whole counts)."""
    m = rank_ratios(indices, values, s, e, medians, med_ok, d, has_div, log1p, plain, table, tab, ix, rat, pay)
    if m < 0:
        return -1
    descending_keys(rat[:m], k32)
    sort_asc(k32, pay, m, sk32, spay, ucounts)
    n = min(m, k)
    for i in range(n):
        out[i] = spay[i]
    return n


@njit(nogil=True, cache=True)
def rank(indptr, indices, values, n_genes, div, log1p, f32, colmap, ltab, medians, cls_of, cmed, k, cls, gene, mask, flag):  # noqa: ANN001, ANN201
    """Rank-value tokens: genes by value / median descending (ties: lower gene id). ``cls_of``
    and ``cmed``: the medians' classes for :func:`_rankfast.rank_counts` (empty: not used).
    ``ltab``/``flag``: see :func:`preprocess`."""
    bad, longest = _check_indptr(indptr, min(len(indices), len(values)))
    if bad >= 0:
        return BAD_INDPTR, bad
    sg, sv, sp, keys, order, skeys, counts, memo, stamp = _scratch(longest)
    fast, has_div = f32 and len(colmap) == 0, len(div) > 0
    plain = not (has_div or log1p)
    rat, k32, sk32 = np.empty(longest, np.float32), np.empty(longest, np.uint32), np.empty(longest, np.uint32)
    pay, spay = np.empty(longest, np.int32), np.empty(longest, np.int32)
    ucounts = np.empty(COUNTS, np.uint64)
    table, ix = np.empty(TABLE, ltab.dtype), np.empty(longest, np.int32)
    med_ok = bool(np.all((medians > 0) & (medians < np.inf)))
    by_pairs = fast and len(cmed) > 0
    sc = rank_scratch(longest if by_pairs else 0, len(cmed) if by_pairs else 0)
    for c in range(len(indptr) - 1):
        gr, mr = gene[c], mask[c]
        tab = ltab[c] if len(ltab) > 1 else ltab[0]
        n = -2
        if by_pairs:
            s, e = indptr[c], indptr[c + 1]
            d = div[c] if has_div else 1.0
            n = rank_counts(indices, values, s, e, n_genes, cls_of, cmed, d, has_div, log1p, tab, sc, k, cls, gr)
            if n == -1:
                return BAD_INDEX, _first_bad(indices, s, e, n_genes)
        if n >= 0:
            pass
        elif fast:
            s, e = indptr[c], indptr[c + 1]
            if not genes_ok(indices, s, e, n_genes):
                return BAD_INDEX, _first_bad(indices, s, e, n_genes)
            d = div[c] if has_div else 1.0
            n = _rank_sorted(indices, values, s, e, medians, med_ok, d, has_div, log1p, plain, table, tab, ix, rat, pay,
                             k32, sk32, spay, ucounts, k, gr[cls:])
            if n < 0:  # log1p of a row that is not small whole counts: numpy's numbers (the caller)
                flag[c] = 1
                continue
        elif log1p:
            flag[c] = 1
            continue
        else:
            m = _load(indptr, indices, values, c, n_genes, div, log1p, f32, colmap, True, sg, sv, sp, memo, stamp)
            if m < 0:
                return BAD_INDEX, -1 - m
            m = _ratios(sg, sv, m, medians, f32)
            value_keys(sv, m, keys, True)
            stable_sort(keys, m, order, skeys, counts)
            n = min(m, k)
            for i in range(n):
                gr[cls + i] = sg[order[i]]
        if cls:
            gr[0] = _CLS
        mr[: cls + n] = True
        gr[cls + n :] = _PAD
        mr[cls + n :] = False
    return 0, 0


@njit(nogil=True, cache=True)
def binned(indptr, indices, values, n_genes, div, log1p, f32, colmap, ltab, qs, k, cls, random, seed, first, gene, expr,
           mask, flag):  # noqa: ANN001, ANN201
    """Binned tokens: padded layout with per-cell quantile bins as ``expression`` (``first``: as
    in :func:`padded`; ``ltab``/``flag``: see :func:`preprocess`)."""
    bad, longest = _check_indptr(indptr, min(len(indices), len(values)))
    if bad >= 0:
        return BAD_INDPTR, bad
    sg, sv, sp, keys, order, skeys, counts, memo, stamp = _scratch(longest)
    asc, dig, keep = np.empty(longest, np.float64), np.empty(longest, np.int64), np.empty(longest, np.bool_)
    edges = np.empty(len(qs), np.float64)
    hist, xs, bins = np.empty(4 * (TABLE + 1), np.int64), np.empty(TABLE, np.float64), np.empty(TABLE, np.int64)
    rest, bins32 = np.empty(longest + 16, np.int32), np.empty(TABLE, np.int32)
    fast = f32 and len(colmap) == 0 and not random
    has_div = len(div) > 0
    for c in range(len(indptr) - 1):
        if fast:
            s, e = indptr[c], indptr[c + 1]
            d = div[c] if has_div else 1.0
            tab = ltab[c] if len(ltab) > 1 else ltab[0]
            n = binned_counts(indices, values, s, e, n_genes, d, has_div, log1p, tab, qs, k, cls, hist, rest, xs, bins, bins32, edges,
                              gene[c], expr[c], mask[c])
            if n == -1:
                return BAD_INDEX, _first_bad(indices, s, e, n_genes)
            if n >= 0:
                continue
        if log1p:
            flag[c] = 1
            continue
        m = _load(indptr, indices, values, c, n_genes, div, log1p, f32, colmap, False, sg, sv, sp, memo, stamp)
        if m < 0:
            return BAD_INDEX, -1 - m
        _order(sv, sp, m, c, False, seed, keys, order, skeys, counts)
        digits(sv, order, m, asc, qs, f32, edges, dig)
        keep[:m] = True
        if m > k:
            if random:
                _order(sv, sp, m, first + c, True, seed, keys, order, skeys, counts)
            _keep_first(order, m, k, keep)
        if cls:
            gene[c, 0], expr[c, 0], mask[c, 0] = _CLS, 0, True
        w = cls
        for i in range(m):
            if keep[i]:
                gene[c, w], expr[c, w], mask[c, w] = sg[i], dig[i], True
                w += 1
        expr[c, w:] = 0
        _pad_row(gene, mask, c, w)
    return 0, 0


@njit(nogil=True, cache=True)
def preprocess(indptr, values, div, log1p, f32, ltab, out, flag):  # noqa: ANN001, ANN201
    """``out[j]``: value ``j`` of ``[indptr[0], indptr[-1])`` divided by its cell's divisor and
    ``log1p``'d (the compute dtype: ``out``'s), read and written once.

    ``log1p`` is numpy's (the compiled ``log1p`` differs from it in the last bit for some
    inputs): ``ltab`` holds, per cell (one row for all when there are no divisors), the
    whole counts ``0 .. T-1`` preprocessed by numpy (:func:`scmf_loader.outputs.log_tables`),
    and a row of such counts is a lookup; any other row is left to the caller, which
    finds ``flag[c]`` set and computes it with numpy. Without ``log1p`` every row is
    written here (a division is the same in both)."""
    bad, longest = _check_indptr(indptr, len(values))
    if bad >= 0:
        return BAD_INDPTR, bad
    table, ix = np.empty(TABLE, out.dtype), np.empty(longest, np.int32)  # the table in out's dtype: no conversions
    has_div, base = len(div) > 0, indptr[0] if len(indptr) else 0
    for c in range(len(indptr) - 1):
        d = div[c] if has_div else 1.0
        tab = ltab[c] if len(ltab) > 1 else ltab[0]
        if not transform_row(values, indptr[c], indptr[c + 1], d, has_div, log1p, f32, table, tab, ix, out,
                             indptr[c] - base):
            flag[c] = 1
    return 0, 0
