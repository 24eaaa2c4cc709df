"""The CUDA backend's attention kernels: causal GQA softmax attention over a KV cache in GPU memory, the
appends to that cache, and GatedDeltaNet's causal conv and gated delta rule (linear attention). Same conventions as backends/cuda_kernels.py (flat float32 arrays, LANES-wide rows,
the lane reductions that also run in numba's simulator).
"""

from __future__ import annotations

import math
from functools import lru_cache

from numba import cuda, float32, float64

from flashmoe.backends.cuda_kernels import LANES, ROWS, _lane_sum, _sigmoid, _silu

KEYS_PER_PASS = 4  # keys whose dot products one pass of the attention kernel computes with independent loads
DELTA_PARTS = 8  # threads sharing one column of S in gated_delta_rule
MAX_HEAD_DIM = 512  # features of a head qk_norm_rope holds in shared memory (larger heads: two steps)


@cuda.jit(device=True)
def _key_dot(q, k, qo, ko, head_dim, lane):
    """This lane's part of q[qo:qo+D] . k[ko:ko+D] (dims lane, lane + LANES, ...)."""
    acc = float32(0.0)
    for d in range(lane, head_dim, LANES):
        acc += q[qo + d] * k[ko + d]
    return acc


@cuda.jit
def attention(q, k, v, q_positions, scale, sinks, n_heads, n_kv_heads, head_dim, scores, out):
    """Causal GQA softmax attention; one block of (LANES, 1) threads per (token, query head), the query at
    position p attending to cached positions 0..p. sinks [Hq]: a logit per head joining the softmax
    denominator with no value (gpt-oss), -inf for none.

    q, out flat [T * Hq * D]; k, v flat [S * Hkv * D] (S >= every position + 1: the cache may be longer);
    scores scratch [T * Hq * S]. The lanes split each key's dot product over the head's features, so a key's
    row is read in one coalesced pass, KEYS_PER_PASS keys at a time; likewise each lane sums its features of
    the values over the keys (the transposed split, one lane per key, read every key row feature by feature,
    one dependent load after another). Grid T * Hq."""
    sh = cuda.shared.array((1, LANES), float32)
    lane = cuda.threadIdx.x
    th = cuda.blockIdx.x
    S = k.shape[0] // (n_kv_heads * head_dim)
    t, h = th // n_heads, th % n_heads
    kv = (h // (n_heads // n_kv_heads)) * head_dim  # the head's keys and values within a cached row
    row = n_kv_heads * head_dim
    n = q_positions[t] + 1
    qo, so = th * head_dim, th * S
    m = sinks[h]
    for j in range(0, n, KEYS_PER_PASS):
        s0 = _lane_sum(_key_dot(q, k, qo, j * row + kv, head_dim, lane), sh, lane, 0) * scale
        s1 = s2 = s3 = float32(-math.inf)
        if j + 1 < n:
            s1 = _lane_sum(_key_dot(q, k, qo, (j + 1) * row + kv, head_dim, lane), sh, lane, 0) * scale
        if j + 2 < n:
            s2 = _lane_sum(_key_dot(q, k, qo, (j + 2) * row + kv, head_dim, lane), sh, lane, 0) * scale
        if j + 3 < n:
            s3 = _lane_sum(_key_dot(q, k, qo, (j + 3) * row + kv, head_dim, lane), sh, lane, 0) * scale
        if lane == 0:
            scores[so + j] = s0
            if j + 1 < n:
                scores[so + j + 1] = s1
            if j + 2 < n:
                scores[so + j + 2] = s2
            if j + 3 < n:
                scores[so + j + 3] = s3
        m = max(m, max(max(s0, s1), max(s2, s3)))
    cuda.syncthreads()  # lane 0's scores are written before every lane reads its share
    total = float32(0.0)
    for j in range(lane, n, LANES):
        e = math.exp(scores[so + j] - m)
        scores[so + j] = e
        total += e
    total = _lane_sum(total, sh, lane, 0)
    if sinks[h] > float32(-math.inf):
        total += math.exp(sinks[h] - m)
    cuda.syncthreads()  # every lane's weights are written before any lane reads them all
    for d in range(lane, head_dim, LANES):
        a0 = a1 = a2 = a3 = float32(0.0)
        j = 0
        while j + 4 <= n:  # four independent loads in flight
            a0 += scores[so + j] * v[j * row + kv + d]
            a1 += scores[so + j + 1] * v[(j + 1) * row + kv + d]
            a2 += scores[so + j + 2] * v[(j + 2) * row + kv + d]
            a3 += scores[so + j + 3] * v[(j + 3) * row + kv + d]
            j += 4
        while j < n:
            a0 += scores[so + j] * v[j * row + kv + d]
            j += 1
        out[qo + d] = (a0 + a1 + a2 + a3) / total


@cuda.jit
def qk_norm_rope(q, k, wq, wk, eps, q_heads, kv_heads, head_dim, half, positions, inv_freq, q_out, k_out):
    """Per-head RMSNorm of one step's queries and keys (weights wq, wk [D]), then rotate-half RoPE on the
    first 2 * half features of each head (as cuda_kernels.rope: float64 angles, the rest copied), in one
    launch. q, q_out flat [T * Hq * D]; k, k_out [T * Hkv * D]; positions int [T]. One row of LANES threads
    per head row, queries' rows first, then keys'; grid ceil(T * (Hq + Hkv) / ROWS), block (LANES, ROWS)."""
    sh = cuda.shared.array((ROWS, LANES), float32)
    normed = cuda.shared.array((ROWS, MAX_HEAD_DIM), float32)  # the row normed, for its rotation partners
    lane, r = cuda.threadIdx.x, cuda.threadIdx.y
    row = cuda.blockIdx.x * ROWS + r
    q_rows = q.shape[0] // head_dim
    is_q = row < q_rows
    x, w, out = (q, wq, q_out) if is_q else (k, wk, k_out)
    base = (row if is_q else row - q_rows) * head_dim
    active = base < x.shape[0]
    ss = float32(0.0)
    if active:
        for d in range(lane, head_dim, LANES):
            ss += x[base + d] * x[base + d]
    ss = _lane_sum(ss, sh, lane, r)
    inv = float32(1.0) / math.sqrt(ss / float32(head_dim) + eps)
    if active:
        for d in range(lane, head_dim, LANES):
            normed[r, d] = x[base + d] * inv * w[d]
    cuda.syncthreads()
    if active:
        t = base // ((q_heads if is_q else kv_heads) * head_dim)
        for d in range(lane, head_dim, LANES):
            if d < 2 * half:
                angle = float64(positions[t]) * inv_freq[d if d < half else d - half]
                c, s = float32(math.cos(angle)), float32(math.sin(angle))
                if d < half:
                    out[base + d] = normed[r, d] * c - normed[r, d + half] * s
                else:
                    out[base + d] = normed[r, d] * c + normed[r, d - half] * s
            else:
                out[base + d] = normed[r, d]


@cuda.jit
def kv_append(k, v, k_cache, v_cache, offset):
    """k_cache[offset + i] = k[i] and v_cache[offset + i] = v[i] (flat): one launch appends a token's keys
    and values to a device KV cache."""
    n = cuda.grid(1)
    if n < k.shape[0]:
        k_cache[offset + n] = k[n]
        v_cache[offset + n] = v[n]


@cuda.jit
def kv_append_at(k, v, k_cache, v_cache, positions):
    """One token's keys and values (k, v flat [Hkv * D]) into the caches at position positions[0] (a device
    int64 array: the position a replayed CUDA graph reads)."""
    n = cuda.grid(1)
    if n < k.shape[0]:
        at = positions[0] * k.shape[0] + n
        k_cache[at] = k[n]
        v_cache[at] = v[n]


@cuda.jit
def causal_conv1d(state, x, w, kernel_size, y):
    """Depthwise causal conv with SiLU over xs = concat(state, x) read in place: y[t, c] = silu(sum_j
    w[c, j] * xs[t + j, c]), then state = the last K-1 rows of xs, in place (a channel's outputs and state
    depend on that channel alone). state flat [(K-1) * C], x, y [T * C], w [C * K]. One thread per channel."""
    c = cuda.grid(1)
    C = w.shape[0] // kernel_size
    keep = state.shape[0] // C  # K - 1
    n_tok = x.shape[0] // C
    if c < C:
        for t in range(n_tok):
            acc = float32(0.0)
            for j in range(kernel_size):
                r = t + j
                xv = state[r * C + c] if r < keep else x[(r - keep) * C + c]
                acc += w[c * kernel_size + j] * xv
            y[t * C + c] = _silu(acc)
        for m in range(keep):  # row m of the new state is row n_tok + m of xs: not yet overwritten
            r = n_tok + m
            state[m * C + c] = state[r * C + c] if r < keep else x[(r - keep) * C + c]


@cuda.jit(device=True)
def _column_sum(x, sh, lane, r):
    """Sum of x over the DELTA_PARTS threads (lane, 0..DELTA_PARTS-1) of a block; every thread must call it."""
    sh[r, lane] = x
    cuda.syncthreads()
    total = float32(0.0)
    for p in range(DELTA_PARTS):
        total += sh[p, lane]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _column_sums(x, y, z, sh, lane, r):
    """Sums of x, y and z over the DELTA_PARTS threads (lane, 0..DELTA_PARTS-1) of a block, with one pair of
    barriers; every thread must call it."""
    sh[0, r, lane] = x
    sh[1, r, lane] = y
    sh[2, r, lane] = z
    cuda.syncthreads()
    sx = sy = sz = float32(0.0)
    for p in range(DELTA_PARTS):
        sx += sh[0, p, lane]
        sy += sh[1, p, lane]
        sz += sh[2, p, lane]
    cuda.syncthreads()
    return sx, sy, sz


L2_EPS = 1e-6  # GatedDeltaNet's l2norm of q and k (Backend.l2_normalize's default)


@lru_cache(maxsize=None)
def gated_delta_rule(dk: int, raw: bool = False):
    """Kernel: the gated delta rule (Yang et al. 2024) from state_in into state [H * Dk * Dv] (state_in is only
    read; state may be state_in itself) for key heads of dk features. Per token S = exp(g) S;
    delta = beta (v - Sᵀk); S += k ⊗ delta; o = Sᵀq. A block of (LANES, DELTA_PARTS) threads takes LANES
    columns j of one head's S (a warp reads LANES consecutive floats of a row); thread (lane, r) keeps rows
    r, r + DELTA_PARTS, ... of its column in registers (dk is a compile-time constant), loaded all at once,
    and the column's dot products are summed over the block's DELTA_PARTS threads. (One thread per column
    walking its rows in place, each load after a store to the same array, was one memory round trip per row:
    73 µs a launch for Qwen3.5-397B's 64 x 128 x 128 state on an H100, docs/benchmarks.md, issue 15, sixth
    session.)

    raw (Backend.gated_delta_net): q and k as projected, L2-normalised here (their squared norms summed over
    the block with Sᵀk, and applied to the sums: Sᵀk / |k|, Sᵀq · dk^-0.5 / |q|); g holds a, beta holds b, and
    each head's log decay rate · softplus(a + dt_bias) and sigmoid(b) are taken here. Else rate and dt_bias
    are unused (any array).

    (q, k [T * Hk * Dk], v [T * H * Dv], g, beta [T * H], rate, dt_bias [H], n_tok, k_heads, state_in, state,
    o [T * H * Dv]); grid H * ceil(Dv / LANES), block (LANES, DELTA_PARTS)."""
    per = -(-dk // DELTA_PARTS)  # rows of its column each thread holds
    q_scale = float32(dk ** -0.5)

    @cuda.jit
    def kernel(q, k, v, g, beta, rate, dt_bias, n_tok, k_heads, state_in, state, o):
        sh3 = cuda.shared.array((3, DELTA_PARTS, LANES), float32)
        sh = cuda.shared.array((DELTA_PARTS, LANES), float32)
        lane, r = cuda.threadIdx.x, cuda.threadIdx.y
        H = g.shape[0] // n_tok
        dv = v.shape[0] // (n_tok * H)
        chunks = (dv + LANES - 1) // LANES
        h = cuda.blockIdx.x // chunks
        j = cuda.blockIdx.x % chunks * LANES + lane
        live = j < dv
        kh = h // (H // k_heads)
        base = h * dk * dv + j
        col = cuda.local.array(per, float32)
        for u in range(per):
            i = r + u * DELTA_PARTS
            col[u] = state_in[base + i * dv] if live and i < dk else float32(0.0)
        for t in range(n_tok):
            if raw:
                a = g[t * H + h] + dt_bias[h]  # log decay = rate · softplus(a), softplus overflow-free
                decay = math.exp(rate[h] * (max(a, float32(0.0)) + math.log1p(math.exp(-abs(a)))))
                bt = _sigmoid(beta[t * H + h])
            else:
                decay = math.exp(g[t * H + h])
                bt = beta[t * H + h]
            kq = (t * k_heads + kh) * dk
            kv = kk = qq = float32(0.0)
            for u in range(per):
                i = r + u * DELTA_PARTS
                if i < dk:
                    col[u] *= decay
                    kv += col[u] * k[kq + i]
                    if raw:
                        kk += k[kq + i] * k[kq + i]
                        qq += q[kq + i] * q[kq + i]
            if raw:
                kv, kk, qq = _column_sums(kv, kk, qq, sh3, lane, r)
            else:
                kv = _column_sum(kv, sh, lane, r)
            rk = rq = float32(1.0)
            if raw:
                rk = float32(1.0) / math.sqrt(kk + float32(L2_EPS))
                rq = q_scale / math.sqrt(qq + float32(L2_EPS))
            delta = (v[(t * H + h) * dv + j] - kv * rk) * bt if live else float32(0.0)
            kd = delta * rk  # S += (k / |k|) ⊗ delta
            acc = float32(0.0)
            for u in range(per):
                i = r + u * DELTA_PARTS
                if i < dk:
                    col[u] += k[kq + i] * kd
                    acc += col[u] * q[kq + i]
            acc = _column_sum(acc, sh, lane, r)
            if live and r == 0:
                o[(t * H + h) * dv + j] = acc * rq
        for u in range(per):
            i = r + u * DELTA_PARTS
            if live and i < dk:
                state[base + i * dv] = col[u]

    return kernel
