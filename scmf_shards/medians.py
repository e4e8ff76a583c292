"""Per-gene non-zero medians, the divisors of the ``rank`` output (Geneformer's rank-value
encoding), computed from one read of every value.

**What the median is over.** The values a shard stores: after alignment to the vocabulary,
after baked preprocessing if any, in the stored ``--dtype``, stored zeros left out. Every
cell of the dataset counts once. For each gene the median of its non-zero values; for an
even count the mean of the two middle values (numpy's convention, computed in float64,
stored as float32). A gene without any non-zero value (and every special token) gets NaN;
the ``rank`` kernels leave out genes whose median is not a positive finite number.

**How.** Every read chunk is summarised by a :class:`NonzeroHistogram`: per gene, its
distinct keys with their counts (CSR by gene, keys sorted). Histograms are merged by adding
counts, which is exact integer arithmetic: the result does not depend on the order of the
merges, the number of workers or the chunking. Keys come in three kinds, chosen from the
data alone:

- ``int``: every value is an integer (counts, in any dtype): the key is the value; exact.
- ``float``: some value is not an integer but the dataset holds at most
  :data:`EXACT_LIMIT` non-zeros: the key is the value itself (its float64 bits, order kept);
  exact.
- ``bin``: otherwise, a streaming approximation: the key is the top 16 bits of the value as
  float32 (sign, exponent and 7 mantissa bits), a bin ``[lo, hi)`` with ``hi / lo - 1 <=
  2**-7`` (0.78%). The value at a rank is interpolated linearly between ``lo`` and ``hi`` by
  its position among the bin's values, so it lies in the same bin as the true value: the
  relative error of each middle value is below 0.78% (for float32-normal magnitudes,
  ``>= 2**-126``). Memory: at most 128 keys per octave of each gene's value range.

A dataset is ``int`` when every value is an integer, else ``float`` when it holds at most
``EXACT_LIMIT`` non-zeros, else ``bin``: the same rule whatever the chunking, since a chunk
is never larger than the dataset.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from scmf_loader.errors import InvalidInputError, ShardCorruptError

__all__ = [
    "BIN_BITS",
    "EXACT_LIMIT",
    "KINDS",
    "VAR_COLUMN",
    "NonzeroHistogram",
    "chunk_histogram",
    "load_medians",
    "merge_histograms",
    "read_dataset_medians",
    "save_medians",
]

#: the shard's var column holding the medians
VAR_COLUMN = "nonzero_median"
#: a dataset with at most this many non-zeros gets exact medians whatever its values (about
#: 128 MB of keys and counts at most)
EXACT_LIMIT = 1 << 23
#: mantissa bits kept by a ``bin`` key: bins are at most ``2**-BIN_BITS`` wide, relatively
BIN_BITS = 7
#: key kinds, in order of precedence when merging
KINDS = ("int", "float", "bin")
_INT, _FLOAT, _BIN = 0, 1, 2
_EXACT_INT_MAX = 2.0**53  # integers beyond this are not all exact in float64
_SUB = 1 << BIN_BITS  # bins per octave
_SMALL = 64  # integer values below this are counted in a dense (gene, value) table


@njit(cache=True, nogil=True)
def _bin_key(v):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    """The ``bin`` key of non-zero ``v``: the top 16 bits of float32 |v| as a number
    (``biased exponent * 2**BIN_BITS + top mantissa bits``), ``-key - 1`` below 0."""
    a = np.float64(np.float32(abs(v)))
    m, e = math.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    if e + 126 >= 1:  # normal: biased exponent e + 126
        k = (e + 126) * _SUB + math.floor((2.0 * m - 1.0) * _SUB)
    else:  # subnormal: float32 bits >> (23 - BIN_BITS)
        k = math.floor(math.ldexp(a, 126) * _SUB)
    return np.float64(k) if v > 0 else np.float64(-k - 1)


@njit(cache=True, nogil=True)
def _key(v, kind):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    """The key of non-zero ``v``: the value itself (``int``, ``float``) or its bin."""
    if kind == _BIN:
        return _bin_key(v)
    return np.float64(v)


@njit(cache=True, nogil=True)
def _bin_low(mag):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    """The lower bound of the magnitudes in bin ``mag`` (a ``bin`` key >= 0)."""
    e, sub = mag // _SUB, mag % _SUB
    if e == 0:
        return math.ldexp(sub / _SUB, -126)
    return math.ldexp(1.0 + sub / _SUB, int(e) - 127)


@njit(cache=True, nogil=True)
def _decode(key, kind):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    """The value of an exact key; a ``bin`` key's value is interpolated (:func:`_value_at`)."""
    if kind != _BIN:
        return key
    mag = key if key >= 0 else -key - 1
    low = _bin_low(mag)
    return low if key >= 0 else -low


@njit(cache=True, nogil=True)
def _reduce_segment(seg, out_keys, out_counts, w, table):  # noqa: ANN001, ANN202  # pragma: no cover
    """Distinct keys of ``seg`` with their counts, appended at ``w``; returns the new ``w``.
    A narrow range is counted in ``table``, a wide one sorted."""
    n = seg.size
    if n == 0:
        return w
    lo, hi = seg.min(), seg.max()
    if hi - lo < table.size:  # integer keys (int, bin) in a narrow range: count them
        span = int(hi - lo) + 1
        table[:span] = 0
        for x in seg:
            table[int(x - lo)] += 1
        for j in range(span):
            if table[j]:
                out_keys[w] = lo + j
                out_counts[w] = table[j]
                w += 1
        return w
    seg.sort()
    prev = seg[0]
    c = 0
    for x in seg:
        if x != prev:
            out_keys[w] = prev
            out_counts[w] = c
            w += 1
            prev, c = x, 0
        c += 1
    out_keys[w] = prev
    out_counts[w] = c
    return w + 1


@njit(cache=True, nogil=True)
def _histogram(indices, data, n_genes, kind):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    """Per gene, the distinct keys of its non-zero values and their counts (CSR by gene)."""
    start = np.zeros(n_genes + 1, dtype=np.int64)
    for i in range(data.size):
        if data[i] != 0:
            start[indices[i] + 1] += 1
    longest = 0
    for g in range(n_genes):
        longest = max(longest, start[g + 1])
        start[g + 1] += start[g]
    keys = np.empty(start[n_genes], dtype=np.float64)
    pos = start[:-1].copy()
    for i in range(data.size):
        if data[i] != 0:
            g = indices[i]
            keys[pos[g]] = _key(data[i], kind)
            pos[g] += 1
    table = np.empty(4 * longest + 64, dtype=np.int64)
    out_ptr = np.zeros(n_genes + 1, dtype=np.int64)
    out_keys = np.empty(keys.size, dtype=np.float64)
    out_counts = np.empty(keys.size, dtype=np.int64)
    if kind == _FLOAT:  # keys are not integers: sort every gene
        table = table[:0]
    w = 0
    for g in range(n_genes):
        w = _reduce_segment(keys[start[g] : start[g + 1]], out_keys, out_counts, w, table)
        out_ptr[g + 1] = w
    return out_ptr, out_keys[:w].copy(), out_counts[:w].copy()


@njit(cache=True, nogil=True)
def _small_counts(indices, data, table):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    """Integer values ``1 <= v < width`` counted in ``table[v, gene]`` (one pass, no grouping;
    value-major, so the few planes of small counts stay in cache as a row's genes ascend).
    Returns ``(rest, nnz)``: how many other non-zeros there are (-1 at the first value that is
    not an integer below 2**53: the table is then incomplete) and how many non-zeros (-1 at
    the first gene id outside the table)."""
    width = table.shape[0]
    n_genes = table.shape[1]
    rest = 0
    nnz = 0
    for i in range(data.size):
        v = data[i]
        if v == 0:
            continue
        g = indices[i]
        if g < 0 or g >= n_genes:
            return rest, -1
        nnz += 1
        if v > 0 and v < width:
            k = np.int64(v)
            if k != v:
                return -1, nnz
            table[k, g] += 1
        elif v != np.floor(v) or abs(np.float64(v)) >= _EXACT_INT_MAX:
            return -1, nnz
        else:
            rest += 1
    return rest, nnz


@njit(cache=True, nogil=True)
def _large_values(indices, data, width, n_rest):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    """The entries :func:`_small_counts` left out (negative, or at least ``width``)."""
    out_i = np.empty(n_rest, dtype=indices.dtype)
    out_d = np.empty(n_rest, dtype=data.dtype)
    w = 0
    for i in range(data.size):
        v = data[i]
        if v != 0 and not (v > 0 and v < width):
            out_i[w], out_d[w] = indices[i], v
            w += 1
    return out_i, out_d


def _int_histogram(indices: np.ndarray, data: np.ndarray, n_genes: int) -> tuple[int, tuple[np.ndarray, ...]] | None:
    """The number of non-zeros and :func:`_histogram` of integer values, small counts through
    a dense table; None when some value is not an integer."""
    table = np.zeros((_SMALL, n_genes), dtype=np.int32 if data.size < 2**31 else np.int64)
    n_rest, nnz = _small_counts(indices, data, table)
    if nnz < 0:
        raise InvalidInputError(f"gene ids outside [0, {n_genes})")
    if n_rest < 0:
        return None
    table = np.ascontiguousarray(table.T)  # (gene, value)
    genes, values = np.nonzero(table)  # row-major: by gene, then value
    ptr = np.zeros(n_genes + 1, dtype=np.int64)
    np.cumsum(np.bincount(genes, minlength=n_genes), out=ptr[1:])
    small = (ptr, values.astype(np.float64), table[genes, values].astype(np.int64))
    if n_rest == 0:
        return nnz, small
    rest = _histogram(*_large_values(indices, data, _SMALL, n_rest), n_genes, _INT)
    return nnz, _merge(*small, *rest)


@njit(cache=True, nogil=True)
def _convert(indptr, keys, counts, kind, to):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    """Keys of ``kind`` as keys of the coarser kind ``to`` (a monotone map: the order stays,
    equal neighbours merge)."""
    out_ptr = np.zeros(indptr.size, dtype=np.int64)
    out_keys = np.empty(keys.size, dtype=np.float64)
    out_counts = np.empty(keys.size, dtype=np.int64)
    w = 0
    for g in range(indptr.size - 1):
        first = w
        for p in range(indptr[g], indptr[g + 1]):
            k = _key(_decode(keys[p], kind), to)
            if w > first and out_keys[w - 1] == k:
                out_counts[w - 1] += counts[p]
            else:
                out_keys[w] = k
                out_counts[w] = counts[p]
                w += 1
        out_ptr[g + 1] = w
    return out_ptr, out_keys[:w].copy(), out_counts[:w].copy()


@njit(cache=True, nogil=True)
def _merge(ap, ak, ac, bp, bk, bc):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    """Two histograms of one kind, added (per gene a merge of two sorted key lists)."""
    out_ptr = np.zeros(ap.size, dtype=np.int64)
    out_keys = np.empty(ak.size + bk.size, dtype=np.float64)
    out_counts = np.empty(ak.size + bk.size, dtype=np.int64)
    w = 0
    for g in range(ap.size - 1):
        i, ie, j, je = ap[g], ap[g + 1], bp[g], bp[g + 1]
        while i < ie or j < je:
            if j >= je or (i < ie and ak[i] < bk[j]):
                out_keys[w], out_counts[w] = ak[i], ac[i]
                i += 1
            elif i >= ie or bk[j] < ak[i]:
                out_keys[w], out_counts[w] = bk[j], bc[j]
                j += 1
            else:
                out_keys[w], out_counts[w] = ak[i], ac[i] + bc[j]
                i += 1
                j += 1
            w += 1
        out_ptr[g + 1] = w
    return out_ptr, out_keys[:w].copy(), out_counts[:w].copy()


@njit(cache=True, nogil=True)
def _value_at(keys, counts, lo, hi, rank, kind):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    """The value of 0-based ``rank`` among one gene's values (``bin``: interpolated)."""
    below = 0
    for p in range(lo, hi):
        c = counts[p]
        if rank < below + c:
            if kind != _BIN:
                return _decode(keys[p], kind)
            k = keys[p]
            mag = k if k >= 0 else -k - 1
            low, high = _bin_low(mag), _bin_low(mag + 1)
            t = (rank - below + 0.5) / c
            return low + (high - low) * t if k >= 0 else -(high - (high - low) * t)
        below += c
    return np.nan


@njit(cache=True, nogil=True)
def _medians(indptr, keys, counts, kind):  # noqa: ANN001, ANN202  # pragma: no cover - compiled
    n_genes = indptr.size - 1
    out = np.empty(n_genes, dtype=np.float32)
    for g in range(n_genes):
        lo, hi = indptr[g], indptr[g + 1]
        n = counts[lo:hi].sum()
        if n == 0:
            out[g] = np.nan
            continue
        a = _value_at(keys, counts, lo, hi, (n - 1) // 2, kind)
        b = _value_at(keys, counts, lo, hi, n // 2, kind)
        out[g] = np.float32((a + b) / 2.0)
    return out


@dataclass(frozen=True)
class NonzeroHistogram:
    """Per gene, the distinct keys of its non-zero values and how often each occurs: CSR by
    gene (``indptr``, ``n_genes + 1``), keys sorted within a gene. ``kind`` is one of
    :data:`KINDS` (see the module docstring); ``nnz`` the number of values counted."""

    kind: str
    nnz: int
    indptr: np.ndarray
    keys: np.ndarray
    counts: np.ndarray

    @property
    def n_genes(self) -> int:
        """Vocabulary size."""
        return len(self.indptr) - 1

    @classmethod
    def empty(cls, n_genes: int) -> NonzeroHistogram:
        """The histogram of no values."""
        return cls("int", 0, np.zeros(n_genes + 1, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64))

    def as_kind(self, kind: str) -> NonzeroHistogram:
        """The same counts with keys of ``kind`` (only towards coarser kinds: ``int`` ->
        ``float`` -> ``bin``)."""
        if KINDS.index(kind) < KINDS.index(self.kind):
            raise InvalidInputError(f"cannot refine a {self.kind!r} histogram into {kind!r}")
        if kind == self.kind:
            return self
        ptr, keys, counts = _convert(self.indptr, self.keys, self.counts, KINDS.index(self.kind),
                                     KINDS.index(kind))
        return NonzeroHistogram(kind, self.nnz, ptr, keys, counts)

    def merge(self, other: NonzeroHistogram, exact_limit: int = EXACT_LIMIT) -> NonzeroHistogram:
        """The histogram of both sets of values (counts added, exactly). The kind is the
        coarser of the two, and ``bin`` when a ``float`` result would count more than
        ``exact_limit`` values."""
        if other.n_genes != self.n_genes:
            raise InvalidInputError(f"histograms over {self.n_genes} and {other.n_genes} genes cannot merge")
        nnz = self.nnz + other.nnz
        kind = KINDS[max(KINDS.index(self.kind), KINDS.index(other.kind))]
        if kind == "float" and nnz > exact_limit:
            kind = "bin"
        a, b = self.as_kind(kind), other.as_kind(kind)
        ptr, keys, counts = _merge(a.indptr, a.keys, a.counts, b.indptr, b.keys, b.counts)
        return NonzeroHistogram(kind, nnz, ptr, keys, counts)

    def medians(self) -> np.ndarray:
        """Each gene's non-zero median (float32; NaN for a gene without non-zeros)."""
        return _medians(self.indptr, self.keys, self.counts, KINDS.index(self.kind))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path`` (``.npz``) under a temporary name, then rename."""
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}.npz")
        np.savez(tmp, kind=np.array(self.kind), nnz=np.array(self.nnz, dtype=np.int64),
                 indptr=self.indptr, keys=self._stored_keys(), counts=_narrow(self.counts))
        os.replace(tmp, final)

    def _stored_keys(self) -> np.ndarray:
        """The keys in the narrowest exact dtype (bin keys fit int16; small integers int32)."""
        if self.kind == "bin":
            return self.keys.astype(np.int16)
        return _narrow(self.keys) if self.kind == "int" else self.keys

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NonzeroHistogram:
        """Read a histogram :meth:`save` wrote."""
        try:
            with np.load(path, allow_pickle=False) as z:
                kind, nnz = str(z["kind"]), int(z["nnz"])
                indptr, keys = z["indptr"].astype(np.int64), z["keys"].astype(np.float64)
                counts = z["counts"].astype(np.int64)
        except (OSError, KeyError, ValueError) as e:
            raise ShardCorruptError(f"{path}: not a readable non-zero histogram ({e})") from None
        if kind not in KINDS or indptr.size < 1 or int(indptr[-1]) != keys.size or keys.size != counts.size:
            raise ShardCorruptError(f"{path}: inconsistent non-zero histogram (kind {kind!r})")
        return cls(kind, nnz, indptr, keys, counts)


def _narrow(a: np.ndarray) -> np.ndarray:
    """Integer-valued ``a`` as int32 when every value fits, else int64."""
    fits = a.size == 0 or (int(a.min()) >= -(2**31) and int(a.max()) < 2**31)
    return a.astype(np.int32 if fits else np.int64)


def chunk_histogram(indices: np.ndarray, data: np.ndarray, n_genes: int,
                    exact_limit: int = EXACT_LIMIT) -> NonzeroHistogram:
    """The histogram of one chunk's stored values: ``indices`` the vocabulary ids and
    ``data`` the values exactly as stored (stored dtype; zeros are skipped). The kind:
    ``int`` when every value is an integer, else ``float`` up to ``exact_limit`` non-zeros,
    else ``bin``."""
    data = np.ascontiguousarray(data)
    indices = np.ascontiguousarray(indices)
    if indices.shape != data.shape:
        raise InvalidInputError(f"indices {indices.shape} and data {data.shape} differ in shape")
    if data.dtype.kind not in "iuf":
        raise InvalidInputError(f"values of dtype {data.dtype} have no median")
    exact = _int_histogram(indices, data, int(n_genes))  # counts: one pass, no grouping
    if exact is not None:
        return NonzeroHistogram("int", exact[0], *exact[1])
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n_genes):
        raise InvalidInputError(f"gene ids outside [0, {n_genes})")
    nnz = int(np.count_nonzero(data))
    kind = "float" if nnz <= exact_limit else "bin"
    ptr, keys, counts = _histogram(indices, data, int(n_genes), KINDS.index(kind))
    return NonzeroHistogram(kind, nnz, ptr, keys, counts)


def merge_histograms(histograms: Iterable[NonzeroHistogram], n_genes: int,
                     exact_limit: int = EXACT_LIMIT) -> NonzeroHistogram:
    """All ``histograms`` merged, one at a time (memory: the running result and one more);
    the result does not depend on their order."""
    total = NonzeroHistogram.empty(n_genes)
    for h in histograms:
        total = total.merge(h, exact_limit)
    return total


def save_medians(path: str | os.PathLike[str], medians: np.ndarray) -> None:
    """Write the medians (float32 ``.npy``) under a temporary name, then rename."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}.npy")
    np.save(tmp, np.asarray(medians, dtype=np.float32))
    os.replace(tmp, final)


def load_medians(path: str | os.PathLike[str], n_genes: int) -> np.ndarray:
    """The medians :func:`save_medians` wrote, checked to hold one float32 per token."""
    try:
        med = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ShardCorruptError(f"{path}: the non-zero medians cannot be read ({e}); re-run the "
                                "conversion") from None
    if med.dtype != np.float32 or med.shape != (n_genes,):
        raise ShardCorruptError(f"{path}: {med.dtype} {med.shape} non-zero medians, expected "
                                f"float32 ({n_genes},); re-run the conversion")
    return med


def read_dataset_medians(dataset_dir: str | os.PathLike[str], shard_path: str | None,
                         n_genes: int) -> np.ndarray | None:
    """A dataset's stored ``var/nonzero_median`` (from the shard at ``shard_path``, relative
    to ``dataset_dir``; every shard holds the same array), or None when it has none (a
    dataset written before the column existed, or without shards)."""
    if shard_path is None:
        return None
    import zarr

    try:
        med = np.asarray(zarr.open_group(str(Path(dataset_dir) / shard_path), mode="r")["var"][VAR_COLUMN][...])
    except (KeyError, FileNotFoundError):
        return None
    if med.shape != (n_genes,):
        raise ShardCorruptError(f"{Path(dataset_dir) / shard_path}: var/{VAR_COLUMN} holds {med.shape} "
                                f"values, expected ({n_genes},)")
    return med.astype(np.float32, copy=False)
