"""The AVX-512 building blocks of the compiled kernels (scmf_loader.outputs._simd) against
numpy: table lookups, the one-pass count check and lookup, and compaction, on every length
around the 16-entry blocks; and the same calls where AVX-512 is not compiled (the scalar
loops the kernels fall back to)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from scmf_loader import outputs

pytestmark = pytest.mark.skipif(not outputs.numba_available(), reason="the compiled kernels need numba")

CHECKS = textwrap.dedent('''
    import numpy as np
    from numba import njit
    from scmf_loader.outputs._simd import AVX512, compact, count_lookup, lookup
    from scmf_loader.outputs._simd_bins import bin_compact, bin_lookup, hist_small

    @njit
    def do_lookup(table, ix, top, dst):
        lookup(table, ix, top, dst)

    @njit
    def do_count_lookup(table, src, dst):
        return count_lookup(table, src, dst)

    @njit
    def do_compact(genes, src, bits, t, lut, gr, er):
        """The kernels' loop: blocks while 16 slots are free, then one by one."""
        w, i, n = 0, 0, len(genes)
        while i + 16 <= n and w <= min(len(gr), len(er)) - 16:
            r = compact(genes, src, bits, t, lut, gr, er, i, w)
            if r < 0:
                break
            w, i = r, i + 16
        for j in range(i, n):
            gr[w] = genes[j]
            er[w] = lut[np.int32(src[j])] if len(lut) else src[j]
            w += bits[j] > t
        return w

    @njit
    def do_hist(src, hist, rest):
        return hist_small(src, hist, rest)

    @njit
    def do_bins(table, src, dst):
        return bin_lookup(table, src, dst)

    @njit
    def do_bin_compact(genes, src, lo, table, gw, ew):
        start, w = bin_compact(genes, src, lo, table, gw, ew)
        for j in range(start, len(genes)):
            i = np.int32(src[j])
            gw[w], ew[w] = genes[j], table[i]
            w += i >= lo
        return w

    def check() -> None:
        rng = np.random.default_rng(0)
        for m in (0, 1, 15, 16, 17, 33, 100, 2062):
            table = rng.integers(0, 51, 128).astype(np.int32)
            src = rng.integers(0, 128, m).astype(np.float32)
            dst = np.full(m, -9, np.int64)
            assert do_bins(table, src, dst) is AVX512
            if AVX512:
                assert np.array_equal(dst, table[src.astype(np.int64)])
            genes = rng.integers(0, 20000, m).astype(np.int32)
            for lo in (0, 2, 60, 128):
                for room in (0, 5, 40):
                    gw, ew = np.full(m + room, -7, np.int64), np.full(m + room, -7, np.int64)
                    w = do_bin_compact(genes, src, lo, table, gw, ew)
                    keep = src >= lo
                    assert w == keep.sum()
                    assert np.array_equal(gw[:w], genes[keep]), (m, lo, room)
                    assert np.array_equal(ew[:w], table[src[keep].astype(np.int64)]), (m, lo, room)
        for m in (0, 1, 15, 16, 17, 33, 100, 2062):
            for scale in (0.3, 3.0, 60.0):
                src = np.minimum(np.floor(rng.exponential(scale, m)), 255).astype(np.float32)
                hist = np.zeros(257, np.int64)
                hist[:4] = 5  # added to
                assert do_hist(src, hist, np.empty(m + 16, np.int32)) is AVX512
                if AVX512:
                    want = np.bincount(src.astype(np.int64), minlength=257)
                    want[:4] += 5
                    assert np.array_equal(hist, want), (m, scale)
                assert not do_hist(src, hist, np.empty(m + 15, np.int32))  # scratch too short
                assert not do_hist(src.astype(np.float64), hist, np.empty(m + 16, np.int32))
        for m in (0, 1, 15, 16, 17, 31, 32, 33, 100, 2062):
            for top in (0, 1, 31, 32, 63, 64, 127, 128, 255):
                table = rng.standard_normal(256).astype(np.float32)
                ix = rng.integers(0, top + 1, m).astype(np.int32)
                dst = np.full(m, np.nan, np.float32)
                do_lookup(table, ix, top, dst)
                assert np.array_equal(dst, table[ix]), (m, top)
                dst64 = np.full(m, np.nan)
                do_lookup(table.astype(np.float64), ix, top, dst64)  # other dtypes: the scalar loop
                assert np.array_equal(dst64, table[ix].astype(np.float64))
            table = rng.standard_normal(128).astype(np.float32)
            counts = rng.integers(0, 128, m).astype(np.float32)
            dst = np.full(m, np.nan, np.float32)
            assert do_count_lookup(table, counts, dst) is AVX512  # without AVX-512: False, the caller's path
            if AVX512:
                assert np.array_equal(dst, table[counts.astype(np.int64)])
            if m and AVX512:
                zero = counts.copy()
                zero[m - 1] = -0.0  # a count of 0
                assert do_count_lookup(table, zero, dst)
                assert dst[m - 1] == table[0]
            if m:
                for bad in (128.0, -1.0, 0.5, 127.5, np.nan, np.inf, -np.inf, 1e10, -1e10):
                    for pos in {0, m // 2, m - 1}:
                        x = counts.copy()
                        x[pos] = bad
                        assert not do_count_lookup(table, x, dst), (m, bad, pos)
            assert not do_count_lookup(table[:100], counts, dst)  # a table too short
            for lut in (np.zeros(0, np.float32), rng.standard_normal(128).astype(np.float32)):
                genes = rng.integers(0, 20000, m).astype(np.int32)
                src = rng.integers(0, 128, m).astype(np.float32)
                bits = src.view(np.int32)
                for cut in (0.0, 3.0, 60.0, 127.0):
                    t = int(np.float32(cut).view(np.int32))
                    for room in (0, 5, 40):
                        gr = np.full(m + room, -7, np.int64)
                        er = np.full(m + room, np.nan, np.float32)
                        w = do_compact(genes, src, bits, t, lut, gr, er)
                        keep = bits > t
                        assert w == keep.sum()
                        assert np.array_equal(gr[:w], genes[keep]), (m, cut, room)
                        want = lut[src[keep].astype(np.int64)] if len(lut) else src[keep]
                        assert np.array_equal(er[:w], want), (m, cut, room)
        print("AVX512", AVX512)
''')


def test_simd_blocks_equal_numpy() -> None:
    namespace: dict = {}
    exec(compile(CHECKS, "simd_checks", "exec"), namespace)  # noqa: S102 - the checks above, run here
    namespace["check"]()


def test_simd_blocks_without_avx512_fall_back_to_the_scalar_loops(tmp_path) -> None:  # noqa: ANN001
    """Numba told to compile for a generic x86-64 CPU: the AVX-512 paths are not emitted and
    the same calls give the same arrays."""
    script = tmp_path / "checks.py"
    script.write_text(CHECKS + "\ncheck()\nassert not AVX512\n")
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "AVX512 False" in run.stdout
