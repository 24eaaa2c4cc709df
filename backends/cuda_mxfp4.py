"""The CUDA backend's MXFP4 kernel: products with gpt-oss's experts read straight from their published bytes.

The numerics are flashmoe.format.mxfp4's and the numba kernel's (backends/numba_mxfp4.py): a weight is
E2M1(code) · 2^(s − 127), two codes per byte (the even element in the low nibble), one E8M0 scale byte per
32 inputs; a block's 32 products are summed, then scaled once. The row layout of the other mat-vecs
(backends/cuda_kernels.py: LANES threads per output row, ROWS rows per block, the lane sum) is reused as is,
so the kernel runs in numba's CUDA simulator too.
"""

from __future__ import annotations

from numba import cuda, float32, uint32

from flashmoe.backends.cuda_kernels import CODES_PER_LANE, LANES, ROWS, _as_f32, _lane_sum


@cuda.jit(device=True)
def _fp4(c):
    """E2M1 code c (uint32, 0..15) -> float32, by backends/numba_mxfp4.fp4_value's arithmetic: the magnitude
    bits placed in a float32 with exponent 126 + e, the subnormal pair (e = 0) mapped by 2v - 1, bit 3 the sign."""
    mag = _as_f32(((c & uint32(7)) << uint32(22)) + uint32(126 << 23))
    if (c & uint32(6)) == uint32(0):
        mag = float32(2.0) * mag - float32(1.0)
    return -mag if c & uint32(8) else mag


@cuda.jit(device=True)
def _e8m0(s):
    """E8M0 byte s -> 2^(s - 127) as float32, as np.ldexp gives it: s = 0 is the subnormal 2^-127, 255 is inf."""
    return _as_f32(uint32(s) << uint32(23)) if s else _as_f32(uint32(0x400000))


@cuda.jit
def mxfp4_linear(words, scales, n_out, n_blocks, x, out):
    """out[t, o] = W[o] . x[t] for an MXFP4 W: words uint32 flat [out * in / 8] (the blocks' bytes, 8 codes a
    word: element 8u + j in bits 4j..4j+3), scales uint8 flat [out * in / 32], n_blocks = in / 32. A block
    of 32 codes is what a row's lanes read together (as qdot's units); its products are summed, then scaled
    once by 2^(s - 127). Grid (ceil(n_out / ROWS), T), block (LANES, ROWS)."""
    sh = cuda.shared.array((ROWS, LANES), float32)
    lane, r = cuda.threadIdx.x, cuda.threadIdx.y
    o = cuda.blockIdx.x * ROWS + r
    t = cuda.blockIdx.y
    p = float32(0.0)
    if o < n_out:
        for b in range(n_blocks):
            dot = float32(0.0)
            for i in range(CODES_PER_LANE):
                c = lane + i * LANES
                word = words[(o * n_blocks + b) * 4 + (c >> 3)]
                dot += _fp4((word >> uint32(4 * (c & 7))) & uint32(15)) * x[(t * n_blocks + b) * 32 + c]
            p += _e8m0(scales[o * n_blocks + b]) * dot
    total = _lane_sum(p, sh, lane, r)
    if o < n_out and lane == 0:
        out[t * n_out + o] = total
