"""AnnData sources (scmf_shards.sources): every store format and matrix layout read row range
by row range, compared with anndata's own whole-object reading (read_h5ad / read_zarr)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from scmf_loader.errors import InvalidInputError
from scmf_shards.sources import AnnDataSource, H5adSource, open_sources
from scmf_shards.sources.csc import CsrCopy, transpose_csc

N_CELLS, N_GENES = 157, 23
RANGES = [(0, N_CELLS), (0, 1), (5, 64), (64, 65), (100, N_CELLS), (40, 40)]


def _adata(layout: str, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(N_CELLS, N_GENES, density=0.2, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 50, k)).astype(np.float32)
    keep = np.ones(N_CELLS)
    keep[7] = 0  # an empty row
    x = sp.csr_matrix(sp.diags(keep.astype(np.float32)) @ x)
    x.eliminate_zeros()
    na = rng.random(N_CELLS) < 0.2
    obs = pd.DataFrame({
        "cat": pd.Categorical(np.where(na, None, rng.choice(["T", "B", "NK"], N_CELLS))),
        "nint": pd.array(np.where(na, None, rng.integers(0, 9, N_CELLS)), dtype="Int64"),
        "nbool": pd.array(np.where(na, None, rng.random(N_CELLS) < 0.5), dtype="boolean"),
        "text": [f"t{i % 11}" for i in range(N_CELLS)],
        "f64": rng.random(N_CELLS),
        "i64": rng.integers(-5, 5, N_CELLS),
        "flag": rng.random(N_CELLS) < 0.5,
    }, index=[f"cell-{i}" for i in range(N_CELLS)])
    var = pd.DataFrame({"symbol": [f"S{j}" for j in range(N_GENES)]}, index=[f"G{j}" for j in range(N_GENES)])
    matrix = {"csr": x, "csc": x.tocsc(), "dense": x.toarray()}[layout]
    a = ad.AnnData(X=matrix, obs=obs, var=var)
    a.layers["twice"] = matrix * 2
    a.raw = a.copy()
    return a


def _write(a: ad.AnnData, path: Path, store: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: zarr v2 will stop being the default
        if store == "h5ad":
            a.write_h5ad(path)
        else:
            with ad.settings.override(zarr_write_format=2 if store == "zarr2" else 3):
                a.write_zarr(path)
    return path


def _reference(path: Path, store: str) -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: old formats
        return ad.read_h5ad(path) if store == "h5ad" else ad.read_zarr(path)


def _as_strings(series: pd.Series) -> list[str | None]:
    """anndata's values as the sources give them: None for NA, str() of everything else."""
    return [None if pd.isna(v) else str(v) for v in series.astype(object).tolist()]


STORES = ["h5ad", "zarr2", "zarr3"]


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_rows_and_obs_equal_anndata(tmp_path: Path, store: str, layout: str) -> None:
    path = _write(_adata(layout), tmp_path / f"d.{'h5ad' if store == 'h5ad' else 'zarr'}", store)
    ref = _reference(path, store)
    src = AnnDataSource(path)
    assert src.kind == ("h5ad" if store == "h5ad" else "anndata_zarr")
    assert (src.layout, src.n_cells, src.n_genes, src.dtype) == (layout, N_CELLS, N_GENES, np.float32)
    assert src.genes == list(ref.var_names)
    assert set(src.obs_columns) == set(ref.obs.columns)
    want = sp.csr_matrix(ref.X)
    cols = list(ref.obs.columns)
    for a, b in RANGES:
        chunk = src.read_rows(a, b, cols)
        assert chunk.matrix.shape == (b - a, N_GENES)
        assert chunk.matrix.indices.dtype == np.int32
        assert (chunk.matrix != want[a:b]).nnz == 0
        assert chunk.cell_ids.tolist() == list(ref.obs_names[a:b])
        for c in cols:
            assert chunk.obs[c].tolist() == _as_strings(ref.obs[c][a:b]), c
    for c in cols:
        assert src.obs_values(c).tolist() == _as_strings(ref.obs[c]), c


@pytest.mark.parametrize("store", STORES)
def test_raw_layer_and_gene_column(tmp_path: Path, store: str) -> None:
    path = _write(_adata("csr"), tmp_path / f"d.{'h5ad' if store == 'h5ad' else 'zarr'}", store)
    ref = _reference(path, store)
    raw = AnnDataSource(path, matrix="raw", gene_column="symbol")
    assert raw.genes == list(ref.raw.var["symbol"])
    assert (raw.read_rows(3, 90).matrix != ref.raw.X[3:90]).nnz == 0
    layer = AnnDataSource(path, matrix="layer:twice")
    assert (layer.read_rows(0, N_CELLS).matrix != sp.csr_matrix(ref.layers["twice"])).nnz == 0
    with pytest.raises(InvalidInputError, match=r"has no matrix 'layers/nope'"):
        AnnDataSource(path, matrix="layer:nope")
    with pytest.raises(InvalidInputError, match=r"var has no column 'nope'"):
        AnnDataSource(path, gene_column="nope")


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("layout", ["csr", "csc"])
def test_int64_indices(tmp_path: Path, store: str, layout: str) -> None:
    a = _adata(layout)
    a.X.indices, a.X.indptr = a.X.indices.astype(np.int64), a.X.indptr.astype(np.int64)
    path = _write(a, tmp_path / f"d.{'h5ad' if store == 'h5ad' else 'zarr'}", store)
    ref = _reference(path, store)
    assert ref.X.indices.dtype == np.int64
    src = AnnDataSource(path)
    for a, b in RANGES:
        m = src.read_rows(a, b).matrix
        assert m.indices.dtype == np.int32
        assert (m != sp.csr_matrix(ref.X)[a:b]).nnz == 0


def test_csc_transposition_against_scipy(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = sp.random(300, 41, density=0.15, format="csc", random_state=rng, dtype=np.float64)
    rows, cols = np.ones(300), np.ones(41)
    rows[17], cols[5] = 0, 0  # an empty row and column
    x = sp.csc_matrix(sp.diags(rows) @ x @ sp.diags(cols))
    x.eliminate_zeros()
    path = tmp_path / "c.h5ad"
    ad.AnnData(X=x).write_h5ad(path)
    for block in (1, 7, 64, 1 << 24):  # blocks of one column up to the whole matrix
        with h5py.File(path) as f:
            out = transpose_csc(f["X"], x.shape, x.dtype, tmp_path / f"copy{block}", block_nnz=block)
        got = CsrCopy(out, x.shape[1]).rows(0, 300)
        want = x.tocsr()
        assert got.has_sorted_indices
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.data, want.data)
        assert (CsrCopy(out, x.shape[1]).rows(17, 18)).nnz == 0


def test_prepared_csc_source_reads_the_copy(tmp_path: Path) -> None:
    path = _write(_adata("csc"), tmp_path / "c.h5ad", "h5ad")
    src = AnnDataSource(path)
    prepared = src.prepare(tmp_path / "work")
    assert prepared is not src
    assert src._csr_copy is None
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["data.npy", "indices.npy", "indptr.npy"]
    want = sp.csr_matrix(ad.read_h5ad(path).X)
    assert (prepared.read_rows(10, 99).matrix != want[10:99]).nnz == 0
    assert AnnDataSource(_write(_adata("csr"), tmp_path / "r.h5ad", "h5ad")).prepare(tmp_path / "w2").layout == "csr"
    assert not (tmp_path / "w2").exists()  # CSR needs no copy


def test_legacy_pre_07_layout_scanpy_pbmc68k() -> None:
    """scanpy's bundled pbmc68k_reduced: structured-array obs/var, raw.X / raw.var, categories
    in uns; everything equals anndata.read_h5ad."""
    import scanpy

    path = Path(scanpy.__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad"
    with h5py.File(path) as f:
        assert isinstance(f["obs"], h5py.Dataset)
        assert "raw.X" in f
    ref = _reference(path, "h5ad")
    x = AnnDataSource(path)
    assert x.layout == "dense"
    assert x.genes == list(ref.var_names)
    np.testing.assert_array_equal(x.read_rows(0, 700).matrix.toarray(), ref.X)
    raw = H5adSource(path, matrix="raw")
    assert raw.layout == "csr"
    assert raw.genes == list(ref.raw.var_names)
    chunk = raw.read_rows(100, 350, ["bulk_labels", "louvain", "n_genes"])
    assert (chunk.matrix != ref.raw.X[100:350]).nnz == 0
    assert chunk.cell_ids.tolist() == list(ref.obs_names[100:350])
    for c in ("bulk_labels", "louvain", "n_genes"):
        assert chunk.obs[c].tolist() == _as_strings(ref.obs[c][100:350]), c
    assert isinstance(ref.obs["bulk_labels"].dtype, pd.CategoricalDtype)
    assert sorted(set(raw.obs_values("bulk_labels"))) == sorted(ref.obs["bulk_labels"].cat.categories)


def test_zarr_store_at_a_memory_url(tmp_path: Path) -> None:
    import fsspec

    path = _write(_adata("csr"), tmp_path / "d.zarr", "zarr3")
    fs = fsspec.filesystem("memory")
    for p in path.rglob("*"):
        if p.is_file():
            fs.pipe(f"/scmf-zarr-test/d.zarr/{p.relative_to(path)}", p.read_bytes())
    try:
        src = AnnDataSource("memory://scmf-zarr-test/d.zarr")
        ref = ad.read_zarr(path)
        assert (src.read_rows(0, N_CELLS).matrix != ref.X).nnz == 0
        assert src.read_rows(9, 20, ["cat"]).obs["cat"].tolist() == _as_strings(ref.obs["cat"][9:20])
        local = AnnDataSource(path)
        assert src.fingerprint()["sha256"] == local.fingerprint()["sha256"]
    finally:
        fs.rm("/scmf-zarr-test", recursive=True)


def test_fingerprints_differ_with_content(tmp_path: Path) -> None:
    a = AnnDataSource(_write(_adata("csr", 0), tmp_path / "a.zarr", "zarr2"))
    b = AnnDataSource(_write(_adata("csr", 1), tmp_path / "b.zarr", "zarr2"))
    assert a.fingerprint()["sha256"] != b.fingerprint()["sha256"]
    assert a.fingerprint()["kind"] == "anndata_zarr"


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    no_raw = _adata("csr")
    no_raw.raw = None
    path = _write(no_raw, tmp_path / "n.h5ad", "h5ad")
    with pytest.raises(InvalidInputError, match=r"n\.h5ad: has no raw matrix"):
        AnnDataSource(path, matrix="raw")
    with pytest.raises(InvalidInputError, match=r"--matrix 'bogus' is not understood"):
        AnnDataSource(path, matrix="bogus")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"empty: a directory with no \.h5ad/\.zarr chunks"):
        open_sources([tmp_path / "empty"])
    with pytest.raises(InvalidInputError, match=r"matches no file"):
        open_sources([str(tmp_path / "nothing-*.h5ad")])
    with pytest.raises(InvalidInputError, match=r"nope\.zarr: no such zarr store"):
        AnnDataSource(tmp_path / "nope.zarr")
    (tmp_path / "x.zarr").mkdir()
    zarr.open_group(tmp_path / "x.zarr", mode="w")
    with pytest.raises(InvalidInputError, match=r"x\.zarr: not an AnnData store"):
        AnnDataSource(tmp_path / "x.zarr")


def test_anndata_07_frames_with_categories_by_reference(tmp_path: Path) -> None:
    """Dataframes of encoding-version 0.1.0 (anndata 0.7): categories under ``__categories``,
    referenced by an attribute of the codes."""
    path = tmp_path / "v07.h5ad"
    with h5py.File(path, "w") as f:
        for name, cols in (("obs", ["ct", "n"]), ("var", [])):
            g = f.create_group(name)
            g.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.1.0", "_index": "_index",
                            "column-order": np.array(cols, dtype=h5py.string_dtype())})
        f["obs"].create_dataset("_index", data=np.array([f"c{i}" for i in range(6)], dtype="S"))
        cats = f["obs"].create_group("__categories").create_dataset("ct", data=np.array(["B", "T"], dtype="S"))
        f["obs"].create_dataset("ct", data=np.array([0, 1, 1, -1, 0, 1], dtype="i1")).attrs["categories"] = cats.ref
        f["obs"].create_dataset("n", data=np.arange(6))
        f["var"].create_dataset("_index", data=np.array(["G1", "G2", "G3"], dtype="S"))
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (6, 3)})
        x.create_dataset("data", data=np.arange(1, 7, dtype=np.float32))
        x.create_dataset("indices", data=np.array([0, 1, 2, 0, 1, 2], dtype=np.int32))
        x.create_dataset("indptr", data=np.arange(7))
    ref = _reference(path, "h5ad")
    assert isinstance(ref.obs["ct"].dtype, pd.CategoricalDtype)
    src = AnnDataSource(path)
    assert src.genes == list(ref.var_names)
    chunk = src.read_rows(1, 5, ["ct", "n"])
    assert chunk.cell_ids.tolist() == list(ref.obs_names[1:5])
    assert chunk.obs["ct"].tolist() == _as_strings(ref.obs["ct"][1:5]) == ["T", "T", None, "B"]
    assert chunk.obs["n"].tolist() == _as_strings(ref.obs["n"][1:5])
    assert (chunk.matrix != ref.X[1:5]).nnz == 0
