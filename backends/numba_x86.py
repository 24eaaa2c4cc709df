"""The x86 int8 dot-product intrinsics of the numba q8 kernels (numba_q8.py, whose docstring gives the
numerics), written in LLVM IR because LLVM's vectoriser does not find the integer multiply-add instructions
from plain loops (checked with ``inspect_asm``: plain loops give zero-extends and vpmulld).

4-bit rows (affine and MXFP4) in *paired* input order: per 64 inputs a row's 32 code bytes are loaded and
split into low and high nibbles and multiplied with the int8 inputs by ``vpdpbusd`` (AVX-512 VNNI, where the
CPU has it) or ``vpmaddubsw`` + ``vpmaddwd`` (AVX2), giving 8 int32 lanes = 2 blocks x 4; those are converted
to float and accumulated with the blocks' scales by one FMA, and the 8 lanes are summed once per row
(llama.cpp's Q4_0 x Q8_0 scheme). An MXFP4 row maps each nibble to |2·E2M1 value| by vpshufb and moves the
code's sign onto its int8 input by vpsignb first. One row meets one token (decode) or a tile of
Q8_TILE_TOKENS tokens (prefill: the codes loaded and split, the scales read, once per tile; each token's sums
in the same order as alone). Other affine widths (2, 3, 5, 6 bits, and any width in groups of 16) take *units*
of 32 codes in natural input order: a unit's 4·bits bytes unpacked to 32 code bytes (_unit_codes), one
vpdpbusd (or vpmaddubsw + vpmaddwd) against the 32 int8 inputs, the same loop and tiles as the 4-bit rows
(row_dots). 8-bit rows in groups of 32 or more take one 32-value block per 32 bytes of codes in natural order:
``vpdpbusd`` multiplies the unsigned code bytes with the int8 inputs directly; on AVX2 each code is split into
its nibbles (16 * high + low) because ``vpmaddubsw`` on whole bytes could saturate its int16 lanes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

try:
    import llvmlite.binding as llvm_binding
    import numba
    from llvmlite import ir as llvm_ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # the numba backend reports it (numba_backend.unavailable_reason)
    numba = None

from flashmoe.reference.q8 import FP4_DOUBLED


def int8_instructions() -> str | None:
    """What the 4-bit q8 row kernel uses on this CPU: 'avx512-vnni' (vpdpbusd), 'avx2' (vpmaddubsw +
    vpmaddwd), or None (the portable loop)."""
    if numba is None:
        return None
    features = llvm_binding.get_host_cpu_features()
    if features.get("avx512vnni") and features.get("avx512vl"):
        return "avx512-vnni"
    if features.get("avx2"):
        return "avx2"
    return None


INT8_INSTRUCTIONS = int8_instructions()
#: Whether 8-bit codes take the x86 row kernel (natural input order: code i is byte i of the row).
X86_BYTES = INT8_INSTRUCTIONS is not None
#: How far ahead of its loads the 4-bit row kernel prefetches the row's codes (one cache line per 64 bytes of
#: codes). Experts are used in place on the page cache's 4 KiB pages, where the hardware prefetchers stop at
#: each page's end; 1 KiB ahead reaches into the next rows and pages (docs/benchmarks.md, "Decode on every core").
PREFETCH_BYTES = 1024
#: Tokens per pass over a row of 4-bit codes in calls of many tokens (prefill): the codes are loaded and split,
#: and the row's scales read, once for this many tokens; a chunk's rows meet one such tile of tokens before
#: the next, so the tile's int8 inputs and the chunk's rows both stay in L1 (docs/benchmarks.md, "Prefill").
Q8_TILE_TOKENS = 4
#: Code widths of the x86 unit row kernels (UNIT_KERNELS): any affine width, inputs in natural order.
UNIT_BITS = (2, 3, 4, 5, 6, 8)


class RowStep(NamedTuple):
    """One step of an x86 row kernel's loop (row_dots): its inputs (32 or 64), activation blocks (1 or 2: the
    int32 lanes' halves) and code bytes."""

    inputs: int
    blocks: int
    bytes: int


#: The 4-bit rows in paired order: per step 64 inputs, 2 blocks of 32, 32 code bytes.
PAIR_STEP = RowStep(64, 2, 32)
#: The same step with its activation scales given per int32 lane (q4_group_row_dot: 8 floats a step).
PAIR_LANES_STEP = RowStep(64, 8, 32)


if numba is not None:
    _i8, _i16, _i32, _i64 = (llvm_ir.IntType(n) for n in (8, 16, 32, 64))
    _f32 = llvm_ir.FloatType()
    _v32i8, _v16i16 = llvm_ir.VectorType(_i8, 32), llvm_ir.VectorType(_i16, 16)
    _v8i32, _v8f32, _v2f32 = llvm_ir.VectorType(_i32, 8), llvm_ir.VectorType(_f32, 8), llvm_ir.VectorType(_f32, 2)

    def _lanes(*idx):
        return llvm_ir.Constant(llvm_ir.VectorType(_i32, len(idx)), list(idx))

    def _vnni(builder, acc, u8, s8):
        """acc + vpdpbusd(u8, s8): each int32 lane adds its 4 adjacent unsigned-by-signed byte products."""
        fn = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(_v8i32, [_v8i32] * 3),
                                            "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(fn, [acc, builder.bitcast(u8, _v8i32), builder.bitcast(s8, _v8i32)])

    def _maddubs(builder, u8, s8):
        """vpmaddubsw: <16 x i16>, each lane the sum of 2 adjacent unsigned-by-signed byte products."""
        fn = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(_v16i16, [_v32i8] * 2),
                                            "llvm.x86.avx2.pmadd.ub.sw")
        return builder.call(fn, [u8, s8])

    def _maddwd(builder, a, factor):
        """vpmaddwd with a constant: <8 x i32>, each lane factor * (the sum of 2 adjacent int16 lanes)."""
        fn = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(_v8i32, [_v16i16] * 2),
                                            "llvm.x86.avx2.pmadd.wd")
        return builder.call(fn, [a, llvm_ir.Constant(_v16i16, [factor] * 16)])

    def nibbles(builder, w):
        return (builder.and_(w, llvm_ir.Constant(_v32i8, [15] * 32)),
                builder.lshr(w, llvm_ir.Constant(_v32i8, [4] * 32)))

    def pair_products(builder, lo, hi, xl, xh):
        """<8 x i32>: lanes 0-3 sum block 0's lo·xl + hi·xh products, lanes 4-7 block 1's (lo, hi: 32
        unsigned bytes of at most 15, the weights of the low and high nibbles; xl, xh: their int8 inputs)."""
        if INT8_INSTRUCTIONS == "avx512-vnni":
            return _vnni(builder, _vnni(builder, llvm_ir.Constant(_v8i32, [0] * 8), lo, xl), hi, xh)
        # Each int16 lane is at most 2 * 15 * 127 per call, so neither the add nor vpmaddubsw saturates.
        return _maddwd(builder, builder.add(_maddubs(builder, lo, xl), _maddubs(builder, hi, xh)), 1)

    def _byte_dot(builder, w, x):
        """<8 x i32> summing to the block's code·x (32 bytes w of 8-bit codes, 32 int8 inputs x)."""
        if INT8_INSTRUCTIONS == "avx512-vnni":
            return _vnni(builder, llvm_ir.Constant(_v8i32, [0] * 8), w, x)
        # vpmaddubsw on whole bytes would saturate (2 * 255 * 127 > 32767): code = 16 * high + low nibble.
        lo, hi = nibbles(builder, w)
        return builder.add(_maddwd(builder, _maddubs(builder, hi, x), 16), _maddwd(builder, _maddubs(builder, lo, x), 1))

    def _load_scale(builder, pointer, index, bf16):
        """One weight scale as a float: bf16 bits (uint16) widened to the high half of a float32, or float32."""
        v = builder.load(builder.gep(pointer, [index]))
        if not bf16:
            return v
        return builder.bitcast(builder.shl(builder.zext(v, _i32), llvm_ir.Constant(_i32, 16)), _f32)

    def row_dots(builder, words, xs, ds, n_steps, step, block_scale, weights, step_dot, fma_terms, step_scale=None):
        """Codegen of one row's q8 dots with one or more tokens, shared by every x86 row kernel (4-bit in paired
        order, MXFP4, b-bit units), decode (one token) and prefill (a tile). words: a pointer to the row's
        code bytes; xs, ds: per token, pointers to its int8 inputs (the kernel's order) and its float32
        activation scales; n_steps: i64 steps in the row; step: the RowStep (inputs, activation blocks and
        code bytes per step). For each step p the codes are loaded and turned into weights (weights(builder,
        pointer to the step's codes)) and the step's block scales s read (block_scale(b) -> float) once for
        all the tokens; per token, f = sitofp(step_dot(builder, weights, *x vectors of 32 int8)) (<8 x i32>:
        lane l of the step's activation block l * blocks / 8) is accumulated as fma(*fma_terms(builder, f, d,
        s), acc) with d, s <blocks x float>; with step_scale (step_scale(p) -> <8 x float>: the step's weight
        scale in each int32 lane's place) s is that instead. Each token has two accumulators taking alternate
        steps (hiding the FMA latency), so its sum is the same bits whatever tokens share the call. Returns
        one float32 value per token."""
        one = llvm_ir.Constant(_i64, 1)
        nx = step.inputs // 32
        wp = builder.bitcast(words, _i8.as_pointer())
        xps = [builder.bitcast(x, _v32i8.as_pointer()) for x in xs]
        dps = [builder.bitcast(d, llvm_ir.VectorType(_f32, step.blocks).as_pointer()) for d in ds]
        fma = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(_v8f32, [_v8f32] * 3),
                                             "llvm.fma.v8f32")
        accs = [[cgutils.alloca_once_value(builder, llvm_ir.Constant(_v8f32, [0.0] * 8)) for _ in range(2)]
                for _ in xs]

        def at(p, n):
            return builder.mul(p, llvm_ir.Constant(_i64, n))

        def run(p, half):
            w = weights(builder, builder.gep(wp, [at(p, step.bytes)]))
            s = None if block_scale is None else llvm_ir.Constant(llvm_ir.VectorType(_f32, step.blocks), None)
            if step_scale is not None:
                s = step_scale(p)
            for lane in range(0 if block_scale is None else step.blocks):
                b = builder.add(at(p, step.blocks), llvm_ir.Constant(_i64, lane))
                s = builder.insert_element(s, block_scale(b), llvm_ir.Constant(_i32, lane))
            for xp, dp, acc in zip(xps, dps, accs):
                xv = [builder.load(builder.gep(xp, [builder.add(at(p, nx), llvm_ir.Constant(_i64, j))]), align=1)
                      for j in range(nx)]
                d = builder.load(builder.gep(dp, [p]), align=4)
                f = builder.sitofp(step_dot(builder, w, *xv), _v8f32)
                builder.store(builder.call(fma, [*fma_terms(builder, f, d, s), builder.load(acc[half])]), acc[half])

        ahead = llvm_ir.Constant(_i64, PREFETCH_BYTES)
        with cgutils.for_range(builder, builder.lshr(n_steps, one)) as loop:  # two steps per iteration
            p0 = builder.shl(loop.index, one)
            prefetch(builder, builder.gep(wp, [builder.add(at(p0, step.bytes), ahead)]))
            run(p0, 0)
            run(builder.add(p0, one), 1)
        with builder.if_then(builder.trunc(n_steps, llvm_ir.IntType(1))):  # an odd step left
            run(builder.sub(n_steps, one), 0)
        sums = []
        for acc in accs:
            v = builder.fadd(builder.load(acc[0]), builder.load(acc[1]))
            v4 = builder.fadd(builder.shuffle_vector(v, v, _lanes(0, 1, 2, 3)),
                              builder.shuffle_vector(v, v, _lanes(4, 5, 6, 7)))
            v2 = builder.fadd(builder.shuffle_vector(v4, v4, _lanes(0, 1)), builder.shuffle_vector(v4, v4, _lanes(2, 3)))
            sums.append(builder.fadd(builder.extract_element(v2, llvm_ir.Constant(_i32, 0)),
                                     builder.extract_element(v2, llvm_ir.Constant(_i32, 1))))
        return sums

    def prefetch(builder, pointer):
        """A read prefetch of the cache line at `pointer` into every cache level (a hint: no fault, no result)."""
        fn = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]),
            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(pointer, _i8.as_pointer()), llvm_ir.Constant(_i32, 0),
                          llvm_ir.Constant(_i32, 3), llvm_ir.Constant(_i32, 1)])

    def block_lanes(builder, v):
        """<n x float> (one value per activation block of a step, n = 1 or 2) -> <8 x float>, each repeated
        over its block's 8 / n lanes."""
        n = v.type.count
        return builder.shuffle_vector(v, v, _lanes(*(lane * n // 8 for lane in range(8))))

    def row_kernels(step, block_scale, weights, step_dot, fma_terms, coefficients=False):
        """The two intrinsics of one row format, both row_dots (whose arguments the last four are):

        row_dot(words, xq, d, srow, extra) -> float32: one row (words uint32, srow its scales) with one token
        (xq int8 [in] in the format's order, d float32 [blocks]): decode. With ``coefficients`` (affine rows)
        d holds each block's d_b * scale_g(b) instead, formed by the caller in a vectorised pass (numba_q8),
        and the loop reads no scale (srow and extra unused).
        tile_dot(words, xq, d, srow, extra, t0, out): out[i] = row_dot with token t0 + i for i <
        Q8_TILE_TOKENS (xq int8 [T, in], d float32 [T, blocks], both C-contiguous; out float32
        [Q8_TILE_TOKENS]): prefill, one pass over the row's codes for the whole tile.

        step: the RowStep; block_scale(builder, srow_type, srow, extra, b) -> float: the weight scale of
        activation block b (i64); srow is the row's scales as an array struct, extra the format's argument
        (array struct or value)."""

        def arg(context, builder, t, v):
            return context.make_array(t)(context, builder, value=v) if isinstance(t, types.Array) else v

        def dots(context, builder, signature, args, xs, ds, n_blocks, scaled=True):
            """row_dots of the row (arguments 0, 3, 4: words, srow, extra) with the tokens xs, ds (scaled:
            ds are activation scales, else coefficients)."""
            w, srow, extra = (arg(context, builder, signature.args[i], args[i]) for i in (0, 3, 4))
            n_steps = builder.lshr(n_blocks, llvm_ir.Constant(_i64, step.blocks.bit_length() - 1))
            if not scaled:
                return row_dots(builder, w.data, xs, ds, n_steps, step, None, weights, step_dot,
                                lambda builder, f, c, s: (f, block_lanes(builder, c)))
            return row_dots(builder, w.data, xs, ds, n_steps, step,
                            lambda b: block_scale(builder, signature.args[3], srow, extra, b),
                            weights, step_dot, fma_terms)

        @intrinsic
        def row_dot(typingctx, words, xq, d, srow, extra):
            def codegen(context, builder, signature, args):
                xa, da = (arg(context, builder, signature.args[i], args[i]) for i in (1, 2))
                n_blocks = cgutils.unpack_tuple(builder, da.shape)[0]
                return dots(context, builder, signature, args, [xa.data], [da.data], n_blocks, not coefficients)[0]

            return types.float32(words, xq, d, srow, extra), codegen

        @intrinsic
        def tile_dot(typingctx, words, xq, d, srow, extra, t0, out):
            def codegen(context, builder, signature, args):
                xa, da, oa = (arg(context, builder, signature.args[i], args[i]) for i in (1, 2, 6))
                n_in, n_blocks = cgutils.unpack_tuple(builder, xa.shape)[1], cgutils.unpack_tuple(builder, da.shape)[1]
                tokens = [builder.add(args[5], llvm_ir.Constant(_i64, i)) for i in range(Q8_TILE_TOKENS)]
                xs = [builder.gep(xa.data, [builder.mul(t, n_in)]) for t in tokens]
                ds = [builder.gep(da.data, [builder.mul(t, n_blocks)]) for t in tokens]
                for i, v in enumerate(dots(context, builder, signature, args, xs, ds, n_blocks)):
                    builder.store(v, builder.gep(oa.data, [llvm_ir.Constant(_i64, i)]))
                return context.get_dummy_value()

            return types.void(words, xq, d, srow, extra, t0, out), codegen

        return row_dot, tile_dot

    def _affine_scale(builder, srow_type, srow, shift, b):
        """An affine row's scale of activation block b: scales[b >> shift] (float32, or bf16 bits)."""
        return _load_scale(builder, srow.data, builder.lshr(b, shift), srow_type.dtype == types.uint16)

    def _affine_terms(builder, f, d, s):
        """The affine rows' fma terms: f * (d_b * scale_g(b)) per lane."""
        return f, block_lanes(builder, builder.fmul(d, s))

    def _load_pair(builder, pointer):
        """The 32 code bytes of a 4-bit pair step (64 codes in paired order), split into their nibbles."""
        return nibbles(builder, builder.load(builder.bitcast(pointer, _v32i8.as_pointer()), align=1))

    def _q4_pair_dot(builder, lohi, xl, xh):
        return pair_products(builder, *lohi, xl, xh)

    #: sum_b d[b] * srow[b >> shift] * (codes_b . xq_b) of one row of 4-bit affine codes (extra: shift =
    #: log2(activation blocks per group)), with one token / a tile of tokens (row_kernels).
    q4_row_dot, q4_tile_dot = row_kernels(PAIR_STEP, _affine_scale, _load_pair, _q4_pair_dot, _affine_terms,
                                          coefficients=True)

    @intrinsic
    def q4_group_row_dot(typingctx, words, xq, d8, srow, shift1):
        """q4_row_dot of one row whose weight groups span whole steps (groups of 64 or more: one scale per
        64 inputs or fewer) with one token, each step's coefficients d_b * scale_g formed in the loop from
        the token's activation scales in step lanes (d8 float32 [4 * blocks], numba_q8.step_lanes: d8[4b +
        i] = d_b, each block's scale where its int32 products lie in a step, loaded as the step's <8 x
        float>) and the row's scales srow (scale g = srow[p >> shift1] for step p; shift1 = log2(blocks per
        group) - 1): the same float32 products as the coefficient scratch's, so the same bits, without a pass
        over the row's scales first nor a shuffle of the step's two activation scales to 8 lanes."""
        sig = types.float32(words, xq, d8, srow, shift1)
        bf16 = srow.dtype == types.uint16

        def codegen(context, builder, signature, args):
            wa, xa, da, sa = (context.make_array(t)(context, builder, value=v)
                              for t, v in zip(signature.args[:4], args[:4]))
            n_steps = builder.lshr(cgutils.unpack_tuple(builder, da.shape)[0], llvm_ir.Constant(_i64, 3))
            shift = args[4]

            def step_scale(p):  # <8 x float>: the step's weight scale in every lane
                v = builder.load(builder.gep(sa.data, [builder.lshr(p, shift)]))
                if not bf16:
                    v = builder.insert_element(llvm_ir.Constant(_v8f32, None), v, llvm_ir.Constant(_i32, 0))
                    return builder.shuffle_vector(v, v, _lanes(*[0] * 8))
                # bf16 bits in both halves of each 32-bit lane, then shifted up: the float32 of the scale
                v = builder.insert_element(llvm_ir.Constant(_v16i16, None), v, llvm_ir.Constant(_i32, 0))
                v = builder.bitcast(builder.shuffle_vector(v, v, _lanes(*[0] * 16)), _v8i32)
                return builder.bitcast(builder.shl(v, llvm_ir.Constant(_v8i32, [16] * 8)), _v8f32)

            return row_dots(builder, wa.data, [xa.data], [da.data], n_steps, PAIR_LANES_STEP, None, _load_pair,
                            _q4_pair_dot, lambda builder, f, d8, s: (f, builder.fmul(d8, s)), step_scale)[0]

        return sig, codegen

    def _unit_codes(bits):
        """weights() of b-bit units: a unit's 4·b code bytes (MLX's packing: code k at bits b·k.. of the unit,
        least significant first) -> its 32 codes as unsigned bytes in natural order. Each code is taken from
        the 16-bit window of the two bytes it touches, shifted right by its bit offset and masked: plain LLVM
        vector operations, which x86 gets as byte shuffles, word shifts (vpsrlvw, or multiplies on AVX2) and
        a narrowing."""
        n = 4 * bits
        first = [bits * k // 8 for k in range(32)]
        shifts = [bits * k % 8 for k in range(32)]
        second = [f + 1 if s + bits > 8 else n for f, s in zip(first, shifts)]  # n: a zero byte
        v32i16 = llvm_ir.VectorType(_i16, 32)

        def weights(builder, pointer):
            raw = builder.load(builder.bitcast(pointer, llvm_ir.VectorType(_i8, n).as_pointer()), align=1)
            if bits == 8:
                return raw
            zero = llvm_ir.Constant(raw.type, None)
            lo, hi = (builder.zext(builder.shuffle_vector(raw, zero, _lanes(*idx)), v32i16) for idx in (first, second))
            window = builder.or_(lo, builder.shl(hi, llvm_ir.Constant(v32i16, [8] * 32)))
            codes = builder.and_(builder.lshr(window, llvm_ir.Constant(v32i16, shifts)),
                                 llvm_ir.Constant(v32i16, [(1 << bits) - 1] * 32))
            return builder.trunc(codes, _v32i8)

        return weights

    def _unit_dot(bits):
        """step_dot() of b-bit units: <8 x i32> of 32 unsigned codes against 32 int8 inputs, lane l summing
        codes 4l..4l+3 (vpdpbusd; on AVX2 vpmaddubsw + vpmaddwd, whose int16 pairs hold 2 * 127 * 127 for
        codes below 128, and the 8-bit split of _byte_dot)."""
        def step_dot(builder, w, x):
            if INT8_INSTRUCTIONS == "avx512-vnni" or bits == 8:
                return _byte_dot(builder, w, x)
            return _maddwd(builder, _maddubs(builder, w, x), 1)

        return step_dot

    #: (bits, activation blocks per unit) -> (row_dot, tile_dot) of affine b-bit rows in units of 32 codes,
    #: inputs in natural order (extra: shift = log2(activation blocks per group)); 2 blocks per unit for
    #: groups of 16 (GGUF's Q2_K/Q3_K/Q6_K), whose activation blocks are 16.
    UNIT_KERNELS = {(bits, blocks): row_kernels(RowStep(32, blocks, 4 * bits), _affine_scale, _unit_codes(bits),
                                                _unit_dot(bits), _affine_terms, coefficients=True)
                    for bits in UNIT_BITS for blocks in (1, 2)}

    def _e2m1_weights(builder, pointer):
        """32 bytes of E2M1 codes (in paired order) -> each nibble's |2·value| (low, high nibbles; by vpshufb
        from a 16-entry table) and its signed 2·value (whose sign _e2m1_pair_dot moves onto the input)."""
        shuffle = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(_v32i8, [_v32i8] * 2),
                                                 "llvm.x86.avx2.pshuf.b")
        magnitudes, values = (llvm_ir.Constant(_v32i8, [int(v) for v in np.tile(t, 2)])
                              for t in (np.abs(FP4_DOUBLED), FP4_DOUBLED))
        lo, hi = _load_pair(builder, pointer)
        return tuple(builder.call(shuffle, [table, n]) for table in (magnitudes, values) for n in (lo, hi))

    def _e2m1_pair_dot(builder, weights, xl, xh):
        """pair_products of _e2m1_weights: the magnitudes against the inputs given each code's sign by
        vpsignb (zero for ±0)."""
        sign = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(_v32i8, [_v32i8] * 2),
                                              "llvm.x86.avx2.psign.b")
        ml, mh, vl, vh = weights
        return pair_products(builder, ml, mh, builder.call(sign, [xl, vl]), builder.call(sign, [xh, vh]))

    def _e8m0_scale(builder, srow_type, srow, pow2, b):
        """pow2[srow[b]]: the block's power of two (srow uint8 E8M0 bytes, pow2 HALF_SCALE_VALUES)."""
        e = builder.zext(builder.load(builder.gep(srow.data, [b])), _i64)
        return builder.load(builder.gep(pow2.data, [e]))

    #: sum_b pow2[srow[b]] * (d[b] * (FP4_DOUBLED[codes_b] . xq_b)) for one MXFP4 row (srow uint8 [in / 32]
    #: E8M0, extra: pow2 = HALF_SCALE_VALUES) with one token / a tile of tokens (row_kernels). d_b meets the
    #: integer dot before the power of two, so a tiny scale leaves one rounding to a subnormal, not two.
    e2m1_row_dot, e2m1_tile_dot = row_kernels(
        PAIR_STEP, _e8m0_scale, _e2m1_weights, _e2m1_pair_dot,
        lambda builder, f, d2, s2: (builder.fmul(f, block_lanes(builder, d2)), block_lanes(builder, s2)))

    @intrinsic
    def q8w_row_dot(typingctx, words, xq, cb):
        """sum_b cb[b] * (codes_b . xq_b) for one row of 8-bit codes (uint32 words [in / 4]), xq int8 [in]
        in natural order, cb float32 [in / 32] the blocks' d_b * scale_g; returns float32. Each block's
        integer dot is exact; the blocks are accumulated in order by scalar FMAs, as the portable loop
        does, so both give the same float32 bits (and the recorded q8 greedy output stays as it is)."""
        sig = types.float32(words, xq, cb)

        def codegen(context, builder, signature, args):
            wa, xa, ca = (context.make_array(t)(context, builder, value=v) for t, v in zip(signature.args, args))
            wp = builder.bitcast(wa.data, _v32i8.as_pointer())
            xp = builder.bitcast(xa.data, _v32i8.as_pointer())
            fma = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(_f32, [_f32] * 3),
                                                 "llvm.fma.f32")
            acc = cgutils.alloca_once_value(builder, llvm_ir.Constant(_f32, 0.0))
            with cgutils.for_range(builder, cgutils.unpack_tuple(builder, ca.shape)[0]) as loop:
                b = loop.index
                v = _byte_dot(builder, builder.load(builder.gep(wp, [b]), align=1),
                              builder.load(builder.gep(xp, [b]), align=1))
                v4 = builder.add(builder.shuffle_vector(v, v, _lanes(0, 1, 2, 3)),
                                 builder.shuffle_vector(v, v, _lanes(4, 5, 6, 7)))
                v2 = builder.add(builder.shuffle_vector(v4, v4, _lanes(0, 1)), builder.shuffle_vector(v4, v4, _lanes(2, 3)))
                dot = builder.add(builder.extract_element(v2, llvm_ir.Constant(_i32, 0)),
                                  builder.extract_element(v2, llvm_ir.Constant(_i32, 1)))
                c = builder.load(builder.gep(ca.data, [b]))
                builder.store(builder.call(fma, [c, builder.sitofp(dot, _f32), builder.load(acc)]), acc)
            return builder.load(acc)

        return sig, codegen
