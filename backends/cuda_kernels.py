"""numba-cuda kernels of the CUDA backend (backends/cuda_backend.py), on flat float32 device arrays.

The quantised mat-vec kernels are in backends/cuda_matvec.py.

numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) runs the same kernels as Python threads: it has no
warp shuffles and no libdevice, so there (and only there) the lane sum goes through shared memory and
bits are reinterpreted as float32 with NumPy; and rows are 4 lanes wide instead of 32 (a thread costs a
Python thread there; the code takes any power of two). Everything else is one code path.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numba
import numpy as np
from numba import cuda, float32, float64, int32

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

if not hasattr(np, "row_stack"):
    # numba-cuda 0.30 registers an overload of np.row_stack when its CUDA target first compiles; NumPy 2.5
    # removed that alias of np.vstack (seen on the H200 machine: AttributeError at the first kernel launch).
    np.row_stack = np.vstack

LANES = 32  # threads per output row: a warp
ROWS = 4  # output rows per block of the row kernels
FLAT_BLOCK = 128  # threads per block of the one-thread-per-element kernels
NORM_WARPS = 32  # most warps of an rms_norm block (1024 threads)
if SIMULATOR:  # every simulated thread is a Python thread: narrower rows, same code (LANES is any power of 2)
    LANES, ROWS, FLAT_BLOCK, NORM_WARPS = 4, 2, 32, 4
NORM_PER_THREAD = 8  # features of a row each thread of rms_norm holds in registers

# Scale/bias formats, decoded from raw bits in the kernels.
F32, F16, BF16 = 0, 1, 2

# -- bit reinterpretation and the lane sum: the places the simulator differs --------------------------
if SIMULATOR:
    import sys
    import threading

    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    _SHARED_LOCK = threading.Lock()

    def _shared_array(self, shape, dtype, alignment=None):
        """numba's FakeCUDAShared.array, its check-then-create made atomic. The simulator makes a block's
        shared array when the first thread reaches its line; numba's version can lose the GIL between looking
        for it and storing it, and then two threads of the block hold different arrays (a lane sum missing a
        lane: seen as engine logits off by ~1e-4 of their scale, now and then, on a loaded machine)."""
        if shape == 0 or alignment is not None:  # dynamic or aligned shared memory: not used by these kernels
            raise NotImplementedError("the simulator shim makes static shared arrays only")
        caller = sys._getframe(1)  # arrays are told apart by the line that makes them, as numba does
        key = (caller.f_code.co_filename, caller.f_lineno)
        with _SHARED_LOCK:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(
                    shape, numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype)
        return res

    FakeCUDAShared.array = _shared_array


    def _as_f32(u):
        return np.array([u], np.uint32).view(np.float32)[0]


    @cuda.jit(device=True)
    def _lane_sum(v, sh, lane, r):
        """Sum of v over the 32 lanes of row r; every thread of the block must call it."""
        sh[r, lane] = v
        cuda.syncthreads()
        s = LANES // 2
        while s > 0:
            if lane < s:
                sh[r, lane] += sh[r, lane + s]
            cuda.syncthreads()
            s //= 2
        total = sh[r, 0]
        cuda.syncthreads()
        return total

    @cuda.jit(device=True)
    def _lane_max(v, sh, lane, r):
        sh[r, lane] = v
        cuda.syncthreads()
        s = LANES // 2
        while s > 0:
            if lane < s:
                sh[r, lane] = max(sh[r, lane], sh[r, lane + s])
            cuda.syncthreads()
            s //= 2
        total = sh[r, 0]
        cuda.syncthreads()
        return total

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _as_f32(u):
        return libdevice.int_as_float(int32(u))

    @cuda.jit(device=True)
    def _lane_sum(v, sh, lane, r):
        """Sum of v over the 32 lanes of row r (one warp): butterfly shuffles, every lane gets the sum."""
        off = LANES // 2
        while off > 0:
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, off)
            off //= 2
        return v

    @cuda.jit(device=True)
    def _lane_max(v, sh, lane, r):
        off = LANES // 2
        while off > 0:
            v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, off))
            off //= 2
        return v


@cuda.jit(device=True)
def _silu(a):
    return a / (float32(1.0) + math.exp(-a))


# -- float matrices -----------------------------------------------------------------------------------------
@cuda.jit
def flinear(w, n_in, x, out):
    """out[t, o] = w[o] . x[t], w float32 flat [out * in]. Grid (ceil(n_out / ROWS), T), block (LANES, ROWS)."""
    sh = cuda.shared.array((ROWS, LANES), float32)
    lane, r = cuda.threadIdx.x, cuda.threadIdx.y
    n_out = w.shape[0] // n_in
    o = cuda.blockIdx.x * ROWS + r
    t = cuda.blockIdx.y
    p = float32(0.0)
    if o < n_out:
        for i in range(lane, n_in, LANES):
            p += w[o * n_in + i] * x[t * n_in + i]
    total = _lane_sum(p, sh, lane, r)
    if o < n_out and lane == 0:
        out[t * n_out + o] = total


@cuda.jit
def gather_rows(src, n_cols, ids, out):
    """out[t, :] = src[ids[t], :] on flat arrays. Grid ceil(T * n_cols / FLAT_BLOCK)."""
    n = cuda.grid(1)
    if n < out.shape[0]:
        out[n] = src[ids[n // n_cols] * n_cols + n % n_cols]


# -- normalisation, rotary, attention, recurrences ------------------------------------------------------------
NORM_PLAIN, NORM_ADD, NORM_GATE = 0, 1, 2  # rms_norm's modes


@cuda.jit
def rms_norm(x, d, w, eps, add, x_out, out):
    """Rows of n = w.shape[0]: y = x + d when add == NORM_ADD (also written to x_out: a residual add fused
    with the norm after it), else y = x (x_out unused); out = y / sqrt(mean(y²) + eps) * w, times silu(d)
    when add == NORM_GATE (GatedDeltaNet's gated norm; d unused when add == NORM_PLAIN). One block of
    (LANES, warps) threads per row, warps <= NORM_WARPS (:func:`norm_warps`). A thread loads its first
    NORM_PER_THREAD features of the row, their d and w, all before using any, and keeps them in registers
    for the scaling; features past LANES * warps * NORM_PER_THREAD are read again. (A loop that loaded,
    added and stored one feature at a time waited for memory once per feature: 10.5 µs a row of 2048 over
    128 threads on an H200, docs/benchmarks.md issue 15 run 6.) Grid rows."""
    sh = cuda.shared.array((NORM_WARPS, LANES), float32)
    part = cuda.shared.array(NORM_WARPS, float32)
    lane, r = cuda.threadIdx.x, cuda.threadIdx.y
    step = LANES * cuda.blockDim.y
    n = w.shape[0]
    base = cuda.blockIdx.x * n
    v = cuda.local.array(NORM_PER_THREAD, float32)
    dv = cuda.local.array(NORM_PER_THREAD, float32)
    wv = cuda.local.array(NORM_PER_THREAD, float32)
    for j in range(NORM_PER_THREAD):  # loads only: all in flight together
        i = r * LANES + lane + j * step
        if i < n:
            v[j] = x[base + i]
            wv[j] = w[i]
            dv[j] = d[base + i] if add != NORM_PLAIN else float32(0.0)
    ss = float32(0.0)
    for j in range(NORM_PER_THREAD):
        i = r * LANES + lane + j * step
        if i < n:
            if add == NORM_ADD:
                v[j] += dv[j]
                x_out[base + i] = v[j]
            ss += v[j] * v[j]
    for i in range(r * LANES + lane + NORM_PER_THREAD * step, n, step):
        y = x[base + i]
        if add == NORM_ADD:
            y += d[base + i]
            x_out[base + i] = y
        ss += y * y
    ss = _lane_sum(ss, sh, lane, r)
    if lane == 0:
        part[r] = ss
    cuda.syncthreads()
    ss = float32(0.0)
    for j in range(cuda.blockDim.y):
        ss += part[j]
    inv = float32(1.0) / math.sqrt(ss / float32(n) + eps)
    for j in range(NORM_PER_THREAD):
        i = r * LANES + lane + j * step
        if i < n:
            y = v[j] * inv * wv[j]
            out[base + i] = y * dv[j] * _sigmoid(dv[j]) if add == NORM_GATE else y
    for i in range(r * LANES + lane + NORM_PER_THREAD * step, n, step):  # reads back only what it wrote
        y = (x_out[base + i] if add == NORM_ADD else x[base + i]) * inv * w[i]
        if add == NORM_GATE:
            y *= d[base + i] * _sigmoid(d[base + i])
        out[base + i] = y


def norm_warps(n: int) -> int:
    """Warps of the rms_norm block for rows of n features: two features per thread, at most NORM_WARPS."""
    return max(1, min(NORM_WARPS, -(-n // (2 * LANES))))


@cuda.jit
def l2_normalize(x, n, eps, out):
    """Rows of n: out = x / sqrt(sum(x²) + eps). Grid ceil(rows / ROWS), block (LANES, ROWS)."""
    sh = cuda.shared.array((ROWS, LANES), float32)
    lane, r = cuda.threadIdx.x, cuda.threadIdx.y
    row = cuda.blockIdx.x * ROWS + r
    active = row * n < x.shape[0]
    ss = float32(0.0)
    if active:
        for i in range(lane, n, LANES):
            v = x[row * n + i]
            ss += v * v
    ss = _lane_sum(ss, sh, lane, r)
    if active:
        inv = float32(1.0) / math.sqrt(ss + eps)
        for i in range(lane, n, LANES):
            out[row * n + i] = x[row * n + i] * inv


@cuda.jit
def rope(x, heads, head_dim, half, positions, inv_freq, out):
    """Rotate-half RoPE on the first 2 * half features of each head, the rest copied. x, out flat
    [T * heads * head_dim]; positions int [T]; inv_freq float64 [half]. The angle position * inv_freq and its
    cosine and sine are float64, as in the reference (in float32 the angle is 1e-4 off at 32k positions).
    One thread per element."""
    n = cuda.grid(1)
    if n < x.shape[0]:
        t = n // (heads * head_dim)
        d = n % head_dim
        if d < 2 * half:
            f = d if d < half else d - half
            angle = float64(positions[t]) * inv_freq[f]
            c, s = float32(math.cos(angle)), float32(math.sin(angle))
            if d < half:
                out[n] = x[n] * c - x[n + half] * s
            else:
                out[n] = x[n] * c + x[n - half] * s
        else:
            out[n] = x[n]


# -- elementwise ----------------------------------------------------------------------------------------------
SIGMOID, SILU, SOFTPLUS, ADD, MUL = range(5)


@cuda.jit(device=True)
def _sigmoid(a):
    e = math.exp(-abs(a))  # never overflows
    return float32(1.0) / (float32(1.0) + e) if a >= 0 else e / (float32(1.0) + e)


@lru_cache(maxsize=None)
def unary(op: int):
    """out[i] = op(x[i]) for op in SIGMOID, SILU, SOFTPLUS. Grid ceil(n / FLAT_BLOCK)."""

    @cuda.jit
    def kernel(x, out):
        n = cuda.grid(1)
        if n < x.shape[0]:
            a = x[n]
            if op == SIGMOID:
                out[n] = _sigmoid(a)
            elif op == SILU:
                out[n] = a * _sigmoid(a)
            else:  # log(1 + exp(a)) = max(a, 0) + log1p(exp(-|a|)), overflow-free
                out[n] = max(a, float32(0.0)) + math.log1p(math.exp(-abs(a)))

    return kernel


@lru_cache(maxsize=None)
def binary(op: int):
    """out = a op b with NumPy broadcasting over 4-D shapes, for ADD, MUL: out flat C order with shape
    (n0, d1, d2, d3); a and b read at element strides sa*, sb* (0 along a broadcast axis)."""

    @cuda.jit
    def kernel(a, b, out, d1, d2, d3, sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3):
        n = cuda.grid(1)
        if n < out.shape[0]:
            i3 = n % d3
            i2 = (n // d3) % d2
            i1 = (n // (d3 * d2)) % d1
            i0 = n // (d3 * d2 * d1)
            x = a[i0 * sa0 + i1 * sa1 + i2 * sa2 + i3 * sa3]
            y = b[i0 * sb0 + i1 * sb1 + i2 * sb2 + i3 * sb3]
            if op == ADD:
                out[n] = x + y
            else:
                out[n] = x * y

    return kernel


@cuda.jit
def add_sigmoid_gated(a, gate, b, width, out):
    """out = a + sigmoid(gate[n // width]) * b elementwise: a gate per run of `width` elements (one per row
    of b: width = its features; one per element: width 1)."""
    n = cuda.grid(1)
    if n < out.shape[0]:
        out[n] = a[n] + _sigmoid(gate[n // width]) * b[n]


@cuda.jit
def silu_mul(gate, up, out):
    """out = silu(gate) * up elementwise (SwiGLU's activation)."""
    n = cuda.grid(1)
    if n < out.shape[0]:
        a = gate[n]
        out[n] = a * _sigmoid(a) * up[n]


@cuda.jit
def clip(x, limit, out):
    """out = min(max(x, -limit), limit)."""
    n = cuda.grid(1)
    if n < x.shape[0]:
        out[n] = min(max(x[n], -limit), limit)


@cuda.jit(device=True)
def clamped_swiglu_value(gate, up, limit, alpha):
    """gpt-oss: (clip(up, ±limit) + 1) · g · sigmoid(alpha · g), g = min(gate, limit)."""
    g = min(gate, limit)
    return (min(max(up, -limit), limit) + float32(1.0)) * g * _sigmoid(alpha * g)


@cuda.jit
def clamped_swiglu(gate, up, limit, alpha, out):
    """out = clamped_swiglu_value(gate, up) elementwise."""
    n = cuda.grid(1)
    if n < out.shape[0]:
        out[n] = clamped_swiglu_value(gate[n], up[n], limit, alpha)


@cuda.jit
def copy_columns(src, n_cols, start, width, out):
    """out (flat [rows, width]) = columns start .. start + width of src (flat [rows, n_cols]): one piece of
    a split of the last axis. Grid ceil(rows * width / FLAT_BLOCK)."""
    n = cuda.grid(1)
    if n < out.shape[0]:
        out[n] = src[(n // width) * n_cols + start + n % width]
