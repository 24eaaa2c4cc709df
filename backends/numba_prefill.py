"""A prompt's routed experts in the numba backend, a batch of experts at a time, with q8 activations.

In a prefill every expert of a layer meets the few prompt tokens routed to it (a 512-token prompt with
k = 8 of 128 experts: ~32 tokens each). Run expert by expert (Backend.packed_experts_prefill's default), each
expert costs two parallel regions plus serial NumPy work (gathering its rows, quantising them, SiLU,
scattering its output), and on 16 cores that serial work, not the kernels, was most of the experts' time
(docs/benchmarks.md, "The device table at the sixth session's start": 2.57 s of a 3.53 s prompt). Here a
batch of experts (every expert of a layer already in memory: runtime.engine.prefill_batches) takes:

1. the prompt's rows of x quantised once (numba_q8.quantize, a region over tokens): a token's q8 codes are
   the same whatever expert it meets; then, per call of at most CALL_BYTES of temporaries:
2. ``grouped_gate_up``: every expert's gate and up rows against its own rows of x (their codes gathered), in
   chunks of EXPERT_ROW_BLOCK rows of one expert, and the gated activation (numba_packed.gated) in the same
   chunk; the chunks go to the threads in runs of equal work (balanced_runs);
3. the hidden rows h quantised like x;
4. ``grouped_down``: chunks of hidden_size rows, each taking every expert of the call in turn and adding
   ``weight * (down_e . h + bias)`` into the prompt's output rows, so no two chunks write one value and each
   value's sum over the batch's experts is in the batch's order (as the default's).

The row dots are numba_q8's (``_rows_of_tokens``: tiles of Q8_TILE_TOKENS tokens), so each gate, up and down
output has the bits it has in numba_q8.linears; the activation and the weighted sum are float32 arithmetic
whose rounding may differ in the last bit from the default's NumPy (held to it by conformance).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from flashmoe.backends import numba_q8
from flashmoe.backends.numba_cache import cached_njit
from flashmoe.backends.numba_packed import EXPERT_ROW_BLOCK, FASTMATH, ROW_BLOCK, expert_view, gated
from flashmoe.backends.numba_x86 import Q8_TILE_TOKENS

try:
    import numba
    from numba import njit, prange
except ImportError:  # the numba backend reports it (numba_backend.unavailable_reason)
    njit = None


#: Bytes of temporaries (x's codes gathered per routed row, gate and h, h's codes) per kernel call: a layer's
#: experts in memory come as one batch (runtime.engine.prefill_batches), k rows per prompt token, so a batch
#: runs in calls of this size (~1,870 rows at Qwen3-30B's shapes: 3 calls a layer at 512 tokens, k = 8).
#: At one thread a call of 64 MiB (its h and the down outputs out of L2) took ~1.1x the time of 8 MiB ones.
CALL_BYTES = 16 << 20


if njit is not None:
    _rows_of_tokens = numba_q8._rows_of_tokens

    @njit(inline="always")
    def balanced_runs(first, nblk, parts):
        """int64 [parts + 1]: chunk c (expert c // nblk, whose work is its rows first[e + 1] - first[e]) goes to
        run p when runs[p] <= c < runs[p + 1], each run about 1 / parts of the total work. numba's prange
        gives each thread one contiguous run of its iterations, so a prange over chunks gave a thread the
        chunks of one or two experts and the region waited for the one with most tokens (a prompt's experts
        have 13-54 tokens each at 512 tokens, k = 8 of 128)."""
        n_experts = first.shape[0] - 1
        runs = np.full(parts + 1, n_experts * nblk, np.int64)
        runs[0] = 0
        total = (first[n_experts] - first[0]) * nblk
        done, p = 0, 1
        for c in range(n_experts * nblk):
            while p < parts and done * parts >= p * total:
                runs[p] = c
                p += 1
            e = c // nblk
            done += first[e + 1] - first[e]
        return runs

    @functools.lru_cache(maxsize=None)
    def grouped_kernels(bits: int, scale: str, row: str) -> SimpleNamespace:
        """The grouped kernels for one bit width, scale kind and row kernel (as numba_q8.q8_kernels: closure
        constants, so numba compiles only the row kernel that applies)."""

        @cached_njit(parallel=True, fastmath=FASTMATH)
        def grouped_gate_up(g_addr, u_addr, first, xq, d, xsum, g_bias, u_bias, act, gate, h, parts):
            """h[n, i] = gated(gate_e[i] . x_n + g_bias[e, i], up_e[i] . x_n + u_bias[e, i]) for the rows n
            of expert e, first[e] <= n < first[e + 1] (x given quantised; g_addr, u_addr int64 [E, 3];
            biases [E, inter] or [E, 0]; gate float32 [rows, inter] scratch). The chunks (EXPERT_ROW_BLOCK
            rows of one expert) go to the threads in `parts` runs of equal work (balanced_runs; parts: the
            threads)."""
            n_experts, inter = g_addr.shape[0], h.shape[1]
            n_words = xq.shape[1] * bits // 32
            nblk = (inter + EXPERT_ROW_BLOCK - 1) // EXPERT_ROW_BLOCK
            runs = balanced_runs(first, nblk, parts)
            d8 = numba_q8.step_lanes(d, row)
            for part in prange(runs.shape[0] - 1):
                cb = np.empty(d.shape[1], np.float32)
                tile = np.empty(Q8_TILE_TOKENS, np.float32)
                for c in range(runs[part], runs[part + 1]):
                    e = c // nblk
                    i0 = (c % nblk) * EXPERT_ROW_BLOCK
                    i1 = min(inter, i0 + EXPERT_ROW_BLOCK)
                    gw, gs, gb = expert_view(g_addr, e, inter, n_words, xsum.shape[1], scale)
                    uw, us, ub = expert_view(u_addr, e, inter, n_words, xsum.shape[1], scale)
                    for s0 in range(i0, i1, ROW_BLOCK):  # ROW_BLOCK gate and up rows stay in L1 over the tiles
                        s1 = min(i1, s0 + ROW_BLOCK)
                        for t0 in range(first[e], first[e + 1], Q8_TILE_TOKENS):
                            t1 = min(first[e + 1], t0 + Q8_TILE_TOKENS)
                            for i in range(s0, s1):
                                _rows_of_tokens(gw, gs, gb, i, xq, d, d8, xsum, t0, t1, cb, tile, bits, row, gate, i)
                            for i in range(s0, s1):
                                _rows_of_tokens(uw, us, ub, i, xq, d, d8, xsum, t0, t1, cb, tile, bits, row, h, i)
                    for n in range(first[e], first[e + 1]):
                        for i in range(i0, i1):
                            g, u = gate[n, i], h[n, i]
                            if g_bias.shape[1]:
                                g += g_bias[e, i]
                            if u_bias.shape[1]:
                                u += u_bias[e, i]
                            h[n, i] = gated(g, u, act)

        @cached_njit(parallel=True, fastmath=FASTMATH)
        def grouped_down(d_addr, first, hq, hd, hsum, d_bias, tokens, weights, y):
            """y[tokens[n], o] += weights[n] * (down_e[o] . h_n + d_bias[e, o]) for the rows n of each expert
            e in turn (h given quantised; d_bias [E, hidden] or [E, 0]). A chunk of EXPERT_ROW_BLOCK hidden
            rows goes through every expert of the call, each expert's outputs first in a chunk-sized scratch
            (a scratch of all [rows, hidden] outputs made a call of 64 experts 1.2x slower at one thread)."""
            n_experts, hidden = d_addr.shape[0], y.shape[1]
            n_words = hq.shape[1] * bits // 32
            most = 0
            for e in range(n_experts):
                most = max(most, first[e + 1] - first[e])
            hd8 = numba_q8.step_lanes(hd, row)
            for c in prange((hidden + EXPERT_ROW_BLOCK - 1) // EXPERT_ROW_BLOCK):
                o0 = c * EXPERT_ROW_BLOCK
                o1 = min(hidden, o0 + EXPERT_ROW_BLOCK)
                cb = np.empty(hd.shape[1], np.float32)
                tile = np.empty(Q8_TILE_TOKENS, np.float32)
                out = np.empty((most, EXPERT_ROW_BLOCK), np.float32)
                for e in range(n_experts):
                    w, s, b = expert_view(d_addr, e, hidden, n_words, hsum.shape[1], scale)
                    n0, n1 = first[e], first[e + 1]
                    # the expert's rows: tokens from 0
                    he, hde, hd8e, hse = hq[n0:n1], hd[n0:n1], hd8[n0:n1], hsum[n0:n1]
                    for t0 in range(0, n1 - n0, Q8_TILE_TOKENS):
                        t1 = min(n1 - n0, t0 + Q8_TILE_TOKENS)
                        for o in range(o0, o1):
                            _rows_of_tokens(w, s, b, o, he, hde, hd8e, hse, t0, t1, cb, tile, bits, row, out, o - o0)
                    for n in range(n0, n1):
                        for o in range(o0, o1):
                            v = out[n - n0, o - o0]
                            if d_bias.shape[1]:
                                v += d_bias[e, o]
                            y[tokens[n], o] += weights[n] * v

        return SimpleNamespace(grouped_gate_up=grouped_gate_up, grouped_down=grouped_down)


def experts_prefill(x: np.ndarray, gate_up, down, tables: np.ndarray, biases: list, tokens: list, weights: list,
                    act: np.ndarray, y: np.ndarray, call) -> None:
    """y[tokens[j]] += weights[j][:, None] * expert_j(x[tokens[j]]) for each expert j of a batch, in order, with
    q8 activations: x quantised once, then the experts in calls of at most CALL_BYTES of temporaries, each
    in two parallel regions for the kernels and one for quantising h (module docstring).

    x float32 [T, hidden]; gate_up, down: the projections' formats (numba_experts.FusedFormat, alike across the
    batch); tables int64 [3, E, 3]: the gate, up and down address tables, their memory alive meanwhile;
    biases: gate's, up's and down's float32 [E, out] ([E, 0]: none); tokens: per expert int64 [n_j], the
    prompt positions routed to it; weights: per expert float32 [n_j], their router weights; act as
    numba_packed.gated; y float32 [T, hidden], accumulated in place; call: numba_backend._call."""
    xq, xd, xsum, row = numba_q8.quantize(x, gate_up.bits, gate_up.group_size)  # a token's codes: whatever expert
    sizes = np.array([len(t) for t in tokens], np.int64)
    per_row = gate_up.in_features + 9 * gate_up.out_features  # bytes: x's codes, gate, h and h's codes
    max_rows = max(1, CALL_BYTES // per_row)
    start = 0
    while start < len(tokens):
        stop = start + max(1, int(np.searchsorted(np.cumsum(sizes[start:]), max_rows, side="right")))
        part = slice(start, stop)
        _experts_call((xq, xd, xsum, row), gate_up, down, tables[:, part], [b[part] for b in biases], tokens[part],
                      weights[part], act, y, call)
        start = stop


def _experts_call(xq8: tuple, gate_up, down, tables: np.ndarray, biases: list, tokens: list, weights: list,
                  act: np.ndarray, y: np.ndarray, call) -> None:
    """experts_prefill of some of the batch's experts, x given quantised (numba_q8.quantize's tuple)."""
    first = np.zeros(len(tokens) + 1, np.int64)
    np.cumsum([len(t) for t in tokens], out=first[1:])
    rows = np.concatenate(tokens)
    xq, xd, xsum, row = xq8
    xq, xd, xsum = xq[rows], xd[rows], xsum[rows]
    gate = np.empty((len(rows), gate_up.out_features), np.float32)
    h = np.empty_like(gate)
    work = len(rows) * gate_up.out_features * gate_up.in_features
    call(grouped_kernels(gate_up.bits, gate_up.scale, row).grouped_gate_up, 2 * work, tables[0], tables[1], first,
         xq, xd, xsum, biases[0], biases[1], act, gate, h, numba.get_num_threads())
    hq, hd, hsum, row = numba_q8.quantize(h, down.bits, down.group_size)
    call(grouped_kernels(down.bits, down.scale, row).grouped_down, work, tables[2], first, hq, hd, hsum, biases[2],
         rows, np.concatenate(weights).astype(np.float32), y)
