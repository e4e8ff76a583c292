"""Numba kernels of binned outputs: quantile edges exactly as ``np.quantile`` (method
"linear") and ``np.digitize``, from a sorted row or, for rows of small whole counts, from a
histogram of the counts (no sort; imported only with numba).

A row of raw counts holds a few distinct values: its preprocessed values are a function of
the count, and when that function is strictly increasing over the counts present (checked
per row), the sorted non-zero values are the counts' values in count order, repeated by
their histogram, so each edge is read off the histogram and each count has one bin.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from scmf_loader.outputs._fast import _small_counts, copy_genes, count_value, genes_ok
from scmf_loader.outputs._simd import WIDTH as SIMD_WIDTH
from scmf_loader.outputs._simd_bins import bin_compact, bin_lookup, hist_small

_CLS, _PAD = 3, 0


@njit(nogil=True, cache=True)
def _edges(asc, a, qs, f32, edges) -> None:  # noqa: ANN001
    """``edges``: ``np.quantile(asc[:a], qs)`` (method "linear"), numpy's arithmetic exactly."""
    for j in range(len(qs)):
        vi = (a - 1) * qs[j]
        if vi >= a - 1:
            edges[j] = asc[a - 1]
            continue
        prev = np.floor(vi)
        lo, hi = asc[int(prev)], asc[int(prev) + 1]
        diff = np.float64(np.float32(hi) - np.float32(lo)) if f32 else hi - lo
        t = vi - prev
        edges[j] = hi - diff * (1 - t) if t >= 0.5 else lo + diff * t


@njit(nogil=True, cache=True)
def digits(sv, order, m, asc, qs, f32, edges, dig) -> None:  # noqa: ANN001
    """``dig[p]``: the bin of value ``sv[p]`` (``order`` sorts values descending): 0 for a
    zero, else the number of edges <= value (``np.digitize``), edges from the non-zeros."""
    a = 0
    for i in range(m - 1, -1, -1):
        x = sv[order[i]]
        if x != 0:
            asc[a] = x
            a += 1
    if a:
        _edges(asc, a, qs, f32, edges)
    j = len(qs)
    for i in range(m):
        p = order[i]
        x = sv[p]
        if x == 0:
            dig[p] = 0
            continue
        while j > 0 and edges[j - 1] > x:
            j -= 1
        dig[p] = j


@njit(nogil=True, cache=True)
def _hist_edges(hist, xs, top, a, qs, edges) -> None:  # noqa: ANN001
    """``_edges`` on the sorted non-zeros the histogram stands for (float32 compute dtype):
    positions only grow with the quantile, so one walk up the counts finds every value."""
    i, end = 1, hist[1] if top >= 1 else 0  # count i covers sorted positions [end - hist[i], end)
    for j in range(len(qs)):
        vi = (a - 1) * qs[j]
        p = a - 1 if vi >= a - 1 else int(np.floor(vi))
        while end <= p:
            i += 1
            end += hist[i]
        lo = xs[i]
        if vi >= a - 1:
            edges[j] = lo
            continue
        i2, end2 = i, end
        while end2 <= p + 1:
            i2 += 1
            end2 += hist[i2]
        hi = xs[i2]
        diff = np.float64(np.float32(hi) - np.float32(lo))
        t = vi - np.floor(vi)
        edges[j] = hi - diff * (1 - t) if t >= 0.5 else lo + diff * t


@njit(nogil=True, cache=True)
def _histogram(src, top, hist) -> None:  # noqa: ANN001
    """``hist[:top + 1]``: how often each count occurs in ``src`` (whole counts ``<= top``);
    ``hist`` holds four histograms (``len(hist) // 4`` each), one per quarter of the row, so
    that four chains of counter updates run at once (a count repeats: one chain would wait on
    the same counter), summed at the end."""
    n, stride = len(src), len(hist) // 4
    for j in range(4):
        hist[j * stride : j * stride + top + 1] = 0
    q = n // 4
    for i in range(q):
        for j in range(4):
            hist[np.uint32(j * stride + np.int32(src[j * q + i]))] += 1
    for i in range(4 * q, n):
        hist[np.uint32(3 * stride + np.int32(src[i]))] += 1
    for i in range(top + 1):
        hist[i] += hist[stride + i] + hist[2 * stride + i] + hist[3 * stride + i]


@njit(nogil=True, cache=True)
def _count_bins(src, top, d, has_div, log1p, tab, qs, hist, rest, xs, bins, edges) -> bool:  # noqa: ANN001
    """``bins[i]``: the bin of count ``i`` of the row (0 for 0); False when the preprocessing
    is not strictly increasing over the counts present (the caller sorts instead). The
    histogram: :func:`_simd_bins.hist_small` (``rest``: its scratch), else :func:`_histogram`."""
    hist[: max(top + 1, 4)] = 0
    if not hist_small(src, hist, rest):
        _histogram(src, top, hist)
    last = 0.0
    for i in range(top + 1):
        xs[i] = count_value(i, d, has_div, log1p, True, tab)
        if hist[i] and i:
            if not xs[i] > last:
                return False
            last = xs[i]
    a = len(src) - hist[0]
    if a:
        _hist_edges(hist, xs, top, a, qs, edges)
    j = 0
    bins[0] = 0
    for i in range(1, top + 1):  # ascending values: edges <= value only grow
        while j < len(qs) and edges[j] <= xs[i]:
            j += 1
        bins[i] = j
    return True


@njit(nogil=True, cache=True)
def _tie_end(src, t, ties) -> int:  # noqa: ANN001
    """The position after the ``ties``-th count equal to ``t`` (0 when ``ties`` is 0); blocks of
    128 are counted whole (vectorised) until the one holding it."""
    if ties == 0:
        return 0
    seen, start, m = 0, 0, len(src)
    while start < m:
        blk = src[start : start + 128]
        n = 0
        for i in range(len(blk)):
            n += np.int32(blk[i]) == t
        if seen + n >= ties:
            break
        seen += n
        start += 128
    for i in range(start, m):
        seen += np.int32(src[i]) == t
        if seen == ties:
            return i + 1
    return m


@njit(nogil=True, cache=True)
def _keep_write(genes, src, bins, bins32, lo, gw, ew) -> int:  # noqa: ANN001
    """Entries whose count is ``>= lo`` written in order from 0, branch-free (a dropped entry
    is overwritten by the next kept one; the last entry must be kept): the count written.
    ``bins32``: ``bins`` as int32 for :func:`_simd_bins.bin_compact` (counts below 128), or empty."""
    start, w = bin_compact(genes, src, lo, bins32, gw, ew) if len(bins32) else (0, 0)
    for j in range(start, len(genes)):
        i = np.int32(src[j])
        gw[w], ew[w] = genes[j], bins[np.uint32(i)]
        w += i >= lo
    return w


@njit(nogil=True, cache=True)
def _write_top(genes, src, bins, bins32, t, ties, gw, ew) -> None:  # noqa: ANN001
    """The ``len(gw)`` kept entries of a truncated count row (counts above ``t``, and the first
    ``ties`` equal to ``t``) in position order: two branch-free compactions."""
    cut = _tie_end(src, t, ties)
    w = _keep_write(genes[:cut], src[:cut], bins, bins32, t, gw, ew) if cut else 0
    end = len(src)
    while end > cut and np.int32(src[end - 1]) <= t:  # past the last kept entry: nothing to write
        end -= 1
    if end > cut:
        _keep_write(genes[cut:end], src[cut:end], bins, bins32, t + 1, gw[w:], ew[w:])


@njit(nogil=True, cache=True)
def binned_counts(indices, values, s, e, n_genes, d, has_div, log1p, tab, qs, k, cls, hist, rest, xs, bins, bins32, edges, gr, er,
                  mr) -> int:  # noqa: ANN001
    """One binned row (float32 compute dtype, top truncation) when the row holds small whole
    counts (below ``len(xs)``, and ``len(tab)`` with ``log1p``: :func:`_fast.count_value`):
    the genes written, ``-1`` a bad gene id, ``-2`` not this case."""
    src, m = values[s:e], e - s
    top = _small_counts(src, min(len(xs), len(tab)) if log1p else len(xs))
    if top < 0 or not _count_bins(src, top, d, has_div, log1p, tab, qs, hist, rest, xs, bins, edges):
        return -2
    if cls:
        gr[0], er[0] = _CLS, 0
    b32 = bins32[:0]
    if top < SIMD_WIDTH <= len(bins32):  # the int32 bins for the vectorised lookups
        for i in range(top + 1):
            bins32[i] = bins[i]
        b32 = bins32
    if m <= k:
        if not copy_genes(indices, s, e, n_genes, gr, cls):
            return -1
        out = er[cls : cls + m]
        if not (len(b32) and bin_lookup(b32, src, out)):
            for j in range(m):
                out[j] = bins[np.uint32(np.int32(src[j]))]
        n = m
    else:
        if not genes_ok(indices, s, e, n_genes):
            return -1
        drop, below, t = m - k, 0, 0
        while below + hist[t] < drop:  # the lowest counts go first
            below += hist[t]
            t += 1
        ties = hist[t] - (drop - below)  # of count t, the first `ties` stay
        _write_top(indices[s:e], src, bins, b32, t, ties, gr[cls : cls + k], er[cls : cls + k])
        n = k
    mr[: cls + n] = True
    gr[cls + n :] = _PAD
    er[cls + n :] = 0
    mr[cls + n :] = False
    return n
