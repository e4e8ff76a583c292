"""Highly variable genes: every flavor, with and without batch key, dense and sparse input,
all-zero genes and cells, against scanpy (same gene set, columns to 1e-6 relative)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from preprocess_helpers import ad, assert_close, counts, scanpy_hvg, scanpy_normalize

from scmf_loader.errors import ScmfError
from scmf_loader.preprocess.hvg import MomentStats, highly_variable_genes

FLAVORS = ["seurat", "cell_ranger", "seurat_v3"]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, list[str]]:
    x = counts(500, 240, seed=3, zero_genes=[0, 7, 100], zero_cells=[5, 6])
    batch = np.random.default_rng(4).choice(["a", "b", "c"], x.shape[0])
    return x, batch, [f"g{i:03d}" for i in range(x.shape[1])]


def _adata(x: np.ndarray, batch: np.ndarray, names: list[str], flavor: str, sparse: bool) -> ad.AnnData:
    import pandas as pd

    a = ad.AnnData(sp.csr_matrix(x) if sparse else x.copy(),
                   obs=pd.DataFrame({"batch": pd.Categorical(batch)}, index=[f"c{i}" for i in range(len(x))]),
                   var=pd.DataFrame(index=names))
    return a if flavor == "seurat_v3" else scanpy_normalize(a)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_matches_scanpy(data, flavor: str, batched: bool, sparse: bool) -> None:
    if flavor == "seurat_v3":
        pytest.importorskip("skmisc")
    x, batch, names = data
    a = _adata(x, batch, names, flavor, sparse)
    ref = scanpy_hvg(a, 60, flavor, "batch" if batched else None)
    mine = highly_variable_genes(a.X, n_top_genes=60, flavor=flavor,
                                 batch_labels=batch if batched else None, gene_names=names)
    assert np.array_equal(mine.highly_variable, ref["highly_variable"].to_numpy())
    assert mine.n_selected == int(ref["highly_variable"].sum())
    for name, values in mine.columns.items():
        assert_close(values, ref[name].to_numpy().astype(np.float64))


def test_moments_merge_in_chunks_equals_whole(data) -> None:
    x, batch, _ = data
    codes = np.unique(batch, return_inverse=True)[1]
    whole = MomentStats.zeros(3, x.shape[1])
    m = sp.csr_matrix(x)
    whole.add_csr(m.data, m.indices, m.indptr, codes)
    parts = MomentStats.zeros(3, x.shape[1])
    for lo in range(0, len(x), 77):
        c = sp.csr_matrix(x[lo : lo + 77])
        piece = MomentStats.zeros(3, x.shape[1])
        piece.add_csr(c.data, c.indices, c.indptr, codes[lo : lo + 77])
        parts.merge(piece)
    np.testing.assert_array_equal(whole.n, parts.n)
    np.testing.assert_array_equal(whole.n_pos, parts.n_pos)
    np.testing.assert_allclose(whole.total, parts.total, rtol=1e-12)
    np.testing.assert_allclose(whole.total_sq, parts.total_sq, rtol=1e-12)


def test_errors(data) -> None:
    x, _, names = data
    with pytest.raises(ScmfError, match="flavor"):
        highly_variable_genes(x, n_top_genes=10, flavor="bogus")
    with pytest.raises(ScmfError, match="only 240 genes"):
        highly_variable_genes(x, n_top_genes=241)
    with pytest.raises(ScmfError, match="one per cell"):
        highly_variable_genes(x, n_top_genes=10, batch_labels=["a"])
    flat = np.zeros((50, 40), dtype=np.float32)
    flat[:, :2] = 1.0
    with pytest.raises(ScmfError, match="percentiles"):
        highly_variable_genes(flat, n_top_genes=5, flavor="cell_ranger")
