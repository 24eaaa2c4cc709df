"""MXFP4 kernels of the numba backend: products with gpt-oss's experts read straight from their packed bytes.

The numerics are flashmoe.format.mxfp4's (read its docstring first): a weight is FP4_VALUES[code] · 2^(s − 127)
with two E2M1 codes per byte (the even element in the low nibble) and one E8M0 scale byte per 32 inputs.
The 32 products of a block share that power of two, so a row is

    y = Σ_b 2^(s_b − 127) · Σ_j FP4_VALUES[code_bj] · x_{32b + j}

and the scale multiplies once per block, from a 256-entry table of the exact powers of two (np.ldexp, so
2^-127 is the subnormal it is in transformers). The mat-vec (decode) decodes each byte's two codes by table
lookup and never forms a weight; the mat-mat (prefill) decodes a block of rows once into a per-thread tile
and reuses it for every token. Rounding differs from "dequantise, then dot" only by float32 summation
order (conformance holds both to the reference).
"""

from __future__ import annotations

import functools

import numpy as np

try:
    from numba import njit, prange
except ImportError:  # the numba backend reports it (numba_backend.unavailable_reason)
    njit = None

from flashmoe.backends.base import BackendError
from flashmoe.format.mxfp4 import BLOCK, FP4_VALUES, SCALE_BIAS, Mxfp4Tensor

#: 2^(s − 127) for every E8M0 byte s, float32 (s = 255 gives inf, as ldexp does for the large codes).
with np.errstate(over="ignore"):
    SCALE_VALUES = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - SCALE_BIAS).astype(np.float32)

# Rows decoded per chunk of the mat-mat: a tile of 16 x in floats stays in L2.
_ROW_BLOCK = 16


@functools.cache
def kernels():
    """The compiled kernels (compiled on first use, cached on disk by numba)."""
    _FASTMATH = {"contract", "reassoc"}

    @njit(inline="always", fastmath=_FASTMATH)
    def _row_dot(brow, srow, x, lut, pow2):
        """Σ_b 2^(s_b−127) Σ_j v_bj x_{32b+j} for one packed row brow [in/2] with scales srow [in/32]."""
        acc = np.float32(0.0)
        for b in range(srow.shape[0]):
            part = np.float32(0.0)
            base = b * (BLOCK // 2)
            for i in range(BLOCK // 2):
                byte = brow[base + i]
                part += lut[byte & 15] * x[2 * (base + i)] + lut[byte >> 4] * x[2 * (base + i) + 1]
            acc += pow2[srow[b]] * part
        return acc

    @njit(parallel=True, fastmath=_FASTMATH, cache=True)
    def matvec(blocks, scales, x, lut, pow2, out):
        """out[t, r] = row r · x[t] for few tokens: blocks uint8 [out, in/2], scales uint8 [out, in/32],
        x float32 [T, in] -> out float32 [T, out]."""
        for r in prange(blocks.shape[0]):
            for t in range(x.shape[0]):
                out[t, r] = _row_dot(blocks[r], scales[r], x[t], lut, pow2)

    @njit(parallel=True, fastmath=_FASTMATH, cache=True)
    def matmat(blocks, scales, x, lut, pow2, out):
        """As matvec, for many tokens: each block of rows is decoded once into a tile, then dotted with every
        token."""
        n_rows, n_in = blocks.shape[0], x.shape[1]
        for c in prange((n_rows + _ROW_BLOCK - 1) // _ROW_BLOCK):
            r0 = c * _ROW_BLOCK
            r1 = min(r0 + _ROW_BLOCK, n_rows)
            tile = np.empty((r1 - r0, n_in), np.float32)
            for r in range(r0, r1):
                for i in range(n_in // 2):
                    byte = blocks[r, i]
                    s = pow2[scales[r, i // (BLOCK // 2)]]
                    tile[r - r0, 2 * i] = lut[byte & 15] * s
                    tile[r - r0, 2 * i + 1] = lut[byte >> 4] * s
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
    out = np.empty((x.shape[0], w.blocks.shape[0]), np.float32)
    kernel = matvec if x.shape[0] <= MATVEC_TOKENS else matmat
    call(kernel, out.size * x.shape[1], np.ascontiguousarray(w.blocks), np.ascontiguousarray(w.scales),
         np.ascontiguousarray(x, dtype=np.float32), FP4_VALUES, SCALE_VALUES, out)
    return out
