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


@pytest.mark.parametrize(
    ("values", "target", "match"),
    [
        (np.array([3.0, 2.0**24 + 1]), "float32", r"counts above 2\^24 \(e.g. 16777217\).*--dtype float64"),
        (np.array([-(2.0**24) - 1, 1.0]), "float32", "counts above 2\\^24 .e.g. -16777217"),
        (np.array([1.0, 1e39]), "float32", "outside the range of --dtype float32"),
        (np.array([2**53 + 1], dtype=np.int64), "float64", "counts above 2\\^53"),
        (np.array([0.5, 3.0]), "uint32", "non-integer values"),
        (np.array([1.0, 2.0**32]), "uint32", "outside the range of --dtype uint32"),
        (np.array([1, 2**31], dtype=np.int64), "int32", "outside the range of --dtype int32"),
        (np.array([1.0, 2.0**31], dtype=np.float32), "int32", "outside the range of --dtype int32"),
        (np.array([1, 70_000], dtype=np.uint32), "uint16", "outside the range of --dtype uint16"),
    ],
)
def test_float64_and_wide_integer_inputs_are_refused(values: np.ndarray, target: str, match: str) -> None:
    """Issue 19: a float64 count of 2^24 + 1 would be stored as 16777216 in float32."""
    with pytest.raises(InvalidInputError, match=f"^x.h5ad: rows .*{match}"):
        check_values(values, target, "x.h5ad: rows [0, 2)", allow_negative=True)


def test_every_source_and_target_dtype_pair_keeps_every_accepted_value() -> None:
    """Independent reference: whatever check_values accepts survives the cast unchanged
    (counts) or, for non-integral floats into float32, within float32's precision."""
    rng = np.random.default_rng(0)
    samples = [0.0, 1.0, 2.5, 255.0, 65535.0, 65536.0, 2.0**24, 2.0**24 + 1, 2.0**25, 2.0**31, 2.0**32, 1.5e8 + 0.5]
    for source in ("float32", "float64", "int32", "int64", "uint16", "uint32"):
        for target in ("float32", "float64", "int32", "uint16", "uint32"):
            for v in samples:
                data = np.array([v, rng.integers(0, 100)], dtype=np.float64)
                with np.errstate(invalid="ignore", over="ignore"):
                    as_source = data.astype(source)
                if as_source.astype(np.float64)[0] != v:
                    continue  # not representable in the source dtype
                data = as_source
                try:
                    check_values(data, target, "w")
                except InvalidInputError:
                    continue
                with np.errstate(invalid="raise"):
                    stored = data.astype(target)
                if data[0] == np.trunc(data[0]):
                    assert stored[0] == data[0], (source, target, v)
                else:
                    assert np.dtype(target).kind == "f"
                    assert abs(float(stored[0]) - float(data[0])) <= abs(float(data[0])) * 2e-7


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


def test_a_float64_count_beyond_float32_is_refused_through_the_cli(tmp_path: Path) -> None:
    """``scmf-convert h5ad`` on a float64 X holding 2^24 + 1: exit 1, one line naming the
    file, no manifest; with ``--dtype float64`` or ``--dtype uint32`` it is stored exactly."""
    import subprocess
    import sys

    import pandas as pd

    src = tmp_path / "big.h5ad"
    X = sp.csr_matrix(np.array([[1.0, 2.0**24 + 1], [0.0, 3.0]], dtype=np.float64))
    ad.AnnData(X=X, obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["CD3E", "CD4"])).write_h5ad(src)
    exe = Path(sys.executable).with_name("scmf-convert")

    def convert(out: str, *extra: str) -> subprocess.CompletedProcess[str]:
        args = [str(exe), "h5ad", str(src), "--output", str(tmp_path / out), "--workers", "1", "--quiet", *extra]
        return subprocess.run(args, capture_output=True, text=True, timeout=300)

    res = convert("o")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(src) in lines[0]
    assert "16777217" in lines[0]
    assert "float32 cannot store exactly" in lines[0]
    assert not (tmp_path / "o" / "manifest.json").exists()
    for dtype in ("float64", "uint32"):
        res = convert(dtype, "--dtype", dtype)
        assert res.returncode == 0, res.stderr
        batch = CellDataset(str(tmp_path / dtype)).__getitems__([0, 1])
        assert sorted(batch.values.numpy().tolist()) == [1, 3, 2**24 + 1]
