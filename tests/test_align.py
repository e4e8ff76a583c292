"""The alignment kernel against an independent scipy reference (COO → CSR, scipy's sort)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from scmf_shards.align import GeneAlignment, align_rows, align_rows_with_totals
from scmf_shards.kernels import align_csr, copy_rows


def _reference(m: sp.csr_matrix, cmap: np.ndarray) -> sp.csr_matrix:
    coo = m.tocoo()
    keep = (cmap[coo.col] >= 0) & (coo.data != 0)
    n_cols = int(cmap.max()) + 1
    out = sp.csr_matrix((coo.data[keep], (coo.row[keep], cmap[coo.col[keep]])), shape=(m.shape[0], n_cols))
    out.sort_indices()
    return out


def _random_case(rng: np.random.Generator, n_rows: int, n_genes: int, density: float,
                 vocab_size: int, dtype: str) -> tuple[sp.csr_matrix, np.ndarray]:
    m = sp.random(n_rows, n_genes, density=density, format="csr", random_state=rng, dtype=np.float64)
    m.data = np.ceil(m.data * 20).astype(dtype)
    m.data[::5] = 0  # explicit zeros are dropped
    n_keep = int(rng.integers(1, n_genes + 1))
    cmap = np.full(n_genes, -1, dtype=np.int32)
    cols = rng.choice(n_genes, n_keep, replace=False)
    cmap[cols] = rng.choice(np.arange(4, vocab_size), n_keep, replace=False)
    return m, cmap


@pytest.mark.parametrize("vocab_size", [40, 300, 20_000, 70_000, 3_000_000])  # 1, 2, 3, 3 radix passes
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "uint16"])
def test_align_csr_matches_scipy(vocab_size: int, dtype: str) -> None:
    rng = np.random.default_rng(vocab_size)
    n_genes = min(vocab_size - 4, 3000)
    m, cmap = _random_case(rng, 200, n_genes, 0.3, vocab_size, dtype)
    m = sp.vstack([m[:50], sp.csr_matrix((10, n_genes), dtype=m.dtype), m[60:]], format="csr")
    m.sort_indices()  # a run of empty rows in the middle
    indptr, indices, data, totals = align_csr(m.indptr, m.indices, m.data, cmap, presorted=False)
    ref = _reference(m, cmap)
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data, ref.data)
    assert data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(totals, np.asarray(m.sum(axis=1, dtype=np.float64)).ravel())


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(0, 30),
    n_genes=st.integers(1, 80),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_align_rows_property(n_rows: int, n_genes: int, density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, cmap = _random_case(rng, n_rows, n_genes, density, 600, "float32")
    keep = np.flatnonzero(cmap >= 0)
    order = np.argsort(cmap[keep])
    alignment = GeneAlignment(keep[order].astype(np.int64), cmap[keep][order], n_genes)
    got, totals = align_rows_with_totals(m, alignment, dtype="float64")
    ref = _reference(m, cmap)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.data, ref.data)
    assert got.data.dtype == np.float64
    np.testing.assert_allclose(totals, np.asarray(m.sum(axis=1)).ravel(), rtol=1e-6)


def test_presorted_map_and_uncanonical_input() -> None:
    """An increasing map needs no sort; duplicate entries of the source are summed first."""
    m = sp.csr_matrix(
        (np.array([1.0, 2.0, 3.0, 0.0, 5.0], np.float32), np.array([2, 0, 2, 1, 3]), np.array([0, 3, 5])),
        shape=(2, 4),
    )
    alignment = GeneAlignment(np.array([0, 2, 3]), np.array([4, 6, 9], np.int32), 4)
    assert alignment.is_identity_order
    got = align_rows(m, alignment)
    np.testing.assert_array_equal(got.toarray()[:, [4, 6, 9]], [[2.0, 4.0, 0.0], [0.0, 0.0, 5.0]])
    np.testing.assert_array_equal(got.indices, [4, 6, 9])


def test_align_rows_in_a_given_order() -> None:
    rng = np.random.default_rng(7)
    m, cmap = _random_case(rng, 50, 40, 0.4, 100, "float32")
    order = rng.permutation(50)
    indptr, indices, data, totals = align_csr(m.indptr, m.indices, m.data, cmap, False, row_order=order)
    ref = _reference(m, cmap)[order]
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data, ref.data)
    np.testing.assert_array_equal(totals, np.asarray(m.sum(axis=1, dtype=np.float64)).ravel()[order])
    with pytest.raises(ValueError, match="row_order"):
        align_csr(m.indptr, m.indices, m.data, cmap, False, row_order=order[:-1])


def test_copy_rows_matches_slices_and_checks_bounds() -> None:
    rng = np.random.default_rng(3)
    src_d = rng.random(100).astype(np.float32)
    src_i = rng.integers(0, 1000, 100).astype(np.int32)
    starts = np.array([0, 10, 40, 40, 90])
    stops = np.array([5, 10, 55, 41, 100])
    lengths = stops - starts
    dest = np.array([lengths[k + 1 :].sum() for k in range(len(lengths))])  # reversed placement
    out_d = np.zeros(lengths.sum(), np.float32)
    out_i = np.zeros(lengths.sum(), np.int32)
    copy_rows(src_d, src_i, starts, stops, dest, out_d, out_i)
    exp_d = np.concatenate([src_d[a:b] for a, b in zip(starts[::-1], stops[::-1], strict=True)])
    exp_i = np.concatenate([src_i[a:b] for a, b in zip(starts[::-1], stops[::-1], strict=True)])
    np.testing.assert_array_equal(out_d, exp_d)
    np.testing.assert_array_equal(out_i, exp_i)
    with pytest.raises(ValueError, match="outside"):
        copy_rows(src_d, src_i, np.array([95]), np.array([101]), np.array([0]), out_d, out_i)
    with pytest.raises(ValueError, match="outside"):
        copy_rows(src_d, src_i, np.array([0]), np.array([5]), np.array([out_d.size - 2]), out_d, out_i)
