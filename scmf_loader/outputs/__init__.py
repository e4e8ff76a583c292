"""Model-ready outputs of a CSR batch, written by kernels into preallocated arrays.

Every function takes a batch's CSR arrays (``indptr``, ``indices``, ``values``; numpy
arrays or anything ``np.asarray`` takes) and ``n_genes``, and returns numpy arrays:

* :func:`padded` - ``gene_indices`` (int64), ``expression`` (float32), ``attention_mask``
  (bool), each ``(cells, L)``; genes in vocabulary order; a cell longer than ``max_genes``
  keeps its largest values (``truncation="top"``, ties to the lower gene id) or a random
  subset (``"random"``: the ``max_genes`` entries with the largest splitmix64 hash of
  ``(seed, cell, position)``; the same subset for the same seed on every backend).
* :func:`dense` - ``(cells, n_genes)`` (or ``(cells, len(genes))`` with a subset).
* :func:`rank` - Geneformer's rank-value encoding: ``gene_indices`` and ``attention_mask``;
  each non-zero value divided by its gene's non-zero median (``medians``, float32, one per
  token, computed in the compute dtype), genes ordered by that ratio descending, ties to
  the lower token id, the first ``max_genes`` kept. Stored zeros, and genes whose median is
  not a positive finite number, are left out.
* :func:`binned` - scGPT's value binning: the :func:`padded` layout with ``expression`` the
  int64 bin of each value. Per cell, ``edges = np.quantile(nz, np.linspace(0, 1, n_bins - 1))``
  over its non-zero values ``nz`` (numpy's "linear" method, numpy's arithmetic exactly), and
  a non-zero value's bin is ``np.digitize(value, edges)`` (the number of edges <= value),
  in ``1 .. n_bins - 1``; stored zeros and padding are 0. This is scGPT's ``_digitize`` with
  ``side="one"``: scGPT's default ``"both"`` draws a random bin between the left and right
  digitisation for values equal to several edges; here such a value always takes the
  highest (deterministic). Bins are computed over all of a cell's entries, before
  truncation to ``max_genes`` (which follows :func:`padded`'s rule on the values).

``L`` is ``max_genes`` (plus one with ``add_cls``, the ``<cls>`` id 3 first, expression 0),
else the longest kept cell. Padding is the ``<pad>`` id 0, expression 0, mask False.

**Fused preprocessing** (every function): ``divisors`` (one per cell: library size /
target_sum, or a scran size factor, as :meth:`PreprocessingPipeline.divisors_for` gives
them), ``log1p`` and ``genes`` (token ids to keep, e.g. an HVG subset; :func:`dense`
returns their columns in that order, the token outputs keep token ids) are applied while
the values are read, so each value is read and written once. The arithmetic is
:class:`~scmf_loader.preprocess.PreprocessingPipeline`'s: the compute dtype is float64 for
float64 values, else float32; ``value / divisor``, then ``log1p``. Truncation, ranks and
bins use the preprocessed values. ``log1p`` is numpy's own (the compiled one differs from
it in the last bit for some inputs): the compiled kernels look whole counts up in numpy's
:func:`log_tables` and hand any other row back to be redone from numpy's values.

**Backends**: ``"numba"`` (compiled, ``nogil``; used when numba imports, the faster one:
``scripts/bench_outputs.py``) and ``"numpy"`` (vectorised); ``backend=None`` picks (or
``$SCMF_OUTPUT_BACKEND``). Malformed arrays (``indptr`` negative, decreasing or past the
entries, gene ids outside ``[0, n_genes)``) raise :class:`~scmf_loader.errors.ScmfError`
and are never read out of bounds.

**Threads** (compiled backend): ``threads`` (every function; default: :func:`set_threads`,
``$SCMF_OUTPUT_THREADS``, else 2 in the main thread of the main process when a core is
spare, 1 in loader workers, other threads, or on a busy machine) cuts a batch's cells into
parts of about equal non-zeros (the caller's a tenth larger) that the ``nogil`` kernels run
at once, each writing its own rows: the same arrays as one thread, bit for bit (random truncation hashes the batch's cell
index). See :mod:`scmf_loader.outputs._threads`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scmf_loader import buffers
from scmf_loader.errors import ConfigurationError, ScmfError
from scmf_loader.outputs import _common as common
from scmf_loader.outputs import _threads, vectorised
from scmf_loader.outputs._common import BACKENDS, numba_available, resolve_backend
from scmf_loader.outputs._threads import set_threads

__all__ = ["BACKENDS", "LOG_TABLE", "binned", "dense", "log_tables", "numba_available", "padded", "preprocess", "rank",
           "resolve_backend",
           "set_threads"]

_EMPTY_F64 = np.zeros(0, np.float64)
_EMPTY_MAP = np.zeros(0, np.int32)
_EMPTY_BITS = np.zeros(0, np.int32)
_BAD_INDPTR = 1  # compiled.BAD_INDPTR (that module imports numba)
#: whole counts ``0 .. LOG_TABLE - 1`` of each cell are preprocessed by numpy up front when
#: ``log1p`` is fused (:func:`log_tables`); rows with larger or other values take numpy's
#: numbers after the kernel. 128 covers the largest count of 99.9% of the benchmark's cells
#: and costs ~0.16 us per cell (numpy's float32 ``log1p``, 0.46 ns a value here).
LOG_TABLE = 128
_NO_TABLE = {np.dtype(np.float32): np.zeros((1, 0), np.float32), np.dtype(np.float64): np.zeros((1, 0), np.float64)}


def log_tables(divisors: np.ndarray | None, n: int, f32: bool, width: int = LOG_TABLE) -> np.ndarray:
    """``(cells, width)`` (one row for every cell without divisors): whole count ``i`` of cell
    ``c`` divided by its divisor and ``log1p``'d by numpy in the compute dtype, -0.0 folded
    into 0.0 - :func:`~scmf_loader.preprocess.transform.transform_values`' numbers exactly
    (numpy's ``log1p`` differs from the compiled one in the last bit for some inputs, so the
    kernels look counts up here instead of computing them)."""
    dt = np.float32 if f32 else np.float64
    counts = np.arange(width, dtype=dt)
    if divisors is None or n == 0:
        tab = counts[None, :].copy()
    else:
        tab = buffers.empty((n, width), dt)
        np.divide(counts[None, :], divisors.astype(dt, copy=False)[:, None], out=tab)
    np.log1p(tab, out=tab)
    tab += dt(0.0)
    return tab


def _runs(flag: np.ndarray) -> list[tuple[int, int]]:
    """``[c0, c1)`` ranges of consecutive flagged cells."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flag.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _exact_values(indptr: np.ndarray, values: np.ndarray, divisors: np.ndarray | None, f32: bool,
                  runs: list[tuple[int, int]], out: np.ndarray, base: int = 0) -> None:
    """``out[indptr[c0] - base : indptr[c1] - base]`` = the cells' values through the fused
    preprocessing with numpy (``transform_values``' arithmetic: divide, ``log1p``; -0.0
    folded into 0.0), for each run ``(c0, c1)``."""
    dt = np.float32 if f32 else np.float64
    for c0, c1 in runs:
        s, e = int(indptr[c0]), int(indptr[c1])
        dst = out[s - base : e - base]
        np.copyto(dst, values[s:e], casting="unsafe")
        if divisors is not None:
            np.divide(dst, np.repeat(divisors[c0:c1].astype(dt, copy=False), np.diff(indptr[c0 : c1 + 1])), out=dst)
        np.log1p(dst, out=dst)
        dst += dt(0.0)


class _Batch:
    """Checked arguments shared by the four outputs."""

    def __init__(self, indptr: Any, indices: Any, values: Any, n_genes: int, divisors: Any, log1p: bool,
                 genes: Any, backend: str | None) -> None:
        self.backend = resolve_backend(backend)
        self.n_genes = int(n_genes)
        self.indptr, self.indices, values = common.check_batch(
            indptr, indices, values, self.n_genes, full=self.backend == "numpy")
        if values.dtype not in common.NATIVE_VALUES:
            values = values.astype(np.float32)
        self.values = values
        self.f32 = values.dtype != np.float64
        self.n = len(self.indptr) - 1
        self.divisors = common.check_divisors(divisors, self.n, self.f32)
        self.log1p = bool(log1p)
        self.colmap = common.colmap_of(genes, self.n_genes)
        self.ltab = None

    def entries(self, keep: np.ndarray | None = None) -> vectorised.Entries:
        return vectorised.entries(self.indptr, self.indices, self.values, self.divisors, self.log1p, self.f32,
                                  self.colmap, keep)


    def width(self, max_genes: int | None, keep: np.ndarray | None = None) -> int:
        """``max_genes``, else the longest cell once the subset and ``keep`` are applied."""
        if max_genes is not None:
            return int(max_genes)
        if self.n == 0:
            return 0
        if self.colmap is None and keep is None:
            return int(np.diff(self.indptr).max())
        if self.backend != "numpy":  # the counts below index: check everything first
            common.check_batch(self.indptr, self.indices, self.values, self.n_genes)
        return int(np.diff(self.entries(keep).indptr).max())

    def run(self, kernel: Any, args_for: Any, *, outs: tuple[np.ndarray, ...], threads: int | None,
            first: bool = False) -> None:
        """``kernel`` over the batch's cells, cut into parts run on threads (:mod:`._threads`):
        each part gets its rows of ``outs`` (and its first cell's index when ``first``);
        ``args_for(values)``: the kernel's own arguments for these values. With ``log1p``
        the kernels look whole counts up in numpy's :func:`log_tables` and flag any other
        row; those rows are then run again on their values preprocessed by numpy (no
        preprocessing left for the kernel), so every number is numpy's."""
        div = _EMPTY_F64 if self.divisors is None else self.divisors.astype(np.float64)
        colmap = _EMPTY_MAP if self.colmap is None else self.colmap
        dt = np.dtype(np.float32 if self.f32 else np.float64)
        ltab = log_tables(self.divisors, self.n, self.f32) if self.log1p else _NO_TABLE[dt]
        flag = np.zeros(self.n, np.int8)
        ranges = _threads.parts(self.indptr, _threads.resolve_threads(threads))
        args = args_for(self.values)

        def part(c0: int, c1: int) -> tuple[int, int]:
            return kernel(self.indptr[c0 : c1 + 1], self.indices, self.values, self.n_genes, div[c0:c1] if len(div) else div,
                          self.log1p, self.f32, colmap, ltab[c0:c1] if len(ltab) > 1 else ltab, *args,
                          *((c0,) if first else ()), *(o[c0:c1] for o in outs), flag[c0:c1])

        self._raise(ranges, _threads.run_parts(part, ranges))
        if not self.log1p or not flag.any():
            return
        runs = _runs(flag)
        exact = buffers.empty(len(self.values), dt)  # only the flagged rows' entries are written and read
        _exact_values(self.indptr, self.values, self.divisors, self.f32, runs, exact)
        args = args_for(exact)
        for c0, c1 in runs:
            result = kernel(self.indptr[c0 : c1 + 1], self.indices, exact, self.n_genes, _EMPTY_F64, False, self.f32, colmap,
                            _NO_TABLE[dt], *args, *((c0,) if first else ()), *(o[c0:c1] for o in outs), flag[c0:c1])
            self._raise([(c0, c1)], [result])

    def _raise(self, ranges: list[tuple[int, int]], results: list[tuple[int, int]]) -> None:
        for (c0, _), (code, where) in zip(ranges, results, strict=True):
            if code:
                nnz = min(len(self.indices), len(self.values))
                where = int(where) + (c0 if code == _BAD_INDPTR else 0)
                raise common.kernel_error(int(code), where, self.indptr, self.indices, nnz, self.n_genes)


def _compiled() -> Any:
    from scmf_loader.outputs import compiled

    return compiled


def _token_arrays(n: int, width: int, expr_dtype: Any) -> tuple[np.ndarray, ...]:
    gene = buffers.empty((n, width), np.int64)
    mask = buffers.empty((n, width), np.bool_)
    if expr_dtype is None:
        return gene, mask
    return gene, buffers.empty((n, width), expr_dtype), mask


def padded(indptr: Any, indices: Any, values: Any, n_genes: int, *, max_genes: int | None = None,
           add_cls: bool = True, truncation: str = "top", seed: int = 0, divisors: Any = None, log1p: bool = False,
           genes: Any = None, backend: str | None = None, threads: int | None = None) -> dict[str, np.ndarray]:
    """Padded token batch (see the module docstring)."""
    common.check_sizes(max_genes, truncation)
    b = _Batch(indptr, indices, values, n_genes, divisors, log1p, genes, backend)
    cls, random = int(bool(add_cls)), truncation == "random"
    if b.backend == "numpy":
        ent = b.entries()
        k = max_genes if max_genes is not None else (int(np.diff(ent.indptr).max()) if b.n else 0)
        return vectorised.padded(ent, k, cls, random, seed)
    k = b.width(max_genes)
    gene, expr, mask = _token_arrays(b.n, k + cls, np.float32)

    def args_for(values: np.ndarray) -> tuple[Any, ...]:
        bits = values.dtype == np.float32 and values.flags.c_contiguous
        return (values.view(np.int32) if bits else _EMPTY_BITS), k, cls, random, np.uint64(seed)

    b.run(_compiled().padded, args_for, outs=(gene, expr, mask), threads=threads, first=True)
    return {"gene_indices": gene, "expression": expr, "attention_mask": mask}


def dense(indptr: Any, indices: Any, values: Any, n_genes: int, *, dtype: Any = None, divisors: Any = None,
          log1p: bool = False, genes: Any = None, backend: str | None = None, threads: int | None = None) -> np.ndarray:
    """Dense ``(cells, n_genes)`` matrix (``(cells, len(genes))`` with a subset) of
    ``dtype`` (default: the values' dtype, or the compute dtype when preprocessing)."""
    b = _Batch(indptr, indices, values, n_genes, divisors, log1p, genes, backend)
    transform = b.divisors is not None or b.log1p
    if dtype is None:
        dtype = (np.float32 if b.f32 else np.float64) if transform else np.asarray(values).dtype
    dtype = np.dtype(dtype)
    width = b.n_genes if b.colmap is None else int((b.colmap >= 0).sum())
    if b.backend == "numpy" or dtype not in common.NATIVE_VALUES:
        if b.backend != "numpy":
            common.check_batch(b.indptr, b.indices, b.values, b.n_genes)
        if not transform and b.colmap is None:  # the stored values, untouched
            return _dense_raw(b, dtype)
        return vectorised.dense(b.entries(), width, b.colmap, dtype)
    out = buffers.empty((b.n, width), dtype)
    b.run(_compiled().dense, lambda v: (), outs=(out,), threads=threads)
    return out


def _dense_raw(b: _Batch, dtype: np.dtype) -> np.ndarray:
    out = buffers.zeros((b.n, b.n_genes), dtype)
    s, e = int(b.indptr[0]), int(b.indptr[-1])
    rows = np.repeat(np.arange(b.n, dtype=np.int64) * b.n_genes, np.diff(b.indptr))
    out.reshape(-1)[rows + b.indices[s:e]] = b.values[s:e]
    return out


def _check_medians(medians: Any, n_genes: int) -> np.ndarray:
    if medians is None:
        raise ScmfError("rank output needs the per-gene non-zero medians (var/nonzero_median); none were given")
    med = np.asarray(medians)
    if med.shape != (n_genes,):
        raise ConfigurationError(f"medians must hold one number per token ({n_genes}), got shape {med.shape}")
    return np.ascontiguousarray(med, dtype=np.float32)


_classes_cache: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []


def _median_classes(med: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(class of each token's median, the distinct valid medians ascending)`` for the count
    fast path of the rank kernel (each token's class is ``len(classes)`` when its median is
    not a positive finite number); empty arrays when there are more than
    ``_rankfast.MAX_CLASSES`` distinct medians. The last medians seen are remembered (the
    loader passes the same array every batch; a changed array is recomputed)."""
    for ref, cls_of, cmed in _classes_cache:
        if ref.shape == med.shape and np.array_equal(ref, med, equal_nan=True):
            return cls_of, cmed
    from scmf_loader.outputs._rankfast import MAX_CLASSES

    ok = (med > 0) & (med < np.inf)
    cmed = np.unique(med[ok])
    if len(cmed) > MAX_CLASSES or len(cmed) == 0:
        cls_of, cmed = _EMPTY_MAP, np.zeros(0, np.float32)
    else:
        cls_of = np.full(len(med), len(cmed), dtype=np.int32)
        cls_of[ok] = np.searchsorted(cmed, med[ok]).astype(np.int32)
    _classes_cache[:] = [(med.copy(), cls_of, cmed.astype(np.float32))]
    return _classes_cache[0][1], _classes_cache[0][2]


def rank(indptr: Any, indices: Any, values: Any, n_genes: int, medians: Any, *, max_genes: int | None = None,
         add_cls: bool = True, divisors: Any = None, log1p: bool = False, genes: Any = None,
         backend: str | None = None, threads: int | None = None) -> dict[str, np.ndarray]:
    """Rank-value token batch (see the module docstring)."""
    common.check_sizes(max_genes)
    med = _check_medians(medians, int(n_genes))
    b = _Batch(indptr, indices, values, n_genes, divisors, log1p, genes, backend)
    cls = int(bool(add_cls))
    keep = None
    if b.backend == "numpy" or max_genes is None:
        if b.backend != "numpy":
            common.check_batch(b.indptr, b.indices, b.values, b.n_genes)
        s, e = int(b.indptr[0]), int(b.indptr[-1])
        m = med[b.indices[s:e]]
        keep = (b.values[s:e] != 0) & (m > 0) & np.isfinite(m)
    if b.backend == "numpy":
        ent = b.entries(keep)
        k = max_genes if max_genes is not None else (int(np.diff(ent.indptr).max()) if b.n else 0)
        return vectorised.rank(ent, med, k, cls)
    k = b.width(max_genes, keep)
    gene, mask = _token_arrays(b.n, k + cls, None)
    cls_of, cmed = _median_classes(med)
    b.run(_compiled().rank, lambda v: (med, cls_of, cmed, k, cls), outs=(gene, mask), threads=threads)
    return {"gene_indices": gene, "attention_mask": mask}


def binned(indptr: Any, indices: Any, values: Any, n_genes: int, *, n_bins: int = 51, max_genes: int | None = None,
           add_cls: bool = True, truncation: str = "top", seed: int = 0, divisors: Any = None, log1p: bool = False,
           genes: Any = None, backend: str | None = None, threads: int | None = None) -> dict[str, np.ndarray]:
    """Binned token batch (see the module docstring)."""
    common.check_sizes(max_genes, truncation)
    if isinstance(n_bins, bool) or int(n_bins) < 2:
        raise ConfigurationError(f"n_bins must be >= 2, got {n_bins!r}")
    b = _Batch(indptr, indices, values, n_genes, divisors, log1p, genes, backend)
    cls, random = int(bool(add_cls)), truncation == "random"
    if b.backend == "numpy":
        ent = b.entries()
        k = max_genes if max_genes is not None else (int(np.diff(ent.indptr).max()) if b.n else 0)
        return vectorised.binned(ent, int(n_bins), k, cls, random, seed)
    k = b.width(max_genes)
    gene, expr, mask = _token_arrays(b.n, k + cls, np.int64)
    qs = np.linspace(0, 1, int(n_bins) - 1)
    b.run(_compiled().binned, lambda v: (qs, k, cls, random, np.uint64(seed)), outs=(gene, expr, mask), threads=threads,
          first=True)
    return {"gene_indices": gene, "expression": expr, "attention_mask": mask}


#: non-zeros per thread below which :func:`preprocess` runs in the calling thread alone: its
#: kernel costs ~0.7 ns an entry, so a part smaller than this gains less than the hand-off
#: and the other core's cache cost (measured, 100k set, idle machine: batch 256 (~530k
#: entries) 371 us in one thread, 602 us split in two; batch 1024: 1,193 / 1,273 us; batch
#: 4096: 7,673 / 6,479 us)
PREPROCESS_MIN_PART = 2 << 20


def preprocess(indptr: Any, values: Any, divisors: Any = None, log1p: bool = False,
               backend: str | None = None, threads: int | None = None) -> np.ndarray:
    """The values of a CSR batch's entries ``[indptr[0], indptr[-1])`` preprocessed, in the
    compute dtype (float64 for float64 values, else float32): ``value / divisors[cell]``,
    then ``log1p`` - :class:`~scmf_loader.preprocess.PreprocessingPipeline`'s numbers
    exactly, each value read and written once (into a reused buffer: :mod:`scmf_loader.buffers`)."""
    backend = resolve_backend(backend)
    indptr = np.asarray(indptr)
    values = np.asarray(values)
    if indptr.ndim != 1 or len(indptr) < 1 or indptr.dtype.kind not in "iu":
        raise ScmfError(f"batch indptr must be a 1-D integer array of length cells + 1, got {indptr.dtype} {indptr.shape}")
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise ScmfError(f"batch values must be a 1-D numeric array, got {values.dtype} {values.shape}")
    indptr = indptr.astype(np.int64, copy=False)
    f32 = values.dtype != np.float64
    if values.dtype not in common.NATIVE_VALUES:
        values = values.astype(np.float32)
    n = len(indptr) - 1
    div = common.check_divisors(divisors, n, f32)
    if backend == "numpy":
        common.check_batch(indptr, np.zeros(len(values), np.int32), values, 1)
        return vectorised.entries(indptr, np.zeros(len(values), np.int32), values, div, bool(log1p), f32, None).values
    out = buffers.empty(int(indptr[-1] - indptr[0]) if n else 0, np.float32 if f32 else np.float64)
    d64 = _EMPTY_F64 if div is None else div.astype(np.float64)
    ltab = log_tables(div, n, f32) if log1p else _NO_TABLE[out.dtype]
    flag = np.zeros(n, np.int8)
    ranges = _threads.parts(indptr, _threads.resolve_threads(threads), PREPROCESS_MIN_PART)
    base = int(indptr[0]) if n else 0
    lo = [max(0, min(int(indptr[c0]) - base, len(out))) for c0, _ in ranges]  # a malformed indptr: the kernel says so

    def part(c0: int, c1: int) -> tuple[int, int]:
        i = lo[ranges.index((c0, c1))]
        return _compiled().preprocess(indptr[c0 : c1 + 1], values, d64[c0:c1] if len(d64) else d64, bool(log1p), f32,
                                      ltab[c0:c1] if len(ltab) > 1 else ltab, out[i:], flag[c0:c1])

    for (c0, _), (code, where) in zip(ranges, _threads.run_parts(part, ranges), strict=True):
        if code:
            raise common.kernel_error(int(code), int(where) + c0, indptr, np.zeros(0, np.int32), len(values), 1)
    if log1p and flag.any():  # rows that are not small whole counts: numpy's numbers
        _exact_values(indptr, values, div, f32, _runs(flag), out, base)
    return out
