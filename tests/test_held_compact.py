"""The compact form a conversion holds its aligned rows in between scatter and gather
(``uint16`` ids and whole counts, scmf_shards.convert.scatter.held_dtypes): chosen only
where it is exact, and widened back to the very bytes the wide form gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import hpc_genes

from scmf_shards.convert.scatter import held_dtypes
from scmf_shards.kernels import align_csr, fill_rows
from scmf_shards.values import check_values


@pytest.mark.parametrize(
    ("values", "small"),
    [
        (np.array([1, 2, 65535], dtype=np.float32), True),
        (np.array([0, 3], dtype=np.int64), True),
        (np.array([1, 65536], dtype=np.float32), False),  # one past uint16
        (np.array([1.0, 2.5], dtype=np.float32), False),  # not whole
        (np.array([1, 70000], dtype=np.int32), False),
    ],
)
def test_check_values_says_whether_values_are_small_whole_counts(values: np.ndarray, small: bool) -> None:
    assert check_values(values, "float32", "x") is small


def test_negative_values_are_never_small_counts() -> None:
    assert check_values(np.array([-1.0, 2.0], dtype=np.float32), "float32", "x", allow_negative=True) is False


def test_held_dtypes_rules() -> None:
    u16, i32, f32 = np.dtype(np.uint16), np.dtype(np.int32), np.dtype(np.float32)
    assert held_dtypes(20_000, "float32", True) == (u16, u16)
    assert held_dtypes(20_000, "float32", False) == (f32, u16)
    assert held_dtypes(1 << 16, "float64", True) == (u16, u16)  # ids 0..65535 fit
    assert held_dtypes((1 << 16) + 1, "float32", True) == (u16, i32)  # they no longer do
    assert held_dtypes(20_000, "float16", True) == (np.dtype(np.float16), u16)  # float16: as stored
    assert held_dtypes(20_000, "int32", True) == (i32, u16)
    assert held_dtypes(0, "float32", True) == (u16, i32)  # unknown vocabulary size: wide ids


@pytest.mark.parametrize("presorted", [True, False])
def test_compact_alignment_widens_back_to_the_wide_bytes(presorted: bool) -> None:
    rng = np.random.default_rng(5)
    n_cols = 3_000
    m = sp.random(300, n_cols, density=0.05, format="csr", random_state=6, dtype=np.float32)
    m.data = rng.integers(1, 60_000, m.nnz).astype(np.float32)
    m.sort_indices()
    cmap = np.arange(n_cols, dtype=np.int32) + 4
    if not presorted:  # a shuffled map: rows need sorting (insertion and radix paths)
        cmap = rng.permutation(n_cols).astype(np.int32) + 4
    cmap[::7] = -1  # dropped genes
    order = rng.permutation(300)
    wide = align_csr(m.indptr, m.indices, m.data, cmap, presorted, out_dtype=np.float32, row_order=order)
    small = align_csr(m.indptr, m.indices, m.data, cmap, presorted, out_dtype=np.uint16, row_order=order,
                      index_dtype=np.uint16)
    assert small[1].dtype == np.uint16
    assert small[2].dtype == np.uint16
    assert np.array_equal(wide[0], small[0])
    assert np.array_equal(wide[3], small[3])  # library sizes from the raw values
    # the gather's copy widens them into the shard's dtypes: the same bytes
    rows = np.arange(300, dtype=np.int64)
    indptr = wide[0]
    for w, s in ((wide[1], small[1]), (wide[2], small[2])):
        got = np.empty(w.size, dtype=w.dtype)
        fill_rows([s], [rows], indptr[:-1].copy(), indptr, 0, 300, got)
        assert got.tobytes() == np.ascontiguousarray(w).tobytes()


def test_ids_that_do_not_fit_are_refused() -> None:
    from scmf_loader.errors import InvalidInputError

    indptr = np.array([0, 1], dtype=np.int64)
    with pytest.raises(InvalidInputError, match="do not fit uint16"):
        align_csr(indptr, np.zeros(1, np.int32), np.ones(1, np.float32), np.array([70_000], np.int32), True,
                  index_dtype=np.uint16)


def _held_dtypes_of_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, values: np.ndarray, name: str,
                        **kw: object) -> set[tuple[str, str]]:
    """The (values, ids) dtypes a conversion of ``values`` (40 cells x 50 genes) held its
    rows in, from the held buckets (one pass) or the bucket files written (two stages)."""
    import anndata as ad

    from scmf_shards.convert import convert_h5ad
    from scmf_shards.convert import driver as driver_module
    from scmf_shards.convert import scatter as scatter_module

    seen: set[tuple[str, str]] = set()
    real_memory, real_save = scatter_module.scatter_to_memory, scatter_module._save

    def memory(task):  # type: ignore[no-untyped-def]
        held = real_memory(task)
        seen.add((str(held.data.dtype), str(held.indices.dtype)))
        return held

    def save(tmp, bucket, dtype):  # type: ignore[no-untyped-def]
        real_save(tmp, bucket, dtype)
        seen.add((str(np.load(tmp / "data.npy").dtype), str(np.load(tmp / "indices.npy").dtype)))

    monkeypatch.setattr(driver_module, "scatter_to_memory", memory)
    monkeypatch.setattr(scatter_module, "_save", save)
    a = ad.AnnData(X=sp.csr_matrix(values.reshape(40, 50).astype(np.float32)))
    a.var_names = hpc_genes()[:50]
    a.obs_names = [f"c{i}" for i in range(40)]
    src = tmp_path / f"{name}.h5ad"
    a.write_h5ad(src)
    convert_h5ad([src], tmp_path / name, quiet=True, shard_size=16, chunk_size=16, workers=1, **kw)
    return seen


@pytest.mark.parametrize("limit", [None, "1MB"])  # one pass, two stages
def test_a_conversion_holds_counts_compactly_and_other_values_as_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str | None
) -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, 2_000).astype(np.float32)
    kw = {} if limit is None else {"memory_limit": limit}
    assert _held_dtypes_of_run(tmp_path, monkeypatch, counts, "counts", **kw) == {("uint16", "uint16")}
    monkeypatch.undo()
    fractions = counts * np.float32(0.5)
    assert _held_dtypes_of_run(tmp_path, monkeypatch, fractions, "fractions", **kw) == {("float32", "uint16")}
