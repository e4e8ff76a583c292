"""CellDataset over a dataset directory and over AnnData (the quick path): contents equal the
sources read through anndata, zero copy, metadata, preprocessing, errors."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import hpc_genes

from scmf_loader.batch import CSRBatch
from scmf_loader.dataset import CellDataset
from scmf_loader.errors import ConfigurationError, InvalidInputError, VocabularyError
from scmf_loader.vocab import GeneVocab
from scmf_shards.convert import convert_h5ad


@pytest.fixture(scope="module")
def ds(loader_dataset: Path) -> CellDataset:
    return CellDataset(loader_dataset)


def _expected(ds: CellDataset, reference: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    return np.stack([reference[c] for c in ds.cell_names(ids)])


def _scipy(b: CSRBatch) -> sp.csr_matrix:
    return sp.csr_matrix((b.values.numpy(), b.indices.numpy(), b.indptr.numpy()), shape=b.shape)


def _inside(t: torch.Tensor, a: np.ndarray) -> bool:
    lo = a.ctypes.data
    return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= lo + a.nbytes


def test_every_cell_equals_its_source(ds: CellDataset, loader_reference: dict[str, np.ndarray]) -> None:
    assert len(ds) == len(loader_reference) == 1437
    for lo in range(0, len(ds), 100):
        ids = np.arange(lo, min(lo + 100, len(ds)))
        b = ds.__getitems__(ids)
        np.testing.assert_array_equal(b.to_dense().numpy(), _expected(ds, loader_reference, ids))
        assert torch.equal(b.cell_ids, torch.from_numpy(ids))


def test_contiguous_batch_is_zero_copy(ds: CellDataset) -> None:
    shard = 2
    lo = int(ds.shard_offsets[shard]) + 10
    b = ds.__getitems__(np.arange(lo, lo + 64))
    maps = ds.store.csr(shard)
    assert np.shares_memory(b.values.numpy(), maps.data)
    assert _inside(b.values, maps.data)
    assert np.shares_memory(b.indices.numpy(), maps.indices)
    assert _inside(b.indices, maps.indices)
    crossing = ds.__getitems__(np.arange(int(ds.shard_offsets[3]) - 5, int(ds.shard_offsets[3]) + 5))
    assert not np.shares_memory(crossing.values.numpy(), ds.store.csr(3).data)


def test_gathered_batches_in_any_order(ds: CellDataset, loader_reference: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = rng.integers(0, len(ds), size=50)
        ids[10:20] = np.arange(300, 310)  # a run inside a gather
        ids[20] = ids[21]  # a duplicate
        b = ds[ids]
        assert isinstance(b, CSRBatch)
        np.testing.assert_array_equal(b.to_dense().numpy(), _expected(ds, loader_reference, ids))


def test_obs_codes_stats_and_metadata(ds: CellDataset, loader_sources: list[Path]) -> None:
    frames = {p.name: ad.read_h5ad(p) for p in loader_sources}
    ids = np.arange(0, len(ds), 37)
    b = ds[ids]
    for k, i in enumerate(ids.tolist()):
        cell = ds[i]
        name = ds.cell_names([i])[0]
        src = ds.decode("source", b.obs["source"][k : k + 1])[0]
        a = frames[src]
        assert cell["metadata"] == {
            "source": src,
            "cell_type": a.obs.loc[name, "cell_type"],
            "batch": a.obs.loc[name, "batch"],
        }
        assert ds.decode("cell_type", b.obs["cell_type"][k : k + 1]) == [cell["metadata"]["cell_type"]]
        assert b.stats["library_size"][k] == pytest.approx(float(a[name].X.sum()))
        assert cell["n_genes"] == len(cell["expression"]) == len(cell["gene_indices"])
        assert cell["gene_indices"].dtype == torch.int64
        assert cell["expression"].dtype == torch.float32
    assert ds[-1]["metadata"] == ds[len(ds) - 1]["metadata"]
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds[np.array([0, len(ds)])]


def test_single_cell_max_genes_keeps_the_highest(loader_dataset: Path) -> None:
    full = CellDataset(loader_dataset)
    cut = CellDataset(loader_dataset, max_genes=5)
    for i in range(0, len(full), 97):
        a, b = full[i], cut[i]
        assert b["n_genes"] == min(5, a["n_genes"])
        assert np.all(np.diff(b["gene_indices"].numpy()) > 0)
        assert sorted(b["expression"].tolist(), reverse=True) == sorted(a["expression"].tolist(), reverse=True)[:5]
        b["expression"][0] = -1  # a copy: writing is safe
    with pytest.raises(ConfigurationError, match="max_genes"):
        CellDataset(loader_dataset, max_genes=0)


class _Scale:
    def apply_batch(self, batch: CSRBatch) -> CSRBatch:
        return CSRBatch(batch.indptr, batch.indices, batch.values * 2, batch.cell_ids, batch.n_genes, batch.obs)


def test_preprocessing_object_or_callable(loader_dataset: Path, ds: CellDataset) -> None:
    ids = np.arange(5, 25)
    doubled = CellDataset(loader_dataset, preprocessing=_Scale())
    assert torch.equal(doubled[ids].values, ds[ids].values * 2)
    plus = CellDataset(loader_dataset, preprocessing=lambda b: _Scale().apply_batch(_Scale().apply_batch(b)))
    assert torch.equal(plus[ids].values, ds[ids].values * 4)
    with pytest.raises(ConfigurationError, match="preprocessing"):
        CellDataset(loader_dataset, preprocessing=42)


def test_obs_column_selection_and_vocab_mismatch(loader_dataset: Path) -> None:
    small = CellDataset(loader_dataset, obs_columns=["batch"])
    assert list(small[np.arange(3)].obs) == ["batch"]
    assert list(small[0]["metadata"]) == ["batch"]
    with pytest.raises(ConfigurationError, match="donor"):
        CellDataset(loader_dataset, obs_columns=["donor"])
    with pytest.raises(VocabularyError, match="vocabulary"):
        CellDataset(loader_dataset, gene_vocab=GeneVocab.from_genes(["A", "B"]))
    CellDataset(loader_dataset, gene_vocab=GeneVocab.from_file(loader_dataset / "vocab.json"))


# ---- the quick path ------------------------------------------------------------------------
def test_quick_path_equals_the_converted_dataset(three_sources: list[Path], tmp_path: Path) -> None:
    """CSR, CSC and dense inputs, genes outside the vocabulary and versioned ids: served on
    the fly they equal the converter's output cell by cell."""
    out = tmp_path / "ds"
    convert_h5ad(three_sources, out, shard_size=400, obs_columns=("cell_type",), quiet=True)
    converted = CellDataset(out)
    vocab = GeneVocab.human_protein_coding()
    quick = CellDataset([str(p) for p in three_sources], gene_vocab=vocab, obs_columns=["source", "cell_type"])
    assert len(quick) == len(converted)
    assert quick.n_genes == converted.n_genes
    assert quick.categories == converted.categories
    b = converted[np.arange(len(converted))]
    keys = zip(converted.decode("source", b.obs["source"]), converted.cell_names(b.cell_ids), strict=True)
    row_of = {key: k for k, key in enumerate(keys)}
    rng = np.random.default_rng(1)
    ids = np.concatenate([np.arange(0, 1450, 3), rng.integers(0, 1450, 100)])
    qb = quick[ids]
    assert qb.indices.dtype == torch.int32
    keys = zip(quick.decode("source", qb.obs["source"]), quick.cell_names(ids), strict=True)
    rows = torch.tensor([row_of[key] for key in keys])
    assert (_scipy(qb) != _scipy(b)[rows.numpy()]).nnz == 0
    assert torch.equal(qb.obs["cell_type"], b.obs["cell_type"][rows])
    torch.testing.assert_close(qb.stats["library_size"], b.stats["library_size"][rows])
    lo, hi = int(qb.indptr[0]), int(qb.indptr[1])
    assert np.all(np.diff(qb.indices[lo:hi].numpy()) > 0)  # sorted vocabulary ids per row


def test_quick_path_from_anndata_objects_defaults_to_union_vocab() -> None:
    rng = np.random.default_rng(0)
    x = sp.random(30, 6, density=0.5, format="csr", random_state=rng, dtype=np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(["a", "b", None] * 10)}, index=[f"c{i}" for i in range(30)])
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(6)]))
    q = CellDataset(a)
    assert q.vocab.genes == [f"G{i}" for i in range(6)]
    assert q.obs_columns == ("source", "cell_type")
    np.testing.assert_array_equal(q[np.arange(30)].to_dense()[:, 4:].numpy(), x.toarray())
    assert q[2]["metadata"]["cell_type"] is None
    assert q[0]["metadata"]["cell_type"] == "a"
    backed_path = Path(__file__).parent / "data" / "golden_source.h5ad"
    backed = ad.read_h5ad(backed_path, backed="r")
    with pytest.raises(InvalidInputError, match="backed"):
        CellDataset(backed)
    backed.file.close()
    with pytest.raises(InvalidInputError, match="no such"):
        CellDataset("missing.h5ad")


def test_quick_path_avoids_the_scipy_row_slicing_trap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """int64 indptr with int32 indices (common in h5ad files): rows are sliced with numpy,
    never through scipy's row indexing, which would copy all indices per slice."""
    genes = hpc_genes()[:50]
    x = sp.random(400, 50, density=0.2, format="csr", random_state=np.random.default_rng(3), dtype=np.float32)
    path = tmp_path / "mixed.h5ad"
    ad.AnnData(X=x, var=pd.DataFrame(index=genes)).write_h5ad(path)
    with h5py.File(path, "r+") as f:  # scipy would make the dtypes agree: rewrite indptr
        indptr = f["X/indptr"][...]
        del f["X/indptr"]
        f["X"].create_dataset("indptr", data=indptr.astype(np.int64))
    raw = ad.read_h5ad(path).X
    assert raw.indptr.dtype == np.int64
    assert raw.indices.dtype == np.int32

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("scipy row slicing used")

    q = CellDataset(path)
    monkeypatch.setattr(sp.csr_matrix, "__getitem__", forbidden)
    dense = np.concatenate([q[np.arange(lo, lo + 100)].to_dense().numpy() for lo in range(0, 400, 100)])
    np.testing.assert_array_equal(dense[:, q.vocab.encode(genes)], x.toarray())


def test_kept_gathered_batches_are_never_overwritten(ds: CellDataset, loader_reference: dict[str, np.ndarray]) -> None:
    """Gathers reuse output buffers only once no batch views them."""
    rng = np.random.default_rng(5)
    kept = [(ids, ds[ids]) for ids in (rng.integers(0, len(ds), 300) for _ in range(3))]
    padded = kept[0][1].to_padded(8)
    before = {k: v.clone() for k, v in padded.items()}
    for _ in range(20):
        ds[rng.integers(0, len(ds), 300)].to_padded(8)  # churn: many more gathers
    for ids, b in kept:
        np.testing.assert_array_equal(b.to_dense().numpy(), _expected(ds, loader_reference, ids))
    assert all(torch.equal(padded[k], before[k]) for k in before)


def test_obs_is_decoded_only_when_a_batch_asks(loader_dataset: Path, ds: CellDataset) -> None:
    fresh = CellDataset(loader_dataset)
    contiguous, gathered = fresh[np.arange(3, 40)], fresh[np.array([1500, 2, 7, 1400]) % len(fresh)]
    assert fresh._blocks == {}  # nothing decoded while batches were cut
    for got, ids in ((contiguous, np.arange(3, 40)), (gathered, np.array([1500, 2, 7, 1400]) % len(fresh))):
        want = ds[ids]
        assert got.obs.keys() == want.obs.keys()
        assert all(torch.equal(got.obs[k], want.obs[k]) for k in want.obs)
        assert all(torch.equal(got.stats[k], want.stats[k]) for k in want.stats)
    assert fresh._blocks  # decoded once asked for
