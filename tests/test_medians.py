"""Per-gene non-zero medians (scmf_shards.medians) and their place in a converted dataset:
``var/nonzero_median`` in every shard, ``CellDataset.gene_nonzero_median``, ``output="rank"``."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from conftest import hpc_genes

from scmf_loader import CellDataLoader, CellDataset
from scmf_loader.errors import ScmfError, ShardCorruptError
from scmf_loader.format import read_manifest
from scmf_loader.vocab import GeneVocab
from scmf_shards.convert import convert_h5ad
from scmf_shards.medians import (
    BIN_BITS,
    NonzeroHistogram,
    chunk_histogram,
    load_medians,
    merge_histograms,
    save_medians,
)


def _reference(genes: np.ndarray, values: np.ndarray, n_genes: int) -> np.ndarray:
    """np.median of each gene's non-zero values (float64, as float32); NaN without any."""
    out = np.full(n_genes, np.nan, dtype=np.float32)
    keep = values != 0
    genes, values = genes[keep], values[keep].astype(np.float64)
    for g in np.unique(genes):
        out[g] = np.median(values[genes == g])
    return out


def _chunked(genes: np.ndarray, values: np.ndarray, n_genes: int, cuts: list[int],
             exact_limit: int = 1 << 23) -> NonzeroHistogram:
    bounds = [0, *cuts, len(values)]
    parts = [chunk_histogram(genes[a:b], values[a:b], n_genes, exact_limit) for a, b in zip(bounds, bounds[1:], strict=False)]
    return merge_histograms(parts, n_genes, exact_limit)


def test_counts_are_exact_whatever_the_chunking_and_merge_order() -> None:
    """Integer values (small ones through the dense table, large and negative ones through
    the grouped path) give numpy's median exactly, for any split into chunks and any order."""
    rng = np.random.default_rng(0)
    n, n_genes = 60_000, 300
    genes = rng.integers(4, n_genes - 20, n).astype(np.int32)  # ids < 4 and the last 20 stay empty
    values = rng.negative_binomial(2, 0.2, n).astype(np.float32)  # zeros included: skipped
    values[rng.random(n) < 0.05] *= 100  # some beyond the dense table
    values[rng.random(n) < 0.01] *= -1   # negative integers (normalised data, no log1p)
    ref = _reference(genes, values, n_genes)
    whole = chunk_histogram(genes, values, n_genes)
    assert whole.kind == "int"
    assert np.array_equal(whole.medians(), ref, equal_nan=True)
    assert np.isnan(ref[:4]).all()
    assert np.isnan(ref[-20:]).all()
    parts = [chunk_histogram(genes[a : a + 7000], values[a : a + 7000], n_genes) for a in range(0, n, 7000)]
    for order in (parts, parts[::-1], [parts[i] for i in rng.permutation(len(parts))]):
        merged = merge_histograms(order, n_genes)
        assert np.array_equal(merged.medians(), ref, equal_nan=True)
        assert np.array_equal(merged.keys, whole.keys)
        assert np.array_equal(merged.counts, whole.counts)
    for dtype in ("int32", "uint16"):  # integer dtypes: the same counts
        pos = values > 0
        h = chunk_histogram(genes[pos], values[pos].astype(dtype), n_genes)
        assert np.array_equal(h.medians(), _reference(genes[pos], values[pos], n_genes), equal_nan=True)


def test_even_counts_take_the_mean_of_the_two_middle_values() -> None:
    genes = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2], dtype=np.int32)
    values = np.array([1, 2, 1, 2, 3, 10, 5, 0, 7], dtype=np.float32)
    med = chunk_histogram(genes, values, 4).medians()
    assert med.dtype == np.float32
    assert med[:3].tolist() == [1.5, 2.5, 6.0]
    assert np.isnan(med[3])


def test_non_integer_values_are_exact_up_to_the_limit() -> None:
    rng = np.random.default_rng(1)
    genes = rng.integers(0, 50, 20_000).astype(np.int32)
    values = np.log1p(rng.gamma(0.7, 3.0, 20_000)).astype(np.float32)
    h = _chunked(genes, values, 50, [5000, 12_000], exact_limit=20_000)
    assert h.kind == "float"
    assert np.array_equal(h.medians(), _reference(genes, values, 50), equal_nan=True)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_streaming_approximation_within_one_percent(sign: float) -> None:
    """Above the exact limit: binned keys, every gene's median within 2**-7 (< 1%) of numpy's,
    on values spread over many orders of magnitude; the same result for every chunking."""
    rng = np.random.default_rng(2)
    n, n_genes = 200_000, 400
    genes = rng.integers(0, n_genes, n).astype(np.int32)
    scale = np.exp(rng.uniform(-20, 20, n_genes))  # each gene in its own range
    values = (sign * scale[genes] * rng.lognormal(0.0, 1.5, n)).astype(np.float32)
    ref = _reference(genes, values, n_genes)
    a = _chunked(genes, values, n_genes, [50_000, 120_000], exact_limit=1000)
    b = _chunked(genes, values, n_genes, [10_000, 90_000, 91_000, 150_000], exact_limit=1000)
    assert a.kind == b.kind == "bin"
    rel = np.abs(a.medians().astype(np.float64) - ref) / np.abs(ref)
    assert rel.max() <= 2.0**-BIN_BITS < 0.01
    assert np.array_equal(a.medians(), b.medians())
    octaves = np.floor(np.log2(scale * 60)) - np.floor(np.log2(scale / 60)) + 1  # lognormal: >4 sigma
    assert (np.diff(a.indptr) <= 2**BIN_BITS * octaves).all()  # memory: bins of the range only


def test_bins_hold_their_values_over_the_float32_range() -> None:
    """Every magnitude from subnormal to near float32's largest lands in a bin whose
    interpolated median is within 2**-7 of it (a single value: the bin's middle)."""
    values = np.float32(2.0) ** np.arange(-125, 127, 0.37, dtype=np.float64).astype(np.float32)
    values = np.concatenate([values, values * np.float32(1.0078), -values]).astype(np.float32)
    genes = np.arange(values.size, dtype=np.int32)
    h = chunk_histogram(genes, values, values.size, exact_limit=0)
    assert h.kind == "bin"
    rel = np.abs(h.medians().astype(np.float64) - values) / np.abs(values)
    assert rel.max() <= 2.0**-BIN_BITS


def test_the_kind_follows_the_data_not_the_chunking() -> None:
    """int when every value is an integer; float up to the limit; bin beyond it, whichever
    chunk comes first."""
    rng = np.random.default_rng(3)
    genes = rng.integers(0, 20, 3000).astype(np.int32)
    counts = rng.integers(1, 9, 3000).astype(np.float32)
    frac = counts + np.float32(0.5)
    for first, second in ((counts, frac), (frac, counts)):
        parts = [chunk_histogram(genes, first, 20, 4000), chunk_histogram(genes[:500], second[:500], 20, 4000)]
        assert merge_histograms(parts, 20, 4000).kind == "float"  # 3500 <= 4000
        parts.append(chunk_histogram(genes, first, 20, 4000))
        assert merge_histograms(parts, 20, 4000).kind == "bin"  # 6500 > 4000
    assert merge_histograms([chunk_histogram(genes, counts, 20, 10)] * 3, 20, 10).kind == "int"


def test_histogram_and_medians_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    genes = rng.integers(0, 30, 500).astype(np.int32)
    values = {"int": rng.integers(1, 2**40, 500).astype(np.float64),  # beyond int32 keys
              "float": rng.random(500).astype(np.float32),
              "bin": -rng.lognormal(0, 20, 500).astype(np.float32)}
    for kind, v in values.items():
        h = chunk_histogram(genes, v, 30, exact_limit=0 if kind == "bin" else 1000)
        h.save(tmp_path / "sub" / f"{kind}.npz")
        back = NonzeroHistogram.load(tmp_path / "sub" / f"{kind}.npz")
        assert back.kind == h.kind == kind
        assert back.nnz == h.nnz
        assert np.array_equal(back.keys, h.keys)
        assert np.array_equal(back.medians(), h.medians(), equal_nan=True)
    (tmp_path / "bad.npz").write_bytes(b"not a histogram")
    with pytest.raises(ShardCorruptError, match="bad.npz"):
        NonzeroHistogram.load(tmp_path / "bad.npz")
    save_medians(tmp_path / "m.npy", h.medians())
    assert np.array_equal(load_medians(tmp_path / "m.npy", 30), h.medians(), equal_nan=True)
    with pytest.raises(ShardCorruptError, match="m.npy"):
        load_medians(tmp_path / "m.npy", 31)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# ---- in a converted dataset ---------------------------------------------------------------


def _input_medians(paths: list[Path], vocab: GeneVocab) -> np.ndarray:
    """Each vocabulary gene's non-zero median over all inputs, read with anndata."""
    genes, values = [], []
    for p in paths:
        a = ad.read_h5ad(p)
        X = sp.coo_matrix(a.X)
        ids = vocab.encode([g.split(".")[0] for g in a.var_names])
        keep = ids[X.col] != 1  # <unk>: genes outside the vocabulary are dropped
        genes.append(ids[X.col][keep])
        values.append(X.data[keep])
    return _reference(np.concatenate(genes), np.concatenate(values), len(vocab))


def _stored_medians(out: Path) -> list[np.ndarray]:
    m = read_manifest(out)
    return [np.asarray(zarr.open_group(str(out / s.path), mode="r")["var"]["nonzero_median"][...])
            for s in m.shards]


@pytest.mark.parametrize("path", ["one-pass", "two-stage"])
def test_converted_dataset_stores_the_exact_medians(three_sources: list[Path], tmp_path: Path, path: str) -> None:
    """Counts: every shard's var/nonzero_median (float32) equals np.median of each gene's
    non-zero values computed from the inputs through anndata; the same on both paths."""
    limit = "1KB" if path == "two-stage" else "4GB"
    out = tmp_path / "ds"
    convert_h5ad(three_sources, out, shard_size=400, chunk_size=256, memory_limit=limit, quiet=True)
    vocab = GeneVocab.human_protein_coding()
    ref = _input_medians(three_sources, vocab)
    stored = _stored_medians(out)
    assert len(stored) == 4
    assert all(s.dtype == np.float32 for s in stored)
    for s in stored:
        assert np.array_equal(s, ref, equal_nan=True)
    assert np.array_equal(CellDataset(out).gene_nonzero_median, ref, equal_nan=True)
    assert np.isfinite(ref).sum() > 300
    assert np.isnan(ref[:4]).all()
    assert ad.read_zarr(out / read_manifest(out).shards[0].path).var["nonzero_median"].dtype == np.float32


def test_baked_preprocessing_medians_are_over_the_stored_values(three_sources: list[Path], tmp_path: Path) -> None:
    """With baked normalisation and log1p the medians are those of the values the shards
    hold (exact: the dataset is under the exact limit)."""
    out = tmp_path / "baked"
    convert_h5ad(three_sources, out, shard_size=400, chunk_size=256, quiet=True,
                 preprocessing={"normalize": "library_size", "log1p": True, "bake": True})
    genes, values = [], []
    for s in read_manifest(out).shards:
        X = ad.read_zarr(out / s.path).X
        genes.append(X.indices)
        values.append(X.data)
    ref = _reference(np.concatenate(genes), np.concatenate(values), len(GeneVocab.human_protein_coding()))
    assert np.array_equal(CellDataset(out).gene_nonzero_median, ref, equal_nan=True)


def _rank_reference(batch: dict, medians: np.ndarray, max_genes: int) -> np.ndarray:
    indptr, indices, values = (np.asarray(batch[k]) for k in ("indptr", "indices", "values"))
    rows = []
    for i in range(len(indptr) - 1):
        g, v = indices[indptr[i] : indptr[i + 1]], values[indptr[i] : indptr[i + 1]].astype(np.float32)
        ratio = v / medians[g]
        order = np.lexsort((g, -ratio))[:max_genes]  # ratio descending, ties: lower id
        rows.append(np.concatenate([[3], g[order], np.zeros(max_genes - len(order), dtype=g.dtype)]))
    return np.stack(rows)


def test_rank_output_end_to_end(three_sources: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    convert_h5ad(three_sources, out, shard_size=400, chunk_size=256, quiet=True)
    ds = CellDataset(out)
    ranked = CellDataLoader(ds, batch_size=64, shuffle=False, output="rank", max_genes=32, num_workers=0,
                            drop_last=False)
    plain = CellDataLoader(ds, batch_size=64, shuffle=False, output="csr", num_workers=0, drop_last=False)
    n = 0
    for r, b in zip(ranked, plain, strict=True):
        csr = {"indptr": b.indptr, "indices": b.indices, "values": b.values}
        expect = _rank_reference(csr, ds.gene_nonzero_median, 32)
        assert np.array_equal(r["gene_indices"].numpy(), expect)
        assert np.array_equal(r["attention_mask"].numpy(), expect != 0)
        n += len(expect)
    assert n == len(ds)


def test_dataset_without_medians_reads_but_refuses_rank(three_sources: list[Path], tmp_path: Path) -> None:
    """An older dataset (no var/nonzero_median) opens and serves CSR batches; rank output
    is refused naming the fix."""
    out = tmp_path / "old"
    convert_h5ad(three_sources[:1], out, shard_size=400, chunk_size=256, quiet=True)
    for s in read_manifest(out).shards:
        var = out / s.path / "var"
        shutil.rmtree(var / "nonzero_median")
        group = zarr.open_group(str(var), mode="r+")
        group.attrs["column-order"] = [c for c in group.attrs["column-order"] if c != "nonzero_median"]
    ds = CellDataset(out)
    assert sum(len(b.indptr) - 1 for b in CellDataLoader(ds, batch_size=100, output="csr", num_workers=0)) == len(ds)
    with pytest.raises(ScmfError, match="re-convert"):
        CellDataLoader(ds, batch_size=100, output="rank", num_workers=0)


def test_appended_version_keeps_the_parents_medians(make_h5ad: Callable[..., Path], tmp_path: Path) -> None:
    """docs/versions.md: the new shards of a child carry BASE's medians (BASE's shards are
    reused untouched, and every shard holds the same array)."""
    from scmf_shards.versions import append_dataset

    genes = hpc_genes()[:300]
    base_in = make_h5ad("base.h5ad", 400, genes, seed=5)
    new_in = make_h5ad("new.h5ad", 300, genes, seed=6, density=0.3)
    base = tmp_path / "base"
    convert_h5ad([base_in], base, shard_size=200, quiet=True)
    child = tmp_path / "child"
    append_dataset(base, [new_in], child)
    parent = CellDataset(base).gene_nonzero_median
    assert len(_stored_medians(child)) == 4
    for s in _stored_medians(child):
        assert np.array_equal(s, parent, equal_nan=True)
