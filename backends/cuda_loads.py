"""Device-side loads and bit decoding shared by the CUDA backend's quantised kernels (backends/cuda_matvec.py,
backends/cuda_mxfp4.py): unchecked and 16-byte loads, a three-input logic op, and scales/biases read as raw
bits (float32, float16 or bfloat16) and decoded in the kernel.

numba's a[i] adds the array's length to a negative signed index before loading; these kernels' indices are
never negative, and those three integer instructions per load were a large share of the mat-vec's integer
pipe, its busiest (ncu on an H100, docs/benchmarks.md, issue 15, seventh session). numba's CUDA simulator has
no inline PTX or LLVM intrinsics: there each helper is plain Python.
"""

from __future__ import annotations

from functools import lru_cache

from numba import cuda, float32, uint32

from flashmoe.backends.cuda_kernels import BF16, F32, SIMULATOR, _as_f32

if SIMULATOR:
    def _aligned16(x, i):
        return True  # one path in the simulator: _load4 is four element reads there

    def _load4(x, i):
        return x[i], x[i + 1], x[i + 2], x[i + 3]

    def _and_or(a, m, o):
        return (a & m) | o

    def _ld(a, i):
        return a[i]

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    def _item_pointer(context, builder, sig, args):
        aryty, idxty = sig.args
        ary = context.make_array(aryty)(context, builder, value=args[0])
        i = context.cast(builder, args[1], idxty, types.intp)
        return cgutils.get_item_pointer(context, builder, aryty, ary, [i], wraparound=False)

    @intrinsic
    def _aligned16(typingctx, x, i):
        """Whether &x[i] of a 1-D array is 16-byte aligned (the address a _load4 needs)."""
        def codegen(context, builder, sig, args):
            addr = builder.ptrtoint(_item_pointer(context, builder, sig, args), ir.IntType(64))
            return builder.icmp_unsigned("==", builder.and_(addr, ir.Constant(ir.IntType(64), 15)),
                                         ir.Constant(ir.IntType(64), 0))
        return types.boolean(x, i), codegen

    @intrinsic
    def _load4(typingctx, x, i):
        """(x[i], .., x[i + 3]) of a float32 array in one 16-byte load (ld.v4.f32); &x[i] 16-byte aligned."""
        def codegen(context, builder, sig, args):
            vec = ir.VectorType(ir.FloatType(), 4)
            v = builder.load(builder.bitcast(_item_pointer(context, builder, sig, args), vec.as_pointer()), align=16)
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_element(v, ir.Constant(ir.IntType(32), j)) for j in range(4)])
        return types.UniTuple(types.float32, 4)(x, i), codegen

    @intrinsic
    def _ld(typingctx, a, i):
        """a[i] of a 1-D array for an index known to be in range: numba's a[i] with a signed i first adds
        the length when i < 0 (three integer instructions per load in sm_90 SASS, where the mat-vec's integer
        pipe is its busiest: ncu)."""
        def codegen(context, builder, sig, args):
            return builder.load(_item_pointer(context, builder, sig, args))
        return a.dtype(a, i), codegen

    @intrinsic
    def _and_or(typingctx, a, m, o):
        """(a & m) | o of three uint32 as one lop3.b32: written as two logic ops with constant m and o,
        ptxas emits two (a SASS LOP3 takes one immediate)."""
        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), "lop3.b32 $0, $1, $2, $3, 0xEA;",
                               "=r,r,r,r")
            return builder.call(asm, args)
        return types.uint32(types.uint32, types.uint32, types.uint32), codegen


@lru_cache(maxsize=None)
def _scale_bits(fmt: int):
    """Device function (b32, b16, i) -> the raw bits of scale/bias element i in format fmt, as uint32 (a 16-bit
    format zero-extended: the load itself, no instruction after it). The mat-vec passes load bits and decode
    them (:func:`_scale_value`) where they are used: a decode right after its load made the warp wait for
    that load before issuing the next (sm_90 SASS), one memory round trip per word instead of one per pass."""
    if fmt == F32:

        @cuda.jit(device=True)
        def bits(b32, b16, i):
            return _ld(b32, i)

    else:

        @cuda.jit(device=True)
        def bits(b32, b16, i):
            return uint32(_ld(b16, i))

    return bits


@lru_cache(maxsize=None)
def _scale_value(fmt: int):
    """Device function (uint32 bits from :func:`_scale_bits`) -> the float32 value in format fmt."""
    if fmt == F32:

        @cuda.jit(device=True)
        def value(h):
            return _as_f32(h)

    elif fmt == BF16:

        @cuda.jit(device=True)
        def value(h):
            return _as_f32(h << uint32(16))

    else:

        @cuda.jit(device=True)
        def value(h):
            # IEEE half -> single from the bits: rebias the exponent; subnormal halves are m * 2^-24.
            sign = (h >> uint32(15)) << uint32(31)
            e = (h >> uint32(10)) & uint32(31)
            m = h & uint32(1023)
            if e == uint32(0):
                v = float32(m) * float32(5.9604644775390625e-08)
                return -v if sign else v
            if e == uint32(31):
                return _as_f32(sign | uint32(0x7F800000) | (m << uint32(13)))
            return _as_f32(sign | ((e + uint32(112)) << uint32(23)) | (m << uint32(13)))

    return value


@lru_cache(maxsize=None)
def _scale_loader(fmt: int):
    """Device function (b32, b16, i) -> float32 value of scale/bias element i in format fmt."""
    bits, value = _scale_bits(fmt), _scale_value(fmt)

    @cuda.jit(device=True)
    def load(b32, b16, i):
        return value(bits(b32, b16, i))

    return load
