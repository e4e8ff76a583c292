"""CSR batches: row gathering (zero copy for one run), and the converters."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scmf_loader.batch import CSRBatch, as_tensor, gather_rows
from scmf_loader.errors import ConfigurationError


def _random_csr(n: int = 40, genes: int = 30, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    m = sp.random(n, genes, density=0.3, format="csr", random_state=rng, dtype=np.float32)
    m.data = np.ceil(m.data * 10).astype(np.float32)
    m.indptr = m.indptr.astype(np.int64)
    m.indices = m.indices.astype(np.int32)
    m.data[3] = m.data[4] = 11.0  # a tie
    return m


def _batch(m: sp.csr_matrix, rows: np.ndarray | None = None) -> CSRBatch:
    rows = np.arange(m.shape[0]) if rows is None else rows
    sub = m[rows]
    return CSRBatch(
        torch.from_numpy(sub.indptr.astype(np.int64)), torch.from_numpy(sub.indices.astype(np.int32)),
        torch.from_numpy(sub.data), torch.from_numpy(rows.astype(np.int64)), m.shape[1],
        {"cell_type": torch.arange(len(rows))}, {"library_size": torch.ones(len(rows), dtype=torch.float64)},
    )


def test_gather_one_run_is_a_view() -> None:
    m = _random_csr()
    arrays = (m.indptr, m.indices, m.data)
    indptr, indices, data = gather_rows([(arrays, np.array([5]), np.array([17]))])
    assert np.shares_memory(indices, m.indices)
    assert np.shares_memory(data, m.data)
    ref = m[5:17]
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)


def test_gather_many_runs_from_two_sources() -> None:
    a, b = _random_csr(seed=1), _random_csr(seed=2)
    pieces = [
        ((a.indptr, a.indices, a.data), np.array([0, 7, 30]), np.array([2, 8, 35])),
        ((b.indptr, b.indices, b.data), np.array([4]), np.array([9])),
    ]
    indptr, indices, data = gather_rows(pieces)
    ref = sp.vstack([a[0:2], a[7:8], a[30:35], b[4:9]]).tocsr()
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data, ref.data)
    assert not np.shares_memory(data, a.data)


def test_sparse_and_dense_converters() -> None:
    m = _random_csr()
    b = _batch(m)
    np.testing.assert_array_equal(b.to_dense().numpy(), m.toarray())
    np.testing.assert_array_equal(b.to_sparse_csr().to_dense().numpy(), m.toarray())
    assert b.to_sparse_csr().shape == (40, 30)
    assert b.to_dense(torch.float64).dtype == torch.float64
    assert b.shape == (40, 30)
    assert len(b) == 40
    assert b.nnz == m.nnz


def test_padded_without_truncation() -> None:
    m = _random_csr()
    p = _batch(m).to_padded()
    longest = int(np.diff(m.indptr).max())
    assert p["gene_indices"].shape == (40, longest + 1)
    assert (p["gene_indices"][:, 0] == 3).all()
    assert (p["expression"][:, 0] == 0).all()
    assert p["attention_mask"][:, 0].all()
    for i in range(40):
        row = m[i]
        n = row.nnz
        np.testing.assert_array_equal(p["gene_indices"][i, 1 : n + 1].numpy(), row.indices)
        np.testing.assert_array_equal(p["expression"][i, 1 : n + 1].numpy(), row.data)
        assert p["attention_mask"][i].sum() == n + 1
        assert (p["gene_indices"][i, n + 1 :] == 0).all()
        assert (p["expression"][i, n + 1 :] == 0).all()
    q = _batch(m).to_padded(max_genes=longest + 5, add_cls=False)
    assert q["gene_indices"].shape == (40, longest + 5)  # a fixed length when max_genes is given
    assert q["expression"].dtype == torch.float32
    assert q["gene_indices"].dtype == torch.int64


def test_padded_top_truncation_keeps_highest_in_gene_order() -> None:
    m = _random_csr()
    k = 5
    p = _batch(m).to_padded(max_genes=k, add_cls=False)
    for i in range(40):
        row = m[i]
        order = np.argsort(-row.data, kind="stable")[:k]  # ties: the lower gene id (earlier)
        keep = np.sort(order)
        n = min(row.nnz, k)
        np.testing.assert_array_equal(p["gene_indices"][i, :n].numpy(), row.indices[keep])
        np.testing.assert_array_equal(p["expression"][i, :n].numpy(), row.data[keep])
        assert p["attention_mask"][i].sum() == n


def test_padded_random_truncation_is_a_seeded_subset() -> None:
    m = _random_csr()
    b = _batch(m)
    p1 = b.to_padded(4, truncation="random", generator=torch.Generator().manual_seed(1))
    p2 = b.to_padded(4, truncation="random", generator=torch.Generator().manual_seed(1))
    p3 = b.to_padded(4, truncation="random", generator=torch.Generator().manual_seed(2))
    assert torch.equal(p1["gene_indices"], p2["gene_indices"])
    assert not torch.equal(p1["gene_indices"], p3["gene_indices"])
    for i in range(40):
        genes = p1["gene_indices"][i, 1:][p1["attention_mask"][i, 1:]].numpy()
        assert set(genes) <= set(m[i].indices)
        assert np.all(np.diff(genes) > 0)
        assert len(genes) == min(4, m[i].nnz)


def test_padded_errors_and_empty_batch() -> None:
    b = _batch(_random_csr())
    with pytest.raises(ConfigurationError, match="max_genes"):
        b.to_padded(0)
    with pytest.raises(ConfigurationError, match="truncation"):
        b.to_padded(4, truncation="first")
    empty = _batch(_random_csr(), np.zeros(0, dtype=np.int64))
    assert empty.to_padded(8)["gene_indices"].shape == (0, 9)
    assert empty.to_dense().shape == (0, 30)


def test_pin_clone_and_to() -> None:
    b = _batch(_random_csr())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pinned = b.pin_memory()  # no CUDA here: unchanged, silently
    if not torch.cuda.is_available():
        assert pinned is b
    c = b.clone()
    assert c.values.data_ptr() != b.values.data_ptr()
    assert torch.equal(c.values, b.values)
    moved = b.to("cpu")
    assert moved.obs["cell_type"].device.type == "cpu"
    assert "library_size" in moved.stats
    assert "CSRBatch(cells=40" in repr(b)


def test_as_tensor_accepts_read_only_views_silently() -> None:
    a = np.arange(10, dtype=np.float32)
    a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = as_tensor(a[2:5])
        t2 = as_tensor(a[5:7])
    assert t.tolist() == [2, 3, 4]
    assert t2.data_ptr() == a[5:].ctypes.data


def test_pickle_round_trip_with_lazy_columns() -> None:
    import pickle

    m = _random_csr()
    b = _batch(m)
    lazy = CSRBatch(b.indptr, b.indices, b.values, b.cell_ids, b.n_genes,
                    lambda: (("cell_type",), torch.arange(40).reshape(40, 1)), None)
    again = pickle.loads(pickle.dumps(lazy))
    assert torch.equal(again.values, b.values)
    assert torch.equal(again.obs["cell_type"], torch.arange(40))
    assert again.stats == {}
