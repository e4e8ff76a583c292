"""AVX-512 blocks of the binned output (:mod:`scmf_loader.outputs._binfast`): a vectorised
count histogram (:func:`hist_small`), bins looked up 16 at a time into int64 (:func:`bin_lookup`)
and the kept entries of a truncated row compacted (:func:`bin_compact`). Built on the helpers
of :mod:`scmf_loader.outputs._simd`; without AVX-512 each says so and the caller's scalar
loop does the work."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from scmf_loader.outputs._simd import (
    AVX512,
    WIDTH,
    _bins_of,
    _compress,
    _halves,
    _load16,
    _popcount,
    _store,
    _table_regs,
    _vec_types,
    _widen,
)

__all__ = ["bin_compact", "bin_lookup", "hist_small"]


@intrinsic
def _hist4(typingctx, src, n, small, rest):  # noqa: ANN001, ANN202
    """Over ``src[:n - n % 16]`` (float32 whole counts below 2**31): ``small[c] +=`` how many
    equal ``c`` for ``c < 4``, and the counts of 4 and above packed in order into ``rest``
    (int32, ``n + 16`` slots); returns how many were packed (-1 without AVX-512)."""
    ok = (isinstance(src, types.Array) and src.dtype == types.float32 and isinstance(small, types.Array)
          and small.dtype == types.int64 and isinstance(rest, types.Array) and rest.dtype == types.int32
          and isinstance(n, types.Integer))
    if not ok:
        return None
    sig = types.int64(src, n, small, rest)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        i64, i32, f16, i16 = _vec_types()
        if not AVX512:
            return i64(-1)
        sa = context.make_array(signature.args[0])(context, builder, args[0])
        sm = context.make_array(signature.args[2])(context, builder, args[2])
        ra = context.make_array(signature.args[3])(context, builder, args[3])
        n64 = context.cast(builder, args[1], signature.args[1], types.int64)
        blocks = builder.sdiv(n64, i64(16))
        accs = [cgutils.alloca_once_value(builder, i64(0)) for _ in range(4)]
        pos = cgutils.alloca_once_value(builder, i64(0))
        with cgutils.for_range(builder, blocks) as loop:
            off = builder.mul(loop.index, i64(16))
            idx = builder.fptosi(_load16(builder, sa, off, f16), i16)
            for c in range(4):
                eq = builder.icmp_signed("==", idx, ir.Constant(i16, [c] * 16))
                builder.store(builder.add(builder.load(accs[c]), _popcount(builder, eq)), accs[c])
            big = builder.icmp_signed(">", idx, ir.Constant(i16, [3] * 16))
            p = builder.load(pos)
            _store(builder, _compress(builder, idx, big), ra, p)
            builder.store(builder.add(p, _popcount(builder, big)), pos)
        for c in range(4):
            ptr = builder.gep(sm.data, [i64(c)])
            builder.store(builder.add(builder.load(ptr), builder.load(accs[c])), ptr)
        return builder.load(pos)

    return sig, codegen


def hist_small(src, hist, rest) -> int:  # noqa: ANN001
    """Add the float32 whole counts of ``src`` (each at most ``len(hist) - 1``; ``hist`` int64
    with at least 4 slots) to ``hist`` with AVX-512 and return True (compiled code only):
    counts of 0..3 - nine in ten entries of count data - by vectorised compares, the others
    one by one (``rest``: int32 scratch of ``len(src) + 16``). False, ``hist`` untouched,
    without AVX-512 or for other dtypes: the caller counts."""
    raise NotImplementedError("compiled code only")


@overload(hist_small, jit_options={"nogil": True})
def _hist_small_impl(src, hist, rest):  # noqa: ANN001, ANN202
    vector = (isinstance(src, types.Array) and src.dtype == types.float32 and src.layout == "C"
              and isinstance(hist, types.Array) and hist.dtype == types.int64 and hist.layout == "C")

    if vector:
        def impl(src, hist, rest):  # noqa: ANN001, ANN202
            n = len(src)
            if not AVX512 or len(rest) < n + 16 or len(hist) < 4:
                return False
            packed = _hist4(src, n, hist, rest)
            for j in range(packed):
                hist[rest[j]] += 1
            for j in range(n - n % 16, n):
                hist[np.int32(src[j])] += 1
            return True
    else:
        def impl(src, hist, rest):  # noqa: ANN001, ANN202
            return False
    return impl


def _bin_types_ok(src, table, *out) -> bool:  # noqa: ANN001
    return (isinstance(src, types.Array) and src.dtype == types.float32 and src.layout == "C"
            and isinstance(table, types.Array) and table.dtype == types.int32 and table.layout == "C"
            and all(isinstance(o, types.Array) and o.dtype == types.int64 and o.layout == "C" for o in out))


@intrinsic
def _bin_lookup16(typingctx, table, src, dst, n):  # noqa: ANN001, ANN202
    """``dst[j] = table[int(src[j])]`` (int32 ``table`` of 128 readable numbers, float32 whole
    counts below 128, int64 ``dst``) for ``j < n - n % 16``: how many (-1 without AVX-512)."""
    if not _bin_types_ok(src, table, dst) or not isinstance(n, types.Integer):
        return None
    sig = types.int64(table, src, dst, n)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        i64, _, f16, i16 = _vec_types()
        if not AVX512:
            return i64(-1)
        ta, sa, da = (context.make_array(signature.args[k])(context, builder, args[k]) for k in range(3))
        blocks = builder.sdiv(context.cast(builder, args[3], signature.args[3], types.int64), i64(16))
        regs = _table_regs(builder, ta)
        with cgutils.for_range(builder, blocks) as loop:
            off = builder.mul(loop.index, i64(16))
            lo, hi = _widen(builder, _bins_of(builder, regs, builder.fptosi(_load16(builder, sa, off, f16), i16)))
            _store(builder, lo, da, off)
            _store(builder, hi, da, builder.add(off, i64(8)))
        return builder.mul(blocks, i64(16))

    return sig, codegen


@intrinsic
def _bin_compact16(typingctx, genes, src, lo, table, gw, ew, i, w):  # noqa: ANN001, ANN202
    """Entries ``i .. i+15`` whose count (float32 ``src``, whole, below 128) is at least
    ``lo``: gene (int32 ``genes`` widened) and ``table[count]`` (int32 table, widened) written
    in order into int64 ``gw``/``ew`` from ``w`` (16 slots written); the new ``w``."""
    ok = (_bin_types_ok(src, table, gw, ew) and isinstance(genes, types.Array) and genes.dtype == types.int32
          and genes.layout == "C")
    if not ok:
        return None
    sig = types.int64(genes, src, lo, table, gw, ew, i, w)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        i64, i32, f16, i16 = _vec_types()
        ga, sa, ta, gwa, ewa = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 1, 3, 4, 5))
        low = context.cast(builder, args[2], signature.args[2], types.int32)
        ii = context.cast(builder, args[6], signature.args[6], types.int64)
        ww = context.cast(builder, args[7], signature.args[7], types.int64)
        idx = builder.fptosi(_load16(builder, sa, ii, f16), i16)
        lov = builder.shuffle_vector(builder.insert_element(ir.Constant(i16, None), low, i32(0)), ir.Constant(i16, None),
                                     ir.Constant(i16, [0] * 16))
        mask = builder.icmp_signed(">=", idx, lov)
        mlo, mhi = _halves(builder, mask)
        nlo = _popcount(builder, mlo)
        for values, out in ((_load16(builder, ga, ii, i16), gwa), (_bins_of(builder, _table_regs(builder, ta), idx), ewa)):
            vlo, vhi = _widen(builder, values)
            _store(builder, _compress(builder, vlo, mlo), out, ww)
            _store(builder, _compress(builder, vhi, mhi), out, builder.add(ww, nlo))
        return builder.add(builder.add(ww, nlo), _popcount(builder, mhi))

    return sig, codegen


def bin_lookup(table, src, dst) -> bool:  # noqa: ANN001
    """``dst[j] = table[int(src[j])]`` for every ``j`` (``src``: float32 whole counts below 128,
    ``table``: int32 with 128 numbers, ``dst`` int64) 16 at a time with AVX-512: True; False,
    nothing done, elsewhere (compiled code only)."""
    raise NotImplementedError("compiled code only")


@overload(bin_lookup, jit_options={"nogil": True})
def _bin_lookup_impl(table, src, dst):  # noqa: ANN001, ANN202
    if _bin_types_ok(src, table, dst):
        def impl(table, src, dst):  # noqa: ANN001, ANN202
            m = len(dst)
            if not AVX512 or len(table) < WIDTH or len(src) < m:
                return False
            done = _bin_lookup16(table, src, dst, m)
            for j in range(done, m):
                dst[j] = table[np.int32(src[j])]
            return True
    else:
        def impl(table, src, dst):  # noqa: ANN001, ANN202
            return False
    return impl


def bin_compact(genes, src, lo, table, gw, ew) -> int:  # noqa: ANN001
    """Entries whose count (float32 ``src``, whole, below 128) is at least ``lo``: gene and
    ``table[count]`` (int32 table of 128) written in order into int64 ``gw``/``ew`` from 0,
    16 at a time with AVX-512 while 16 slots are free; returns ``(entries consumed, entries
    written)`` for the caller to finish one by one - ``(0, 0)`` without AVX-512 or for other
    dtypes (compiled code only)."""
    raise NotImplementedError("compiled code only")


@overload(bin_compact, jit_options={"nogil": True})
def _bin_compact_impl(genes, src, lo, table, gw, ew):  # noqa: ANN001, ANN202
    ok = (_bin_types_ok(src, table, gw, ew) and isinstance(genes, types.Array) and genes.dtype == types.int32
          and genes.layout == "C")
    if ok:
        def impl(genes, src, lo, table, gw, ew):  # noqa: ANN001, ANN202
            i, w, n = 0, 0, len(genes)
            if not AVX512 or len(table) < WIDTH or len(src) < n:
                return 0, 0
            room = min(len(gw), len(ew)) - 16
            while i + 16 <= n and w <= room:
                w = _bin_compact16(genes, src, lo, table, gw, ew, i, w)
                i += 16
            return i, w
    else:
        def impl(genes, src, lo, table, gw, ew):  # noqa: ANN001, ANN202
            return 0, 0
    return impl
