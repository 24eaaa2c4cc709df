"""The CUDA backend's MXFP4 kernels: products with gpt-oss's experts read straight from their published bytes.

The numerics are flashmoe.format.mxfp4's and the numba kernels' (backends/numba_packed.py): a weight is
E2M1(code) · 2^(s − 127), two codes per byte (the even element in the low nibble), one E8M0 scale byte per
32 inputs; a block's 32 products are summed, then scaled once. The row layout of the other mat-vecs
(backends/cuda_kernels.py: LANES threads per output row, ROWS rows per block, the lane sum) is reused as is,
so the kernels run in numba's CUDA simulator too.

Every kernel addresses its matrices inside one device buffer, as the affine expert kernels do
(backends/cuda_staging.py): ``b32`` / ``b16`` views of it, a row's codes from word ``w_off``, its scale
bytes from byte ``s_off`` (read out of the uint32 words: the buffer has no byte view), its bias from element
``b_off`` in the bias format ``fmt`` (cuda_kernels.F32 / F16 / BF16). Streamed experts are staged there
once per call (or kept in the VRAM tier), so nothing is uploaded per projection.
"""

from __future__ import annotations

from functools import lru_cache

from numba import cuda, float32, uint32

from flashmoe.backends.cuda_kernels import F32, LANES, ROWS, _as_f32, _lane_sum, clamped_swiglu_value
from flashmoe.backends.cuda_loads import _scale_loader
from flashmoe.backends.cuda_matvec import CODES_PER_LANE


@cuda.jit(device=True)
def _fp4(c):
    """E2M1 code c (uint32, 0..15) -> float32: the magnitude bits placed in a float32 with exponent 126 + e,
    the subnormal pair (e = 0) mapped by 2v - 1, bit 3 the sign (no float32 subnormals: a GPU kernel compiled
    with flush-to-zero would lose the ±0.5 codes that backends/numba_packed.fp4_value forms through them)."""
    mag = _as_f32(((c & uint32(7)) << uint32(22)) + uint32(126 << 23))
    if (c & uint32(6)) == uint32(0):
        mag = float32(2.0) * mag - float32(1.0)
    return -mag if c & uint32(8) else mag


@cuda.jit(device=True)
def _e8m0(s):
    """E8M0 byte s -> 2^(s - 127) as float32, as np.ldexp gives it: s = 0 is the subnormal 2^-127, 255 is inf."""
    return _as_f32(uint32(s) << uint32(23)) if s else _as_f32(uint32(0x400000))


@cuda.jit(device=True)
def _dot(b32, w_off, s_off, n_blocks, x, xoff, lane):
    """This lane's part of one MXFP4 row · x[xoff : xoff + 32 · n_blocks]: a block of 32 codes (4 words) is
    what the row's lanes read together; its products are summed, then scaled once by 2^(s - 127)."""
    p = float32(0.0)
    for b in range(n_blocks):
        dot = float32(0.0)
        for i in range(CODES_PER_LANE):
            c = lane + i * LANES
            word = b32[w_off + b * 4 + (c >> 3)]
            dot += _fp4((word >> uint32(4 * (c & 7))) & uint32(15)) * x[xoff + b * 32 + c]
        at = s_off + b
        p += _e8m0((b32[at >> 2] >> uint32(8 * (at & 3))) & uint32(255)) * dot
    return p


@lru_cache(maxsize=None)
def linear(fmt: int):
    """out[t, o] = W[o] . x[t] (+ bias[o] when b_off >= 0). Grid (ceil(n_out / ROWS), T), block (LANES, ROWS).

    (b32, b16, w_off, s_off, b_off, n_out, n_blocks, x [T * in], out [T * n_out]); W's rows of n_blocks
    blocks follow each other from w_off (4 words a block) and s_off (a byte a block)."""
    load = _scale_loader(fmt)

    @cuda.jit
    def kernel(b32, b16, w_off, s_off, b_off, n_out, n_blocks, x, out):
        sh = cuda.shared.array((ROWS, LANES), float32)
        lane, r = cuda.threadIdx.x, cuda.threadIdx.y
        o = cuda.blockIdx.x * ROWS + r
        t = cuda.blockIdx.y
        p = float32(0.0)
        if o < n_out:
            p = _dot(b32, w_off + o * n_blocks * 4, s_off + o * n_blocks, n_blocks, x, t * n_blocks * 32, lane)
        total = _lane_sum(p, sh, lane, r)
        if o < n_out and lane == 0:
            out[t * n_out + o] = total + (load(b32, b16, b_off + o) if b_off >= 0 else float32(0.0))

    return kernel


@lru_cache(maxsize=None)
def gate_up(fmt: int):
    """h[e, t, i] = clamped_swiglu(gate_e[i] . x[t] + gate_bias_e[i], up_e[i] . x[t] + up_bias_e[i]) for k
    experts, expert e in slot slots[e] of ``stride`` bytes. Grid (ceil(inter / ROWS), k * T), block
    (LANES, ROWS).

    (b32, b16, gw, gs, gb, uw, us, ub, stride, slots [k], n_inter, n_blocks, n_tok, limit, alpha,
    x [T * hidden], h [k * T * inter]); gw/uw in words, gs/us in bytes, gb/ub in bias elements, slot 0."""
    load = _scale_loader(fmt)
    bias_bytes = 4 if fmt == F32 else 2

    @cuda.jit
    def kernel(b32, b16, gw, gs, gb, uw, us, ub, stride, slots, n_inter, n_blocks, n_tok, limit, alpha, x, h):
        sh = cuda.shared.array((ROWS, LANES), float32)
        lane, r = cuda.threadIdx.x, cuda.threadIdx.y
        i = cuda.blockIdx.x * ROWS + r
        e = cuda.blockIdx.y // n_tok
        t = cuda.blockIdx.y % n_tok
        at = slots[e] * stride
        ew, es = at // 4 + i * n_blocks * 4, at + i * n_blocks
        a = float32(0.0)
        b = float32(0.0)
        if i < n_inter:
            a = _dot(b32, gw + ew, gs + es, n_blocks, x, t * n_blocks * 32, lane)
            b = _dot(b32, uw + ew, us + es, n_blocks, x, t * n_blocks * 32, lane)
        a = _lane_sum(a, sh, lane, r)
        b = _lane_sum(b, sh, lane, r)
        if i < n_inter and lane == 0:
            eb = at // bias_bytes + i
            h[(e * n_tok + t) * n_inter + i] = clamped_swiglu_value(a + load(b32, b16, gb + eb),
                                                                    b + load(b32, b16, ub + eb), limit, alpha)

    return kernel


@lru_cache(maxsize=None)
def down_combine(fmt: int):
    """out[o] = sum_e weights[e] * (down_e[o] . h[e] + bias_e[o]) for one token's k experts. Grid
    ceil(hidden / ROWS), block (LANES, ROWS).

    (b32, b16, dw, ds, db, stride, slots [k], n_out, n_blocks, h [k * inter], weights [k], out [hidden]);
    expert e in slot slots[e] as in :func:`gate_up`."""
    load = _scale_loader(fmt)
    bias_bytes = 4 if fmt == F32 else 2

    @cuda.jit
    def kernel(b32, b16, dw, ds, db, stride, slots, n_out, n_blocks, h, weights, out):
        sh = cuda.shared.array((ROWS, LANES), float32)
        lane, r = cuda.threadIdx.x, cuda.threadIdx.y
        o = cuda.blockIdx.x * ROWS + r
        p = float32(0.0)
        bias = float32(0.0)
        if o < n_out:
            for e in range(slots.shape[0]):
                at = slots[e] * stride
                dot = _dot(b32, dw + at // 4 + o * n_blocks * 4, ds + at + o * n_blocks, n_blocks, h,
                           e * n_blocks * 32, lane)
                p += weights[e] * dot
                bias += weights[e] * load(b32, b16, db + at // bias_bytes + o)
        total = _lane_sum(p, sh, lane, r)
        if o < n_out and lane == 0:
            out[o] = total + bias

    return kernel
