"""Vectorised table lookups and compactions for the compiled kernels (imported only with numba).

``dst[j] = table[ix[j]]`` over a row does not vectorise in LLVM's hands on this machine (no
gathers: the scalar loop costs about a cycle an entry, ~0.6 us per 2,000-value cell). With
AVX-512, a table of up to 128 float32 numbers fits in eight registers and ``vpermi2ps``
looks 16 entries up in two of them at once: four such lookups and three selects on the
index bits give 16 entries in seven instructions. :func:`lookup` emits that loop when the
compiling CPU has AVX-512 (``avx512f``) and numba compiles for the host; elsewhere it does
nothing and returns 0, and the caller's scalar loop does every entry.

Compaction (the kept entries of a truncated row, in order) is a loop with a data-dependent
write position that LLVM does not vectorise either (~1.5 cycles an entry). :func:`compact16`
does 16 entries with AVX-512's ``vpcompressd``/``vpcompressq`` (register form) and full
unaligned stores past the write position (the next block overwrites what lies past the
kept ones), so the caller keeps 16 free slots after ``w``; without AVX-512 it returns -1.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["AVX512", "bin_compact", "bin_lookup", "compact", "compact16", "count_lookup", "hist_small", "lookup"]


def _host_avx512() -> bool:
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return False  # numba compiles for another target: it may lack AVX-512
    try:
        import llvmlite.binding as ll

        return "+avx512f" in ll.get_host_cpu_features().flatten().split(",")
    except Exception:  # noqa: BLE001 - no feature list: the scalar loop
        return False


AVX512 = _host_avx512()
WIDTH = 128  # table entries the vector lookup needs readable


@intrinsic
def _lookup128(typingctx, table, ix, dst, n):  # noqa: ANN001, ANN202
    """``dst[j] = table[ix[j]]`` for ``j < n - n % 16`` (float32 ``table`` of at least 128
    readable numbers, int32 ``ix`` in ``[0, 128)``, C-contiguous); returns how many were done
    (0 without AVX-512)."""
    ok = (isinstance(table, types.Array) and table.dtype == types.float32 and isinstance(ix, types.Array)
          and ix.dtype == types.int32 and isinstance(dst, types.Array) and dst.dtype == types.float32
          and isinstance(n, types.Integer))
    if not ok:
        return None
    sig = types.int64(table, ix, dst, n)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        i64 = ir.IntType(64)
        n64 = context.cast(builder, args[3], signature.args[3], types.int64)
        blocks = builder.sdiv(n64, i64(16))
        if not AVX512:
            return i64(0)
        i32 = ir.IntType(32)
        f16, i16 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(i32, 16)
        tab = context.make_array(signature.args[0])(context, builder, args[0])
        ixa = context.make_array(signature.args[1])(context, builder, args[1])
        out = context.make_array(signature.args[2])(context, builder, args[2])
        tp = builder.bitcast(tab.data, f16.as_pointer())
        regs = [builder.load(builder.gep(tp, [i64(r)]), align=4) for r in range(8)]
        perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f16, [f16, i16, f16]),
                                              "llvm.x86.avx512.vpermi2var.ps.512")
        bit32 = ir.Constant(i16, [32] * 16)
        bit64 = ir.Constant(i16, [64] * 16)
        zero = ir.Constant(i16, [0] * 16)
        with cgutils.for_range(builder, blocks) as loop:
            off = builder.mul(loop.index, i64(16))
            iv = builder.load(builder.bitcast(builder.gep(ixa.data, [off]), i16.as_pointer()), align=4)
            parts = [builder.call(perm, [regs[2 * q], iv, regs[2 * q + 1]]) for q in range(4)]
            hi32 = builder.icmp_signed("!=", builder.and_(iv, bit32), zero)
            hi64 = builder.icmp_signed("!=", builder.and_(iv, bit64), zero)
            low = builder.select(hi32, parts[1], parts[0])
            high = builder.select(hi32, parts[3], parts[2])
            res = builder.select(hi64, high, low)
            builder.store(res, builder.bitcast(builder.gep(out.data, [off]), f16.as_pointer()), align=4)
        return builder.mul(blocks, i64(16))

    return sig, codegen


def lookup(table, ix, top, dst) -> None:  # noqa: ANN001
    """``dst[j] = table[ix[j]]`` for every ``j < len(dst)`` (``ix``: int32 counts ``<= top``;
    compiled code only): for float32 ``table`` and ``dst``, 16 at a time with AVX-512 when
    ``top < 128 <= len(table)``; the rest (or all) one by one."""
    raise NotImplementedError("compiled code only")


@overload(lookup, jit_options={"nogil": True})
def _lookup_impl(table, ix, top, dst):  # noqa: ANN001, ANN202
    vector = (isinstance(table, types.Array) and table.dtype == types.float32 and isinstance(dst, types.Array)
              and dst.dtype == types.float32 and isinstance(ix, types.Array) and ix.dtype == types.int32)
    if vector:
        def impl(table, ix, top, dst):  # noqa: ANN001, ANN202
            m = len(dst)
            done = 0
            if top < WIDTH and len(table) >= WIDTH and len(ix) >= m:
                done = _lookup128(table, ix, dst, m)
            for j in range(done, m):
                dst[j] = table[np.uint32(ix[j])]
    else:
        def impl(table, ix, top, dst):  # noqa: ANN001, ANN202
            for j in range(len(dst)):
                dst[j] = table[np.uint32(ix[j])]
    return impl


def _vec_types():  # noqa: ANN202
    i32 = ir.IntType(32)
    return ir.IntType(64), i32, ir.VectorType(ir.FloatType(), 16), ir.VectorType(i32, 16)


def _load16(builder, ary, index, vty):  # noqa: ANN001, ANN202
    return builder.load(builder.bitcast(builder.gep(ary.data, [index]), vty.as_pointer()), align=1)


def _store(builder, value, ary, index):  # noqa: ANN001, ANN202
    builder.store(value, builder.bitcast(builder.gep(ary.data, [index]), value.type.as_pointer()), align=1)


def _compress(builder, value, mask):  # noqa: ANN001, ANN202
    """``value``'s lanes selected by ``mask`` packed to the front (vpcompress, register form)."""
    vty = value.type
    suffix = f"v{vty.count}{'f32' if isinstance(vty.element, ir.FloatType) else f'i{vty.element.width}'}"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, mask.type]),
                                        f"llvm.x86.avx512.mask.compress.{suffix}")
    return builder.call(fn, [value, ir.Constant(vty, None), mask])


def _popcount(builder, mask):  # noqa: ANN001, ANN202
    ity = ir.IntType(mask.type.count)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ity, [ity]), f"llvm.ctpop.i{ity.width}")
    n = builder.call(fn, [builder.bitcast(mask, ity)])
    return builder.zext(n, ir.IntType(64))


@intrinsic
def compact16(typingctx, genes, src, bits, t, lut, gr, er, i, w):  # noqa: ANN001, ANN202
    """Entries ``i .. i+15`` whose ``bits`` (int32) exceed ``t``: their gene (int32 ``genes``,
    widened into int64 ``gr``) and value (float32 ``src``, or ``lut[int(src)]`` when ``lut``
    is not empty: counts below 128, ``lut`` with 128 readable float32 numbers) written in
    order from ``w``; returns the new ``w`` (-1 without AVX-512: nothing done). Writes 16
    slots from ``w`` of ``gr`` and ``er``: the caller keeps ``w + 16`` within both."""
    arrays = (genes, src, bits, lut, gr, er)
    dtypes = (types.int32, types.float32, types.int32, types.float32, types.int64, types.float32)
    if not all(isinstance(a, types.Array) and a.dtype == d for a, d in zip(arrays, dtypes, strict=True)):
        return None
    sig = types.int64(genes, src, bits, t, lut, gr, er, i, w)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        i64, i32, f16, i16 = _vec_types()
        if not AVX512:
            return i64(-1)
        ga, sa, ba, la, gra, era = (context.make_array(signature.args[k])(context, builder, args[k])
                                    for k in (0, 1, 2, 4, 5, 6))
        tt = context.cast(builder, args[3], signature.args[3], types.int32)
        ii = context.cast(builder, args[7], signature.args[7], types.int64)
        ww = context.cast(builder, args[8], signature.args[8], types.int64)
        g = _load16(builder, ga, ii, i16)
        x = _load16(builder, sa, ii, f16)
        b = _load16(builder, ba, ii, i16)
        tv = builder.insert_element(ir.Constant(i16, None), tt, i32(0))
        tv = builder.shuffle_vector(tv, ir.Constant(i16, None), ir.Constant(i16, [0] * 16))
        mask = builder.icmp_signed(">", b, tv)
        n_lut = builder.extract_value(la.shape, 0)
        has_lut = builder.icmp_signed(">", n_lut, i64(0))
        with builder.if_else(has_lut) as (then, otherwise):
            with then:
                bb_then = builder.block
                idx = builder.fptosi(x, i16)
                tp = builder.bitcast(la.data, f16.as_pointer())
                regs = [builder.load(builder.gep(tp, [i64(r)]), align=4) for r in range(8)]
                perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f16, [f16, i16, f16]),
                                                      "llvm.x86.avx512.vpermi2var.ps.512")
                parts = [builder.call(perm, [regs[2 * q], idx, regs[2 * q + 1]]) for q in range(4)]
                zero = ir.Constant(i16, [0] * 16)
                hi32 = builder.icmp_signed("!=", builder.and_(idx, ir.Constant(i16, [32] * 16)), zero)
                hi64 = builder.icmp_signed("!=", builder.and_(idx, ir.Constant(i16, [64] * 16)), zero)
                looked = builder.select(hi64, builder.select(hi32, parts[3], parts[2]),
                                        builder.select(hi32, parts[1], parts[0]))
                bb_then = builder.block
            with otherwise:
                bb_else = builder.block
        vals = builder.phi(f16)
        vals.add_incoming(looked, bb_then)
        vals.add_incoming(x, bb_else)
        _store(builder, _compress(builder, vals, mask), era, ww)
        i8 = ir.VectorType(i64, 8)
        lo_idx, hi_idx = ir.Constant(ir.VectorType(i32, 8), list(range(8))), ir.Constant(ir.VectorType(i32, 8), list(range(8, 16)))
        glo = builder.sext(builder.shuffle_vector(g, g, lo_idx), i8)
        ghi = builder.sext(builder.shuffle_vector(g, g, hi_idx), i8)
        mlo = builder.shuffle_vector(mask, mask, lo_idx)
        mhi = builder.shuffle_vector(mask, mask, hi_idx)
        _store(builder, _compress(builder, glo, mlo), gra, ww)
        w2 = builder.add(ww, _popcount(builder, mlo))
        _store(builder, _compress(builder, ghi, mhi), gra, w2)
        return builder.add(w2, _popcount(builder, mhi))

    return sig, codegen


def compact(genes, src, bits, t, lut, gr, er, i, w) -> int:  # noqa: ANN001
    """:func:`compact16` where the arrays have its dtypes, else -1 (nothing done; compiled
    code only)."""
    raise NotImplementedError("compiled code only")


@overload(compact, jit_options={"nogil": True})
def _compact_impl(genes, src, bits, t, lut, gr, er, i, w):  # noqa: ANN001, ANN202
    arrays = (genes, src, bits, lut, gr, er)
    dtypes = (types.int32, types.float32, types.int32, types.float32, types.int64, types.float32)
    if all(isinstance(a, types.Array) and a.dtype == d and a.layout == "C" for a, d in zip(arrays, dtypes, strict=True)):
        def impl(genes, src, bits, t, lut, gr, er, i, w):  # noqa: ANN001, ANN202
            return compact16(genes, src, bits, t, lut, gr, er, i, w)
    else:
        def impl(genes, src, bits, t, lut, gr, er, i, w):  # noqa: ANN001, ANN202
            return -1
    return impl


def _perm128(builder, regs, idx):  # noqa: ANN001, ANN202
    """``table[idx]`` for 16 indices in ``[0, 128)``, the table in eight registers."""
    _, _, f16, i16 = _vec_types()
    perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f16, [f16, i16, f16]),
                                          "llvm.x86.avx512.vpermi2var.ps.512")
    parts = [builder.call(perm, [regs[2 * q], idx, regs[2 * q + 1]]) for q in range(4)]
    zero = ir.Constant(i16, [0] * 16)
    hi32 = builder.icmp_signed("!=", builder.and_(idx, ir.Constant(i16, [32] * 16)), zero)
    hi64 = builder.icmp_signed("!=", builder.and_(idx, ir.Constant(i16, [64] * 16)), zero)
    return builder.select(hi64, builder.select(hi32, parts[3], parts[2]), builder.select(hi32, parts[1], parts[0]))


@intrinsic
def _count_lookup128(typingctx, table, src, dst, n):  # noqa: ANN001, ANN202
    """For ``j < n - n % 16``: ``dst[j] = table[src[j]]`` when every ``src[j]`` (float32) is a
    whole number in ``[0, 128)`` (``table``: 128 readable float32 numbers), one pass; returns
    how many were done, -1 when some value is not such a count (``dst`` then holds garbage),
    -2 without AVX-512 (nothing done)."""
    ok = all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (table, src, dst)) and isinstance(n, types.Integer)
    if not ok:
        return None
    sig = types.int64(table, src, dst, n)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        i64, i32, f16, i16 = _vec_types()
        if not AVX512:
            return i64(-2)
        ta, sa, da = (context.make_array(signature.args[k])(context, builder, args[k]) for k in range(3))
        n64 = context.cast(builder, args[3], signature.args[3], types.int64)
        blocks = builder.sdiv(n64, i64(16))
        tp = builder.bitcast(ta.data, f16.as_pointer())
        regs = [builder.load(builder.gep(tp, [i64(r)]), align=4) for r in range(8)]
        b16 = ir.VectorType(ir.IntType(1), 16)
        bad = cgutils.alloca_once_value(builder, ir.Constant(b16, [0] * 16))
        fmin = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f16, [f16, f16]), "llvm.minnum.v16f32")
        fmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f16, [f16, f16]), "llvm.maxnum.v16f32")
        lo, hi = ir.Constant(f16, [0.0] * 16), ir.Constant(f16, [127.0] * 16)
        with cgutils.for_range(builder, blocks) as loop:
            off = builder.mul(loop.index, i64(16))
            x = _load16(builder, sa, off, f16)
            clamped = builder.call(fmin, [builder.call(fmax, [x, lo]), hi])  # fptosi of it is defined
            idx = builder.fptosi(clamped, i16)
            builder.store(builder.or_(builder.load(bad), builder.fcmp_unordered("!=", builder.sitofp(idx, f16), x)), bad)
            _store(builder, _perm128(builder, regs, idx), da, off)
        any_bad = builder.icmp_unsigned("!=", builder.bitcast(builder.load(bad), ir.IntType(16)), ir.IntType(16)(0))
        return builder.select(any_bad, i64(-1), builder.mul(blocks, i64(16)))

    return sig, codegen


def count_lookup(table, src, dst) -> int:  # noqa: ANN001
    """``dst[j] = table[int(src[j])]`` for every ``j`` when every value of ``src`` is a whole
    number in ``[0, 128)`` (``table``: at least 128 numbers), in one vectorised pass with
    AVX-512 for float32 arrays: True; False (``dst`` garbage) when a value is not such a
    count, or when this path is not available (no AVX-512, other dtypes): the caller then
    takes its general path (compiled code only)."""
    raise NotImplementedError("compiled code only")


@overload(count_lookup, jit_options={"nogil": True})
def _count_lookup_impl(table, src, dst):  # noqa: ANN001, ANN202
    if all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in (table, src, dst)):
        def impl(table, src, dst):  # noqa: ANN001, ANN202
            m = len(dst)
            if not AVX512 or len(table) < WIDTH or len(src) < m:
                return False
            done = _count_lookup128(table, src, dst, m)
            if done < 0:
                return False
            for j in range(done, m):
                v = src[j]
                if not (v >= 0 and v < WIDTH):
                    return False
                i = np.int32(v)
                if i != v:
                    return False
                dst[j] = table[i]
            return True
    else:
        def impl(table, src, dst):  # noqa: ANN001, ANN202
            return False
    return impl


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


def _table_regs(builder, ary):  # noqa: ANN001, ANN202
    """The first 128 numbers of a 32-bit ``ary`` as eight float vectors (int32 bits kept)."""
    i64, _, f16, _ = _vec_types()
    tp = builder.bitcast(ary.data, f16.as_pointer())
    return [builder.load(builder.gep(tp, [i64(r)]), align=4) for r in range(8)]


def _widen(builder, v):  # noqa: ANN001, ANN202
    """An int32 x 16 vector as two int64 x 8 halves."""
    i64, i32, _, _ = _vec_types()
    lo = ir.Constant(ir.VectorType(i32, 8), list(range(8)))
    hi = ir.Constant(ir.VectorType(i32, 8), list(range(8, 16)))
    i8 = ir.VectorType(i64, 8)
    return builder.sext(builder.shuffle_vector(v, v, lo), i8), builder.sext(builder.shuffle_vector(v, v, hi), i8)


def _halves(builder, mask):  # noqa: ANN001, ANN202
    _, i32, _, _ = _vec_types()
    lo = ir.Constant(ir.VectorType(i32, 8), list(range(8)))
    hi = ir.Constant(ir.VectorType(i32, 8), list(range(8, 16)))
    return builder.shuffle_vector(mask, mask, lo), builder.shuffle_vector(mask, mask, hi)


def _bins_of(builder, regs, idx):  # noqa: ANN001, ANN202
    _, _, _, i16 = _vec_types()
    return builder.bitcast(_perm128(builder, regs, idx), i16)


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
