"""Input values vs the stored dtype: nothing silently coerced (unit checks and end to end)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import hpc_genes, write_counts_h5ad

from scmf_loader import CellDataset
from scmf_loader.errors import InvalidInputError
from scmf_loader.vocab import GeneVocab
from scmf_shards.convert import convert_h5ad
from scmf_shards.values import check_values


@pytest.mark.parametrize(
    ("values", "target", "match"),
    [
        ([1.0, np.nan], "float32", "NaN or infinite"),
        ([1.0, np.inf], "float64", "NaN or infinite"),
        ([1.0, -2.0], "float32", "negative values"),
        ([1.0, 2.5], "int32", "non-integer values .*2.5.* truncate"),
        ([1.0, 70000.0], "uint16", r"outside the range of --dtype uint16 \[0, 65535\]"),
        (np.array([3, 2**24 + 1], dtype=np.int64), "float32", "above 2\\^24"),
    ],
)
def test_check_values_refuses(values: list[float], target: str, match: str) -> None:
    data = np.asarray(values) if isinstance(values, np.ndarray) else np.asarray(values, dtype=np.float32)
    with pytest.raises(InvalidInputError, match=f"^x.h5ad: rows .*{match}"):
        check_values(data, target, "x.h5ad: rows [0, 2)")


def test_check_values_accepts() -> None:
    check_values(np.array([0.0, 3.0, 65535.0], np.float32), "uint16", "w")
    check_values(np.array([2**24], np.int64), "float32", "w")
    check_values(np.array([1.5, 2.25], np.float32), "float32", "w")
    check_values(np.array([-1.5, 2.0], np.float32), "float32", "w", allow_negative=True)
    check_values(np.zeros(0, np.float32), "int32", "w")


def _frame(path: Path, X: np.ndarray, genes: list[str]) -> Path:
    import pandas as pd

    obs = pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])])
    ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


@pytest.mark.parametrize("dtype", ["int32", "uint16", "uint32", "float64"])
def test_integer_and_float64_dtypes_store_counts_exactly(tmp_path: Path, dtype: str) -> None:
    """Every stored value equals its source count, in the chosen dtype (read through anndata)."""
    genes = hpc_genes()[:50]
    src = write_counts_h5ad(tmp_path / "a.h5ad", 120, genes, seed=4)
    convert_h5ad([src], tmp_path / "ds", dtype=dtype, quiet=True, shard_size=50)
    vocab = GeneVocab.from_file(tmp_path / "ds" / "vocab.json")
    ref = ad.read_h5ad(src)
    ids = vocab.encode(genes)
    seen = 0
    for shard in sorted((tmp_path / "ds" / "shards").glob("*.zarr")):
        a = ad.read_zarr(shard)
        assert a.X.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a.X.toarray()[:, ids], ref[a.obs_names].X.toarray())
        seen += a.n_obs
    assert seen == 120
    batch = CellDataset(str(tmp_path / "ds")).__getitems__(list(range(120)))
    assert str(batch.values.dtype) == f"torch.{dtype}"


def test_fractional_values_into_an_integer_dtype_are_refused(tmp_path: Path) -> None:
    genes = hpc_genes()[:5]
    src = _frame(tmp_path / "frac.h5ad", np.array([[1.0, 0.5, 0, 0, 2], [0, 0, 3, 0, 1]], np.float32), genes)
    with pytest.raises(InvalidInputError, match="frac.h5ad: rows .*non-integer values .*--dtype int32"):
        convert_h5ad([src], tmp_path / "ds", dtype="int32", quiet=True)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_negative_values_need_assume_normalized_and_no_log1p(tmp_path: Path) -> None:
    genes = hpc_genes()[:5]
    X = np.array([[1.5, -0.5, 0, 0, 2], [0, 0, -3.25, 0, 1]], np.float32)
    src = _frame(tmp_path / "scaled.h5ad", X, genes)
    with pytest.raises(InvalidInputError, match="scaled.h5ad: rows .*negative values.*--assume-normalized --no-log1p"):
        convert_h5ad([src], tmp_path / "a", quiet=True)
    with pytest.raises(InvalidInputError, match="negative values"):
        convert_h5ad([src], tmp_path / "b", quiet=True, preprocessing={"assume_normalized": True})
    convert_h5ad([src], tmp_path / "c", quiet=True, shuffle=False,
                 preprocessing={"assume_normalized": True, "log1p": False})
    ds = CellDataset(str(tmp_path / "c"))
    dense = ds.__getitems__([0, 1]).to_dense().numpy()
    vocab = GeneVocab.from_file(tmp_path / "c" / "vocab.json")
    np.testing.assert_array_equal(dense[:, vocab.encode(genes)], X)
