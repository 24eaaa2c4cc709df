"""q8 kernels of the numba backend: int8 activations against the packed weight codes, int32 dot products.

The numerics are those of flashmoe.reference.q8 (read its docstring first): the input vector is quantised
once per call to int8 in blocks of 32 with a float32 scale ``d_b``; each block's dot product with the
weight codes is exact in int32; a row is

    y = sum_b c_b * (q_b . xq_b) + sum_g bias_g * xsum_g,      c_b = d_b * scale_g(b)

where xsum are the float group sums of x. ``c_b`` is formed per row in a small scratch, so the integer dot
needs no knowledge of the group size.

4-bit weights on x86 with AVX2 (the default format on the usual CPU) take an LLVM-intrinsic row kernel,
because LLVM's vectoriser does not find the integer multiply-add instructions from plain loops (checked with
``inspect_asm``: plain loops give zero-extends and vpmulld): per 64 inputs it loads 32 bytes of codes,
splits low and high nibbles, and multiplies them with the int8 inputs by ``vpdpbusd`` (AVX-512 VNNI, where
the CPU has it) or ``vpmaddubsw`` + ``vpmaddwd`` (AVX2), giving 8 int32 lanes = 2 blocks x 4; those are
converted to float and accumulated with ``c_b`` by one FMA, and the 8 lanes are summed once per row
(llama.cpp's Q4_0 x Q8_0 scheme). For that kernel the int8 inputs are stored in *paired* order: in each run
of 64, the 32 even positions then the 32 odd ones, matching the low/high nibbles of 32 consecutive code
bytes (code 2i is byte i's low nibble, code 2i+1 its high one; MLX packs least significant bits first).
8-bit weights (routers, and the 8-bit format) take the same kernel with one 32-value block per 32 bytes of
codes, inputs in natural order: ``vpdpbusd`` multiplies the unsigned code bytes with the int8 inputs
directly; on AVX2 each code is split into its nibbles (16 * high + low) because ``vpmaddubsw`` on whole
bytes could saturate its int16 lanes. The portable loop (natural order), which unpacks each code with
numba_packed's ``code``, serves CPUs without AVX2 and 4-bit rows whose inputs are not runs of 64; the results
are the same up to float32 rounding. The backend gives these kernels only 4- and 8-bit weights in groups of
32 or more (flashmoe.reference.q8.uses_q8: other widths and groups of 16 take float activations in q8 mode);
the portable loop computes any width, and the tests hold it to the reference at several.

Calls of many tokens (prefill) run the same row kernel over tiles of Q8_TILE_TOKENS tokens: one pass over a
row's codes computes the row's dot with each token of the tile (the codes loaded and split, the scales read,
once per tile), each token's sums in the same order as alone, so a token's output is the same bits whatever
else is in its call.
"""

from __future__ import annotations

import functools
import itertools
from types import SimpleNamespace

import numpy as np

try:
    import llvmlite.binding as llvm_binding
    import numba
    from llvmlite import ir as llvm_ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic, overload
except ImportError:  # the numba backend reports it (numba_backend.unavailable_reason)
    numba = None

from flashmoe.reference.q8 import Q8_BLOCK, q8_block

from flashmoe.backends.numba_packed import (EXPERT_ROW_BLOCK, FASTMATH, ROW_BLOCK, bf16_expert_view, code,
                                            f32_expert_view, u32_as_f32, widen)


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


def paired_layout(bits: int, in_features: int, group_size: int) -> bool:
    """True when the x86 4-bit row kernel applies, so x is quantised in paired order (module docstring): it
    takes activation blocks of 32, so not groups of 16 (whose blocks are 16, flashmoe.reference.q8.q8_block)."""
    return INT8_INSTRUCTIONS is not None and bits == 4 and in_features % 64 == 0 and group_size >= Q8_BLOCK


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

    def paired_row_dots(builder, words, xs, ds, n_pairs, block_scale, weights, pair_dot, fma_terms):
        """Codegen of one row's q8 dots over 4-bit codes in paired order (module docstring) with one or more
        tokens, shared by the affine and MXFP4 row kernels, decode (one token) and prefill (a tile). words:
        a pointer to the row's code bytes; xs, ds: per token, pointers to its int8 inputs (paired order) and
        its float32 activation scales; n_pairs: i64 pairs of blocks in the row. For each pair p of blocks the
        32 code bytes are loaded and turned into weights (weights(builder, w)) and the two blocks' weight
        scales s2 read (block_scale(b) -> float) once for all the tokens; per token, f = sitofp(pair_dot(
        builder, weights, xl, xh)) (<8 x float>: lanes 0-3 block 2p, 4-7 block 2p + 1) is accumulated as
        fma(*fma_terms(builder, f, d2, s2), acc). Each token has two accumulators taking alternate pairs
        (hiding the FMA latency), so its sum is the same bits whatever tokens share the call. Returns one
        float32 value per token."""
        one = llvm_ir.Constant(llvm_ir.IntType(64), 1)
        wp = builder.bitcast(words, _v32i8.as_pointer())
        xps = [builder.bitcast(x, _v32i8.as_pointer()) for x in xs]
        dps = [builder.bitcast(d, _v2f32.as_pointer()) for d in ds]
        fma = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(_v8f32, [_v8f32] * 3),
                                             "llvm.fma.v8f32")
        accs = [[cgutils.alloca_once_value(builder, llvm_ir.Constant(_v8f32, [0.0] * 8)) for _ in range(2)]
                for _ in xs]

        def step(p, half):
            w = weights(builder, builder.load(builder.gep(wp, [p]), align=1))
            b0 = builder.shl(p, one)
            s2 = llvm_ir.Constant(_v2f32, None)
            for lane, b in enumerate((b0, builder.add(b0, one))):
                s2 = builder.insert_element(s2, block_scale(b), llvm_ir.Constant(_i32, lane))
            for xp, dp, acc in zip(xps, dps, accs):
                xl = builder.load(builder.gep(xp, [b0]), align=1)
                xh = builder.load(builder.gep(xp, [builder.add(b0, one)]), align=1)
                d2 = builder.load(builder.gep(dp, [p]), align=4)
                f = builder.sitofp(pair_dot(builder, w, xl, xh), _v8f32)
                builder.store(builder.call(fma, [*fma_terms(builder, f, d2, s2), builder.load(acc[half])]), acc[half])

        ahead = llvm_ir.Constant(llvm_ir.IntType(64), PREFETCH_BYTES // 32)
        with cgutils.for_range(builder, builder.lshr(n_pairs, one)) as loop:  # two pairs per step
            prefetch(builder, builder.gep(wp, [builder.add(builder.shl(loop.index, one), ahead)]))
            step(builder.shl(loop.index, one), 0)
            step(builder.add(builder.shl(loop.index, one), one), 1)
        with builder.if_then(builder.trunc(n_pairs, llvm_ir.IntType(1))):  # an odd pair left
            step(builder.sub(n_pairs, one), 0)
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

    def pair_lanes(builder, v2):
        """<2 x float> (one value per block of a pair) -> <8 x float>, each repeated over its block's 4 lanes."""
        return builder.shuffle_vector(v2, v2, _lanes(0, 0, 0, 0, 1, 1, 1, 1))

    def row_kernels(block_scale, weights, pair_dot, fma_terms):
        """The two intrinsics of one format of 4-bit codes in paired order, both paired_row_dots (whose
        arguments the last three are):

        row_dot(words, xq, d, srow, extra) -> float32: one row (words uint32 [in / 8], srow its scales) with
        one token (xq int8 [in] in paired order, d float32 [in / 32]): decode.
        tile_dot(words, xq, d, srow, extra, t0, out): out[i] = row_dot with token t0 + i for i <
        Q8_TILE_TOKENS (xq int8 [T, in], d float32 [T, in / 32], both C-contiguous; out float32
        [Q8_TILE_TOKENS]): prefill, one pass over the row's codes for the whole tile.

        block_scale(builder, srow_type, srow, extra, b) -> float: the weight scale of activation block b
        (i64); srow is the row's scales as an array struct, extra the format's argument (array struct or
        value)."""

        def arg(context, builder, t, v):
            return context.make_array(t)(context, builder, value=v) if isinstance(t, types.Array) else v

        def dots(context, builder, signature, args, xs, ds, n_blocks):
            """paired_row_dots of the row (arguments 0, 3, 4: words, srow, extra) with the tokens xs, ds."""
            w, srow, extra = (arg(context, builder, signature.args[i], args[i]) for i in (0, 3, 4))
            return paired_row_dots(builder, w.data, xs, ds, builder.lshr(n_blocks, llvm_ir.Constant(_i64, 1)),
                                   lambda b: block_scale(builder, signature.args[3], srow, extra, b),
                                   weights, pair_dot, fma_terms)

        @intrinsic
        def row_dot(typingctx, words, xq, d, srow, extra):
            def codegen(context, builder, signature, args):
                xa, da = (arg(context, builder, signature.args[i], args[i]) for i in (1, 2))
                n_blocks = cgutils.unpack_tuple(builder, da.shape)[0]
                return dots(context, builder, signature, args, [xa.data], [da.data], n_blocks)[0]

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

    #: sum_b d[b] * srow[b >> shift] * (codes_b . xq_b) of one row of 4-bit affine codes (extra: shift =
    #: log2(activation blocks per group)), with one token / a tile of tokens (row_kernels).
    _q4_row_dot, _q4_tile_dot = row_kernels(
        _affine_scale, nibbles, lambda builder, lohi, xl, xh: pair_products(builder, *lohi, xl, xh),
        lambda builder, f, d2, s2: (f, pair_lanes(builder, builder.fmul(d2, s2))))

    @intrinsic
    def _q8w_row_dot(typingctx, words, xq, cb):
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


    @njit(inline="always")
    def _q8_code(v, inv):
        """roundf(v * inv) clipped to +-127, as int32 (flashmoe.reference.q8.round_half_away); branch-free
        but for a select, so the loops calling it vectorise."""
        s = v * inv
        a = abs(s)
        whole = np.floor(a)
        r = np.int32(min(whole + np.floor(np.float32(2.0) * (a - whole)), np.float32(127.0)))
        return r if s >= 0 else -r

    @njit(fastmath=FASTMATH, cache=True)
    def quantize_q8(x, block, paired, xq, d, xsum):
        """x float32 [T, n] -> xq int8 [T, n] (natural or paired order), d float32 [T, n / block] and the
        group sums of the dequantised activations xsum [T, n / group_size] (sum_b d_b * sum(xq_b)), rounding
        exactly as flashmoe.reference.q8.quantize_q8. Block maxima are taken on the bits (|x| as uint32
        orders like the float, and a NaN stays the largest), so that loop vectorises too."""
        T, n = x.shape
        nb = n // block
        bpg = nb // xsum.shape[1]
        inv = np.empty(nb, np.float32)
        codes = np.empty(n, np.int8)
        for t in range(T):
            bits = x[t].view(np.uint32)
            xsum[t, :] = 0.0
            for b in range(nb):
                m = np.uint32(0)
                for i in range(b * block, b * block + block):
                    m = max(m, bits[i] & np.uint32(0x7FFFFFFF))
                d[t, b] = u32_as_f32(m) / np.float32(127.0)
                inv[b] = np.float32(1.0) / d[t, b] if m != 0 else np.float32(0.0)
            for b in range(nb):
                total = np.int32(0)
                for i in range(b * block, b * block + block):
                    c = _q8_code(x[t, i], inv[b])
                    codes[i] = np.int8(c)
                    total += c
                xsum[t, b // bpg] += d[t, b] * np.float32(total)
            if paired:  # in each run of 64: its 32 even positions, then its 32 odd ones
                for r in range(0, n, 64):
                    for i in range(32):
                        xq[t, r + i] = codes[r + 2 * i]
                        xq[t, r + 32 + i] = codes[r + 2 * i + 1]
            else:
                xq[t, :] = codes

    @njit(inline="always")
    def _plain_row_dot(wrow, xq, cb, bits):
        """The portable q8 row dot: sum_b cb[b] * sum_{i in b} code_i * xq_i (natural order)."""
        cpu = 32 // bits if 32 % bits == 0 else 32
        block = xq.shape[0] // cb.shape[0]
        acc = np.float32(0.0)
        for b in range(cb.shape[0]):
            s = np.int32(0)
            for i in range(b * block, b * block + block):
                s += np.int32(code(wrow, i // cpu, i % cpu, bits)) * np.int32(xq[i])
            acc += cb[b] * np.float32(s)
        return acc

    def _expert(addresses, e, rows, n_words, n_groups, bf16):
        """The e-th (words, scales, biases) of an address table (an expert's projection, or one of several
        matrices of one input); bf16 a compile-time constant."""
        raise NotImplementedError("only callable from numba-compiled code")

    @overload(_expert, inline="always")
    def _expert_impl(addresses, e, rows, n_words, n_groups, bf16):
        if not isinstance(bf16, types.BooleanLiteral):
            return None  # numba retries with the closure constant as a literal
        view = bf16_expert_view if bf16.literal_value else f32_expert_view
        return lambda addresses, e, rows, n_words, n_groups, bf16: view(addresses, e, rows, n_words, n_groups)

    @njit(fastmath=FASTMATH, inline="always")
    def _row_scales_fixed(srow, brow, d, xsum, cb, bpg):
        bias = np.float32(0.0)
        for g in range(srow.shape[0]):
            s = widen(srow[g])
            for i in range(bpg):
                cb[g * bpg + i] = d[g * bpg + i] * s
            bias += widen(brow[g]) * xsum[g]
        return bias

    @njit(fastmath=FASTMATH, inline="always")
    def _row_scales(srow, brow, d, xsum, cb):
        """cb[b] = d_b * scale_g(b) for one row; returns its bias term sum_g bias_g * xsum_g. Blocks per
        group as a literal (group 32, 64, 128), so the loops vectorise."""
        bpg = cb.shape[0] // srow.shape[0]
        if bpg == 2:
            return _row_scales_fixed(srow, brow, d, xsum, cb, 2)
        if bpg == 1:
            return _row_scales_fixed(srow, brow, d, xsum, cb, 1)
        if bpg == 4:
            return _row_scales_fixed(srow, brow, d, xsum, cb, 4)
        return _row_scales_fixed(srow, brow, d, xsum, cb, bpg)

    @njit(fastmath=FASTMATH, inline="always")
    def _bias(brow, xsum):
        """The bias term sum_g bias_g * xsum_g of one row and token."""
        bias = np.float32(0.0)
        for g in range(brow.shape[0]):
            bias += widen(brow[g]) * xsum[g]
        return bias

    @njit(inline="always")
    def _group_shift(srow, d):
        """log2(activation blocks per weight group), for the x86 4-bit kernel's scale index."""
        shift = 0
        while (1 << shift) * srow.shape[0] < d.shape[-1]:
            shift += 1
        return shift

    @njit(fastmath=FASTMATH, inline="always")
    def _rows_of_tokens(w, s, b, o, xq, d, xsum, t0, t1, cb, tile, bits, paired, out, col):
        """out[t, col] = row o of (w, s, b) . x[t] for tokens t0..t1-1: Q8_TILE_TOKENS at a time through the
        x86 4-bit tile kernel where it applies, the rest one by one (_row); the values are the same."""
        t = t0
        if paired:
            shift = _group_shift(s[o], d)
            while t + Q8_TILE_TOKENS <= t1:
                _q4_tile_dot(w[o], xq, d, s[o], shift, t, tile)
                for i in range(Q8_TILE_TOKENS):
                    out[t + i, col] = tile[i] + _bias(b[o], xsum[t + i])
                t += Q8_TILE_TOKENS
        for u in range(t, t1):
            out[u, col] = _row(w[o], s[o], b[o], xq[u], d[u], xsum[u], cb, bits, paired)

    @njit(fastmath=FASTMATH, inline="always")
    def _row(wrow, srow, brow, xq, d, xsum, cb, bits, paired):
        """One output row: the integer block dots scaled by d_b * scale_g, plus the bias term. The x86 row
        kernels take 4-bit codes in paired order and 8-bit ones in blocks of 32 (the portable loop's scales
        and order of sums); ``bits``, ``paired`` and X86_BYTES are compile-time constants, so only the
        branch that applies is kept."""
        if paired:
            return _q4_row_dot(wrow, xq, d, srow, _group_shift(srow, d)) + _bias(brow, xsum)
        bias = _row_scales(srow, brow, d, xsum, cb)
        if X86_BYTES and bits == 8 and xq.shape[0] == 32 * cb.shape[0]:
            return _q8w_row_dot(wrow, xq, cb) + bias
        return _plain_row_dot(wrow, xq, cb, bits) + bias

    @functools.lru_cache(maxsize=None)
    def q8_kernels(bits: int, bf16: bool, paired: bool) -> SimpleNamespace:
        """The q8 kernels for one bit width, scale dtype and input order; the three are closure
        constants, so numba keeps only the row kernel that applies (paired: the x86 4-bit one)."""

        @njit(parallel=True, fastmath=FASTMATH, cache=True)
        def matvecs(addr, first_row, xq, d, xsum, out):
            """out[t, first_row[m] + o] = W_m[o] . x[t] for each token (decode or prefill) and each matrix m of
            the address table addr int64 [m, 3] (words, scales, biases; one in_features), x given quantised
            (quantize_q8); first_row int64 [m + 1]: where each matrix's rows start in out, then the total.
            One parallel region for all the matrices, chunks of ROW_BLOCK rows within one matrix; a chunk's
            rows meet the tokens a tile (Q8_TILE_TOKENS) at a time."""
            m = addr.shape[0]
            n_words = xq.shape[1] * bits // 32
            first_chunk = np.zeros(m + 1, np.int64)
            for i in range(m):
                first_chunk[i + 1] = first_chunk[i] + (first_row[i + 1] - first_row[i] + ROW_BLOCK - 1) // ROW_BLOCK
            for c in prange(first_chunk[m]):
                i = 0
                while first_chunk[i + 1] <= c:
                    i += 1
                rows = first_row[i + 1] - first_row[i]
                w, s, b = _expert(addr, i, rows, n_words, xsum.shape[1], bf16)
                cb = np.empty(d.shape[1], np.float32)
                tile = np.empty(Q8_TILE_TOKENS, np.float32)
                r0 = (c - first_chunk[i]) * ROW_BLOCK
                for t0 in range(0, xq.shape[0], Q8_TILE_TOKENS):
                    for o in range(r0, min(rows, r0 + ROW_BLOCK)):
                        _rows_of_tokens(w, s, b, o, xq, d, xsum, t0, min(xq.shape[0], t0 + Q8_TILE_TOKENS), cb, tile,
                                        bits, paired, out, first_row[i] + o)

        @njit(parallel=True, fastmath=FASTMATH, cache=True)
        def experts_gate_up(g_addr, u_addr, xq, d, xsum, h):
            """h[e, i] = silu(gate_e[i] . x) * (up_e[i] . x) for the k experts of one token (x quantised)."""
            k, inter = h.shape
            n_words = xq.shape[1] * bits // 32
            nblk = (inter + EXPERT_ROW_BLOCK - 1) // EXPERT_ROW_BLOCK
            for c in prange(k * nblk):
                e = c // nblk
                cb = np.empty(d.shape[1], np.float32)
                gate = np.empty(EXPERT_ROW_BLOCK, np.float32)
                i0 = (c % nblk) * EXPERT_ROW_BLOCK
                i1 = min(inter, i0 + EXPERT_ROW_BLOCK)
                for up in range(2):  # the chunk's gate rows, then its up rows: two contiguous runs
                    w, s, b = _expert(u_addr if up else g_addr, e, inter, n_words, xsum.shape[1], bf16)
                    for i in range(i0, i1):
                        v = _row(w[i], s[i], b[i], xq[0], d[0], xsum[0], cb, bits, paired)
                        if up:
                            a = gate[i - i0]
                            h[e, i] = a / (np.float32(1.0) + np.exp(-a)) * v
                        else:
                            gate[i - i0] = v

        @njit(parallel=True, fastmath=FASTMATH, cache=True)
        def experts_down(d_addr, hq, hd, hsum, weights, out):
            """out[o] = sum_e weights[e] * (down_e[o] . h_e), h_e given quantised; a chunk of hidden rows
            reads one expert's rows for the whole chunk before the next expert's."""
            k = hq.shape[0]
            n_rows = out.shape[0]
            n_words = hq.shape[1] * bits // 32
            for c in prange((n_rows + EXPERT_ROW_BLOCK - 1) // EXPERT_ROW_BLOCK):
                o0 = c * EXPERT_ROW_BLOCK
                o1 = min(n_rows, o0 + EXPERT_ROW_BLOCK)
                cb = np.empty(hd.shape[1], np.float32)
                acc = np.zeros(EXPERT_ROW_BLOCK, np.float32)
                for e in range(k):
                    w, s, b = _expert(d_addr, e, n_rows, n_words, hsum.shape[1], bf16)
                    for o in range(o0, o1):
                        acc[o - o0] += weights[e] * _row(w[o], s[o], b[o], hq[e], hd[e], hsum[e], cb, bits, paired)
                out[o0:o1] = acc[: o1 - o0]

        return SimpleNamespace(matvecs=matvecs, experts_gate_up=experts_gate_up, experts_down=experts_down)


def quantize(x: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """x float32 [T, n] -> (xq int8 [T, n], d float32 [T, n / block], xsum float32 [T, n / group_size],
    paired): the q8 activations in the order the kernels for `bits` read (paired_layout)."""
    T, n = x.shape
    block = q8_block(group_size)
    paired = paired_layout(bits, n, group_size)
    xq = np.empty((T, n), np.int8)
    d = np.empty((T, n // block), np.float32)
    xsum = np.empty((T, n // group_size), np.float32)
    quantize_q8(x, block, paired, xq, d, xsum)
    return xq, d, xsum, paired


def linears(x: np.ndarray, ws: list, addresses, call) -> list[np.ndarray]:
    """[x · W_m^T for each m]: x float32 [T, in] (decode or prefill) with q8 activations and KernelWeights
    ``ws`` (numba_backend) of one bits, group size, in_features and scale dtype, all in one parallel
    region; each output float32 [T, out_m] (a column slice of one array). ``addresses`` builds their int64
    [m, 3] address table (numba_backend._addresses); ``call`` runs a kernel with its work count
    (numba_backend._call: one thread below the parallel threshold)."""
    w = ws[0]
    xq, d, xsum, paired = quantize(x, w.bits, w.group_size)
    first_row = np.array([0, *itertools.accumulate(v.out_features for v in ws)], np.int64)
    out = np.empty((x.shape[0], int(first_row[-1])), np.float32)
    call(q8_kernels(w.bits, w.bf16, paired).matvecs, x.shape[0] * int(first_row[-1]) * w.in_features,
         addresses(ws), first_row, xq, d, xsum, out)
    return [out[:, a:b] for a, b in zip(first_row[:-1], first_row[1:])]


def experts_gate_up(x: np.ndarray, fmt, g_addr: np.ndarray, u_addr: np.ndarray, call) -> np.ndarray:
    """h float32 [k, inter]: SiLU(gate_e · x) * (up_e · x) for each of the k experts of one token x float32
    [1, hidden] with q8 activations, in one parallel region. fmt: the projections' format (bits,
    group_size, bf16, out_features, in_features: numba_experts.FusedFormat or a KernelWeight, the same across
    the k experts); g_addr, u_addr: their int64 [k, 3] address tables; call: numba_backend._call."""
    xq, xd, xsum, paired = quantize(x, fmt.bits, fmt.group_size)
    h = np.empty((g_addr.shape[0], fmt.out_features), np.float32)
    work = 2 * g_addr.shape[0] * fmt.out_features * fmt.in_features
    call(q8_kernels(fmt.bits, fmt.bf16, paired).experts_gate_up, work, g_addr, u_addr, xq, xd, xsum, h)
    return h


def experts_down(h: np.ndarray, fmt, d_addr: np.ndarray, weights: np.ndarray, call) -> np.ndarray:
    """sum_e weights[e] * (down_e · h_e) float32 [hidden] with q8 activations (each h_e quantised), in one
    parallel region; h float32 [k, inter] from experts_gate_up; fmt and d_addr as there."""
    hq, hd, hsum, paired = quantize(h, fmt.bits, fmt.group_size)
    out = np.empty(fmt.out_features, np.float32)
    work = d_addr.shape[0] * fmt.out_features * fmt.in_features
    call(q8_kernels(fmt.bits, fmt.bf16, paired).experts_down, work, d_addr, hq, hd, hsum, weights, out)
    return out
