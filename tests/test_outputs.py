"""Output kernels (padded, dense, rank, binned; fused preprocessing) against plain numpy
per-cell references, on both backends; malformed batches raise instead of crashing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scmf_loader import outputs
from scmf_loader.batch import CSRBatch
from scmf_loader.errors import ConfigurationError, ScmfError
from scmf_loader.preprocess import PreprocessingPipeline

BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not outputs.numba_available(), reason="numba"))]
G = 60


def _csr(seed: int, n: int = 48, ints: bool = True, dtype: type = np.float32) -> tuple[np.ndarray, ...]:
    """A batch with empty cells, single-gene cells, long cells and many tied values."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, n)
    lengths[:4] = [0, 1, 39, 0]
    rows = [np.sort(rng.choice(G, int(m), replace=False)) for m in lengths]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate(rows).astype(np.int32)
    values = rng.integers(1, 6, len(indices)) if ints else rng.lognormal(0, 1, len(indices))
    if not ints and dtype != np.int32:  # normalised data may be negative: orders must hold there too
        neg = np.zeros(len(values), dtype=bool)
        neg[::7] = values[::7] < 0.9
        values[neg] *= -0.2  # small enough that log1p(value / divisor) stays defined
        values[indptr[2] + 5] = -0.0  # equal to 0.0 in every order
    return indptr, indices, values.astype(dtype)


def _cells(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(indices[s:e].astype(np.int64), values[s:e]) for s, e in zip(indptr[:-1], indptr[1:], strict=True)]


def _prep(v: np.ndarray, div: float | None, log1p: bool) -> np.ndarray:
    dt = np.float64 if v.dtype == np.float64 else np.float32
    x = v.astype(dt)
    if div is not None:
        x = x / dt(div)
    return np.log1p(x) if log1p else x


def _top(v: np.ndarray, k: int) -> np.ndarray:
    """Ascending positions of the k largest values, ties to the lower position."""
    return np.sort(np.argsort(-v, kind="stable")[:k])


def _row(out: dict[str, np.ndarray], i: int, genes: np.ndarray, expr: np.ndarray | None, cls: int) -> None:
    n = len(genes)
    assert out["gene_indices"][i, :cls].tolist() == [3] * cls
    np.testing.assert_array_equal(out["gene_indices"][i, cls : cls + n], genes)
    assert (out["gene_indices"][i, cls + n :] == 0).all()
    assert out["attention_mask"][i].tolist() == [True] * (cls + n) + [False] * (out["attention_mask"].shape[1] - cls - n)
    if expr is not None:
        assert (out["expression"][i, :cls] == 0).all()
        np.testing.assert_array_equal(out["expression"][i, cls : cls + n], expr)
        assert (out["expression"][i, cls + n :] == 0).all()


def _subset(g: np.ndarray, v: np.ndarray, genes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if genes is None:
        return g, v
    keep = np.isin(g, genes)
    return g[keep], v[keep]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("k", "add_cls", "ints"), [(8, True, True), (8, False, False), (None, True, True), (64, False, True)])
@pytest.mark.parametrize("fused", [False, True])
def test_padded_top_matches_reference(backend: str, k: int | None, add_cls: bool, ints: bool, fused: bool) -> None:
    indptr, indices, values = _csr(1, ints=ints)
    divisors = np.random.default_rng(2).uniform(0.3, 3, len(indptr) - 1).astype(np.float32) if fused else None
    genes = np.arange(0, G, 3) if fused else None
    out = outputs.padded(indptr, indices, values, G, max_genes=k, add_cls=add_cls, divisors=divisors,
                         log1p=fused, genes=genes, backend=backend)
    cls = int(add_cls)
    cells = [_subset(g, v, genes) for g, v in _cells(indptr, indices, values)]
    width = k if k is not None else max(len(g) for g, _ in cells)
    assert out["gene_indices"].shape == (len(cells), width + cls)
    assert out["expression"].dtype == np.float32
    assert out["gene_indices"].dtype == np.int64
    for i, (g, v) in enumerate(cells):
        x = _prep(v, None if divisors is None else divisors[i], fused)
        keep = _top(x, width)
        _row(out, i, g[keep], x[keep].astype(np.float32), cls)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_random_is_a_seeded_subset_equal_on_both_backends(backend: str) -> None:
    indptr, indices, values = _csr(3)
    a = outputs.padded(indptr, indices, values, G, max_genes=5, truncation="random", seed=11, backend=backend)
    b = outputs.padded(indptr, indices, values, G, max_genes=5, truncation="random", seed=11, backend="numpy")
    c = outputs.padded(indptr, indices, values, G, max_genes=5, truncation="random", seed=12, backend=backend)
    assert all(np.array_equal(a[key], b[key]) for key in a)
    assert not np.array_equal(a["gene_indices"], c["gene_indices"])
    for i, (g, v) in enumerate(_cells(indptr, indices, values)):
        got = a["gene_indices"][i, 1:][a["attention_mask"][i, 1:]]
        assert len(got) == min(5, len(g))
        assert set(got) <= set(g)
        assert np.all(np.diff(got) > 0)
        np.testing.assert_array_equal(a["expression"][i, 1 : 1 + len(got)], v[np.isin(g, got)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
@pytest.mark.parametrize("fused", [False, True])
def test_dense_matches_reference(backend: str, dtype: type, fused: bool) -> None:
    indptr, indices, values = _csr(4, dtype=dtype)
    n = len(indptr) - 1
    divisors = np.linspace(0.5, 2, n) if fused else None
    genes = np.array([7, 2, 40, 59, 0]) if fused else None
    out = outputs.dense(indptr, indices, values, G, divisors=divisors, log1p=fused, genes=genes, backend=backend)
    ref = np.zeros((n, G), dtype=out.dtype)
    for i, (g, v) in enumerate(_cells(indptr, indices, values)):
        ref[i, g] = _prep(v, None if divisors is None else divisors[i], fused) if fused else v
    if fused:
        ref = ref[:, genes]
        assert out.dtype == (np.float64 if dtype == np.float64 else np.float32)
    else:
        assert out.dtype == dtype
    np.testing.assert_array_equal(out, ref)


def _medians(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    med = rng.choice([1.0, 1.5, 2.0, 3.0], G).astype(np.float32)
    med[[5, 6, 7]] = [0.0, np.nan, np.inf]  # genes without a usable median are left out
    return med


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("k", "add_cls"), [(6, True), (None, False), (100, True)])
@pytest.mark.parametrize("fused", [False, True])
def test_rank_matches_reference(backend: str, k: int | None, add_cls: bool, fused: bool) -> None:
    indptr, indices, values = _csr(5)
    values[indptr[4] : indptr[4] + 3] = 0  # stored zeros are not expressed
    med = _medians(6)
    n = len(indptr) - 1
    divisors = np.random.default_rng(7).uniform(0.3, 3, n).astype(np.float32) if fused else None
    genes = np.arange(1, G, 2) if fused else None
    out = outputs.rank(indptr, indices, values, G, med, max_genes=k, add_cls=add_cls, divisors=divisors,
                       log1p=fused, genes=genes, backend=backend)
    assert set(out) == {"gene_indices", "attention_mask"}
    refs = []
    for i, (g, v) in enumerate(_cells(indptr, indices, values)):
        g, v = _subset(g, v, genes)
        m = med[g]
        keep = (v != 0) & (m > 0) & np.isfinite(m)
        g, x = g[keep], _prep(v[keep], None if divisors is None else divisors[i], fused)
        ratio = x / m[keep].astype(x.dtype)
        refs.append(g[np.argsort(-ratio, kind="stable")])
    width = k if k is not None else max(len(r) for r in refs)
    assert out["gene_indices"].shape == (n, width + int(add_cls))
    for i, r in enumerate(refs):
        _row(out, i, r[:width], None, int(add_cls))


def _bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """scGPT's per-cell binning of non-zeros (np.quantile edges, np.digitize), 0 for zeros."""
    out = np.zeros(len(x), dtype=np.int64)
    nz = x != 0
    if nz.any():
        edges = np.quantile(x[nz], np.linspace(0, 1, n_bins - 1))
        out[nz] = np.digitize(x[nz], edges)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n_bins", "k", "ints"), [(51, 10, True), (5, None, False), (11, 64, False), (2, 10, True)])
@pytest.mark.parametrize("fused", [False, True])
def test_binned_matches_reference(backend: str, n_bins: int, k: int | None, ints: bool, fused: bool) -> None:
    indptr, indices, values = _csr(8, ints=ints)
    values[indptr[5]] = 0  # a stored zero: bin 0
    n = len(indptr) - 1
    divisors = np.random.default_rng(9).uniform(0.3, 3, n).astype(np.float32) if fused else None
    out = outputs.binned(indptr, indices, values, G, n_bins=n_bins, max_genes=k, divisors=divisors, log1p=fused,
                         backend=backend)
    cells = _cells(indptr, indices, values)
    width = k if k is not None else max(len(g) for g, _ in cells)
    assert out["expression"].dtype == np.int64
    for i, (g, v) in enumerate(cells):
        x = _prep(v, None if divisors is None else divisors[i], fused)
        b = _bins(x, n_bins)
        assert b[x != 0].min(initial=1) >= 1
        assert b.max(initial=0) <= n_bins - 1
        keep = _top(x, width)
        _row(out, i, g[keep], b[keep], 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_binned_random_truncation_keeps_bins_of_the_whole_cell(backend: str) -> None:
    indptr, indices, values = _csr(10, ints=False)
    out = outputs.binned(indptr, indices, values, G, n_bins=7, max_genes=4, truncation="random", seed=3, backend=backend)
    same = outputs.binned(indptr, indices, values, G, n_bins=7, max_genes=4, truncation="random", seed=3, backend="numpy")
    assert all(np.array_equal(out[key], same[key]) for key in out)
    for i, (g, v) in enumerate(_cells(indptr, indices, values)):
        got = out["gene_indices"][i, 1:][out["attention_mask"][i, 1:]]
        np.testing.assert_array_equal(out["expression"][i, 1 : 1 + len(got)], _bins(v, 7)[np.isin(g, got)])


def _batch(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, library: np.ndarray) -> CSRBatch:
    return CSRBatch(torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(values),
                    torch.arange(len(indptr) - 1), G, None, {"library_size": torch.from_numpy(library)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_preprocessing_equals_pipeline_then_output(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCMF_OUTPUT_BACKEND", backend)
    indptr, indices, values = _csr(11)
    library = np.array([values[s:e].sum() for s, e in zip(indptr[:-1], indptr[1:], strict=True)], dtype=np.float64)
    raw = _batch(indptr, indices, values, library)
    pipe = PreprocessingPipeline(normalize="library_size", target_sum=1e4, log1p=True)
    done = pipe.apply_batch(raw)
    med = _medians(12)
    for name, call in [
        ("padded", lambda b, **kw: b.to_padded(7, **kw)),
        ("dense", lambda b, **kw: {"x": b.to_dense(**kw)}),
        ("rank", lambda b, **kw: b.to_rank(med, 7, **kw)),
        ("binned", lambda b, **kw: b.to_binned(9, 7, **kw)),
    ]:
        fused, ref = call(raw, preprocessing=pipe), call(done)
        assert fused.keys() == ref.keys(), name
        for key in ref:
            assert torch.equal(fused[key], ref[key]), (name, key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("indptr", "indices", "match"),
    [
        ([0, 3, 2, 5], [0, 1, 2, 3, 4], "decreas|non-decreasing"),
        ([0, 2, 9], [0, 1, 2, 3, 4], "past|non-decreasing"),
        ([-1, 2, 5], [0, 1, 2, 3, 4], "< 0"),
        ([0, 2, 5], [0, 1, 2, -3, 4], "outside the vocabulary"),
        ([0, 2, 5], [0, 1, 2, G, 4], "outside the vocabulary"),
        ([0, 2, 5], [0, 1, 2, 2**31 - 1, 4], "outside the vocabulary"),
    ],
)
def test_malformed_batches_raise(backend: str, indptr: list[int], indices: list[int], match: str) -> None:
    ip, idx = np.array(indptr, dtype=np.int64), np.array(indices, dtype=np.int32)
    vals = np.ones(5, dtype=np.float32)
    calls = [
        lambda: outputs.padded(ip, idx, vals, G, max_genes=1, backend=backend),
        lambda: outputs.padded(ip, idx, vals, G, backend=backend),
        lambda: outputs.dense(ip, idx, vals, G, log1p=True, backend=backend),
        lambda: outputs.rank(ip, idx, vals, G, np.ones(G, np.float32), max_genes=2, backend=backend),
        lambda: outputs.binned(ip, idx, vals, G, max_genes=1, backend=backend),
        lambda: outputs.padded(ip, idx, vals, G, max_genes=4, genes=[0, 1, 4], backend=backend),
    ]
    for call in calls:
        with pytest.raises(ScmfError, match=match):
            call()


def test_bad_arguments_are_configuration_errors() -> None:
    indptr, indices, values = _csr(13)
    with pytest.raises(ConfigurationError, match="max_genes"):
        outputs.padded(indptr, indices, values, G, max_genes=0)
    with pytest.raises(ConfigurationError, match="n_bins"):
        outputs.binned(indptr, indices, values, G, n_bins=1)
    with pytest.raises(ConfigurationError, match="medians"):
        outputs.rank(indptr, indices, values, G, np.ones(G - 1, np.float32))
    with pytest.raises(ConfigurationError, match="divisors"):
        outputs.padded(indptr, indices, values, G, divisors=np.ones(3))
    with pytest.raises(ConfigurationError, match="genes"):
        outputs.padded(indptr, indices, values, G, genes=[G])
    with pytest.raises(ConfigurationError, match="backend"):
        outputs.padded(indptr, indices, values, G, backend="cuda")


def test_empty_batch_on_every_output() -> None:
    ip, idx, vals = np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    for backend in ("numpy", "numba") if outputs.numba_available() else ("numpy",):
        assert outputs.padded(ip, idx, vals, G, max_genes=4, backend=backend)["gene_indices"].shape == (0, 5)
        assert outputs.rank(ip, idx, vals, G, np.ones(G, np.float32), backend=backend)["gene_indices"].shape == (0, 1)
        assert outputs.binned(ip, idx, vals, G, backend=backend)["expression"].shape == (0, 1)
        assert outputs.dense(ip, idx, vals, G, backend=backend).shape == (0, G)


def test_loader_rank_equals_the_batch_converter(loader_dataset: Path) -> None:
    """(A dataset without medians is refused: tests/test_medians.py.)"""
    from scmf_loader import CellDataLoader, CellDataset

    ds = CellDataset(loader_dataset)
    loader = CellDataLoader(ds, batch_size=40, num_workers=0, output="rank", max_genes=10, seed=4)
    for out in loader:
        ref = ds[out["cell_ids"].numpy()].to_rank(ds.gene_nonzero_median, 10)
        assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_loader_binned_and_dense_equal_the_batch_converters(loader_dataset: Path) -> None:
    from scmf_loader import CellDataLoader, CellDataset

    ds = CellDataset(loader_dataset)
    loader = CellDataLoader(ds, batch_size=40, num_workers=0, output="binned", max_genes=10, n_bins=7, seed=4)
    for out in loader:
        ref = ds[out["cell_ids"].numpy()].to_binned(7, 10)
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    with pytest.raises(ConfigurationError, match="n_bins"):
        CellDataLoader(ds, batch_size=40, num_workers=0, output="binned", n_bins=1)


@pytest.mark.skipif(not outputs.numba_available(), reason="numba")
def test_compiled_sort_is_numpys_stable_order() -> None:
    from scmf_loader.outputs._sort import stable_sort, value_keys

    rng = np.random.default_rng(14)
    cases = [
        rng.integers(1, 4, 3000).astype(np.float64),  # heavy ties
        np.r_[rng.normal(1, 1e-9, 2000), 1e30],  # one outlier: a giant bucket of distinct keys
        np.full(500, 2.5),  # all equal
        np.r_[rng.normal(0, 3, 1000), -0.0, 0.0, -0.0, np.inf, -np.inf],  # signs and zeros
        rng.lognormal(0, 2, 70_000),  # more entries than the bucket table's bits
    ]
    for x in cases:
        m = len(x)
        keys, order, skeys = np.empty(m, np.uint64), np.empty(m, np.int64), np.empty(m, np.uint64)
        for descending in (False, True):
            value_keys(x + 0.0, m, keys, descending)
            stable_sort(keys, m, order, skeys, np.empty((1 << 16) + 1, np.int64))
            ref = np.argsort(-x if descending else x, kind="stable")
            # -0.0 and 0.0 are equal: numpy keeps them in position order, and so must we
            np.testing.assert_array_equal(order, ref)
