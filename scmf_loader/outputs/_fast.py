"""Numba fast paths of the compiled kernels for the common rows (imported only with numba).

Each helper handles one cell and says when its case does not apply, so the caller falls
back to the general path of :mod:`scmf_loader.outputs.compiled`; both give the same numbers.

* :func:`cutoff` - top-k truncation without keys or selection: the lowest values are
  dropped one distinct value at a time (min, count: vectorised passes); count data drops
  one to three distinct values.
* :func:`write_kept` - the kept entries of a truncated row in position order, written once.
* :func:`transform_row` - the fused preprocessing of a row, ``log1p`` computed once per
  distinct small whole count (a per-cell table) instead of once per entry.
* :func:`sort_desc` - the stable descending order of ``uint32`` keys for rank outputs: one
  bucket pass on the top bits, then an insertion fix-up inside the (nearly always pure)
  buckets, with a least-significant-digit radix sort when that fix-up would be long.
* :func:`count_hist` - a per-cell histogram of small whole counts, for binning without a sort.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from scmf_loader.outputs._simd import AVX512 as SIMD
from scmf_loader.outputs._simd import WIDTH as SIMD_WIDTH
from scmf_loader.outputs._simd import compact, count_lookup, lookup

_MAX_ROUNDS = 8
TABLE = 256  # small whole counts with a per-cell table (log1p, histogram)
BUCKET_BITS = 9
RADIX_BITS = 11
COUNTS = max(4 << BUCKET_BITS, (1 << RADIX_BITS) + 1)  # counters sort_asc needs


_HIGHEST = np.int32((1 << 31) - 1)
_POS_INF_BITS = np.int32(0x7F800000)
_BLOCK = 128


@njit(nogil=True, cache=True)
def cutoff(bits, m, drop):  # noqa: ANN001, ANN201
    """``(t, keep_ties, below, ok)`` to drop the ``drop`` (``1 <= drop < m``) lowest of the
    float32 values whose bits are ``bits[:m]`` (int32; ties: the later positions go first):
    values whose bits are below ``t`` are dropped, of those equal to ``t`` the first
    ``keep_ties`` kept; ``below`` values lie below ``t``. Only for values that are all
    ``+0.0`` or above and not NaN, whose bits order as integers like the values (and are
    equal exactly when the values are); ``ok`` False otherwise, or when more than a few
    distinct values would go (the caller then selects by keys). Integer passes only."""
    lo, hi = bits[0], bits[0]
    for i in range(m):
        lo = min(lo, bits[i])
        hi = max(hi, bits[i])
    if lo < 0 or hi > _POS_INF_BITS:  # a negative value (or -0.0), or NaN
        return lo, 0, 0, False
    t, below = lo, 0
    for _ in range(_MAX_ROUNDS):
        n_eq, nxt = 0, _HIGHEST
        for i in range(m):
            k = bits[i]
            n_eq += k == t
            nxt = min(nxt, k if k > t else _HIGHEST)
        if below + n_eq >= drop:
            return t, n_eq - (drop - below), below, True
        below += n_eq
        t = nxt
    return t, 0, 0, False


@njit(nogil=True, cache=True)
def _count_eq(bits, t) -> int:  # noqa: ANN001
    n = 0
    for i in range(len(bits)):
        n += bits[i] == t
    return n


@njit(nogil=True, cache=True)
def _tie_end(bits, m, t, ties) -> int:  # noqa: ANN001
    """The position after the ``ties``-th key equal to ``t`` (0 when ``ties`` is 0)."""
    if ties == 0:
        return 0
    seen, start = 0, 0
    while start < m:  # whole blocks first (vectorised counts), then the block holding it
        n = _count_eq(bits[start : start + _BLOCK], t)
        if seen + n >= ties:
            break
        seen += n
        start += _BLOCK
    rest = bits[start:m]
    for i in range(len(rest)):
        seen += rest[i] == t
        if seen == ties:
            return start + i + 1
    return m


@njit(nogil=True, cache=True)
def _compact(genes, src, bits, t, lut, vec, gr, er) -> int:  # noqa: ANN001
    """Entries with ``bits > t`` (``>= t`` for ``t`` one above the threshold) written in order
    into ``gr``/``er`` from 0, branch-free (a dropped entry is overwritten by the next kept
    one): the count written. Indices that start at 0 and only grow: no wraparound checks.
    The value written is ``src[i]``, or ``lut[src[i]]`` when ``lut`` is not empty (``src``
    then holds whole counts below ``len(lut)``). ``vec``: the counts are below 128 (or there
    is no ``lut``): blocks of 16 go through :func:`_simd.compact` while 16 slots are free."""
    w, i, n = 0, 0, len(genes)
    if vec and (len(lut) == 0 or len(lut) >= SIMD_WIDTH):
        room = min(len(gr), len(er)) - 16
        while i + 16 <= n and w <= room:
            r = compact(genes, src, bits, t, lut, gr, er, i, w)
            if r < 0:
                break
            w = r
            i += 16
    if len(lut):
        for j in range(i, n):
            gr[w], er[w] = genes[j], lut[np.uint32(np.int32(src[j]))]
            w += bits[j] > t
        return w
    for j in range(i, n):
        gr[w], er[w] = genes[j], src[j]
        w += bits[j] > t
    return w


@njit(nogil=True, cache=True)
def write_kept(indices, s, src, bits, m, t, keep_ties, below, lut, vec, gr, er, w) -> None:  # noqa: ANN001
    """Entries ``i`` of the row (gene ``indices[s + i]``, value ``src[i]`` - or ``lut[src[i]]``,
    see :func:`_compact` - float32 bits ``bits[i]``) that :func:`cutoff` keeps, into
    ``gr``/``er`` from ``w``, in position order. ``below``: how many lie below ``t`` (none:
    the part before the last kept tie is copied whole)."""
    genes = indices[s : s + m]
    cut = _tie_end(bits, m, t, keep_ties)
    if below:  # before the last kept tie only values below t go
        w += _compact(genes[:cut], src[:cut], bits[:cut], t - 1, lut, vec, gr[w:], er[w:])
    else:
        gw, ew = gr[w : w + cut], er[w : w + cut]
        for i in range(cut):
            gw[i] = genes[i]
        if len(lut):
            if not (vec and count_lookup(lut, src[:cut], ew)):  # counts below 128: vectorised
                for i in range(cut):
                    ew[i] = lut[np.uint32(np.int32(src[i]))]
        else:
            for i in range(cut):
                ew[i] = src[i]
        w += cut
    end = m
    while end > cut and bits[end - 1] <= t:  # past the last kept entry: nothing to write
        end -= 1
    # every value <= t goes; the last write is a kept entry (in bounds)
    _compact(genes[cut:end], src[cut:end], bits[cut:end], t, lut, vec, gr[w:], er[w:])


@njit(nogil=True, cache=True, error_model="numpy")
def increasing_lut(src, d, has_div, log1p, tab, lut) -> int:  # noqa: ANN001
    """For a row of small whole counts (below ``len(lut)``, and ``len(tab)`` with ``log1p``)
    whose preprocessing (float32) is strictly increasing over ``0 .. the largest``:
    ``lut[c]`` = count ``c`` preprocessed (:func:`count_value`), and the largest count; else
    -1. The row's order, ties included, is then its counts' order."""
    top = _small_counts(src, min(len(lut), len(tab)) if log1p else len(lut))
    if top < 0:
        return -1
    prev = -np.inf
    for c in range(top + 1):
        x = count_value(c, d, has_div, log1p, True, tab)
        if not x > prev:
            return -1
        lut[c] = np.float32(x)
        prev = x
    return top


@njit(nogil=True, cache=True)
def genes_ok(indices, s, e, n_genes) -> bool:  # noqa: ANN001
    """Every gene id of entries ``[s, e)`` lies in ``[0, n_genes)``."""
    genes = indices[s:e]
    if not len(genes):
        return True
    lo, hi = genes[0], genes[0]
    for i in range(len(genes)):
        lo = min(lo, genes[i])
        hi = max(hi, genes[i])
    return lo >= 0 and hi < n_genes


@njit(nogil=True, cache=True)
def copy_genes(indices, s, e, n_genes, gr, w) -> bool:  # noqa: ANN001
    """``gr[w:]`` = the row's gene ids (widened); False if one is outside ``[0, n_genes)``."""
    genes = indices[s:e]
    out = gr[w : w + e - s]
    if not len(genes):
        return True
    lo, hi = genes[0], genes[0]
    for i in range(len(genes)):
        g = genes[i]
        lo = min(lo, g)
        hi = max(hi, g)
        out[i] = g
    return lo >= 0 and hi < n_genes


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _compute(v, d, has_div, log1p, f32):  # noqa: ANN001, ANN202
    """One value through the preprocessing in the compute dtype (float32 or float64)."""
    if f32:
        x = np.float32(v)
        if has_div:
            x = x / np.float32(d)
        if log1p:
            x = np.log1p(x)
        return np.float64(x) + 0.0
    y = np.float64(v)
    if has_div:
        y = y / d
    if log1p:
        y = np.log1p(y)
    return y + 0.0


@njit(nogil=True, cache=True)
def _small_counts(src, n) -> int:  # noqa: ANN001
    """The largest value of ``src`` when every value is a whole number in ``[0, n)``, else
    -1 (int32 conversions: vectorised)."""
    ok, top, lim = True, np.int32(0), np.float32(n)
    for j in range(len(src)):
        v = src[j]
        inside = (v >= 0) & (v < lim)
        i = np.int32(v) if inside else np.int32(0)
        ok &= inside & (i == v)
        top = max(top, i)
    return top if ok else -1


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def count_value(i, d, has_div, log1p, f32, tab):  # noqa: ANN001, ANN202
    """Whole count ``i`` preprocessed: with ``log1p`` read from ``tab`` (the cell's row of the
    log table numpy computed: :func:`scmf_loader.outputs.log_tables`; numpy's ``log1p`` and
    the compiled one differ in the last bit for some inputs), else :func:`_compute`
    (a division: the same in both). The caller keeps ``i < len(tab)`` with ``log1p``."""
    if log1p:
        return np.float64(tab[i]) + 0.0
    return _compute(i, d, has_div, log1p, f32)


@njit(nogil=True, cache=True)
def count_index(src, n, ix) -> int:  # noqa: ANN001
    """:func:`_small_counts`, writing each value's count into ``ix[:len(src)]`` (int32) in
    the same vectorised pass (``ix`` must hold the row); the largest count, or -1."""
    ok, top, lim = True, np.int32(0), np.float32(n)
    for j in range(len(src)):
        v = src[j]
        inside = (v >= 0) & (v < lim)
        i = np.int32(v) if inside else np.int32(0)
        ok &= inside & (i == v)
        top = max(top, i)
        ix[j] = i
    return top if ok else -1


@njit(nogil=True, cache=True, error_model="numpy")
def transform_row(values, s, e, d, has_div, log1p, f32, table, tab, ix, out, w) -> bool:  # noqa: ANN001
    """``out[w:]`` = the row's values preprocessed (-0.0 folded into 0.0); False (nothing
    written) with ``log1p`` when the row is not all whole counts below ``len(tab)``: the
    caller then takes numpy's numbers (:func:`scmf_loader.outputs._Batch.run`). A row of
    small whole counts (raw data) is a lookup: each count up to the row's largest into
    ``table`` (scratch of :data:`TABLE` numbers of ``out``'s dtype: a float64 table written
    into float32 costs a conversion per entry) - with ``log1p`` the cell's row ``tab`` of the
    numpy log table is the table. ``ix``: int32 scratch that holds the row's counts (the
    check pass writes them, vectorised, and the lookup reads them instead of converting
    each value again: 2.35 -> 1.95 us per 2,062-value cell); with a shorter ``ix`` the counts
    are converted in the lookup."""
    src, dst = values[s:e], out[w : w + e - s]
    m = len(src)
    lut = tab if log1p else table
    if SIMD and m >= 16 and len(lut) >= SIMD_WIDTH:  # counts below 128: one vectorised check-and-lookup pass
        if not log1p:
            for i in range(SIMD_WIDTH):
                table[i] = _compute(i, d, has_div, log1p, f32)
        if count_lookup(lut, src, dst):
            return True
    n = min(len(tab), len(table)) if log1p else len(table)
    if len(ix) >= m:
        top = count_index(src, n, ix)
        if top >= 0:
            if not log1p:
                for i in range(top + 1):
                    table[i] = _compute(i, d, has_div, log1p, f32)
            lookup(lut, ix, top, dst)
            return True
    else:
        top = _small_counts(src, n)
        if top >= 0:
            if not log1p:
                for i in range(top + 1):
                    table[i] = _compute(i, d, has_div, log1p, f32)
            for j in range(m):
                dst[j] = lut[np.uint32(np.int32(src[j]))]
            return True
    if log1p:
        return False
    for j in range(m):
        dst[j] = _compute(src[j], d, has_div, log1p, f32)
    return True


@njit(nogil=True, cache=True)
def _bit_length(x) -> int:  # noqa: ANN001
    n = 0
    while x:
        x = x >> np.uint32(1)
        n += 1
    return n


@njit(nogil=True, cache=True, error_model="numpy")
def rank_ratios(indices, values, s, e, medians, med_ok, d, has_div, log1p, plain, table, tab, ix, rat, pay) -> int:  # noqa: ANN001
    """The row's expressed genes (value not 0, median positive and finite) into ``pay`` and
    their ``value / median`` (float32, the value in the compute dtype float32) into ``rat``:
    the count. Gene ids must be checked; ``med_ok``: every median is positive and finite.
    Vectorised passes (values, the gather of the medians, divisions), then a compaction
    only when some entry is left out."""
    genes, src = indices[s:e], values[s:e]
    m = len(genes)
    if plain:
        for j in range(m):
            rat[j] = np.float32(src[j])
    else:
        if not transform_row(values, s, e, d, has_div, log1p, True, table, tab, ix, rat, 0):
            return -1
    for j in range(m):
        rat[j] = rat[j] / medians[genes[j]]
    n_ok = 0
    for j in range(m):
        n_ok += src[j] != 0
    if med_ok and n_ok == m:  # the common case: every entry is expressed
        pay[:m] = genes
        return m
    w = 0
    for j in range(m):  # in place: w <= j
        md = medians[genes[j]]
        rat[w], pay[w] = rat[j], genes[j]
        w += (src[j] != 0) & (md > 0) & (md < np.inf)
    return w


@njit(nogil=True, cache=True)
def descending_keys(rat, keys) -> None:  # noqa: ANN001
    """``keys[i]`` (uint32): ascending in the order of ``rat[i]`` (float32) descending."""
    bits = rat.view(np.uint32)
    for i in range(len(rat)):
        u = bits[i]
        u = u if u != np.uint32(0x80000000) else np.uint32(0)  # -0.0 is 0.0
        asc = u ^ (np.uint32(0xFFFFFFFF) if u >> np.uint32(31) else np.uint32(0x80000000))
        keys[i] = ~asc


@njit(nogil=True, cache=True)
def _radix(keys, pay, m, tk, tp, counts) -> None:  # noqa: ANN001
    """Stable LSD radix sort of ``keys[:m]`` (uint32) carrying ``pay``; ``tk``/``tp`` scratch."""
    nb = 1 << RADIX_BITS
    mask = np.uint32(nb - 1)
    for p in range(3):
        shift = np.uint32(RADIX_BITS * p)
        counts[: nb + 1] = 0
        for i in range(m):
            counts[np.uint64((keys[i] >> shift) & mask) + np.uint64(1)] += 1
        if counts[np.uint64((keys[0] >> shift) & mask) + np.uint64(1)] == m:
            continue  # one digit value: this pass would not move anything
        for b in range(nb):
            counts[b + 1] += counts[b]
        for i in range(m):
            b = np.uint64((keys[i] >> shift) & mask)
            q = counts[b]
            counts[b] = q + 1
            tk[q], tp[q] = keys[i], pay[i]
        keys[:m] = tk[:m]
        pay[:m] = tp[:m]


@njit(nogil=True, cache=True, inline="always")
def _bucket(key, lo, shift):  # noqa: ANN001, ANN202
    return np.uint64((key - lo) >> shift)


@njit(nogil=True, cache=True)
def _scatter4(keys, pay, m, lo, shift, sk, sp, counts) -> None:  # noqa: ANN001
    """Stable counting scatter by bucket, the row cut into 4 chunks walked together so that
    4 chains of counter updates run at once (count data repeats a few keys: one chain would
    wait on the same counter); each chunk has its own counters (``counts``: 4 x NB)."""
    nb = np.uint64(1 << BUCKET_BITS)
    c = m // 4
    counts[: 4 * (1 << BUCKET_BITS)] = 0
    for i in range(c):
        counts[_bucket(keys[i], lo, shift)] += 1
        counts[nb + _bucket(keys[c + i], lo, shift)] += 1
        counts[2 * nb + _bucket(keys[2 * c + i], lo, shift)] += 1
        counts[3 * nb + _bucket(keys[3 * c + i], lo, shift)] += 1
    for i in range(4 * c, m):
        counts[3 * nb + _bucket(keys[i], lo, shift)] += 1
    run = np.uint64(0)
    for b in range(1 << BUCKET_BITS):
        for j in range(4):
            t = counts[j * nb + b]
            counts[j * nb + b] = run
            run += t
    for i in range(c):
        for j in range(4):  # unrolled by numba/LLVM: four independent chains
            p = j * c + i
            bb = np.uint64(j) * nb + _bucket(keys[p], lo, shift)
            q = counts[bb]
            counts[bb] = q + 1
            sk[q], sp[q] = keys[p], pay[p]
    for p in range(4 * c, m):
        bb = 3 * nb + _bucket(keys[p], lo, shift)
        q = counts[bb]
        counts[bb] = q + 1
        sk[q], sp[q] = keys[p], pay[p]


@njit(nogil=True, cache=True)
def sort_asc(keys, pay, m, sk, sp, counts) -> None:  # noqa: ANN001
    """``sk[:m]``/``sp[:m]``: ``keys[:m]`` (uint32) ascending, ties in position order, with
    their payloads (``counts``: uint64, :data:`COUNTS` of them). One bucket pass on the top
    bits of ``key - min``, then insertion inside the buckets (keys of count data are few
    distinct values: buckets are nearly always pure); a long fix-up turns into a radix
    sort. ``keys``/``pay`` are kept."""
    if m == 0:
        return
    lo, hi = keys[0], keys[0]
    for i in range(m):
        lo = min(lo, keys[i])
        hi = max(hi, keys[i])
    shift = np.uint32(max(_bit_length(hi - lo) - BUCKET_BITS, 0))
    _scatter4(keys, pay, m, lo, shift, sk, sp, counts)
    if shift == 0:
        return
    budget = 4 * m + 64  # insertion moves allowed before a full radix sort
    for i in range(1, m):
        if sk[i - 1] <= sk[i]:
            continue
        k, p = sk[i], sp[i]
        j = i - 1
        while j >= 0 and sk[j] > k:
            sk[j + 1], sp[j + 1] = sk[j], sp[j]
            j -= 1
            budget -= 1
        sk[j + 1], sp[j + 1] = k, p
        if budget < 0:
            sk[:m] = keys[:m]
            sp[:m] = pay[:m]
            _radix(sk, sp, m, keys, pay, counts)  # keys/pay as scratch: sorted result in sk/sp
            return


@njit(nogil=True, cache=True)
def count_hist(values, s, e, hist) -> int:  # noqa: ANN001
    """Add the row's values to ``hist`` (whole counts below ``len(hist) - 1``); the largest
    count seen, or -1 when a value is not such a count (``hist`` is then left dirty up to
    ``len(hist) - 1``: clear it all)."""
    n = len(hist) - 1
    top, ok = 0, True
    for j in range(s, e):
        v = values[j]
        inside = (v >= 0) & (v < n)
        i = np.int64(v) if inside else n
        ok &= inside & (i == v)
        hist[i] += 1
        top = max(top, i)
    return top if ok else -1
