"""MXFP4 kernels of the numba backend: products with gpt-oss's experts read straight from their packed bytes.

The numerics are flashmoe.format.mxfp4's (read its docstring first): a weight is FP4_VALUES[code] · 2^(s − 127)
with two E2M1 codes per byte (the even element in the low nibble) and one E8M0 scale byte per 32 inputs.
The 32 products of a block share that power of two, so a row is

    y = Σ_b 2^(s_b − 127) · Σ_j FP4_VALUES[code_bj] · x_{32b + j}

and the scale multiplies once per block, from a 256-entry table of the exact powers of two (np.ldexp, so
2^-127 is the subnormal it is in transformers). The mat-vec (decode) never forms a weight: as the affine
kernels do (numba_backend.permute_input), it reads a row as uint32 words of 8 codes (element 8u + j in bits
4j..4j+3, the byte order of a little-endian load) against the input permuted to xp[j, u] = x[8u + j], so the
loop over words vectorises, and decodes each code by bit arithmetic instead of a table (fp4_value: a table
lookup is a gather, which does not vectorise). The mat-mat (prefill) decodes a block of
rows once (fp4_value too) into a per-thread tile and reuses it for every token. Rounding differs from "dequantise, then
dot" only by float32 summation order (conformance holds both to the reference).
"""

from __future__ import annotations

import functools

import numpy as np

try:
    from numba import njit, prange

    from flashmoe.backends.numba_packed import u32_as_f32
except ImportError:  # the numba backend reports it (numba_backend.unavailable_reason)
    njit = None

from flashmoe.backends.base import BackendError
from flashmoe.backends.numba_packed import ROW_BLOCK
from flashmoe.format.mxfp4 import BLOCK, SCALE_BIAS, Mxfp4Tensor

#: 2^(s − 127) for every E8M0 byte s, float32 (s = 255 gives inf, as ldexp does for the large codes).
with np.errstate(over="ignore"):
    SCALE_VALUES = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - SCALE_BIAS).astype(np.float32)

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


@functools.cache
def kernels():
    """The compiled kernels (compiled on first use, cached on disk by numba)."""
    _FASTMATH = {"contract", "reassoc"}

    @njit(parallel=True, fastmath=_FASTMATH, cache=True)
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

    @njit(parallel=True, fastmath=_FASTMATH, cache=True)
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


def linear(x: np.ndarray, w: Mxfp4Tensor, call) -> np.ndarray:
    """x float32 [T, in] · Wᵀ for an MXFP4 W (blocks uint8 [out, in/2], scales uint8 [out, in/32]) -> [T, out].

    call: the numba backend's launcher (`_call(kernel, work, *args)`), which picks the thread count."""
    if w.blocks.ndim != 2 or x.shape[1] != w.shape[1]:
        raise BackendError(f"linear: input has {x.shape[1]} features, MXFP4 weight is {w.shape}")
    matvec, matmat = kernels()
    x = np.ascontiguousarray(x, dtype=np.float32)
    blocks, scales = np.ascontiguousarray(w.blocks), np.ascontiguousarray(w.scales)
    out = np.empty((x.shape[0], blocks.shape[0]), np.float32)
    work = out.size * x.shape[1]
    if x.shape[0] <= MATVEC_TOKENS:
        xp = np.ascontiguousarray(x.reshape(x.shape[0], -1, _CODES_PER_WORD).transpose(0, 2, 1))
        call(matvec, work, blocks.view("<u4"), scales, xp, SCALE_VALUES, out)
    else:
        call(matmat, work, blocks, scales, x, SCALE_VALUES, out)
    return out
