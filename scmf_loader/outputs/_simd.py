"""A vectorised table lookup for the compiled kernels (imported only with numba).

``dst[j] = table[ix[j]]`` over a row does not vectorise in LLVM's hands on this machine (no
gathers: the scalar loop costs about a cycle an entry, ~0.6 us per 2,000-value cell). With
AVX-512, a table of up to 128 float32 numbers fits in eight registers and ``vpermi2ps``
looks 16 entries up in two of them at once: four such lookups and three selects on the
index bits give 16 entries in seven instructions. :func:`lookup` emits that loop when the
compiling CPU has AVX-512 (``avx512f``) and numba compiles for the host; elsewhere it does
nothing and returns 0, and the caller's scalar loop does every entry.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["AVX512", "lookup"]


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
