"""Shared helpers of the preprocessing tests: structured count data and scanpy references."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import anndata as ad
    import scanpy as sc


def counts(
    n_cells: int, n_genes: int, seed: int, *, zero_genes: Sequence[int] = (), zero_cells: Sequence[int] = (),
) -> np.ndarray:
    """Poisson-gamma counts (float32) with gene means spread over orders of magnitude, three
    cell groups with shifted genes, cell size variation, and forced all-zero genes/cells."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.4, 1.5, n_genes)
    group = rng.integers(0, 3, n_cells)
    fold = np.ones((3, n_genes))
    for g in range(3):
        fold[g, rng.choice(n_genes, max(1, n_genes // 8), replace=False)] = 5.0
    size = np.exp(rng.normal(0, 0.4, n_cells))
    x = rng.poisson(rng.gamma(2.0, size[:, None] * base[None] * fold[group] / 2.0)).astype(np.float32)
    x[:, list(zero_genes)] = 0
    x[list(zero_cells)] = 0
    return x


def write_h5ad(path: Path, x: np.ndarray, genes: Sequence[str], seed: int, *, layout: str = "csr",
               batches: Sequence[str] = ("b1", "b2", "b3")) -> Path:
    """An .h5ad of ``x`` with obs ``batch`` and ``cell_type`` and the given genes."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed + 1000)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(list(batches), x.shape[0])),
         "cell_type": pd.Categorical(rng.choice(["T", "B"], x.shape[0]))},
        index=[f"{path.stem}-{i}" for i in range(x.shape[0])],
    )
    matrix: Any = {"csr": sp.csr_matrix(x), "csc": sp.csc_matrix(x), "dense": x}[layout]
    ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=list(genes))).write_h5ad(path)
    return path


def scanpy_normalize(a: Any, target_sum: float = 1e4, log1p: bool = True) -> Any:
    """``normalize_total`` + ``log1p`` in place, scanpy's warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=target_sum)
        if log1p:
            sc.pp.log1p(a)
    return a


def scanpy_hvg(a: Any, n_top: int, flavor: str, batch_key: str | None) -> pd.DataFrame:
    """``highly_variable_genes(..., inplace=False)`` with warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor=flavor, batch_key=batch_key,
                                           inplace=False)


def read_h5ad(path: Path) -> Any:
    """``anndata.read_h5ad`` with warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.read_h5ad(path)


def concat_aligned(parts: Sequence[Any], order: Sequence[str]) -> Any:
    """Outer-join concatenation (missing genes are zero), genes in ``order``."""
    import scipy.sparse as sp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = [p.copy() for p in parts]
        for p in parts:
            p.X = sp.csr_matrix(p.X)
        cat = ad.concat(parts, join="outer", index_unique="-")
        cat.obs["batch"] = cat.obs["batch"].astype(str).astype("category")
        return cat[:, list(order)].copy()


def assert_close(mine: np.ndarray, ref: np.ndarray, rtol: float = 1e-6) -> None:
    """Equal to ``rtol`` relative (NaN where the reference is NaN)."""
    mine = np.asarray(mine, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert np.array_equal(np.isnan(mine), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(mine[ok], ref[ok], rtol=rtol, atol=1e-12)


def simulate_sized_counts(n_cells: int, n_genes: int, seed: int, *, shape: float = 5.0,
                          dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """Poisson-gamma counts of three cell types (each with 10% of genes up 5x) and known
    per-cell size factors ``size`` (log-normal): ``(dense counts, size)``, for scran checks."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.5, 2.0, n_genes)
    types = rng.integers(0, 3, n_cells)
    fold = np.ones((3, n_genes))
    for t in range(3):
        fold[t, rng.choice(n_genes, n_genes // 10, replace=False)] = 5.0
    size = np.exp(rng.normal(0, 0.5, n_cells))
    x = rng.poisson(rng.gamma(shape, size[:, None] * base * fold[types] / shape)).astype(dtype)
    return x, size
