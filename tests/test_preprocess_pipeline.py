"""PreprocessingPipeline in memory and per batch: scanpy's numbers, validation, dict form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from preprocess_helpers import ad, counts, scanpy_hvg, scanpy_normalize

from scmf_loader.batch import CSRBatch
from scmf_loader.errors import ConfigurationError, InvalidInputError, ScmfError
from scmf_loader.preprocess import PreprocessingPipeline, cell_divisors, transform_values
from scmf_loader.preprocess.scran import scran_size_factors


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return counts(300, 120, seed=11, zero_genes=[3, 50], zero_cells=[0, 17])


def _names(n: int) -> np.ndarray:
    return np.array([f"gene{i:03d}" for i in range(n)], dtype=object)


@pytest.mark.parametrize("dtype", ["float32", "int32", "float64"])
@pytest.mark.parametrize("log1p", [True, False])
def test_normalize_log1p_equals_scanpy(x: np.ndarray, dtype: str, log1p: bool) -> None:
    data = x.astype(dtype)
    out, genes = PreprocessingPipeline(target_sum=5000, log1p=log1p)(data, _names(data.shape[1]))
    ref = scanpy_normalize(ad.AnnData(data.copy()), target_sum=5000, log1p=log1p).X
    assert out.dtype == ref.dtype
    np.testing.assert_array_equal(out, ref)  # bit for bit
    assert list(genes) == list(_names(data.shape[1]))
    assert not out[[0, 17]].any()  # empty cells stay zero


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger", "seurat_v3"])
@pytest.mark.parametrize("batched", [False, True])
def test_call_with_hvg_equals_scanpy(x: np.ndarray, flavor: str, batched: bool) -> None:
    if flavor == "seurat_v3":
        pytest.importorskip("skmisc")
    import pandas as pd

    batch = np.random.default_rng(0).choice(["p", "q"], x.shape[0])
    pipe = PreprocessingPipeline(hvg_selection=25, hvg_flavor=flavor,
                                 hvg_batch_key="batch" if batched else None)
    out, genes = pipe(x, _names(x.shape[1]), batch_labels=batch if batched else None)
    a = ad.AnnData(x.copy(), obs=pd.DataFrame({"batch": pd.Categorical(batch)}, index=[str(i) for i in range(len(x))]),
                   var=pd.DataFrame(index=list(_names(x.shape[1]))))
    norm = scanpy_normalize(a.copy())
    ref = scanpy_hvg(a if flavor == "seurat_v3" else norm, 25, flavor, "batch" if batched else None)
    hv = ref["highly_variable"].to_numpy()
    assert list(genes) == list(norm.var_names[hv])
    np.testing.assert_array_equal(out, norm.X[:, hv])
    assert pipe.is_fitted
    assert list(pipe.hvg_genes) == list(genes)
    again, genes2 = pipe(x[:10], _names(x.shape[1]))  # fitted: the same genes, no refit
    assert list(genes2) == list(genes)
    assert again.shape == (10, len(genes))


def test_scran_in_memory(x: np.ndarray) -> None:
    out, _ = PreprocessingPipeline(normalize="scran")(x, _names(x.shape[1]))
    sf = scran_size_factors(x)
    assert sf[[0, 17]].tolist() == [0.0, 0.0]
    assert sf[sf > 0].mean() == pytest.approx(1.0)
    div = sf.astype(np.float32)
    div[div == 0] = 1
    np.testing.assert_array_equal(out, np.log1p(x / div[:, None]))


def _batch_of(x: np.ndarray, stats: dict[str, np.ndarray]) -> CSRBatch:
    import scipy.sparse as sp

    m = sp.csr_matrix(x)
    return CSRBatch(torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.int32)),
                    torch.from_numpy(m.data), torch.arange(len(x)), x.shape[1],
                    stats={k: torch.from_numpy(v) for k, v in stats.items()})


@pytest.mark.parametrize("normalize", ["library_size", "scran", None])
def test_apply_batch_equals_dense_call(x: np.ndarray, normalize: str | None) -> None:
    pipe = PreprocessingPipeline(normalize=normalize)
    lib = x.sum(axis=1, dtype=np.float64)
    sf = scran_size_factors(x)
    batch = _batch_of(x, {"library_size": lib, "size_factor": sf})
    out = pipe.apply_batch(batch)
    assert out is not batch
    assert out.indices is batch.indices
    assert torch.equal(batch.values, torch.from_numpy(_batch_of(x, {}).values.numpy()))  # untouched
    dense = pipe.normalize_dense(x, size_factors=sf)
    np.testing.assert_array_equal(out.to_dense().numpy(), dense)


def test_torch_path_matches_numpy_within_an_ulp(x: np.ndarray) -> None:
    import scipy.sparse as sp

    from scmf_loader.preprocess.transform import torch_transform as _torch_transform

    m = sp.csr_matrix(x)
    div = cell_divisors(x.sum(axis=1, dtype=np.float64), normalize="library_size", target_sum=1e4, dtype=np.float32)
    ref = transform_values(m.data, m.indptr, div, True)
    got = _torch_transform(torch.from_numpy(m.data), torch.from_numpy(m.indptr), div, True, np.dtype(np.float32))
    np.testing.assert_allclose(got.numpy(), ref, rtol=2e-7)


def test_validation_before_work(x: np.ndarray) -> None:
    for bad in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ConfigurationError, match="target_sum"):
            PreprocessingPipeline(target_sum=bad)
    with pytest.raises(ConfigurationError, match="hvg_flavor"):
        PreprocessingPipeline(hvg_selection=5, hvg_flavor="pearson")
    with pytest.raises(ConfigurationError, match="hvg_selection"):
        PreprocessingPipeline(hvg_selection=0)
    with pytest.raises(ConfigurationError, match="normalize"):
        PreprocessingPipeline(normalize="log1p")
    with pytest.raises(ConfigurationError, match="batch_labels"):
        PreprocessingPipeline(hvg_selection=5, hvg_batch_key="batch")(x, _names(x.shape[1]))
    with pytest.raises(ConfigurationError, match="only 120 genes"):
        PreprocessingPipeline(hvg_selection=500)(x, _names(x.shape[1]))
    assert isinstance(ConfigurationError("x"), ScmfError)


def test_counts_check_and_assume_normalized(x: np.ndarray) -> None:
    frac = x * 0.5
    with pytest.raises(InvalidInputError, match="non-integer.*--assume-normalized"):
        PreprocessingPipeline()(frac, _names(x.shape[1]))
    with pytest.raises(InvalidInputError, match="negative"):
        PreprocessingPipeline()(-x, _names(x.shape[1]))
    pipe = PreprocessingPipeline(assume_normalized=True, log1p=False)
    assert pipe.normalize is None
    out, _ = pipe(frac, _names(x.shape[1]))
    np.testing.assert_array_equal(out, frac)
    out, _ = PreprocessingPipeline(normalize=None)(frac, _names(x.shape[1]))  # log1p only
    np.testing.assert_array_equal(out, np.log1p(frac))


def test_dict_round_trip_and_loader_view() -> None:
    pipe = PreprocessingPipeline("scran", hvg_selection=3, hvg_flavor="cell_ranger", hvg_batch_key="donor",
                                 hvg_genes=["a", "b", "c"])
    d = pipe.to_dict()
    assert PreprocessingPipeline.from_dict(d) == pipe
    assert pipe.cell_stat == "size_factor"
    assert PreprocessingPipeline.for_loader({**d, "baked": True}) is None
    assert PreprocessingPipeline.for_loader({**d, "baked": False}) == pipe
    assert PreprocessingPipeline.for_loader({"normalize": None, "log1p": False, "hvg": None}) is None
    with pytest.raises(ConfigurationError, match="unknown preprocessing key"):
        PreprocessingPipeline.from_dict({"normalise": "scran"})


def test_loader_module_imports_without_converter_libraries() -> None:
    code = ("import sys, scmf_loader.preprocess, scmf_loader.preprocess.hvg, "
            "scmf_loader.preprocess.scran, scmf_loader.align; "
            "bad = [m for m in ('scipy', 'anndata', 'scanpy', 'dask', 'click', 'pandas', 'skmisc', "
            "'numba', 'torch', 'scmf_shards') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fit_runs_with_the_converter_unimportable(tmp_path: Path) -> None:
    """HVG fitting and scran run from the loader alone: with ``scmf_shards`` made unimportable
    the in-memory fit gives the same genes and values as in this process."""
    x = counts(300, 60, seed=11)
    names = [f"g{i}" for i in range(60)]
    pipe = PreprocessingPipeline(normalize="scran", hvg_selection=12)
    out, kept = pipe(x, names)
    code = (
        "import sys, json, numpy as np; sys.modules['scmf_shards'] = None; "
        "from scmf_loader.preprocess import PreprocessingPipeline; "
        "x = np.load(sys.argv[1]); names = [f'g{i}' for i in range(60)]; "
        "p = PreprocessingPipeline(normalize='scran', hvg_selection=12); out, kept = p(x, names); "
        "np.save(sys.argv[2], out); print(json.dumps(list(p.hvg_genes)))"
    )
    np.save(tmp_path / "x.npy", x)
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "out.npy")],
                         check=True, capture_output=True, text=True)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), out)
    assert json.loads(res.stdout) == list(pipe.hvg_genes)
    assert list(kept) == list(pipe.hvg_genes)
