"""Preprocessing at conversion: out-of-core HVG over several inputs equals scanpy in memory
on the concatenated vocabulary-aligned data; baked shards equal raw shards preprocessed by
the loader, batch for batch; the manifest records everything; workers do not matter."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import hpc_genes
from preprocess_helpers import (
    concat_aligned,
    counts,
    read_h5ad,
    scanpy_hvg,
    scanpy_normalize,
    simulate_sized_counts,
    write_h5ad,
)

from scmf_loader.dataset import CellDataset
from scmf_loader.errors import ConfigurationError, InvalidInputError
from scmf_loader.format import read_manifest
from scmf_loader.preprocess import PreprocessingPipeline
from scmf_loader.vocab import GeneVocab
from scmf_shards.convert import convert_h5ad

N_TOP = 40


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three inputs with different, overlapping gene sets (CSR, CSC, dense), genes outside
    the vocabulary (they count in library sizes), all-zero genes and all-zero cells."""
    d = tmp_path_factory.mktemp("prep_inputs")
    g = hpc_genes()
    a = write_h5ad(d / "a.h5ad", counts(260, 150, 1, zero_genes=[4], zero_cells=[3]), g[:150], 1)
    b_genes = [*reversed(g[100:220]), "NOT_A_GENE_1"]
    b = write_h5ad(d / "b.h5ad", counts(190, len(b_genes), 2, zero_cells=[0, 1]), b_genes, 2, layout="csc")
    c = write_h5ad(d / "c.h5ad", counts(150, 90, 3, zero_genes=[10, 11]), g[60:150], 3, layout="dense",
                   batches=("b2", "b3", "b4"))
    return [a, b, c]


def _reference(paths: list[Path], flavor: str, batch_key: str | None) -> tuple[list[str], object]:
    """scanpy in memory: normalise + log1p each source on all its genes, align to the
    vocabulary, concatenate (absent genes are zero), HVG."""
    vocab = GeneVocab.human_protein_coding()
    parts = []
    for p in paths:
        a = read_h5ad(p)
        if flavor != "seurat_v3":
            scanpy_normalize(a)
        parts.append(a[:, [g for g in a.var_names if g in vocab]].copy())
    present = sorted({g for p in parts for g in p.var_names}, key=lambda t: int(vocab.encode([t])[0]))
    cat = concat_aligned(parts, present)
    df = scanpy_hvg(cat, N_TOP, flavor, batch_key)
    return [g for g, hv in zip(present, df["highly_variable"].to_numpy(), strict=True) if hv], cat


def _convert(paths: list[Path], out: Path, shard_size: int = 1000, **prep: object) -> object:
    return convert_h5ad(paths, out, chunk_size=97, shard_size=shard_size, quiet=True, preprocessing=prep)


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger", "seurat_v3"])
@pytest.mark.parametrize("batch_key", [None, "batch"])
def test_out_of_core_hvg_equals_scanpy(inputs: list[Path], tmp_path: Path, flavor: str, batch_key: str | None) -> None:
    if flavor == "seurat_v3":
        pytest.importorskip("skmisc")
    m = _convert(inputs, tmp_path / "ds", hvg_selection=N_TOP, hvg_flavor=flavor, hvg_batch_key=batch_key,
                 bake=True)
    expected, _ = _reference(inputs, flavor, batch_key)
    assert m.preprocessing["hvg_genes"] == expected
    assert m.n_genes == len(GeneVocab.human_protein_coding())  # ids stay the vocabulary's
    ds = CellDataset(tmp_path / "ds")
    batch = ds.__getitems__(np.arange(len(ds)))
    vocab = GeneVocab.human_protein_coding()
    assert set(torch.unique(batch.indices).tolist()) <= set(vocab.encode(expected).tolist())


def test_baked_values_equal_scanpy(inputs: list[Path], tmp_path: Path) -> None:
    m = _convert(inputs, tmp_path / "ds", hvg_selection=N_TOP, bake=True)
    genes, cat = _reference(inputs, "seurat", None)
    ref = cat[:, genes]
    vocab = GeneVocab.human_protein_coding()
    col = {int(v): i for i, v in enumerate(vocab.encode(genes))}
    ds = CellDataset(tmp_path / "ds")
    b = ds.__getitems__(np.arange(len(ds)))
    dense = np.zeros((len(ds), len(genes)), dtype=np.float32)
    rows = np.repeat(np.arange(len(ds)), b.lengths().numpy())
    dense[rows, [col[int(i)] for i in b.indices]] = b.values.numpy()
    order = [ref.obs_names.get_loc(f"{n}-{k}") for n, k in zip(ds.cell_names(np.arange(len(ds))), _source_index(ds), strict=True)]
    np.testing.assert_array_equal(dense, ref.X.toarray()[order])
    assert m.preprocessing["baked"] is True
    assert m.preprocessing["log1p"] is True


def _source_index(ds: CellDataset) -> list[int]:
    codes = ds.__getitems__(np.arange(len(ds))).obs["source"].numpy()
    return codes.tolist()


@pytest.mark.parametrize("normalize", ["library_size", "scran"])
def test_baked_equals_not_baked_batch_for_batch(inputs: list[Path], tmp_path: Path, normalize: str) -> None:
    prep = {"normalize": normalize, "hvg_selection": N_TOP, "hvg_batch_key": "batch"}
    baked = _convert(inputs, tmp_path / "baked", 200, **prep, bake=True)
    raw = _convert(inputs, tmp_path / "raw", 200, **prep, bake=False)
    assert baked.preprocessing["hvg_genes"] == raw.preprocessing["hvg_genes"]
    assert raw.preprocessing["baked"] is False
    stat = "size_factor" if normalize == "scran" else "library_size"
    assert stat in raw.cell_stats
    assert raw.preprocessing["cell_stat"] == stat
    pipe = PreprocessingPipeline.for_loader(raw.preprocessing)
    assert pipe is not None
    assert PreprocessingPipeline.for_loader(baked.preprocessing) is None
    a = CellDataset(tmp_path / "baked")
    b = CellDataset(tmp_path / "raw", preprocessing=pipe)
    c = CellDataset(tmp_path / "raw")  # default: the pipeline the manifest records
    counts = CellDataset(tmp_path / "raw", preprocessing="raw")
    assert a.preprocessing is None
    assert c.preprocessing == pipe
    assert counts.preprocessing is None
    rng = np.random.default_rng(0)
    batches = [np.arange(s, min(s + 64, len(a))) for s in range(0, len(a), 64)]
    batches.append(rng.permutation(len(a))[:100])  # a gathered (non-contiguous) batch
    for ids in batches:
        x, y, z = a.__getitems__(ids), b.__getitems__(ids), c.__getitems__(ids)
        assert torch.equal(x.indptr, y.indptr)
        assert torch.equal(x.indices, y.indices)
        assert torch.equal(x.values, y.values)  # bit for bit
        assert torch.equal(x.values, z.values)
        raw_values = counts.__getitems__(ids).values
        assert torch.equal(raw_values, torch.round(raw_values))  # stored counts, untouched


def test_scran_manifest_and_size_factors(inputs: list[Path], tmp_path: Path) -> None:
    m = _convert(inputs, tmp_path / "ds", normalize="scran")
    assert m.cell_stats == ("library_size", "size_factor")
    p = m.preprocessing
    assert p["normalize"] == "scran"
    assert p["hvg_genes"] is None
    assert p["scran"]["min_mean"] == 0.1
    ds = CellDataset(tmp_path / "ds")
    b = ds.__getitems__(np.arange(len(ds)))
    sf, lib = b.stats["size_factor"].numpy(), b.stats["library_size"].numpy()
    assert sf.dtype == np.float64
    assert np.all((sf == 0) == (lib == 0))  # empty cells: no size factor
    assert sf[sf > 0].mean() == pytest.approx(1.0)
    src = b.obs["source"].numpy()
    for s in range(3):  # within an input, size factors follow library sizes
        ok = (src == s) & (sf > 0)
        assert np.corrcoef(np.log(sf[ok]), np.log(lib[ok]))[0, 1] > 0.75


@pytest.mark.slow
def test_same_dataset_whatever_the_workers(inputs: list[Path], tmp_path: Path) -> None:
    prep = {"normalize": "scran", "hvg_selection": N_TOP, "hvg_flavor": "seurat", "hvg_batch_key": "batch"}
    one = convert_h5ad(inputs, tmp_path / "one", chunk_size=97, shard_size=200, quiet=True, preprocessing=prep)
    two = convert_h5ad(inputs, tmp_path / "two", chunk_size=97, shard_size=200, quiet=True, preprocessing=prep,
                       workers=2)
    assert one.dataset_id == two.dataset_id
    assert one.preprocessing == two.preprocessing
    assert [s.arrays for s in one.shards] == [s.arrays for s in two.shards]
    assert (tmp_path / "one/manifest.json").read_bytes() == (tmp_path / "two/manifest.json").read_bytes()


def test_equal_configurations_same_id(inputs: list[Path], tmp_path: Path) -> None:
    short = _convert(inputs[:1], tmp_path / "a", hvg=20)
    full = _convert(inputs[:1], tmp_path / "b", normalize="library_size", target_sum=1e4, log1p=True,
                    hvg_selection=20, hvg_flavor="seurat", bake=False)
    assert short.dataset_id == full.dataset_id
    assert read_manifest(tmp_path / "a").preprocessing == full.preprocessing


def test_errors_before_any_work(inputs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="more highly variable genes"):
        _convert(inputs, tmp_path / "x", hvg_selection=10_000)
    with pytest.raises(ConfigurationError, match="donor"):
        _convert(inputs, tmp_path / "y", hvg_selection=10, hvg_batch_key="donor")
    with pytest.raises(ConfigurationError, match="float --dtype"):
        convert_h5ad(inputs, tmp_path / "z", dtype="int32", preprocessing={"bake": True})
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "y").exists()


def test_non_count_input(tmp_path: Path) -> None:
    frac = counts(50, 30, 5) * 0.25
    p = write_h5ad(tmp_path / "frac.h5ad", frac, hpc_genes()[:30], 5)
    with pytest.raises(InvalidInputError, match="non-integer"):
        _convert([p], tmp_path / "a", normalize="library_size")
    assert not (tmp_path / "a" / "manifest.json").exists()
    m = _convert([p], tmp_path / "b", assume_normalized=True, log1p=False, hvg=10, bake=True)
    assert m.preprocessing["normalize"] is None
    assert m.preprocessing["assume_normalized"] is True


@pytest.mark.slow
def test_out_of_core_scran_recovers_size_factors_as_well_as_in_memory_scran(tmp_path: Path) -> None:
    """Size factors computed chunk by chunk at conversion (pre-clustering and pooling per
    chunk, rescaled across chunks) vs scran on the whole matrix in memory, both against the
    simulation's true cell sizes (three groups with different expressed genes)."""
    from scmf_loader.preprocess.scran import scran_size_factors

    n_cells, n_genes = 2000, 1000
    x, true = simulate_sized_counts(n_cells, n_genes, 11, shape=4.0, dtype="float32")
    src = write_h5ad(tmp_path / "sim.h5ad", x, hpc_genes()[:n_genes], 11)
    convert_h5ad([src], tmp_path / "ds", chunk_size=500, shard_size=n_cells, quiet=True,
                 preprocessing={"normalize": "scran"})
    got = CellDataset(tmp_path / "ds").__getitems__(np.arange(n_cells)).stats["size_factor"].numpy()
    rows = np.array([int(c.rsplit("-", 1)[-1]) for c in
                     ad.read_zarr(tmp_path / "ds" / "shards" / "000000.zarr").obs_names])
    ref = scran_size_factors(x)[rows]
    truth = true[rows]
    ok = (got > 0) & (ref > 0)
    assert ok.sum() >= n_cells - 5

    def r(a: np.ndarray) -> float:
        return float(np.corrcoef(np.log(a[ok]), np.log(truth[ok]))[0, 1])

    assert r(ref) > 0.9  # the simulation is one scran can solve
    print(f"log-SF r vs truth: out of core {r(got):.4f}, in memory {r(ref):.4f}")
    assert r(got) >= r(ref) - 0.01, (r(got), r(ref))
    assert np.corrcoef(np.log(got[ok]), np.log(ref[ok]))[0, 1] >= 0.95
