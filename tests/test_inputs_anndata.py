"""Every kind of AnnData input converts, and the shards hold what anndata reads from it:
scanpy's legacy pbmc68k_reduced, the embedded PBMC sample, zarr stores (v2, v3), a directory
(or glob) of .h5ad chunks, and an scmf dataset directory re-converted."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scmf_loader.format import read_manifest
from scmf_loader.vocab import GeneVocab
from scmf_shards.cli import main
from scmf_shards.convert import convert_h5ad

KW = {"shard_size": 400, "chunk_size": 256, "obs_columns": ("cell_type",), "quiet": True}


def _read(path: Path) -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata on old formats and zarr v2
        return ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)


def _expected(matrix: sp.spmatrix | np.ndarray, genes: list[str], cells: list[str], vocab: GeneVocab,
              prefix: str = "") -> dict[str, dict[int, float]]:
    """Each cell's non-zeros keyed by vocabulary id: anndata's matrix, genes encoded by the
    vocabulary (unknown genes dropped), independent of the converter's alignment code."""
    x = sp.csr_matrix(matrix)
    ids = vocab.encode(genes)
    out = {}
    for i, cell in enumerate(cells):
        lo, hi = x.indptr[i], x.indptr[i + 1]
        out[prefix + cell] = {int(ids[j]): float(v) for j, v in zip(x.indices[lo:hi], x.data[lo:hi], strict=True)
                              if ids[j] != 1 and v != 0}
    return out


def _stored(out: Path, with_source: bool = False) -> dict[str, dict[int, float]]:
    """Each stored cell's non-zeros keyed by vocabulary id, read with anndata.read_zarr."""
    cells: dict[str, dict[int, float]] = {}
    for s in read_manifest(out).shards:
        a = _read(out / s.path)
        for i, cell in enumerate(a.obs_names):
            key = f"{a.obs['source'].iloc[i]}/{cell}" if with_source else str(cell)
            assert key not in cells
            lo, hi = a.X.indptr[i], a.X.indptr[i + 1]
            cells[key] = dict(zip(a.X.indices[lo:hi].tolist(), a.X.data[lo:hi].astype(float).tolist(), strict=True))
    return cells


def _pbmc68k() -> Path:
    import scanpy

    return Path(scanpy.__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad"


def test_pbmc68k_default_conversion_is_refused_with_the_raw_options(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["h5ad", str(_pbmc68k()), "--output", str(tmp_path / "ds"), "--quiet"])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "10x_pbmc68k_reduced.h5ad: X holds negative values" in lines[0]
    assert "--matrix raw --assume-normalized --no-log1p" in lines[0]
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_pbmc68k_raw_converts_to_anndatas_raw_values(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    result = CliRunner().invoke(main, [
        "anndata", str(_pbmc68k()), "--output", str(out), "--matrix", "raw", "--assume-normalized",
        "--no-log1p", "--obs-columns", "bulk_labels", "--quiet"])
    assert result.exit_code == 0, result.output
    ref = _read(_pbmc68k())
    vocab = GeneVocab.human_protein_coding()
    want = _expected(ref.raw.X, list(ref.raw.var_names), list(ref.obs_names), vocab)
    assert sum(len(v) for v in want.values()) > 100_000  # symbols resolved: most genes kept
    assert _stored(out) == want
    m = read_manifest(out)
    assert m.sources[0].extra["matrix"] == "raw"
    assert m.sources[0].extra["layout"] == "csr"
    cats = {c.name: list(c.categories) for c in m.obs_columns}
    assert cats["bulk_labels"] == sorted(ref.obs["bulk_labels"].cat.categories)


def test_embedded_pbmc_sample(tmp_path: Path) -> None:
    from scmf_shards.demo import demo_h5ad_path

    path = demo_h5ad_path()
    m = convert_h5ad([path], tmp_path / "ds", shard_size=200, quiet=True)
    ref = _read(path)
    assert m.n_cells == ref.n_obs
    assert _stored(tmp_path / "ds") == _expected(ref.X, list(ref.var_names), list(ref.obs_names),
                                                 GeneVocab.human_protein_coding())


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_stores_written_by_anndata(three_sources: list[Path], tmp_path: Path, zarr_format: int) -> None:
    stores = []
    for p in three_sources[:2]:  # CSR and CSC
        store = tmp_path / f"{p.stem}.zarr"
        with warnings.catch_warnings(), ad.settings.override(zarr_write_format=zarr_format):
            warnings.simplefilter("ignore")
            _read(p).write_zarr(store)
        stores.append(store)
    m = convert_h5ad(stores, tmp_path / "ds", **KW)
    assert [s.kind for s in m.sources] == ["anndata_zarr", "anndata_zarr"]
    assert [s.extra["layout"] for s in m.sources] == ["csr", "csc"]
    vocab = GeneVocab.human_protein_coding()
    want = {}
    for store in stores:
        ref = _read(store)
        want.update(_expected(ref.X, list(ref.var_names), list(ref.obs_names), vocab, f"{store.name}/"))
    assert _stored(tmp_path / "ds", with_source=True) == want


def test_directory_and_glob_of_three_chunks(three_sources: list[Path], tmp_path: Path) -> None:
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    for p in three_sources:
        shutil.copy(p, chunks / f"part-{p.name}")
    (chunks / "README.txt").write_text("not an input")
    listed = sorted(chunks.glob("part-*.h5ad"))
    by_dir = convert_h5ad([chunks], tmp_path / "dir", **KW)
    by_glob = convert_h5ad([str(chunks / "part-*.h5ad")], tmp_path / "glob", **KW)
    by_list = convert_h5ad(listed, tmp_path / "list", **KW)
    assert [s.path for s in by_dir.sources] == [str(p) for p in listed]
    assert by_dir.dataset_id == by_glob.dataset_id == by_list.dataset_id
    vocab = GeneVocab.human_protein_coding()
    want = {}
    for p in listed:
        ref = _read(p)
        want.update(_expected(ref.X, list(ref.var_names), list(ref.obs_names), vocab, f"{p.name}/"))
    assert _stored(tmp_path / "dir", with_source=True) == want


def test_csc_input_is_transposed_once_per_conversion(make_h5ad: object, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import hpc_genes

    import scmf_shards.sources.csc as csc

    calls = []
    real = csc.transpose_csc

    def counting(*args: object, **kwargs: object) -> Path:
        calls.append(args[3])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(csc, "transpose_csc", counting)
    genes = hpc_genes()[:300]
    csr = make_h5ad("r.h5ad", 900, genes, layout="csr", seed=4, cell_prefix="c")  # type: ignore[operator]
    csc_path = make_h5ad("c.h5ad", 900, genes, layout="csc", seed=4, cell_prefix="c")  # type: ignore[operator]
    opts = {**KW, "chunk_size": 100}  # nine read chunks
    convert_h5ad([csc_path], tmp_path / "csc", **opts)
    assert len(calls) == 1
    convert_h5ad([csr], tmp_path / "csr", **opts)
    assert len(calls) == 1
    assert _stored(tmp_path / "csc") == _stored(tmp_path / "csr")


def test_dataset_directory_as_input(three_sources: list[Path], tmp_path: Path) -> None:
    parent = convert_h5ad(three_sources, tmp_path / "parent", **{**KW, "obs_columns": ("cell_type", "batch")})
    genes = GeneVocab.human_protein_coding().genes
    small = GeneVocab.from_genes(genes[100:450])  # another vocabulary: a subset of the genes
    small.save(tmp_path / "small.json")
    child = convert_h5ad([tmp_path / "parent"], tmp_path / "child", shard_size=250, quiet=True,
                         vocab=str(tmp_path / "small.json"),
                         obs_columns=("cell_type", "parent_source"))
    src = child.sources[0]
    assert src.kind == "scmf_dataset"
    assert src.extra["parent_dataset_id"] == parent.dataset_id
    assert (child.n_cells, len(child.shards)) == (parent.n_cells, 6)
    # values: the parent's cells restricted to the new vocabulary (by token)
    parent_vocab = GeneVocab.from_file(tmp_path / "parent" / "vocab.json")
    to_small = small.encode(parent_vocab.tokens)
    want = {cell: {int(to_small[t]): v for t, v in row.items() if to_small[t] != 1}
            for cell, row in _stored(tmp_path / "parent").items()}
    assert _stored(tmp_path / "child") == want
    # obs: the parent's source column (as parent_source) and cell types carried over, and
    # the parent's library sizes (totals over the original inputs' genes)
    cats = {c.name: list(c.categories) for c in child.obs_columns}
    assert cats["source"] == ["parent"]
    assert cats["parent_source"] == ["a.h5ad", "b.h5ad", "c.h5ad"]
    assert cats["cell_type"] == [list(c.categories) for c in parent.obs_columns if c.name == "cell_type"][0]

    def per_cell(out: Path, column: str) -> dict[str, object]:
        found = {}
        for s in read_manifest(out).shards:
            a = _read(out / s.path)
            found.update(zip(map(str, a.obs_names), a.obs[column].astype(object).tolist(), strict=True))
        return found

    assert per_cell(tmp_path / "child", "library_size") == per_cell(tmp_path / "parent", "library_size")
    assert per_cell(tmp_path / "child", "parent_source") == per_cell(tmp_path / "parent", "source")
    assert per_cell(tmp_path / "child", "cell_type") == per_cell(tmp_path / "parent", "cell_type")


def test_dataset_at_a_url_as_input(three_sources: list[Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset at an fsspec URL converts like the same dataset on disk (read through the
    verified shard cache), and the new manifest names the parent's dataset_id."""
    import fsspec

    monkeypatch.setenv("SCMF_CACHE_DIR", str(tmp_path / "cache"))
    parent = convert_h5ad(three_sources, tmp_path / "parent", **KW)
    fs = fsspec.filesystem("memory")
    root = f"/scmf-test-{tmp_path.name}/parent"
    fs.put(str(tmp_path / "parent"), root, recursive=True)
    try:
        remote = convert_h5ad([f"memory://{root}"], tmp_path / "from_url", shard_size=250, quiet=True)
    finally:
        fs.rm(root, recursive=True)
    local = convert_h5ad([tmp_path / "parent"], tmp_path / "from_dir", shard_size=250, quiet=True)
    assert remote.sources[0].kind == "scmf_dataset"
    assert remote.sources[0].extra["parent_dataset_id"] == parent.dataset_id
    assert _stored(tmp_path / "from_url") == _stored(tmp_path / "from_dir") == _stored(tmp_path / "parent")
    assert remote.n_cells == local.n_cells == parent.n_cells
