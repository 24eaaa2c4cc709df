"""MXFP4 kernels of the numba backend: products with gpt-oss's experts read straight from their packed bytes.

The numerics are flashmoe.format.mxfp4's (read its docstring first): a weight is FP4_VALUES[code] · 2^(s − 127)
with two E2M1 codes per byte (the even element in the low nibble) and one E8M0 scale byte per 32 inputs.
The 32 products of a block share that power of two, so a row is

    y = Σ_b 2^(s_b − 127) · Σ_j FP4_VALUES[code_bj] · x_{32b + j}

and the scale multiplies once per block, from a 256-entry table of the exact powers of two (np.ldexp, so
2^-127 is the subnormal it is in transformers). The mat-vec (decode) never forms a weight: as the affine
kernels do (numba_packed.permute_input), it reads a row as uint32 words of 8 codes (element 8u + j in bits
4j..4j+3, the byte order of a little-endian load) against the input permuted to xp[j, u] = x[8u + j], so the
loop over words vectorises, and decodes each code by bit arithmetic instead of a table (fp4_value: a table
lookup is a gather, which does not vectorise). The float mat-mat (prefill) decodes a block of
rows once (fp4_value too) into a per-thread tile and reuses it for every token. Rounding differs from "dequantise, then
dot" only by float32 summation order (conformance holds both to the reference).

With q8 activations (flashmoe.reference.q8: twice an E2M1 value is an integer in [-12, 12]) the mat-vec of
decode and prefill alike is an integer one: on x86 the row kernels of the 4-bit affine q8 path
(numba_q8.row_kernels, inputs in paired order; prefill in tiles of tokens) with each nibble mapped to
|2·value| by vpshufb and its sign moved onto the int8 input by vpsignb, then vpdpbusd (or vpmaddubsw +
vpmaddwd); elsewhere a portable loop. q8 prefill beat the float mat-mat 1.5-2.6x on gpt-oss expert shapes
even before the tiles (docs/benchmarks.md, "Prefill on the CPU").
"""

from __future__ import annotations

import functools

import numpy as np

try:
    from llvmlite import ir as llvm_ir
    from numba import njit, prange
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    from flashmoe.backends import numba_q8
    from flashmoe.backends.numba_q8 import Q8_TILE_TOKENS
    from flashmoe.backends.numba_packed import code, u32_as_f32
except ImportError:  # the numba backend reports it (numba_backend.unavailable_reason)
    njit = None

from flashmoe.backends.base import BackendError
from flashmoe.backends.numba_packed import FASTMATH, ROW_BLOCK
from flashmoe.format.mxfp4 import BLOCK, SCALE_BIAS, Mxfp4Tensor
from flashmoe.reference.q8 import FP4_DOUBLED

#: 2^(s − 127) for every E8M0 byte s, float32 (s = 255 gives inf, as ldexp does for the large codes).
with np.errstate(over="ignore"):
    SCALE_VALUES = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - SCALE_BIAS).astype(np.float32)
#: 2^(s − 128) for every E8M0 byte s, float32: the scale of the q8 kernels' doubled E2M1 values (all finite).
HALF_SCALE_VALUES = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - SCALE_BIAS - 1).astype(np.float32)

# E2M1 codes per uint32 word of a row's blocks, and words per block of 32.
_CODES_PER_WORD = 8
_WORDS_PER_BLOCK = BLOCK // _CODES_PER_WORD


if njit is not None:

    @njit
    def fp4_value(c):
        """The E2M1 value of code c (uint32, 0..15) as float32, by arithmetic (vectorisable, unlike a table).

        E2M1 and float32 encode alike below their exponent fields: the magnitude bits e (2) m (1) placed at
        float32 bits 22..24 are the float32 v · 2^-126 (e = 0 lands on float32's subnormals, 0 and 2^-127, as
        E2M1's own subnormals 0 and 0.5 do), bit 3 moved to bit 31 is the sign, and the product with 2^126 is
        exact. Three integer operations and a multiply, no select. Not inlined by numba, so the multiply keeps
        strict float semantics inside the fastmath kernels (reassociated, 2^126 could meet x first and overflow);
        LLVM still inlines it."""
        bits = ((c & np.uint32(7)) << np.uint32(22)) | ((c & np.uint32(8)) << np.uint32(28))
        return u32_as_f32(bits) * np.float32(2.0**126)


if njit is not None:  # the x86 intrinsics are only compiled where q8_matvec(paired=True) is used
    _V32I8 = llvm_ir.VectorType(llvm_ir.IntType(8), 32)

    def _e2m1_weights(builder, w):
        """32 bytes w of E2M1 codes (in paired order) -> each nibble's |2·value| (low, high nibbles; by vpshufb
        from a 16-entry table) and its signed 2·value (whose sign _e2m1_pair_dot moves onto the input)."""
        shuffle = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(_V32I8, [_V32I8] * 2),
                                                 "llvm.x86.avx2.pshuf.b")
        magnitudes, values = (llvm_ir.Constant(_V32I8, [int(v) for v in np.tile(t, 2)])
                              for t in (np.abs(FP4_DOUBLED), FP4_DOUBLED))
        lo, hi = numba_q8.nibbles(builder, w)
        return tuple(builder.call(shuffle, [table, n]) for table in (magnitudes, values) for n in (lo, hi))

    def _e2m1_pair_dot(builder, weights, xl, xh):
        """numba_q8.pair_products of _e2m1_weights: the magnitudes against the inputs given each code's sign
        by vpsignb (zero for ±0)."""
        sign = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(_V32I8, [_V32I8] * 2),
                                              "llvm.x86.avx2.psign.b")
        ml, mh, vl, vh = weights
        return numba_q8.pair_products(builder, ml, mh, builder.call(sign, [xl, vl]), builder.call(sign, [xh, vh]))

    def _e8m0_scale(builder, srow_type, srow, pow2, b):
        """pow2[srow[b]]: the block's power of two (srow uint8 E8M0 bytes, pow2 HALF_SCALE_VALUES)."""
        e = builder.zext(builder.load(builder.gep(srow.data, [b])), llvm_ir.IntType(64))
        return builder.load(builder.gep(pow2.data, [e]))

    #: sum_b pow2[srow[b]] * (d[b] * (FP4_DOUBLED[codes_b] . xq_b)) for one row (srow uint8 [in / 32] E8M0,
    #: pow2 HALF_SCALE_VALUES) with one token / a tile of tokens (numba_q8.row_kernels: words uint32 [in / 8],
    #: xq int8 in paired order). d_b meets the integer dot before the power of two, so a tiny scale leaves one
    #: rounding to a subnormal, not two.
    _x86_row_dot, _x86_tile_dot = numba_q8.row_kernels(
        _e8m0_scale, _e2m1_weights, _e2m1_pair_dot,
        lambda builder, f, d2, s2: (builder.fmul(f, numba_q8.pair_lanes(builder, d2)), numba_q8.pair_lanes(builder, s2)))

    @njit(inline="always")
    def _portable_row_dot(wrow, xq, d, srow, pow2):
        """_x86_row_dot's sum by plain loops, inputs in natural order."""
        acc = np.float32(0.0)
        for b in range(srow.shape[0]):
            s = np.int32(0)
            for i in range(b * BLOCK, b * BLOCK + BLOCK):
                s += np.int32(FP4_DOUBLED[code(wrow, i // _CODES_PER_WORD, i % _CODES_PER_WORD, 4)]) * np.int32(xq[i])
            acc += pow2[srow[b]] * (d[b] * np.float32(s))
        return acc


@functools.cache
def q8_matvec(paired: bool):
    """The q8 mat-vec (flashmoe.reference.q8, MXFP4): the x86 row kernel for inputs in paired order, else the
    portable loop; ``paired`` is a closure constant, so only one is compiled."""

    @njit(parallel=True, fastmath=FASTMATH, cache=True)
    def matvec(words, scales, xq, d, pow2, out):
        """out[t, r] = row r · x̂[t]: words uint32 [out, in/8], scales uint8 [out, in/32], x quantised (xq int8
        [T, in], d float32 [T, in/32]), pow2 HALF_SCALE_VALUES -> out float32 [T, out]. On x86, tokens in tiles
        of Q8_TILE_TOKENS (the rest one by one: the same values)."""
        n_rows, n_tok = words.shape[0], xq.shape[0]
        tiled = n_tok // Q8_TILE_TOKENS * Q8_TILE_TOKENS if paired else 0
        for c in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
            tile = np.empty(Q8_TILE_TOKENS, np.float32)
            if paired:  # a constant: the x86 intrinsics are compiled only here
                for t0 in range(0, tiled, Q8_TILE_TOKENS):  # a tile of tokens meets the chunk's rows (numba_q8)
                    for r in range(c * ROW_BLOCK, min(n_rows, c * ROW_BLOCK + ROW_BLOCK)):
                        _x86_tile_dot(words[r], xq, d, scales[r], pow2, t0, tile)
                        out[t0 : t0 + Q8_TILE_TOKENS, r] = tile
            for r in range(c * ROW_BLOCK, min(n_rows, c * ROW_BLOCK + ROW_BLOCK)):
                for t in range(tiled, n_tok):
                    if paired:
                        out[t, r] = _x86_row_dot(words[r], xq[t], d[t], scales[r], pow2)
                    else:
                        out[t, r] = _portable_row_dot(words[r], xq[t], d[t], scales[r], pow2)

    return matvec


@functools.cache
def kernels():
    """The compiled kernels (compiled on first use, cached on disk by numba)."""

    @njit(parallel=True, fastmath=FASTMATH, cache=True)
    def matvec(words, scales, xp, pow2, out):
        """out[t, r] = row r · x[t] for few tokens: words uint32 [out, in/8] (the blocks' bytes, 8 codes a
        word), scales uint8 [out, in/32], xp float32 [T, 8, in/8] (xp[t, j, u] = x[t, 8u + j])
        -> out float32 [T, out]."""
        n_rows, n_tok, n_words = words.shape[0], xp.shape[0], xp.shape[2]
        for c in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
            pw = np.empty(n_words, np.float32)  # each word's 8 products, summed
            for r in range(c * ROW_BLOCK, min(n_rows, c * ROW_BLOCK + ROW_BLOCK)):
                wrow = words[r]
                for t in range(n_tok):
                    xt = xp[t]
                    for u in range(n_words):
                        acc = np.float32(0.0)
                        for j in range(_CODES_PER_WORD):
                            acc += fp4_value((wrow[u] >> np.uint32(4 * j)) & np.uint32(15)) * xt[j, u]
                        pw[u] = acc
                    total = np.float32(0.0)
                    for b in range(scales.shape[1]):
                        u = b * _WORDS_PER_BLOCK
                        total += pow2[scales[r, b]] * (pw[u] + pw[u + 1] + pw[u + 2] + pw[u + 3])
                    out[t, r] = total

    @njit(parallel=True, fastmath=FASTMATH, cache=True)
    def matmat(blocks, scales, x, pow2, out):
        """As matvec, for many tokens: each block of rows is decoded once into a tile, then dotted with every
        token."""
        n_rows, n_in = blocks.shape[0], x.shape[1]
        for c in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
            r0 = c * ROW_BLOCK
            r1 = min(r0 + ROW_BLOCK, n_rows)
            tile = np.empty((r1 - r0, n_in), np.float32)
            for r in range(r0, r1):
                for i in range(n_in // 2):
                    byte = blocks[r, i]
                    s = pow2[scales[r, i // (BLOCK // 2)]]
                    tile[r - r0, 2 * i] = fp4_value(np.uint32(byte & 15)) * s
                    tile[r - r0, 2 * i + 1] = fp4_value(np.uint32(byte >> 4)) * s
            for t in range(x.shape[0]):
                for r in range(r0, r1):
                    acc = np.float32(0.0)
                    for i in range(n_in):
                        acc += tile[r - r0, i] * x[t, i]
                    out[t, r] = acc

    return matvec, matmat


# Up to this many tokens the mat-vec (decode the bytes per token) is used, as for the affine kernels.
MATVEC_TOKENS = 3


def linear(x: np.ndarray, w: Mxfp4Tensor, call, q8: bool = False) -> np.ndarray:
    """x float32 [T, in] · Wᵀ for an MXFP4 W (blocks uint8 [out, in/2], scales uint8 [out, in/32]) -> [T, out];
    with ``q8``, q8 activations (flashmoe.reference.q8.linear_q8), decode and prefill alike.

    call: the numba backend's launcher (`_call(kernel, work, *args)`), which picks the thread count."""
    if w.blocks.ndim != 2 or x.shape[1] != w.shape[1]:
        raise BackendError(f"linear: input has {x.shape[1]} features, MXFP4 weight is {w.shape}")
    matvec, matmat = kernels()
    x = np.ascontiguousarray(x, dtype=np.float32)
    blocks, scales = np.ascontiguousarray(w.blocks), np.ascontiguousarray(w.scales)
    out = np.empty((x.shape[0], blocks.shape[0]), np.float32)
    work = out.size * x.shape[1]
    if q8:
        xq, d, _, paired = numba_q8.quantize(x, 4, BLOCK)  # 4-bit codes in bytes, blocks of 32: the same order
        call(q8_matvec(paired), work, blocks.view("<u4"), scales, xq, d, HALF_SCALE_VALUES, out)
    elif x.shape[0] <= MATVEC_TOKENS:
        xp = np.ascontiguousarray(x.reshape(x.shape[0], -1, _CODES_PER_WORD).transpose(0, 2, 1))
        call(matvec, work, blocks.view("<u4"), scales, xp, SCALE_VALUES, out)
    else:
        call(matmat, work, blocks, scales, x, SCALE_VALUES, out)
    return out
