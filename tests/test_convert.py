"""The h5ad converter: round trip through an independent reader, determinism, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import hpc_genes

from scmf_loader.errors import (
    DatasetExistsError,
    InvalidInputError,
    ScmfError,
    VocabularyError,
)
from scmf_loader.format import FORMAT_VERSION, read_manifest
from scmf_loader.vocab import GeneVocab
from scmf_shards.convert import convert_h5ad


def _source_cells(path: Path, vocab: GeneVocab) -> dict[str, dict[int, float]]:
    """Each cell's non-zeros keyed by vocabulary id, read with anndata (independent path)."""
    a = ad.read_h5ad(path)
    X = sp.csr_matrix(a.X)
    ids = vocab.encode(a.var_names)
    out = {}
    for i, cell in enumerate(a.obs_names):
        row = X.getrow(i)
        out[cell] = {int(ids[j]): float(v) for j, v in zip(row.indices, row.data, strict=True) if ids[j] != 1 and v != 0}
    return out


def _shard_cells(out: Path) -> tuple[dict[tuple[str, str], dict[int, float]], list[ad.AnnData]]:
    manifest = read_manifest(out)
    cells: dict[tuple[str, str], dict[int, float]] = {}
    shards = []
    for s in manifest.shards:
        a = ad.read_zarr(out / s.path)
        shards.append(a)
        X = a.X
        for i, (cell, src) in enumerate(zip(a.obs_names, a.obs["source"], strict=True)):
            key = (str(src), str(cell))
            assert key not in cells, f"cell {key} appears twice"
            lo, hi = X.indptr[i], X.indptr[i + 1]
            cells[key] = dict(zip(X.indices[lo:hi].tolist(), X.data[lo:hi].astype(float).tolist(), strict=True))
    return cells, shards


def test_round_trip_every_nonzero_in_exactly_one_row(three_sources: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    m = convert_h5ad(three_sources, out, shard_size=400, chunk_size=256, obs_columns=("cell_type",), quiet=True)
    vocab = GeneVocab.human_protein_coding()
    cells, shards = _shard_cells(out)
    expected_total = 0
    for p in three_sources:
        for cell, nz in _source_cells(p, vocab).items():
            assert cells[(p.name, cell)] == nz
            expected_total += 1
    assert len(cells) == expected_total == m.n_cells == 1450
    assert m.nnz == sum(len(v) for v in cells.values())
    for a in shards:
        assert a.n_vars == len(vocab)
        assert list(a.var_names[:6]) == vocab.tokens[:6]
        assert isinstance(a.X, sp.csr_matrix)
        for i in range(a.n_obs):  # sorted vocabulary ids within each row
            assert np.all(np.diff(a.X.indices[a.X.indptr[i] : a.X.indptr[i + 1]]) > 0)
        assert str(a.obs["cell_type"].dtype) == "category"
        assert list(a.obs["cell_type"].cat.categories) == ["B cell", "NK cell", "T cell", "monocyte"]


def test_manifest_records_alignment_and_sources(three_sources: list[Path], tmp_path: Path) -> None:
    m = convert_h5ad(three_sources, tmp_path / "ds", shard_size=500, quiet=True)
    by_name = {s.extra["name"]: s for s in m.sources}
    assert (by_name["a.h5ad"].genes_matched, by_name["a.h5ad"].genes_dropped) == (400, 0)
    assert (by_name["b.h5ad"].genes_matched, by_name["b.h5ad"].genes_dropped) == (300, 2)
    assert by_name["c.h5ad"].genes_matched == 300  # versioned ids matched
    assert by_name["b.h5ad"].extra["layout"] == "csc"
    assert by_name["c.h5ad"].extra["layout"] == "dense"
    assert all(s.sha256 and s.size for s in m.sources)
    assert [len(s.categories) for s in m.obs_columns] == [3]
    assert m.n_genes == len(GeneVocab.human_protein_coding())
    assert [s.n_cells for s in m.shards] == [484, 483, 483]


def test_raw_chunks_are_memory_mappable(three_sources: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    m = convert_h5ad(three_sources, out, shard_size=1000, quiet=True)
    for s in m.shards:
        a = ad.read_zarr(out / s.path)
        for name, ref in (("data", a.X.data), ("indices", a.X.indices), ("indptr", a.X.indptr)):
            entry = s.arrays[name]
            mm = np.memmap(out / s.path / entry.path, dtype=entry.dtype, mode="r")
            assert np.array_equal(mm, ref)
            assert mm.nbytes == entry.nbytes


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_inputs_same_id_and_bytes_any_directory(three_sources: list[Path], tmp_path: Path) -> None:
    kw = {"shard_size": 300, "chunk_size": 200, "seed": 3, "obs_columns": ("batch",), "quiet": True}
    m1 = convert_h5ad(three_sources, tmp_path / "one", **kw)
    m2 = convert_h5ad(three_sources, tmp_path / "two" / "nested", **kw)
    assert m1.dataset_id == m2.dataset_id
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "two" / "nested")
    m3 = convert_h5ad(three_sources, tmp_path / "three", **{**kw, "seed": 4})
    assert m3.dataset_id != m1.dataset_id


@pytest.mark.slow
def test_worker_count_does_not_change_the_output(three_sources: list[Path], tmp_path: Path) -> None:
    kw = {"shard_size": 300, "chunk_size": 200, "quiet": True}
    convert_h5ad(three_sources, tmp_path / "w1", workers=1, **kw)
    convert_h5ad(three_sources, tmp_path / "w2", workers=2, **kw)
    assert _tree_bytes(tmp_path / "w1") == _tree_bytes(tmp_path / "w2")


def test_no_shuffle_keeps_input_order(three_sources: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    convert_h5ad(three_sources, out, shard_size=500, shuffle=False, quiet=True)
    _, shards = _shard_cells(out)
    names = [c for a in shards for c in a.obs_names]
    expected = [c for p in three_sources for c in ad.read_h5ad(p, backed="r").obs_names]
    assert names == expected


def test_shuffle_mixes_sources_across_shards(three_sources: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    convert_h5ad(three_sources, out, shard_size=400, quiet=True)
    _, shards = _shard_cells(out)
    for a in shards:
        assert a.obs["source"].nunique() == 3


def test_rerun_of_a_complete_dataset_is_a_no_op(three_sources: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    m1 = convert_h5ad(three_sources, out, quiet=True)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    m2 = convert_h5ad(three_sources, out, quiet=True)
    assert m1 == m2
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_different_dataset_in_output_needs_overwrite(three_sources: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    convert_h5ad(three_sources[:1], out, quiet=True)
    with pytest.raises(DatasetExistsError, match="already holds a different dataset"):
        convert_h5ad(three_sources, out, quiet=True)
    m = convert_h5ad(three_sources, out, quiet=True, overwrite=True)
    assert read_manifest(out).dataset_id == m.dataset_id


def test_foreign_directory_is_never_deleted(three_sources: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(DatasetExistsError, match="not an scmf dataset"):
            convert_h5ad(three_sources, out, quiet=True, overwrite=overwrite)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_union_vocab_and_vocab_file(make_h5ad: Callable[..., Path], tmp_path: Path) -> None:
    a = make_h5ad("a.h5ad", 50, ["g1", "g2", "g3"])
    b = make_h5ad("b.h5ad", 40, ["g3", "g4"])
    m = convert_h5ad([a, b], tmp_path / "u", vocab="union", quiet=True)
    v = GeneVocab.from_file(tmp_path / "u" / "vocab.json")
    assert v.genes == ["g1", "g2", "g3", "g4"]
    assert m.n_genes == 8
    GeneVocab.from_genes(["g4", "g2"]).save(tmp_path / "v.tsv")
    m2 = convert_h5ad([a, b], tmp_path / "f", vocab=str(tmp_path / "v.tsv"), quiet=True)
    assert [s.genes_matched for s in m2.sources] == [1, 1]


def test_raw_and_layer_matrices(tmp_path: Path) -> None:
    import pandas as pd

    genes = hpc_genes()[:20]
    counts = sp.random(30, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.ceil(counts.data * 10)
    a = ad.AnnData(X=counts * 0.5, var=pd.DataFrame(index=genes), obs=pd.DataFrame(index=[f"c{i}" for i in range(30)]))
    a.layers["counts"] = counts
    a.raw = ad.AnnData(X=counts, var=pd.DataFrame(index=genes), obs=a.obs)
    path = tmp_path / "x.h5ad"
    a.write_h5ad(path)
    for matrix in ("raw", "layer:counts"):
        out = tmp_path / matrix.replace(":", "_")
        convert_h5ad([path], out, matrix=matrix, shuffle=False, quiet=True)
        shard = ad.read_zarr(out / "shards" / "000000.zarr")
        assert shard.X.sum() == pytest.approx(counts.sum())
    with pytest.raises(InvalidInputError, match="no matrix 'layers/nope'"):
        convert_h5ad([path], tmp_path / "bad", matrix="layer:nope", quiet=True)


def test_gene_column_from_var_and_raw_var_with_ensembl_versions(tmp_path: Path) -> None:
    """``gene_column`` picks a var column (of raw/var for ``matrix="raw"``): here versioned
    Ensembl ids while var_names are meaningless; every value lands at its gene's token, read
    back through anndata and compared cell by cell."""
    import pandas as pd


    vocab = GeneVocab.human_protein_coding()
    ids = vocab.tokens[10:40]
    rng = np.random.default_rng(5)
    order = rng.permutation(30)
    versioned = [f"{ids[i]}.{rng.integers(1, 20)}" for i in order]
    counts = sp.random(25, 30, density=0.4, format="csr", random_state=1, dtype=np.float32)
    counts.data = np.ceil(counts.data * 9)
    var = pd.DataFrame({"gene_ids": versioned}, index=[f"feature{i}" for i in range(30)])
    obs = pd.DataFrame(index=[f"c{i}" for i in range(25)])
    a = ad.AnnData(X=counts, var=var, obs=obs)
    a.raw = ad.AnnData(X=counts * 2, var=var, obs=obs)
    path = tmp_path / "ens.h5ad"
    a.write_h5ad(path)
    for matrix, factor in (("X", 1), ("raw", 2)):
        out = tmp_path / matrix
        m = convert_h5ad([path], out, matrix=matrix, gene_column="gene_ids", quiet=True, shard_size=10)
        assert m.sources[0].genes_matched == 30
        for shard in sorted((out / "shards").glob("*.zarr")):
            got = ad.read_zarr(shard)
            rows = [int(c[1:]) for c in got.obs_names]
            cols = vocab.encode([ids[i] for i in order])
            np.testing.assert_array_equal(got.X.toarray()[:, cols], factor * counts[rows].toarray())
    with pytest.raises(InvalidInputError, match="var has no column 'nope'"):
        convert_h5ad([path], tmp_path / "bad", gene_column="nope", quiet=True)
    with pytest.raises(VocabularyError, match="none of its 30 genes is in the vocabulary"):
        convert_h5ad([path], tmp_path / "bad2", quiet=True)  # var_names are not genes


# ---- bad input: one clear error, naming the file, and no manifest -----------------------
def _assert_no_dataset(out: Path) -> None:
    assert not (out / "manifest.json").exists()


def test_missing_and_non_h5ad_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match=r"missing\.h5ad: no such file"):
        convert_h5ad([tmp_path / "missing.h5ad"], out, quiet=True)
    junk = tmp_path / "junk.h5ad"
    junk.write_text("hello")
    with pytest.raises(InvalidInputError, match=r"junk\.h5ad: not an HDF5"):
        convert_h5ad([junk], out, quiet=True)
    _assert_no_dataset(out)


@pytest.mark.parametrize(("value", "match"), [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-1.0, "negative")])
def test_bad_values(make_h5ad: Callable[..., Path], tmp_path: Path, value: float, match: str) -> None:
    import h5py

    p = make_h5ad("v.h5ad", 100, hpc_genes()[:50])
    with h5py.File(p, "r+") as f:
        data = f["X/data"][:]
        data[len(data) // 2] = value
        f["X/data"][:] = data
    out = tmp_path / "out"
    with pytest.raises(InvalidInputError, match=rf"v\.h5ad: rows .* {match}"):
        convert_h5ad([p], out, quiet=True, chunk_size=30)
    _assert_no_dataset(out)


def test_duplicate_genes(make_h5ad: Callable[..., Path], tmp_path: Path) -> None:
    g = hpc_genes()
    p = make_h5ad("d.h5ad", 10, [g[0], g[1], f"{g[0]}.3"])
    with pytest.raises(InvalidInputError, match=r"d\.h5ad: duplicate gene ids"):
        convert_h5ad([p], tmp_path / "out", quiet=True)


def test_empty_file_and_zero_overlap(make_h5ad: Callable[..., Path], tmp_path: Path) -> None:
    e = make_h5ad("empty.h5ad", 0, hpc_genes()[:5])
    with pytest.raises(InvalidInputError, match=r"empty\.h5ad: holds no cells"):
        convert_h5ad([e], tmp_path / "out", quiet=True)
    z = make_h5ad("zero.h5ad", 10, ["foo", "bar"])
    with pytest.raises(VocabularyError, match=r"zero\.h5ad: none of its 2 genes is in the vocabulary"):
        convert_h5ad([z], tmp_path / "out", quiet=True)
    _assert_no_dataset(tmp_path / "out")


def test_missing_obs_column_and_bad_options(make_h5ad: Callable[..., Path], tmp_path: Path) -> None:
    p = make_h5ad("o.h5ad", 10, hpc_genes()[:5])
    with pytest.raises(InvalidInputError, match=r"o\.h5ad: obs has no column\(s\) \['donor'\]"):
        convert_h5ad([p], tmp_path / "out", obs_columns=("donor",), quiet=True)
    with pytest.raises(ScmfError, match="shard_size must be >= 1"):
        convert_h5ad([p], tmp_path / "out", shard_size=0)
    with pytest.raises(ScmfError, match="reserved"):
        convert_h5ad([p], tmp_path / "out", obs_columns=("source",))


def test_fsspec_memory_url(make_h5ad: Callable[..., Path], tmp_path: Path) -> None:
    import fsspec

    p = make_h5ad("m.h5ad", 60, hpc_genes()[:40])
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/m.h5ad", p.read_bytes())
    try:
        m_url = convert_h5ad(["memory://bucket/m.h5ad"], tmp_path / "url", quiet=True)
        m_file = convert_h5ad([f"file://{p}"], tmp_path / "file", quiet=True)
        m_path = convert_h5ad([p], tmp_path / "path", quiet=True)
    finally:
        fs.rm("/bucket", recursive=True)
    assert m_url.dataset_id == m_file.dataset_id == m_path.dataset_id
    url, path = _tree_bytes(tmp_path / "url"), _tree_bytes(tmp_path / "path")
    assert url.pop("manifest.json") != path.pop("manifest.json")  # records where it came from
    assert url == path


def test_scipy_indptr_int64_indices_int32_layout(tmp_path: Path) -> None:
    """DESIGN.md §7: files with int64 indptr and int32 indices must convert correctly."""
    import h5py
    from conftest import write_counts_h5ad

    p = write_counts_h5ad(tmp_path / "mixed.h5ad", 200, hpc_genes()[:100])
    with h5py.File(p, "r+") as f:
        indptr = f["X/indptr"][:].astype(np.int64)
        del f["X/indptr"]
        f["X/indptr"] = indptr
        assert f["X/indices"].dtype == np.int32
    m = convert_h5ad([p], tmp_path / "ds", quiet=True)
    assert m.nnz == ad.read_h5ad(p).X.nnz


def test_manifest_is_pure_json(three_sources: list[Path], tmp_path: Path) -> None:
    convert_h5ad(three_sources, tmp_path / "ds", quiet=True)
    doc = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    for s in doc["shards"]:
        assert not s["path"].startswith("/")
        assert ".." not in s["path"]
    assert doc["format"] == "scmf-shards"
    assert doc["format_version"] == FORMAT_VERSION


def test_converter_is_importable_without_side_effects() -> None:
    code = "import scmf_shards.convert, logging; print(logging.getLogger().level)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "30"


def test_task_descriptions_do_not_grow_with_the_number_of_chunks(
    three_sources: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the driver submits per task (pickled, as dask sends it) stays the same size when
    the plan has 4x more chunks: gather tasks read their chunk list from the plan files and
    scatter tasks carry a reference to the gene alignment, not its arrays."""
    import pickle

    from scmf_shards import executor

    sizes: dict[str, list[int]] = {}
    real_map = executor.TaskRunner.map

    def recording_map(self, fn, items, desc):  # type: ignore[no-untyped-def]
        sizes.setdefault(fn.__name__, []).extend(len(pickle.dumps(i)) for i in items)
        return real_map(self, fn, items, desc)

    monkeypatch.setattr(executor.TaskRunner, "map", recording_map)
    largest = {}
    for chunk_size in (400, 100):
        sizes.clear()
        convert_h5ad(three_sources, tmp_path / f"c{chunk_size}", chunk_size=chunk_size,
                     shard_size=500, quiet=True, memory_limit="1KB")  # the two-stage path
        largest[chunk_size] = {k: max(v) for k, v in sizes.items()}
        assert len(sizes["run_scatter"]) >= 1450 // chunk_size
    assert largest[100]["run_gather"] == largest[400]["run_gather"]
    assert largest[100]["run_scatter"] <= largest[400]["run_scatter"] + 64
    assert largest[100]["run_scatter"] < 4000  # no per-gene arrays (a source has 400 genes)


def test_obs_value_outside_the_planned_categories_is_a_clear_error() -> None:
    """Categories are collected before any work; a value a chunk read later does not have
    (the input changed meanwhile) is an InvalidInputError naming file, rows and column."""
    from scmf_shards.convert.scatter import obs_codes

    codes = obs_codes(np.array(["b", None, "a"], dtype=object), ["a", "b"], "cell_type", "f.h5ad: rows [0, 3)")
    assert codes.tolist() == [1, -1, 0]
    assert codes.dtype == np.int32
    with pytest.raises(InvalidInputError, match=r"f\.h5ad: rows \[0, 3\): obs column 'cell_type' holds 'z', "
                       r"which was not among its values when the conversion was planned"):
        obs_codes(np.array(["a", "z", None], dtype=object), ["a", "b"], "cell_type", "f.h5ad: rows [0, 3)")


def test_every_scratch_path_is_under_the_workspace(three_sources: list[Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed at its manifest leaves the scratch directory as the Workspace names it."""
    from scmf_shards import faults
    from scmf_shards.convert.workspace import Workspace

    class Stop(Exception):
        pass

    def stop_at_manifest(label: str) -> None:
        if label == "driver:manifest-tmp":
            raise Stop

    monkeypatch.setattr(faults, "fault_point", stop_at_manifest)
    with pytest.raises(Stop):
        convert_h5ad(three_sources, tmp_path / "ds", shard_size=500, quiet=True)
    ws = Workspace.at(tmp_path / "ds")
    found = {p.relative_to(ws.root).parts[0] for p in ws.root.iterdir()}
    assert found == {ws.plan.name, ws.table.name, ws.vocab.name, ws.records.name, "alignments", "buckets", "medians"}
    assert ws.medians.is_file()
    assert ws.histogram(0).is_file()
    assert ws.read_plan()["n_shards"] == 3
    assert sorted(p.name for p in ws.records.iterdir()) == [ws.record(i).name for i in range(3)]
    assert ws.alignment(2).is_file()
    assert ws.bucket_root(None, "x") == ws.root / "buckets"
