"""Rank outputs of count rows by a counting sort over (median class, count) pairs
(numba; imported only with numba).

A row of raw counts holds few distinct values, and the per-gene non-zero medians of a
dataset take few distinct values too (medians of counts: small whole or half numbers). The
ratio ``value / median`` of an entry is then a function of the pair ``(class of its gene's
median, count)``, and a row holds a few dozen distinct pairs. So instead of sorting ~2,000
ratio keys, a row is ranked by:

1. one pass giving each entry its pair id (a gather of the gene's median class) and a
   histogram of the pair ids (four interleaved chains: count data repeats a pair, one chain
   would wait on the same counter), then the distinct pairs read off the histogram;
2. the ratio of each distinct pair (the very float32 division of the general path), its
   pairs sorted by ratio descending; pairs with equal ratios share one bucket, so ties keep
   position order (the lower token id) as in the stable sort;
3. one stable scatter of the gene ids into their buckets (four chains again).

Stored zeros and genes whose median is not a positive finite number go to a last bucket that
is not written out. Rows that are not small whole counts are left to the general path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from scmf_loader.outputs._fast import TABLE, _small_counts, count_value, genes_ok

MAX_CLASSES = 63  # distinct valid medians handled here (one more class: invalid medians)
_CLS, _PAD = 3, 0
_DROP = np.uint64(1) << np.uint64(40)  # key of the dropped pairs: after every ratio key


@njit(nogil=True, cache=True)
def scratch(longest, n_classes):  # noqa: ANN001, ANN202
    """Per-call scratch of :func:`rank_counts`."""
    pairs = (n_classes + 1) * TABLE
    return (np.zeros(4 * pairs, np.int32), np.empty(pairs, np.int32),
            np.empty(pairs, np.float32), np.empty(pairs, np.uint64), np.empty(pairs, np.int32),
            np.empty(4 * pairs, np.int64), np.empty(longest, np.int32), np.empty(longest, np.int32),
            np.empty(TABLE, np.float32))


@njit(nogil=True, cache=True)
def _histogram(genes, src, cls_of, w, n_classes, idx, hist, seen, pairs) -> int:  # noqa: ANN001
    """``idx[i]``: entry ``i``'s pair id; ``hist[j * pairs + id]`` counts the pair ids of chunk
    ``j`` (the row cut in four; the tail is chunk 3's); ``seen[:n]``: the distinct ids, ``n``."""
    m = len(genes)
    for i in range(m):  # gene ids are checked: unsigned indexing, no wraparound test
        idx[i] = np.int32(src[i])
    for i in range(m):
        idx[i] += cls_of[np.uint32(genes[i])] * w
    q = m // 4
    for i in range(q):
        for j in range(4):  # four independent chains of counter updates
            hist[np.uint32(j * pairs + idx[j * q + i])] += 1
    for i in range(4 * q, m):
        hist[np.uint32(3 * pairs + idx[i])] += 1
    used = (n_classes + 1) * w
    h0, h1, h2, h3 = hist[:used], hist[pairs : pairs + used], hist[2 * pairs : 2 * pairs + used], hist[3 * pairs : 3 * pairs + used]
    for p in range(used):  # vectorised: which ids occur
        seen[p] = h0[p] | h1[p] | h2[p] | h3[p]
    n = 0
    for p in range(used):  # in place (n <= p), branch-free: every id is written, the seen ones kept
        t = seen[p]
        seen[n] = p
        n += t != 0
    return n


@njit(nogil=True, cache=True)
def _sort_keys(keys, n) -> None:  # noqa: ANN001
    """``keys[:n]`` ascending (insertion for a few dozen, else numpy's sort)."""
    if n > 96:
        keys[:n] = np.sort(keys[:n])
        return
    for i in range(1, n):
        k = keys[i]
        j = i - 1
        while j >= 0 and keys[j] > k:
            keys[j + 1] = keys[j]
            j -= 1
        keys[j + 1] = k


@njit(nogil=True, cache=True)
def _pair_keys(seen, n, w, n_classes, table, cmed, rat, keys) -> None:  # noqa: ANN001
    """``keys[:n]``: each distinct pair's key (ascending in ratio descending, as
    :func:`scmf_loader.outputs._fast.descending_keys`; dropped pairs last) over its place in
    ``seen``. Pairs are taken from the last: within a class, higher counts first, so the keys
    come nearly sorted (the insertion sort after them moves little)."""
    for i in range(n):
        p = seen[n - 1 - i]
        c, k = p // w, p % w
        rat[i] = table[k] / cmed[min(c, n_classes - 1)]
    bits = rat.view(np.uint32)
    for i in range(n):
        p = seen[n - 1 - i]
        c, k = p // w, p % w
        u = bits[i]
        u = u if u != np.uint32(0x80000000) else np.uint32(0)  # -0.0 is 0.0
        asc = u ^ (np.uint32(0xFFFFFFFF) if u >> np.uint32(31) else np.uint32(0x80000000))
        key = (np.uint64(asc) ^ np.uint64(0xFFFFFFFF)) if (c < n_classes) & (k > 0) else _DROP
        keys[i] = (key << np.uint64(20)) | np.uint64(n - 1 - i)


@njit(nogil=True, cache=True)
def _buckets(seen, n, w, n_classes, table, cmed, hist, pairs, rat, keys, bucket_of, starts) -> int:  # noqa: ANN001
    """Each distinct pair's bucket (``bucket_of``), buckets in ratio order descending, and the
    first slot of each (chunk, bucket) in ``starts[4 * b + j]``; clears ``hist``. Returns the
    entries kept (those before the dropped bucket)."""
    _pair_keys(seen, n, w, n_classes, table, cmed, rat, keys)
    _sort_keys(keys, n)
    b = -1
    last = np.uint64(0xFFFFFFFFFFFFFFFF)
    for i in range(n):
        key = keys[i] >> np.uint64(20)
        p = seen[np.int64(keys[i] & np.uint64(0xFFFFF))]
        if key != last:
            b += 1
            last = key
            starts[4 * b : 4 * b + 4] = 0
        bucket_of[p] = b
        for j in range(4):
            starts[4 * b + j] += hist[j * pairs + p]
            hist[j * pairs + p] = 0
    pos = 0
    for bb in range(b + 1):  # counts -> first slots, chunk by chunk inside a bucket
        for j in range(4):
            t = starts[4 * bb + j]
            starts[4 * bb + j] = pos
            pos += t
    return starts[4 * b] if last == _DROP else pos


@njit(nogil=True, cache=True)
def _scatter(genes, idx, bucket_of, starts, out) -> None:  # noqa: ANN001
    """``out[slot]`` = gene id, each entry at its bucket's next slot of its chunk (stable).
    ``idx`` is overwritten with the entries' counter ids (a gather pass first, so that the
    scatter's chains of counter updates wait on nothing else)."""
    m = len(genes)
    for i in range(m):
        idx[i] = 4 * bucket_of[np.uint32(idx[i])]
    q = m // 4
    for i in range(q):
        for j in range(4):
            p = j * q + i
            s = np.uint32(idx[p] + j)
            slot = starts[s]
            starts[s] = slot + 1
            out[np.uint64(slot)] = genes[p]
    for p in range(4 * q, m):
        s = np.uint32(idx[p] + 3)
        slot = starts[s]
        starts[s] = slot + 1
        out[np.uint64(slot)] = genes[p]


@njit(nogil=True, cache=True, error_model="numpy")
def rank_counts(indices, values, s, e, n_genes, cls_of, cmed, d, has_div, log1p, tab, sc, k, cls, gr) -> int:  # noqa: ANN001
    """One rank row (float32 compute dtype, no subset) when the row holds small whole counts:
    the genes written into ``gr`` after ``cls`` (``-1`` a bad gene id, ``-2`` not this case).
    ``cls_of``: each gene's median class (``len(cmed)`` for an invalid median); ``cmed``:
    the class medians; ``sc``: :func:`scratch`."""
    hist, seen, rat, keys, bucket_of, starts, idx, buf, table = sc
    genes, src = indices[s:e], values[s:e]
    m = e - s
    if m == 0:
        return 0
    top = _small_counts(src, min(TABLE, len(tab)) if log1p else TABLE)
    if top < 0:
        return -2
    if not genes_ok(indices, s, e, n_genes):
        return -1
    w = top + 1
    for c in range(w):
        table[c] = np.float32(count_value(c, d, has_div, log1p, True, tab))
    n_classes = len(cmed)
    pairs = (n_classes + 1) * TABLE
    n = _histogram(genes, src, cls_of, w, n_classes, idx, hist, seen, pairs)
    kept = _buckets(seen, n, w, n_classes, table, cmed, hist, pairs, rat, keys, bucket_of, starts)
    n_out = min(kept, k)
    if m <= k:  # every slot lies in the row
        _scatter(genes, idx, bucket_of, starts, gr[cls : cls + m])
    else:
        _scatter(genes, idx, bucket_of, starts, buf)
        out = gr[cls : cls + n_out]
        for i in range(n_out):
            out[i] = buf[i]
    return n_out
