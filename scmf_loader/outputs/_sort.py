"""Numba building blocks of the compiled kernels: value keys, a stable small-array sort,
the seeded hash of random truncation and the per-cell load (imported only with numba).

Keys are ``uint64``: a float maps to a key whose unsigned order is the float's order
(``-0.0`` first folded into ``+0.0``), so one integer sort serves every dtype, and a
descending order is the ascending order of the complemented key. The sort is a stable
bucket sort for the ~10-10,000 entries of one cell: one counting pass on the top bits of
``key - min``, then insertion sort inside the (nearly always tiny) buckets; a bucket that
is large and not all-equal falls back to a merge sort. Stable throughout, so equal keys keep
their positions' order (ties to the lower gene id).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_SIGN = np.uint64(1) << np.uint64(63)
_SMALL_BUCKET = 24


@njit(nogil=True, cache=True)
def value_keys(values: np.ndarray, m: int, keys: np.ndarray, descending: bool) -> None:
    """``keys[:m]``: the ``uint64`` keys of ``values[:m]`` (float64 holding the compute-dtype
    values exactly, ``-0.0`` already folded into ``+0.0``), complemented for a descending order."""
    bits = values.view(np.uint64)
    for i in range(m):
        b = bits[i]
        k = ~b if b & _SIGN else b | _SIGN
        keys[i] = ~k if descending else k


@njit(nogil=True, cache=True, inline="always")
def splitmix(seed: np.uint64, cell: int, pos: int) -> np.uint64:
    """A 64-bit hash of ``(seed, cell, position)``: the random truncation key (splitmix64)."""
    z = seed + (np.uint64(cell) << np.uint64(32)) + np.uint64(pos) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(nogil=True, cache=True)
def _bit_length(x: np.uint64) -> int:
    n = 0
    while x:
        x = x >> np.uint64(1)
        n += 1
    return n


@njit(nogil=True, cache=True)
def _sorted(skeys: np.ndarray, start: int, end: int) -> bool:
    ok = True
    for i in range(start + 1, end):
        ok &= skeys[i - 1] <= skeys[i]
    return ok


@njit(nogil=True, cache=True)
def _finish_buckets(skeys: np.ndarray, order: np.ndarray, counts: np.ndarray, n_buckets: int) -> None:
    """Sort each bucket ``[counts[b-1], counts[b])`` in place, stably."""
    start = 0
    for b in range(n_buckets):
        end = counts[b]
        if end - start > _SMALL_BUCKET:
            if not _sorted(skeys, start, end):
                sub = np.argsort(skeys[start:end], kind="mergesort")
                ks, os = skeys[start:end][sub], order[start:end][sub]
                skeys[start:end] = ks
                order[start:end] = os
        elif end - start > 1:
            for i in range(start + 1, end):
                k, o = skeys[i], order[i]
                j = i - 1
                while j >= start and skeys[j] > k:
                    skeys[j + 1] = skeys[j]
                    order[j + 1] = order[j]
                    j -= 1
                skeys[j + 1] = k
                order[j + 1] = o
        start = end


@njit(nogil=True, cache=True)
def stable_sort(keys: np.ndarray, m: int, order: np.ndarray, skeys: np.ndarray, counts: np.ndarray) -> None:
    """``order[:m]``: the positions ``0..m-1`` sorted by ``keys[:m]`` ascending, ties in
    position order; ``skeys[:m]`` the sorted keys. ``counts`` has room for ``2**16 + 1``."""
    if m == 0:
        return
    lo, hi = keys[0], keys[0]
    for i in range(1, m):
        k = keys[i]
        lo = min(lo, k)
        hi = max(hi, k)
    if lo == hi:
        for i in range(m):
            order[i] = i
            skeys[i] = lo
        return
    bits = min(max(_bit_length(np.uint64(m)), 4), 16)
    n_buckets = 1 << bits
    shift = np.uint64(max(_bit_length(hi - lo) - bits, 0))
    counts[: n_buckets + 1] = 0
    for i in range(m):
        counts[np.int64((keys[i] - lo) >> shift) + 1] += 1
    for b in range(n_buckets):
        counts[b + 1] += counts[b]
    for i in range(m):
        b = np.int64((keys[i] - lo) >> shift)
        q = counts[b]
        counts[b] = q + 1
        skeys[q] = keys[i]
        order[q] = i
    if shift:  # otherwise every bucket holds one key value: already sorted and stable
        _finish_buckets(skeys, order, counts, n_buckets)


@njit(nogil=True, cache=True)
def threshold(keys: np.ndarray, m: int, k: int, counts: np.ndarray, tmp: np.ndarray) -> tuple[np.uint64, int]:
    """``(t, below)``: ``t`` the ``k``-th smallest of ``keys[:m]`` (``1 <= k < m``) and
    ``below`` how many keys are smaller than it (radix select: one counting pass over the
    top bits, then a partition of the one bucket holding ``t``)."""
    lo, hi = keys[0], keys[0]
    for i in range(1, m):
        lo = min(lo, keys[i])
        hi = max(hi, keys[i])
    if lo == hi:
        return lo, 0
    n_hi = 0
    for i in range(m):
        n_hi += keys[i] == hi
    if m - n_hi < k:  # common when truncating counts: t is the largest key (the lowest value)
        return hi, m - n_hi
    bits = min(max(_bit_length(np.uint64(m)) - 2, 4), 15)
    shift = np.uint64(max(_bit_length(hi - lo) - bits, 0))
    nb = 1 << bits
    counts[: 2 * nb] = 0
    for i in range(0, m - 1, 2):  # two tables: no chain of increments through one counter
        counts[np.int64((keys[i] - lo) >> shift)] += 1
        counts[nb + np.int64((keys[i + 1] - lo) >> shift)] += 1
    if m % 2:
        counts[np.int64((keys[m - 1] - lo) >> shift)] += 1
    below, b = 0, 0
    while below + counts[b] + counts[nb + b] < k:
        below += counts[b] + counts[nb + b]
        b += 1
    if shift == 0:  # one key value per bucket
        return lo + np.uint64(b), below
    t = 0
    for i in range(m):  # branch-free gather of bucket b
        tmp[t] = keys[i]
        t += np.int64((keys[i] - lo) >> shift) == b
    first, pure = tmp[0], True
    for i in range(1, t):
        pure &= tmp[i] == first
    if pure:  # common with counts: the bucket holds one value
        return first, below
    key = _select(tmp, t, k - below - 1)
    for i in range(t):
        below += tmp[i] < key
    return key, below


@njit(nogil=True, cache=True)
def _select(a: np.ndarray, n: int, r: int) -> np.uint64:
    """The ``r``-th smallest of ``a[:n]`` (reordered): quickselect with Hoare's partition,
    which stays linear when most keys are equal."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        p = max(min(a[lo], a[mid]), min(max(a[lo], a[mid]), a[hi]))
        i, j = lo, hi
        while i <= j:
            while a[i] < p:
                i += 1
            while a[j] > p:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if r <= j:
            hi = j
        elif r >= i:
            lo = i
        else:
            break
    return a[r]
