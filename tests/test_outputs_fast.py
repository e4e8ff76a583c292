"""The compiled fast paths (count-data truncation cutoff, rank bucket sort, binned from a
histogram, the fused CSR preprocessing) against plain numpy references, on count-like rows
where they apply and on rows that must fall back (negatives, -0.0, NaN, large or fractional
values, many distinct values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scmf_loader import outputs
from scmf_loader.batch import CSRBatch
from scmf_loader.errors import ConfigurationError, ScmfError
from scmf_loader.preprocess import PreprocessingPipeline
from scmf_loader.preprocess.transform import cell_divisors, transform_values

pytestmark = pytest.mark.skipif(not outputs.numba_available(), reason="the compiled kernels need numba")
G = 400


def _counts(seed: int, n: int = 40, scale: float = 3.0, dtype: type = np.float32) -> tuple[np.ndarray, ...]:
    """Count rows like real data: empty, single-gene and long cells; values 1 + floor(exp)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 300, n)
    lengths[:5] = [0, 1, 299, 2, 250]
    rows = [np.sort(rng.choice(G, int(m), replace=False)) for m in lengths]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    values = 1 + np.floor(rng.exponential(scale, int(indptr[-1])))
    return indptr, np.concatenate(rows).astype(np.int32), values.astype(dtype)


def _variants(seed: int) -> list[tuple[str, tuple[np.ndarray, ...]]]:
    ip, idx, v = _counts(seed)
    zeros = v.copy()
    zeros[::9] = 0  # stored zeros
    big = v.copy()
    big[ip[2] + 3] = 1000  # beyond the per-cell table: that row falls back
    frac = v.copy()
    frac[ip[4] + 1] = 2.5
    neg = v.copy()
    neg[ip[2] : ip[2] + 40 : 3] *= -1
    neg[ip[4]] = -0.0
    nan = v.copy()
    nan[ip[2] + 7] = np.nan
    smooth = np.random.default_rng(seed).lognormal(0, 1, len(v)).astype(np.float32)  # all distinct
    return [("counts", (ip, idx, v)), ("zeros", (ip, idx, zeros)), ("big", (ip, idx, big)), ("frac", (ip, idx, frac)),
            ("neg", (ip, idx, neg)), ("nan", (ip, idx, nan)), ("smooth", (ip, idx, smooth)),
            ("wide", _counts(seed + 1, scale=40.0)), ("int32", _counts(seed + 2, dtype=np.int32))]


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{what}: {key}")


@pytest.mark.parametrize("k", [1, 5, 64, 250, 300])
@pytest.mark.parametrize("fused", [False, True])
def test_padded_fast_paths_equal_the_numpy_backend(k: int, fused: bool) -> None:
    for name, (ip, idx, v) in _variants(1):
        if fused and name in ("neg", "nan"):
            continue  # log1p of values below -1 is NaN: compared in test_outputs
        div = np.random.default_rng(2).uniform(0.3, 3, len(ip) - 1).astype(np.float32) if fused else None
        kw = {"max_genes": k, "divisors": div, "log1p": fused}
        got = outputs.padded(ip, idx, v, G, backend="numba", **kw)
        ref = outputs.padded(ip, idx, v, G, backend="numpy", **kw)
        _equal(got, ref, f"padded {name} k={k} fused={fused}")


def _rank_reference(ip: np.ndarray, idx: np.ndarray, v: np.ndarray, med: np.ndarray, k: int) -> list[np.ndarray]:
    out = []
    for s, e in zip(ip[:-1], ip[1:], strict=True):
        g, x = idx[s:e].astype(np.int64), v[s:e].astype(np.float32)
        m = med[g]
        keep = (x != 0) & (m > 0) & np.isfinite(m)
        ratio = x[keep] / m[keep]
        out.append(g[keep][np.argsort(-ratio, kind="stable")][:k])
    return out


@pytest.mark.parametrize("medians", ["few", "many", "some_bad"])
def test_rank_bucket_sort_equals_a_stable_argsort(medians: str) -> None:
    rng = np.random.default_rng(3)
    med = {"few": rng.choice([1.0, 1.5, 2.0, 2.5, 3.0], G), "many": rng.lognormal(0, 1, G),
           "some_bad": rng.choice([1.0, 2.0, 0.0, np.inf, np.nan], G)}[medians].astype(np.float32)
    for name, (ip, idx, v) in _variants(4):
        if name == "nan":
            continue  # NaN ratios: their place is the float order of the keys, not argsort's
        for k in (3, 100, 300):
            got = outputs.rank(ip, idx, v, G, med, max_genes=k, add_cls=False, backend="numba")
            for i, r in enumerate(_rank_reference(ip, idx, v, med, k)):
                np.testing.assert_array_equal(got["gene_indices"][i, : len(r)], r, err_msg=f"{name} cell {i}")
                assert got["attention_mask"][i].sum() == len(r)
            ref = outputs.rank(ip, idx, v, G, med, max_genes=k, add_cls=False, backend="numpy")
            _equal(got, ref, f"rank {name} k={k}")


@pytest.mark.skipif(not outputs.numba_available(), reason="numba")
def test_sort_asc_falls_back_to_radix_on_a_crowded_bucket() -> None:
    from scmf_loader.outputs._fast import COUNTS, sort_asc

    rng = np.random.default_rng(5)
    for keys in (np.r_[rng.integers(0, 1 << 12, 3000), 0xFFFFFFFF],  # one outlier: one huge bucket, many keys
                 rng.integers(0, 1 << 32, 5000), rng.integers(7, 9, 2000), np.full(10, 4), np.arange(1, 0, -1)):
        keys = keys.astype(np.uint32)
        m = len(keys)
        pay = np.arange(m, dtype=np.int32)
        sk, sp = np.empty(m, np.uint32), np.empty(m, np.int32)
        sort_asc(keys.copy(), pay.copy(), m, sk, sp, np.empty(COUNTS, np.uint64))
        np.testing.assert_array_equal(sp, np.argsort(keys, kind="stable"))
        np.testing.assert_array_equal(sk, np.sort(keys))


@pytest.mark.parametrize("n_bins", [2, 5, 51])
@pytest.mark.parametrize("fused", [False, True])
def test_binned_from_histograms_equals_the_numpy_backend(n_bins: int, fused: bool) -> None:
    for name, (ip, idx, v) in _variants(6):
        if fused and name in ("neg", "nan"):
            continue
        if name == "nan":
            continue  # np.quantile of a NaN row is NaN edges on both sides; bins are not defined
        div = np.random.default_rng(7).uniform(0.3, 3, len(ip) - 1).astype(np.float32) if fused else None
        for k in (4, 120, 300):
            kw = {"n_bins": n_bins, "max_genes": k, "divisors": div, "log1p": fused}
            _equal(outputs.binned(ip, idx, v, G, backend="numba", **kw),
                   outputs.binned(ip, idx, v, G, backend="numpy", **kw), f"binned {name} k={k}")


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_preprocess_is_transform_values_exactly(backend: str) -> None:
    for name, (ip, _idx, v) in _variants(8):
        for dtype in (None, np.float64):
            vals = v if dtype is None else v.astype(dtype)
            lib = np.array([abs(vals[s:e]).sum() for s, e in zip(ip[:-1], ip[1:], strict=True)])
            for normalize in (True, False):
                div = cell_divisors(lib, normalize="library_size", target_sum=1e4, dtype=vals.dtype) if normalize else None
                for log1p in (True, False) if name not in ("neg", "nan") else (False,):
                    got = outputs.preprocess(ip, vals, div, log1p, backend=backend)
                    ref = transform_values(vals, ip, div, log1p)
                    assert got.dtype == ref.dtype, name
                    np.testing.assert_array_equal(got, ref, err_msg=f"{name} {dtype} {normalize} {log1p}")
    sub = outputs.preprocess(np.array([3, 5, 9]), np.arange(12, dtype=np.float32), np.array([2.0, 4.0]), True,
                             backend=backend)  # a batch that starts inside the arrays
    np.testing.assert_array_equal(sub, transform_values(np.arange(3, 9, dtype=np.float32), np.array([0, 2, 6]),
                                                        np.array([2.0, 4.0], np.float32), True))


def test_batch_preprocessed_equals_apply_batch() -> None:
    ip, idx, v = _counts(9)
    lib = np.array([v[s:e].sum() for s, e in zip(ip[:-1], ip[1:], strict=True)], dtype=np.float64)
    batch = CSRBatch(torch.from_numpy(ip), torch.from_numpy(idx), torch.from_numpy(v), torch.arange(len(ip) - 1), G,
                     None, {"library_size": torch.from_numpy(lib)})
    for pipe in (PreprocessingPipeline(normalize="library_size", target_sum=1e4, log1p=True),
                 PreprocessingPipeline(normalize=None, log1p=True),
                 PreprocessingPipeline(normalize="library_size", target_sum=1e4, log1p=False)):
        got, ref = batch.preprocessed(pipe), pipe.apply_batch(batch)
        assert torch.equal(got.values, ref.values)
        assert got.indices is batch.indices
        assert torch.equal(got.indptr, ref.indptr)
        assert torch.equal(batch.values, torch.from_numpy(v))  # the input is untouched


def test_threads_give_the_same_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cells cut into parts run on threads: every output bit for bit as one thread (random
    truncation included: it hashes the batch's cell index), and errors name the batch's cell."""
    from scmf_loader.outputs import _threads

    monkeypatch.setattr(_threads, "MIN_PART_ENTRIES", 64)
    monkeypatch.setattr(outputs, "PREPROCESS_MIN_PART", 64)
    ip, idx, v = _counts(11, n=60)
    div = np.random.default_rng(12).uniform(0.3, 3, len(ip) - 1).astype(np.float32)
    med = np.random.default_rng(13).choice([1.0, 2.0, 0.0, 3.0], G).astype(np.float32)
    assert len(_threads.parts(ip, 3)) == 3
    assert len(_threads.parts(ip, 3, outputs.PREPROCESS_MIN_PART)) == 3  # preprocess is split too
    calls = {
        "padded": lambda t: outputs.padded(ip, idx, v, G, max_genes=100, threads=t),
        "padded_random": lambda t: outputs.padded(ip, idx, v, G, max_genes=100, truncation="random", seed=4, threads=t),
        "padded_fused": lambda t: outputs.padded(ip, idx, v, G, max_genes=100, divisors=div, log1p=True, threads=t),
        "rank": lambda t: outputs.rank(ip, idx, v, G, med, max_genes=100, threads=t),
        "binned": lambda t: outputs.binned(ip, idx, v, G, max_genes=100, truncation="random", threads=t),
        "dense": lambda t: {"x": outputs.dense(ip, idx, v, G, divisors=div, log1p=True, threads=t)},
        "preprocess": lambda t: {"x": outputs.preprocess(ip, v, div, True, threads=t)},
    }
    for name, call in calls.items():
        one = {k: a.copy() for k, a in call(1).items()}
        for t in (2, 3):
            _equal(call(t), one, f"{name} threads={t}")
    bad = idx.copy()
    bad[ip[50] + 1] = G  # a bad gene id in the last part
    with pytest.raises(ScmfError, match=f"entry {ip[50] + 1} "):
        outputs.padded(ip, bad, v, G, max_genes=100, threads=3)
    bad_ip = ip.copy()
    bad_ip[45] = bad_ip[44] - 1  # decreasing at cell 44
    with pytest.raises(ScmfError, match="at cell 4[34]"):
        outputs.padded(bad_ip, idx, v, G, max_genes=100, threads=3)
    with pytest.raises(ConfigurationError, match="threads"):
        outputs.padded(ip, idx, v, G, threads=0)


def test_preprocess_keeps_a_typical_batch_in_one_thread() -> None:
    """The fused preprocessing kernel is too cheap to split a 256-cell batch (~530k entries):
    it runs in the calling thread; only batches past 2 x PREPROCESS_MIN_PART are split."""
    from scmf_loader.outputs import _threads

    ip = np.arange(0, 257 * 2_062, 2_062, dtype=np.int64)
    assert _threads.parts(ip, 2, outputs.PREPROCESS_MIN_PART) == [(0, 256)]
    big = np.arange(0, 4_097 * 2_062, 2_062, dtype=np.int64)
    assert len(_threads.parts(big, 2, outputs.PREPROCESS_MIN_PART)) == 2


def test_threads_default_to_one_off_the_main_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import threading

    from scmf_loader.outputs import _threads

    monkeypatch.delenv("SCMF_OUTPUT_THREADS", raising=False)
    monkeypatch.setattr(_threads, "_usable_cpus", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert _threads.resolve_threads(None) == 2  # a spare core
    monkeypatch.setattr(os, "getloadavg", lambda: (1.8, 0.3, 0.3))
    assert _threads.resolve_threads(None) == 1  # busy cores
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.3, 0.3))

    seen = []
    t = threading.Thread(target=lambda: seen.append(_threads.resolve_threads(None)))
    t.start()
    t.join()
    assert seen == [1]
    monkeypatch.setenv("SCMF_OUTPUT_THREADS", "4")
    assert _threads.resolve_threads(None) == 4
    outputs.set_threads(3)
    try:
        assert _threads.resolve_threads(None) == 3
    finally:
        outputs.set_threads(None)


def test_rank_median_classes_follow_the_medians() -> None:
    """The count path ranks by (median class, count) pairs: classes are recomputed when the
    medians change (even in place), and more distinct medians than it takes use the general path."""
    from scmf_loader.outputs import _median_classes
    from scmf_loader.outputs._rankfast import MAX_CLASSES

    ip, idx, v = _counts(14)
    med = np.random.default_rng(15).choice([1.0, 2.0, 4.0], G).astype(np.float32)
    for _ in range(2):  # the second round: the medians changed in place, same array
        got = outputs.rank(ip, idx, v, G, med, max_genes=120, add_cls=False, backend="numba")
        for i, r in enumerate(_rank_reference(ip, idx, v, med, 120)):
            np.testing.assert_array_equal(got["gene_indices"][i, : len(r)], r)
        assert len(_median_classes(med)[1]) == len(np.unique(med[(med > 0) & np.isfinite(med)]))
        med[::3] = 1.5
    many = (1 + np.arange(G) % (MAX_CLASSES + 1)).astype(np.float32)  # one class too many: general path
    assert len(_median_classes(many)[1]) == 0
    _equal(outputs.rank(ip, idx, v, G, many, max_genes=120, backend="numba"),
           outputs.rank(ip, idx, v, G, many, max_genes=120, backend="numpy"), "rank, many medians")


def test_padded_fused_cut_on_counts_only_when_the_preprocessing_increases() -> None:
    """Long rows of raw counts are cut on their counts when the preprocessing keeps their
    order strictly; a divisor that flattens the values (inf: every value 0) goes the general way."""
    ip, idx, v = _counts(16)
    div = np.random.default_rng(17).uniform(0.3, 3, len(ip) - 1).astype(np.float32)
    div[2], div[4] = np.inf, 1e30
    for k in (5, 100):
        kw = {"max_genes": k, "divisors": div, "log1p": True}
        _equal(outputs.padded(ip, idx, v, G, backend="numba", **kw), outputs.padded(ip, idx, v, G, backend="numpy", **kw),
               f"padded fused k={k}")


def test_threads_work_in_a_forked_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forked child does not reuse the parent's pool (its threads do not exist there): it
    defaults to one thread and builds its own pool when asked for more."""
    import os
    import select
    import signal

    from scmf_loader.outputs import _threads

    monkeypatch.setattr(_threads, "MIN_PART_ENTRIES", 64)
    monkeypatch.setattr(outputs, "PREPROCESS_MIN_PART", 64)
    ip, idx, v = _counts(18, n=60)
    ref = {k: a.copy() for k, a in outputs.padded(ip, idx, v, G, max_genes=100, threads=1).items()}
    outputs.padded(ip, idx, v, G, max_genes=100, threads=2)  # the parent's pool exists
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report 1 for success, 0 for a wrong answer; never return into pytest
        ok = 0
        try:
            default = _threads.resolve_threads(None)
            got = outputs.padded(ip, idx, v, G, max_genes=100, threads=2)
            ok = int(default == 1 and all(np.array_equal(got[k], ref[k]) for k in ref))
        finally:
            os.write(w, bytes([ok]))
            os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 120)
    if not ready:  # a hung child (a pool thread that does not exist): end it, fail
        os.kill(pid, signal.SIGKILL)
    answer = os.read(r, 1) if ready else b""
    os.waitpid(pid, 0)
    os.close(r)
    assert answer == b"\x01"


def test_log_tables_are_numpys_numbers() -> None:
    """The kernels look fused counts up in numpy's table: transform_values' numbers for every
    count (numpy's SIMD log1p and the compiled one differ in the last bit for some inputs)."""
    div = np.random.default_rng(20).uniform(0.01, 50, 37)
    for dtype in (np.float32, np.float64):
        d = div.astype(dtype)
        tab = outputs.log_tables(d, len(d), dtype == np.float32)
        assert tab.shape == (37, outputs.LOG_TABLE)
        assert tab.dtype == dtype
        counts = np.tile(np.arange(outputs.LOG_TABLE, dtype=dtype), len(d))
        ip = np.arange(0, len(counts) + 1, outputs.LOG_TABLE)
        np.testing.assert_array_equal(tab.reshape(-1), transform_values(counts, ip, d, True))
        one = outputs.log_tables(None, 5, dtype == np.float32)
        np.testing.assert_array_equal(one[0], np.log1p(np.arange(outputs.LOG_TABLE, dtype=dtype)))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_log1p_rows_the_table_does_not_cover_take_numpys_numbers(monkeypatch: pytest.MonkeyPatch,
                                                                        threads: int) -> None:
    """A batch mixing count rows within the log table, count rows above it, fractional rows and
    a run of such rows at either end: every output equals the numpy backend bit for bit, on
    one thread and on several (the flagged rows are redone from numpy's values)."""
    from scmf_loader.outputs import _threads

    monkeypatch.setattr(_threads, "MIN_PART_ENTRIES", 64)
    monkeypatch.setattr(outputs, "PREPROCESS_MIN_PART", 64)
    ip, idx, v = _counts(21, n=50)
    v = v.copy()
    lim = outputs.LOG_TABLE
    for c in (0, 1, 2, 7, 8, 30, 48, 49):  # empty, single-gene, long; a run of two; the last two
        if ip[c + 1] > ip[c]:
            v[ip[c + 1] - 1] = lim + c  # a count just past the table
    v[ip[12] + 1] = lim - 1  # the largest count the table holds
    v[ip[20] : ip[21]] += 0.25  # not whole counts
    v[ip[25]] = 1e6
    div = np.random.default_rng(22).uniform(0.3, 3, len(ip) - 1).astype(np.float32)
    med = np.random.default_rng(23).choice([1.0, 2.0, 0.5, 3.0], G).astype(np.float32)
    calls = {
        "padded": lambda b: outputs.padded(ip, idx, v, G, max_genes=100, divisors=div, log1p=True, backend=b, threads=threads),
        "padded_wide": lambda b: outputs.padded(ip, idx, v, G, max_genes=400, divisors=div, log1p=True, backend=b,
                                                threads=threads),
        "padded_random": lambda b: outputs.padded(ip, idx, v, G, max_genes=50, truncation="random", seed=9, log1p=True,
                                                  backend=b, threads=threads),
        "padded_genes": lambda b: outputs.padded(ip, idx, v, G, max_genes=60, genes=np.arange(0, G, 2), divisors=div,
                                                 log1p=True, backend=b, threads=threads),
        "rank": lambda b: outputs.rank(ip, idx, v, G, med, max_genes=100, divisors=div, log1p=True, backend=b,
                                       threads=threads),
        "binned": lambda b: outputs.binned(ip, idx, v, G, max_genes=100, divisors=div, log1p=True, backend=b,
                                           threads=threads),
        "dense": lambda b: {"x": outputs.dense(ip, idx, v, G, divisors=div, log1p=True, backend=b, threads=threads)},
        "dense_f64": lambda b: {"x": outputs.dense(ip, idx, v.astype(np.float64), G, divisors=div.astype(np.float64),
                                                   log1p=True, backend=b, threads=threads)},
        "preprocess": lambda b: {"x": outputs.preprocess(ip, v, div, True, backend=b, threads=threads)},
        "preprocess_no_div": lambda b: {"x": outputs.preprocess(ip, v, None, True, backend=b, threads=threads)},
    }
    for name, call in calls.items():
        _equal(call("numba"), call("numpy"), f"{name} threads={threads}")
    ref = transform_values(v, ip, div, True)
    np.testing.assert_array_equal(outputs.preprocess(ip, v, div, True, threads=threads), ref)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint16, np.int64])
def test_fused_log1p_on_other_value_dtypes_equals_the_numpy_backend(dtype: type) -> None:
    """Every output compiles and matches the numpy backend with fused log1p on float64 values
    (float64 log tables) and integer values (float32 ones)."""
    ip, idx, v = _counts(24, n=30)
    v = v.astype(dtype)
    div = np.random.default_rng(25).uniform(0.3, 3, len(ip) - 1)
    med = np.random.default_rng(26).choice([1.0, 2.0, 3.0], G).astype(np.float32)
    calls = {
        "padded": lambda b: outputs.padded(ip, idx, v, G, max_genes=100, divisors=div, log1p=True, backend=b),
        "padded_random": lambda b: outputs.padded(ip, idx, v, G, max_genes=100, truncation="random", divisors=div,
                                                  log1p=True, backend=b),
        "binned": lambda b: outputs.binned(ip, idx, v, G, max_genes=100, divisors=div, log1p=True, backend=b),
        "rank": lambda b: outputs.rank(ip, idx, v, G, med, max_genes=100, divisors=div, log1p=True, backend=b),
        "dense": lambda b: {"x": outputs.dense(ip, idx, v, G, divisors=div, log1p=True, backend=b)},
        "preprocess": lambda b: {"x": outputs.preprocess(ip, v, div, True, backend=b)},
    }
    for name, call in calls.items():
        _equal(call("numba"), call("numpy"), f"{name} {np.dtype(dtype)}")
