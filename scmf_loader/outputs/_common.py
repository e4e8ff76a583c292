"""Argument checks shared by the output kernels, and the choice of backend."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from scmf_loader.errors import ConfigurationError, ScmfError

__all__ = ["BACKENDS", "check_batch", "colmap_of", "numba_available", "resolve_backend"]

BACKENDS = ("numba", "numpy")
#: value dtypes the compiled kernels take as they are (others are converted to float32 first)
NATIVE_VALUES = frozenset(np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int64, np.uint16, np.uint32))


@functools.cache
def numba_available() -> bool:
    """True when numba imports (it is optional: ``pip install scmodelforge-data[fast]``)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None) -> str:
    """``backend``, else ``$SCMF_OUTPUT_BACKEND``, else numba when importable (measured the
    faster: scripts/bench_outputs.py), else numpy."""
    backend = backend or os.environ.get("SCMF_OUTPUT_BACKEND") or None
    if backend is None:
        return "numba" if numba_available() else "numpy"
    if backend not in BACKENDS:
        raise ConfigurationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numba" and not numba_available():
        raise ConfigurationError("backend='numba' needs numba: pip install numba (or the 'fast' extra)")
    return backend


def check_batch(
    indptr: Any, indices: Any, values: Any, n_genes: int, full: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays as 1-D numpy arrays, checked so that no kernel can index out of bounds
    (``full``; the compiled kernels check as they read, so they skip this): ``indptr``
    starts >= 0, never decreases and ends within ``indices`` and ``values``; every gene id
    in ``[indptr[0], indptr[-1])`` lies in ``[0, n_genes)``. Raises :class:`ScmfError`
    naming the offending array and position."""
    indptr, indices, values = (np.asarray(a) for a in (indptr, indices, values))
    if indptr.ndim != 1 or len(indptr) < 1 or indptr.dtype.kind not in "iu":
        raise ScmfError(f"batch indptr must be a 1-D integer array of length cells + 1, got {indptr.dtype} {indptr.shape}")
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise ScmfError(f"batch indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise ScmfError(f"batch values must be a 1-D numeric array, got {values.dtype} {values.shape}")
    if n_genes < 0:
        raise ConfigurationError(f"n_genes must be >= 0, got {n_genes}")
    indptr = indptr.astype(np.int64, copy=False)
    if not full:
        return indptr, indices, values
    nnz = min(len(indices), len(values))
    if int(indptr[0]) < 0:
        raise ScmfError(f"batch indptr starts at {int(indptr[0])} < 0")
    steps = np.diff(indptr)
    if len(steps) and int(steps.min()) < 0:
        c = int(np.argmax(steps < 0))
        raise ScmfError(f"batch indptr decreases at cell {c} ({int(indptr[c])} -> {int(indptr[c + 1])})")
    if int(indptr[-1]) > nnz:
        raise ScmfError(f"batch indptr ends at {int(indptr[-1])}, past the {nnz} stored entries")
    used = indices[int(indptr[0]) : int(indptr[-1])]
    if len(used) and (int(used.min()) < 0 or int(used.max()) >= n_genes):
        j = int(np.argmax((used < 0) | (used >= n_genes))) + int(indptr[0])
        raise ScmfError(f"batch gene id {int(indices[j])} at entry {j} is outside the vocabulary [0, {n_genes})")
    return indptr, indices, values


def kernel_error(code: int, where: int, indptr: np.ndarray, indices: np.ndarray, nnz: int, n_genes: int) -> ScmfError:
    """The error a compiled kernel's status ``(code, where)`` stands for."""
    if code == 1:
        c = where
        if c == 0 and len(indptr) and indptr[0] < 0:
            return ScmfError(f"batch indptr starts at {int(indptr[0])} < 0")
        return ScmfError(
            f"batch indptr is not non-decreasing within the {nnz} stored entries at cell {c} "
            f"({int(indptr[c])} -> {int(indptr[c + 1])})"
        )
    return ScmfError(f"batch gene id {int(indices[where])} at entry {where} is outside the vocabulary [0, {n_genes})")


def colmap_of(genes: Any, n_genes: int) -> np.ndarray | None:
    """Token -> output column (-1: dropped) for a gene subset given as token ids, or None."""
    if genes is None:
        return None
    g = np.asarray(genes)
    if g.ndim != 1 or (len(g) and g.dtype.kind not in "iu"):
        raise ConfigurationError(f"genes must be a 1-D array of token ids, got {g.dtype} {g.shape}")
    g = g.astype(np.int64)
    if len(g) and (int(g.min()) < 0 or int(g.max()) >= n_genes):
        raise ConfigurationError(f"genes: token ids must lie in [0, {n_genes}), got [{int(g.min())}, {int(g.max())}]")
    if len(np.unique(g)) != len(g):
        raise ConfigurationError("genes: token ids must be unique")
    colmap = np.full(n_genes, -1, dtype=np.int32)
    colmap[g] = np.arange(len(g), dtype=np.int32)
    return colmap


def check_divisors(divisors: Any, n_cells: int, f32: bool) -> np.ndarray | None:
    """Per-cell divisors in the compute dtype (rounded there once), or None."""
    if divisors is None:
        return None
    d = np.asarray(divisors)
    if d.shape != (n_cells,):
        raise ConfigurationError(f"divisors must hold one number per cell ({n_cells}), got shape {d.shape}")
    return d.astype(np.float32 if f32 else np.float64)


def check_sizes(max_genes: int | None, truncation: str | None = None) -> None:
    """``max_genes`` >= 1 (or None) and a known truncation."""
    if max_genes is not None and (isinstance(max_genes, bool) or int(max_genes) < 1):
        raise ConfigurationError(f"max_genes must be >= 1 or None, got {max_genes!r}")
    if truncation is not None and truncation not in ("top", "random"):
        raise ConfigurationError(f"truncation must be one of ('top', 'random'), got {truncation!r}")
