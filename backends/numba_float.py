"""The numba backend's float-activation kernels of quantised weights (``--activations float``, and widths q8
does not take): a few tokens' mat-vec, the prefill mat-mat, embedding rows, and one decode token's fused k
experts. How they read the packed words (the input permuted to the packing, one partial dot per unit, then
groups folded with their scale and bias): numba_backend's module docstring.

Their own module so that their disk-cache stamp (numba_cache) covers only what they are compiled from: an
edit of numba_backend.py does not recompile them.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

try:
    import numba
    from numba import prange
except ImportError:  # numba_backend reports it through unavailable_reason
    numba = None

from flashmoe.backends.numba_cache import cached_njit
from flashmoe.backends.numba_packed import (EXPERT_ROW_BLOCK, FASTMATH, ROW_BLOCK, dequant_rows_permuted,
                                            expert_view, fold_groups, gated, unit_dots)


if numba is not None:

    @functools.lru_cache(maxsize=None)
    def kernels(bits: int, scale: str) -> SimpleNamespace:
        """The quantised kernels for one bit width and scale kind (numba_packed.SCALE_KINDS: float32 or bf16
        affine scales, or MXFP4's E8M0 bytes). Both are closure constants, so numba compiles (and caches on
        disk) one copy per format actually used, with every shift and mask folded and the code loop unrolled;
        passing them as arguments would leave them to run time."""
        e2m1 = scale == "e8m0"

        @cached_njit(parallel=True, fastmath=FASTMATH)
        def qmatvec(words, scales, biases, xp, xsum, out):
            """out[t, o] = W[o] . x[t] for a few tokens (decode): fused, no dequantised weight."""
            n_rows = words.shape[0]
            n_tok, _, nu = xp.shape
            for c in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
                pw = np.empty(max(nu, scales.shape[1]), np.float32)  # per unit, or per group of 16
                for o in range(c * ROW_BLOCK, min(n_rows, c * ROW_BLOCK + ROW_BLOCK)):
                    for t in range(n_tok):
                        unit_dots(words[o], xp[t], pw, bits, e2m1)
                        out[t, o] = fold_groups(pw, scales[o], biases[o], xsum[t], e2m1)

        @cached_njit(parallel=True, fastmath=FASTMATH)
        def qmatmat(words, scales, biases, xp, out):
            """out[t, o] = W[o] . x[t] for many tokens (prefill): each block of rows is dequantised once
            into a per-thread tile (permuted layout, so it meets xp directly) and used by every token."""
            n_rows = words.shape[0]
            n_tok, cpu, nu = xp.shape
            for c in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
                r0 = c * ROW_BLOCK
                r1 = min(n_rows, r0 + ROW_BLOCK)
                tile = np.empty((ROW_BLOCK, cpu, nu), np.float32)
                dequant_rows_permuted(words, scales, biases, bits, e2m1, r0, r1, tile)
                for t in range(n_tok):
                    xt = xp[t]
                    for r in range(r1 - r0):
                        acc = np.float32(0.0)
                        for j in range(cpu):
                            for u in range(nu):
                                acc += tile[r, j, u] * xt[j, u]
                        out[t, r0 + r] = acc

        @cached_njit(parallel=True, fastmath=FASTMATH)
        def qrows(words, scales, biases, ids, out):
            """out[i] = dequantised row ids[i], permuted layout [n, cpu, nu] (embedding lookup)."""
            for i in prange(ids.shape[0]):
                tile = np.empty((1, out.shape[1], out.shape[2]), np.float32)
                dequant_rows_permuted(words, scales, biases, bits, e2m1, ids[i], ids[i] + 1, tile)
                out[i] = tile[0]

        @cached_njit(parallel=True, fastmath=FASTMATH)
        def experts_gate_up(g_addr, u_addr, xp, xsum, g_bias, u_bias, act, h):
            """h[e, i] = gated(gate_e[i] . x + g_bias[e, i], up_e[i] . x + u_bias[e, i]) for the k experts of
            one token (numba_packed.gated: SwiGLU, or gpt-oss's clamped one when act = [limit, alpha]).

            g_addr, u_addr: int64 [k, 3] addresses of each expert's words / scales / biases; g_bias, u_bias
            float32 [k, inter], or [k, 0] for experts without biases."""
            k, inter = h.shape
            n_words = xp.shape[1] * xp.shape[2] * bits // 32
            nblk = (inter + EXPERT_ROW_BLOCK - 1) // EXPERT_ROW_BLOCK
            for c in prange(k * nblk):
                e = c // nblk
                gw, gs, gb = expert_view(g_addr, e, inter, n_words, xsum.shape[1], scale)
                uw, us, ub = expert_view(u_addr, e, inter, n_words, xsum.shape[1], scale)
                pw = np.empty(max(xp.shape[2], xsum.shape[1]), np.float32)
                gate = np.empty(EXPERT_ROW_BLOCK, np.float32)
                i0 = (c % nblk) * EXPERT_ROW_BLOCK
                i1 = min(inter, i0 + EXPERT_ROW_BLOCK)
                for i in range(i0, i1):  # the chunk's gate rows, then its up rows: two contiguous runs
                    unit_dots(gw[i], xp[0], pw, bits, e2m1)
                    gate[i - i0] = fold_groups(pw, gs[i], gb[i], xsum[0], e2m1)
                    if g_bias.shape[1]:
                        gate[i - i0] += g_bias[e, i]
                for i in range(i0, i1):
                    unit_dots(uw[i], xp[0], pw, bits, e2m1)
                    v = fold_groups(pw, us[i], ub[i], xsum[0], e2m1)
                    if u_bias.shape[1]:
                        v += u_bias[e, i]
                    h[e, i] = gated(gate[i - i0], v, act)

        @cached_njit(parallel=True, fastmath=FASTMATH)
        def experts_down(d_addr, hp, hsum, d_bias, weights, out):
            """out[o] = sum_e weights[e] * (down_e[o] . h_e + d_bias[e, o]) (d_bias float32 [k, hidden], or
            [k, 0] without biases). A chunk of hidden rows reads one expert's rows for the whole chunk
            before the next expert's (contiguous reads, not k interleaved ones)."""
            k = hp.shape[0]
            n_rows = out.shape[0]
            n_words = hp.shape[1] * hp.shape[2] * bits // 32
            for c in prange((n_rows + EXPERT_ROW_BLOCK - 1) // EXPERT_ROW_BLOCK):
                o0 = c * EXPERT_ROW_BLOCK
                o1 = min(n_rows, o0 + EXPERT_ROW_BLOCK)
                pw = np.empty(max(hp.shape[2], hsum.shape[1]), np.float32)
                acc = np.zeros(EXPERT_ROW_BLOCK, np.float32)
                for e in range(k):
                    dw, ds, db = expert_view(d_addr, e, n_rows, n_words, hsum.shape[1], scale)
                    for o in range(o0, o1):
                        unit_dots(dw[o], hp[e], pw, bits, e2m1)
                        v = fold_groups(pw, ds[o], db[o], hsum[e], e2m1)
                        if d_bias.shape[1]:
                            v += d_bias[e, o]
                        acc[o - o0] += weights[e] * v
                out[o0:o1] = acc[: o1 - o0]

        return SimpleNamespace(qmatvec=qmatvec, qmatmat=qmatmat, qrows=qrows, experts_gate_up=experts_gate_up,
                               experts_down=experts_down)
