"""The numba backend's attention kernels: causal grouped-query attention over a KV cache, and a decode token's
whole attention block in one call.

``attention`` is Backend.attention (any number of queries). ``block_kernel`` makes the kernel of
Backend.attention_block for one token with q8 activations (Qwen3's attention: q/k/v projections, per-head q/k
RMSNorm and RoPE, the new key and value written into the cache, attention, o_proj): one compiled call instead
of the ~10 backend calls of the default composition (backends/base.py), each with its Python glue and
temporaries, and with no Python between its parallel regions (q/k/v rows, the attention's (kv head, chunk)
items when their work is large enough, o_proj rows), so the pool's workers still spin from one region when the
next begins (numba_backend's module docstring: OMP wait policy). Every step is the compiled function the separate
calls use (numba_q8.matvecs_chunk, numba_norms.rms_row and rope_row, attend_chunk and merge_chunks below),
so the block gives their bits (conformance/test_models.py).
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

    #: Cached positions per work item: attention runs one kv head's query heads over CHUNK positions at a time
    #: and merges the chunks' softmax sums (as flash-decoding does), so a decode token's long cache splits into
    #: (kv head, chunk) items across threads. Every path (the block or the separate call, one thread or many)
    #: splits at the same positions, so they give the same bits.
    CHUNK = 64

    @njit(fastmath=FASTMATH, inline="always")
    def attend_chunk(q, h0, G, k, v, kh, j0, j1, scale, s, m, l, o):
        """Query heads h0 .. h0+G-1 of q float32 [Hq, D] (those of kv head kh) over cached positions j0 .. j1-1
        of k, v [S, Hkv, D]: m [G] each head's largest scaled score, l [G] its sum of exp(score - m), and
        o [G, D] its sum of exp(score - m) * v; s: a float32 scratch [G, >= j1 - j0]. Each k and v row is read
        once for the G heads."""
        D = q.shape[1]
        j4 = j0 + (j1 - j0) // 4 * 4
        for j in range(j0, j4, 4):  # four positions a step: each query value loaded once for four keys
            for g in range(G):
                a0, a1, a2, a3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
                for d in range(D):
                    x = q[h0 + g, d]
                    a0 += x * k[j, kh, d]
                    a1 += x * k[j + 1, kh, d]
                    a2 += x * k[j + 2, kh, d]
                    a3 += x * k[j + 3, kh, d]
                s[g, j - j0], s[g, j + 1 - j0], s[g, j + 2 - j0], s[g, j + 3 - j0] = (a0 * scale, a1 * scale,
                                                                                      a2 * scale, a3 * scale)
        for j in range(j4, j1):
            for g in range(G):
                acc = np.float32(0.0)
                for d in range(D):
                    acc += q[h0 + g, d] * k[j, kh, d]
                s[g, j - j0] = acc * scale
        for g in range(G):
            mg = s[g, 0]
            for j in range(1, j1 - j0):
                mg = max(mg, s[g, j])
            total = np.float32(0.0)
            for j in range(j1 - j0):
                s[g, j] = np.exp(s[g, j] - mg)
                total += s[g, j]
            m[g] = mg
            l[g] = total
            for d in range(D):
                o[g, d] = 0.0
        for j in range(j0, j4, 4):  # four value rows a step: o loaded and stored once for four
            for g in range(G):
                p0, p1, p2, p3 = s[g, j - j0], s[g, j + 1 - j0], s[g, j + 2 - j0], s[g, j + 3 - j0]
                for d in range(D):
                    o[g, d] += p0 * v[j, kh, d] + p1 * v[j + 1, kh, d] + p2 * v[j + 2, kh, d] + p3 * v[j + 3, kh, d]
        for j in range(j4, j1):
            for g in range(G):
                p = s[g, j - j0]
                for d in range(D):
                    o[g, d] += p * v[j, kh, d]

    @njit(fastmath=FASTMATH, inline="always")
    def merge_chunks(M, L, O, sinks, h0, out):
        """out[h0 + g] [D] = softmax-weighted values of query head h0 + g from its chunks' attend_chunk sums
        M, L [C, G], O [C, G, D]; sinks [Hq] the heads' sink logits (-inf: none), which join the softmax's
        denominator with no value."""
        C, G, D = O.shape
        for g in range(G):
            mg = sinks[h0 + g]
            for c in range(C):
                mg = max(mg, M[c, g])
            total = np.exp(sinks[h0 + g] - mg)
            for d in range(D):
                out[h0 + g, d] = 0.0
            for c in range(C):
                f = np.exp(M[c, g] - mg)
                total += f * L[c, g]
                for d in range(D):
                    out[h0 + g, d] += f * O[c, g, d]
            inv = np.float32(1.0) / total
            for d in range(D):
                out[h0 + g, d] *= inv

    @njit(fastmath=FASTMATH, inline="always")
    def _chunk_sums(G, n, D):
        """Scratch for attend_chunk's sums over n positions in CHUNK runs: M, L [C, G], O [C, G, D]."""
        C = (n + CHUNK - 1) // CHUNK
        return np.empty((C, G), np.float32), np.empty((C, G), np.float32), np.empty((C, G, D), np.float32)

    @cached_njit(parallel=PRANGE_ONLY, fastmath=FASTMATH)
    def attention(q, k, v, q_positions, scale, sinks, out):
        """Backend.attention: out [T, Hq, D] for queries q [T, Hq, D] at q_positions int64 [T] over k, v
        [S, Hkv, D]; sinks float32 [Hq] (-inf: none)."""
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        # prange splits the items into one contiguous run per thread, and a causal prompt's work grows with t:
        # the queries are taken first with last (0, T-1, 1, T-2, ...), so every run holds as much work.
        for it in prange(T * Hkv):
            kh = it // T
            i = it % T
            t = i // 2 if i % 2 == 0 else T - 1 - i // 2
            n = q_positions[t] + 1
            M, L, O = _chunk_sums(G, n, D)
            s = np.empty((G, CHUNK), np.float32)
            for c in range(M.shape[0]):
                attend_chunk(q[t], kh * G, G, k, v, kh, c * CHUNK, min(n, (c + 1) * CHUNK), scale, s, M[c], L[c],
                             O[c])
            merge_chunks(M, L, O, sinks, kh * G, out[t])

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
            query attends over rows 0 .. n-1; sinks [Hq] (-inf: none); parallel_heads: the attention's (kv head,
            chunk) items split across threads (else on the calling thread)."""
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
            Hq = sinks.shape[0]
            G = Hq // Hkv
            q = np.empty((Hq, D), np.float32)
            for h in range(Hq):  # as numba_norms.qk_norm_rope
                rms_row(qkv[0, h * D : (h + 1) * D], q_norm, eps, normed)
                q[h, :] = normed
                rope_row(normed, cos, sin, q[h])
            C = (n + CHUNK - 1) // CHUNK
            M, L = np.empty((Hkv, C, G), np.float32), np.empty((Hkv, C, G), np.float32)
            O = np.empty((Hkv, C, G, D), np.float32)
            if parallel_heads:
                for it in prange(Hkv * C):
                    kh, ch = it // C, it % C
                    attend_chunk(q, kh * G, G, k_cache, v_cache, kh, ch * CHUNK, min(n, (ch + 1) * CHUNK),
                                 softmax_scale, np.empty((G, CHUNK), np.float32), M[kh, ch], L[kh, ch], O[kh, ch])
            else:
                s = np.empty((G, CHUNK), np.float32)
                for it in range(Hkv * C):
                    kh, ch = it // C, it % C
                    attend_chunk(q, kh * G, G, k_cache, v_cache, kh, ch * CHUNK, min(n, (ch + 1) * CHUNK),
                                 softmax_scale, s, M[kh, ch], L[kh, ch], O[kh, ch])
            att = np.empty((Hq, D), np.float32)
            for kh in range(Hkv):
                merge_chunks(M[kh], L[kh], O[kh], sinks, kh * G, att)
            att = att.reshape((1, Hq * D))
            aq, ad, asum = _quantized(att, block_size, group, row_out == "paired")
            chunks = chunk_starts(o_rows)
            ad8 = step_lanes(ad, row_out)
            for c in prange(chunks[-1]):
                matvecs_chunk(c, o_addr, o_rows, chunks, aq, ad, ad8, asum, out, bits, scale, row_out)

        return block
