"""The numba backend's attention kernels: causal grouped-query attention over a KV cache, and a decode token's
whole attention block in one call.

``attention`` is Backend.attention (any number of queries). ``block_kernel`` makes the kernel of
Backend.attention_block for one token with q8 activations (Qwen3's attention: q/k/v projections, per-head q/k
RMSNorm and RoPE, the new key and value written into the cache, attention, o_proj): one compiled call instead
of the ~10 backend calls of the default composition (backends/base.py), each with its Python glue and
temporaries, and with no Python between its parallel regions (q/k/v rows, the query heads when their work is
large enough, o_proj rows), so the pool's workers still spin from one region when the next begins
(numba_backend's module docstring: OMP wait policy). Every step is the compiled function the separate
calls use (numba_q8.matvecs_chunk, numba_norms.rms_row and rope_row, attend below), so the block gives
their bits (conformance/test_numba_backend.py).
"""

from __future__ import annotations

import functools

import numpy as np

try:
    from numba import njit, prange
except ImportError:  # numba_backend reports it through unavailable_reason
    njit = None

from flashmoe.backends.numba_cache import cached_njit
from flashmoe.backends.numba_packed import FASTMATH, PRANGE_ONLY

if njit is not None:
    from flashmoe.backends.numba_norms import rms_row, rope_row
    from flashmoe.backends.numba_q8 import _quantize_token, chunk_starts, matvecs_chunk, step_lanes

    @njit(fastmath=FASTMATH, inline="always")
    def attend(q, k, v, kh, n, scale, sink, s, out):
        """out [D] = softmax_j(scale * q . k[j, kh]) . v[j, kh] over cached positions j < n for one query head
        q float32 [D] (k, v [S, Hkv, D]); sink: the head's sink logit (-inf: none), which joins the softmax's
        denominator with no value; s: a float32 scratch of at least n."""
        D = q.shape[0]
        m = sink
        for j in range(n):
            acc = np.float32(0.0)
            for d in range(D):
                acc += q[d] * k[j, kh, d]
            s[j] = acc * scale
            m = max(m, s[j])
        total = np.exp(sink - m)
        for j in range(n):
            s[j] = np.exp(s[j] - m)
            total += s[j]
        for d in range(D):
            out[d] = 0.0
        for j in range(n):
            p = s[j] / total
            for d in range(D):
                out[d] += p * v[j, kh, d]

    @cached_njit(parallel=True, fastmath=FASTMATH)
    def attention(q, k, v, q_positions, scale, sinks, out):
        """Backend.attention: out [T, Hq, D] for queries q [T, Hq, D] at q_positions int64 [T] over k, v
        [S, Hkv, D]; sinks float32 [Hq] (-inf: none)."""
        T, Hq, D = q.shape
        group = Hq // k.shape[1]
        # Head-major: prange splits the items into one contiguous run per thread, and a causal prompt's work
        # grows with t, so position-major runs gave the last thread most of it (3/4 at 2 threads).
        for ht in prange(T * Hq):
            h = ht // T
            t = ht % T
            n = q_positions[t] + 1
            attend(q[t, h], k, v, h // group, n, scale, sinks[h], np.empty(n, np.float32), out[t, h])

    @njit(fastmath=FASTMATH, inline="always")
    def _query_head(h, qkv, q_norm, eps, cos, sin, k_cache, v_cache, n, scale, sinks, att):
        """Query head h of a decode token: RMSNorm and RoPE of its slice of qkv [1, rows] (as
        numba_norms.qk_norm_rope), then attend over the cache's first n positions into att [1, Hq * D]."""
        D = k_cache.shape[2]
        normed = np.empty(D, np.float32)
        q = np.empty(D, np.float32)
        rms_row(qkv[0, h * D : (h + 1) * D], q_norm, eps, normed)
        q[:] = normed
        rope_row(normed, cos, sin, q)
        attend(q, k_cache, v_cache, h // (att.shape[1] // D // k_cache.shape[1]), n, scale, sinks[h],
               np.empty(n, np.float32), att[0, h * D : (h + 1) * D])

    @njit(fastmath=FASTMATH, inline="always")
    def _quantized(x, block, group, paired):
        """One token x float32 [1, n] quantised as numba_q8.quantize: (xq int8 [1, n], d [1, n / block],
        xsum [1, n / group])."""
        n = x.shape[1]
        xq = np.empty((1, n), np.int8)
        d = np.empty((1, n // block), np.float32)
        xsum = np.empty((1, n // group), np.float32)
        _quantize_token(x[0], block, paired, xq[0], d[0], xsum[0], np.empty(n, np.int8))
        return xq, d, xsum

    @functools.lru_cache(maxsize=None)
    def block_kernel(bits: int, scale: str, row_in: str, row_out: str):
        """The attention block kernel of one token for q/k/v and o_proj weights of `bits` and scale kind
        `scale` (numba_packed.SCALE_KINDS), with the row kernels `row_in` (q/k/v) and `row_out` (o_proj)
        (numba_q8.row_kind); the four are closure constants, as in numba_q8.q8_kernels."""

        @cached_njit(parallel=PRANGE_ONLY, fastmath=FASTMATH)
        def block(x, qkv_addr, qkv_rows, o_addr, o_rows, block_size, group, q_norm, k_norm, eps, cos, sin, k_cache,
                  v_cache, slot, n, softmax_scale, sinks, parallel_heads, out):
            """out [1, hidden] = o_proj(attention(rope(norm(q)), cache + rope(norm(k)), v)) for one token x
            float32 [1, hidden]: qkv_addr int64 [3, 3] the q/k/v address table (numba_q8.linears_plan) and
            qkv_rows int64 [4] its row starts; o_addr [1, 3], o_rows [2] o_proj's; block_size and group: the
            q8 block and the weights' group size; q_norm, k_norm [D]; cos, sin [half] the token's RoPE angles;
            the new key and value are written at cache row `slot` of k_cache, v_cache [S, Hkv, D], and the
            query attends over rows 0 .. n-1; sinks [Hq] (-inf: none); parallel_heads: the query heads split
            across threads (else on the calling thread)."""
            Hkv, D = k_cache.shape[1], k_cache.shape[2]
            xq, d, xsum = _quantized(x, block_size, group, row_in == "paired")
            qkv = np.empty((1, qkv_rows[3]), np.float32)
            chunks = chunk_starts(qkv_rows)
            d8 = step_lanes(d, row_in)
            for c in prange(chunks[-1]):
                matvecs_chunk(c, qkv_addr, qkv_rows, chunks, xq, d, d8, xsum, qkv, bits, scale, row_in)
            normed = np.empty(D, np.float32)
            for h in range(Hkv):  # the new key and value, as numba_norms.qk_norm_rope and KVCacheBuffer.append
                rms_row(qkv[0, qkv_rows[1] + h * D : qkv_rows[1] + (h + 1) * D], k_norm, eps, normed)
                k_cache[slot, h, :] = normed
                rope_row(normed, cos, sin, k_cache[slot, h])
                v_cache[slot, h, :] = qkv[0, qkv_rows[2] + h * D : qkv_rows[2] + (h + 1) * D]
            att = np.empty((1, qkv_rows[1]), np.float32)
            if parallel_heads:
                for h in prange(sinks.shape[0]):
                    _query_head(h, qkv, q_norm, eps, cos, sin, k_cache, v_cache, n, softmax_scale, sinks, att)
            else:
                for h in range(sinks.shape[0]):
                    _query_head(h, qkv, q_norm, eps, cos, sin, k_cache, v_cache, n, softmax_scale, sinks, att)
            aq, ad, asum = _quantized(att, block_size, group, row_out == "paired")
            chunks = chunk_starts(o_rows)
            ad8 = step_lanes(ad, row_out)
            for c in prange(chunks[-1]):
                matvecs_chunk(c, o_addr, o_rows, chunks, aq, ad, ad8, asum, out, bits, scale, row_out)

        return block
