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
The binned output's blocks are in :mod:`scmf_loader.outputs._simd_bins`, built on the
helpers here.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["AVX512", "compact", "compact16", "count_lookup", "lookup"]


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
                looked = _perm128(builder, _table_regs(builder, la), builder.fptosi(x, i16))
                bb_then = builder.block
            with otherwise:
                bb_else = builder.block
        vals = builder.phi(f16)
        vals.add_incoming(looked, bb_then)
        vals.add_incoming(x, bb_else)
        _store(builder, _compress(builder, vals, mask), era, ww)
        (glo, ghi), (mlo, mhi) = _widen(builder, g), _halves(builder, mask)
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
