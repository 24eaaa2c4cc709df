"""q8 kernels of the numba backend: int8 activations against the packed weight codes, int32 dot products.

The numerics are those of flashmoe.reference.q8 (read its docstring first): the input vector is quantised
once per call to int8 in blocks of 32 with a float32 scale ``d_b``; each block's dot product with the
weight codes is exact in int32; a row is

    y = sum_b c_b * (q_b . xq_b) + sum_g bias_g * xsum_g,      c_b = d_b * scale_g(b)

where xsum are the float group sums of x. ``c_b`` is formed per row in a small scratch, so the integer dot
needs no knowledge of the group size; the x86 4-bit rows in groups of 64 or more (one weight scale per 64
inputs or fewer) form it in the dot's loop instead (numba_x86.q4_group_row_dot: the same float32 products),
from the token's activation scales laid out once per call in the loop's lanes (step_lanes).

On x86 with AVX2 every affine width takes an LLVM-intrinsic row kernel (numba_x86.py: vpdpbusd, or
vpmaddubsw + vpmaddwd; row_kind names which). For 4-bit weights in groups of 32 or more the int8 inputs are
stored in *paired* order: in each run of 64, the 32 even positions then the 32 odd ones, matching the
low/high nibbles of 32 consecutive code bytes (code 2i is byte i's low nibble, code 2i+1 its high one; MLX
packs least significant bits first). 2-, 3-, 5- and 6-bit codes, and any width in groups of 16 (GGUF's
K-quants: activation blocks of 16), take the *units* kernel: each unit of 32 codes (4·bits bytes) unpacked to
bytes, inputs in natural order. 8-bit codes in groups of 32 or more meet inputs in natural order through
their own kernel. The portable loop (natural order), which unpacks each code with numba_packed's ``code``,
serves CPUs without AVX2; the results are the same up to float32 rounding.

Calls of many tokens (prefill) run the same row kernel over tiles of Q8_TILE_TOKENS tokens: one pass over a
row's codes computes the row's dot with each token of the tile, each token's sums in the same order as
alone, so a token's output is the same bits whatever else is in its call.

MXFP4 weights (E8M0 scale bytes: numba_packed's scale kind 'e8m0') share every kernel here; only the row dot
differs (flashmoe.reference.q8: twice an E2M1 value is an integer in [-12, 12], so a block's dot is exact in
int32 and ``y = sum_b 2^(s_b - 128) * d_b * (2·E2M1(code_b) . xq_b)``, no bias term): on x86 the 4-bit
kernels' loop with E2M1 codes (numba_x86), elsewhere a portable loop. q8 prefill beat the float mat-mat
1.5-2.6x on gpt-oss expert shapes even before the tiles (docs/benchmarks.md, "Prefill on the CPU").
"""

from __future__ import annotations

import functools
import itertools
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

try:
    import numba
    from numba import njit, prange, types
    from numba.extending import overload

    from flashmoe.backends.numba_x86 import (UNIT_KERNELS, e2m1_row_dot, e2m1_tile_dot, q4_group_row_dot,
                                             q4_row_dot, q4_tile_dot, q8w_row_dot)
except ImportError:  # the numba backend reports it (numba_backend.unavailable_reason)
    numba = None

from flashmoe.backends.numba_cache import cached_njit
from flashmoe.backends.numba_packed import (EXPERT_ROW_BLOCK, FASTMATH, PRANGE_ONLY, ROW_BLOCK, code, expert_view,
                                            gated, u32_as_f32, widen)
from flashmoe.backends.numba_x86 import INT8_INSTRUCTIONS, Q8_TILE_TOKENS, UNIT_BITS, X86_BYTES
from flashmoe.format.mxfp4 import SCALE_BIAS
from flashmoe.reference.q8 import FP4_DOUBLED, Q8_BLOCK, q8_block

#: 2^(s − 128) for every E8M0 byte s, float32: the scale of MXFP4's doubled E2M1 values (all finite).
HALF_SCALE_VALUES = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - SCALE_BIAS - 1).astype(np.float32)
#: Calls of at least this many tokens (prompts) are quantised with the tokens split across threads; a
#: 2048-wide token takes a few microseconds, so below this a parallel region's start-up outweighs the split.
PARALLEL_QUANTIZE_TOKENS = 32


def row_kind(bits: int, in_features: int, group_size: int) -> str:
    """Which row kernel takes weights of `bits`, `group_size` and `in_features` (a compile-time constant of
    q8_kernels; module docstring): 'paired' (x86, 4-bit in groups of 32 or more, inputs in runs of 64: x is
    quantised in paired order), 'units1' / 'units2' (x86, any other width in UNIT_BITS, units of 32 codes
    holding 1 activation block, or 2 for groups of 16), or 'natural' (8-bit codes in groups of 32 or more,
    by the 8-bit row kernel on x86, and everything on other CPUs: the portable loop)."""
    if INT8_INSTRUCTIONS is None or (bits == 8 and group_size >= Q8_BLOCK):
        return "natural"
    if bits == 4 and in_features % 64 == 0 and group_size >= Q8_BLOCK:
        return "paired"
    if bits in UNIT_BITS and in_features % 32 == 0:
        return "units1" if group_size >= Q8_BLOCK else "units2"
    return "natural"


if numba is not None:

    @njit(inline="always")
    def _q8_code(v, inv):
        """roundf(v * inv) clipped to +-127, as int32 (flashmoe.reference.q8.round_half_away); branch-free
        but for a select, so the loops calling it vectorise."""
        s = v * inv
        a = abs(s)
        whole = np.floor(a)
        r = np.int32(min(whole + np.floor(np.float32(2.0) * (a - whole)), np.float32(127.0)))
        return r if s >= 0 else -r

    @njit(fastmath=FASTMATH, inline="always")
    def _quantize_row(x, block, codes, d, xsum):
        """One token's codes (natural order), block scales and group sums; ``block`` a literal (32 or 16), so
        the loops vectorise. Block maxima are taken on the bits (|x| as uint32 orders like the float, and a
        NaN stays the largest)."""
        bits = x.view(np.uint32)
        bpg = d.shape[0] // xsum.shape[0]
        xsum[:] = 0.0
        for b in range(d.shape[0]):
            m = np.uint32(0)
            for i in range(b * block, b * block + block):
                m = max(m, bits[i] & np.uint32(0x7FFFFFFF))
            d[b] = u32_as_f32(m) / np.float32(127.0)
            inv = np.float32(1.0) / d[b] if m != 0 else np.float32(0.0)
            total = np.int32(0)
            for i in range(b * block, b * block + block):
                c = _q8_code(x[i], inv)
                codes[i] = np.int8(c)
                total += c
            xsum[b // bpg] += d[b] * np.float32(total)

    @njit(fastmath=FASTMATH, inline="always")
    def _quantize_token(x, block, paired, xq, d, xsum, codes):
        """One token's quantize_q8: codes, an int8 scratch [n] for paired order."""
        if block == 32:
            _quantize_row(x, 32, codes if paired else xq, d, xsum)
        elif block == 16:
            _quantize_row(x, 16, codes if paired else xq, d, xsum)
        else:
            _quantize_row(x, block, codes if paired else xq, d, xsum)
        if paired:  # in each run of 64: its 32 even positions, then its 32 odd ones
            o, pairs = xq.view(np.uint8), codes.view(np.uint16)
            for r in range(0, x.shape[0], 64):
                lo, hi, pr = o[r : r + 32], o[r + 32 : r + 64], pairs[r // 2 : r // 2 + 32]
                for i in range(32):
                    lo[i] = np.uint8(pr[i] & np.uint16(0xFF))
                    hi[i] = np.uint8(pr[i] >> np.uint16(8))

    @cached_njit(fastmath=FASTMATH)
    def quantize_q8(x, block, paired, xq, d, xsum):
        """x float32 [T, n] -> xq int8 [T, n] (natural or paired order), d float32 [T, n / block] and the
        group sums of the dequantised activations xsum [T, n / group_size] (sum_b d_b * sum(xq_b)), rounding
        exactly as flashmoe.reference.q8.quantize_q8. Paired order is made from the natural codes read as
        uint16 pairs (even code in the low byte), so that loop vectorises too."""
        codes = np.empty(x.shape[1], np.int8)
        for t in range(x.shape[0]):
            _quantize_token(x[t], block, paired, xq[t], d[t], xsum[t], codes)

    @cached_njit(parallel=True, fastmath=FASTMATH)
    def quantize_q8_tokens(x, block, paired, xq, d, xsum):
        """quantize_q8 with the tokens split across threads (a prompt's rows), the same bits."""
        for t in prange(x.shape[0]):
            _quantize_token(x[t], block, paired, xq[t], d[t], xsum[t], np.empty(x.shape[1], np.int8))

    @njit(inline="always")
    def _plain_row_dot(wrow, xq, cb, bits):
        """The portable q8 row dot: sum_b cb[b] * sum_{i in b} code_i * xq_i (natural order)."""
        cpu = 32 // bits if 32 % bits == 0 else 32
        block = xq.shape[0] // cb.shape[0]
        acc = np.float32(0.0)
        for b in range(cb.shape[0]):
            s = np.int32(0)
            for i in range(b * block, b * block + block):
                s += np.int32(code(wrow, i // cpu, i % cpu, bits)) * np.int32(xq[i])
            acc += cb[b] * np.float32(s)
        return acc

    @njit(inline="always")
    def _e2m1_portable_row_dot(wrow, xq, d, srow, pow2):
        """e2m1_row_dot's sum by plain loops, inputs in natural order."""
        acc = np.float32(0.0)
        for b in range(srow.shape[0]):
            s = np.int32(0)
            for i in range(b * 32, b * 32 + 32):
                s += np.int32(FP4_DOUBLED[code(wrow, i // 8, i % 8, 4)]) * np.int32(xq[i])
            acc += pow2[srow[b]] * (d[b] * np.float32(s))
        return acc

    @njit(fastmath=FASTMATH, inline="always")
    def _row_scales_fixed(srow, brow, d, xsum, cb, bpg, with_bias):
        bias = np.float32(0.0)
        for g in range(srow.shape[0]):
            s = widen(srow[g])
            for i in range(bpg):
                cb[g * bpg + i] = d[g * bpg + i] * s
            if with_bias:
                bias += widen(brow[g]) * xsum[g]
        return bias

    @njit(fastmath=FASTMATH, inline="always")
    def _row_scales(srow, brow, d, xsum, cb, with_bias):
        """cb[b] = d_b * scale_g(b) for one row and token (one float32 product each); returns the bias term
        sum_g bias_g * xsum_g summed in this loop when ``with_bias`` (a literal), else 0 (the x86 4-bit and
        units rows add _bias's sum: each path keeps the order of sums its recorded outputs were made with).
        Blocks per group as a literal (group 32, 64, 128), so the loops vectorise."""
        bpg = cb.shape[0] // srow.shape[0]
        if bpg == 2:
            return _row_scales_fixed(srow, brow, d, xsum, cb, 2, with_bias)
        if bpg == 1:
            return _row_scales_fixed(srow, brow, d, xsum, cb, 1, with_bias)
        if bpg == 4:
            return _row_scales_fixed(srow, brow, d, xsum, cb, 4, with_bias)
        return _row_scales_fixed(srow, brow, d, xsum, cb, bpg, with_bias)

    @njit(fastmath=FASTMATH, inline="always")
    def _bias(brow, xsum):
        """The bias term sum_g bias_g * xsum_g of one row and token."""
        bias = np.float32(0.0)
        for g in range(brow.shape[0]):
            bias += widen(brow[g]) * xsum[g]
        return bias

    @njit(inline="always")
    def _group_shift(srow, d):
        """log2(activation blocks per weight group), for the x86 4-bit kernel's scale index."""
        shift = 0
        while (1 << shift) * srow.shape[0] < d.shape[-1]:
            shift += 1
        return shift

    @njit
    def _step_lanes(d):
        d8 = np.empty((d.shape[0], 4 * d.shape[1]), np.float32)
        for t in range(d.shape[0]):
            for b in range(d.shape[1]):
                for i in range(4):
                    d8[t, 4 * b + i] = d[t, b]
        return d8

    @njit(inline="always")
    def step_lanes(d, row):
        """float32 [T, 4 * blocks] with d[t, b] at 4b..4b+3 (each activation block's scale in the 4 int32 lanes
        its products take in a step of the x86 4-bit paired kernel, numba_x86.q4_group_row_dot, which loads
        a step's 8 as one vector) when ``row`` (a literal) is 'paired'; d itself for the other row kernels,
        which do not read it. Made once per kernel call, outside its parallel loop (an njit call, so no
        parallel region of its own)."""
        if row == "paired":
            return _step_lanes(d)
        return d

    @njit(fastmath=FASTMATH, inline="always")
    def _rows_of_tokens(w, s, b, o, xq, d, d8, xsum, t0, t1, cb, tile, bits, row, out, col):
        """out[t, col] = row o of (w, s, b) . x[t] for tokens t0..t1-1: Q8_TILE_TOKENS at a time (_tile), the
        rest one by one (_row; d8: step_lanes(d)); the values are the same."""
        t = t0
        while t + Q8_TILE_TOKENS <= t1:
            _tile(w[o], s[o], b[o], xq, d, xsum, t, tile, cb, bits, row)
            for i in range(Q8_TILE_TOKENS):
                out[t + i, col] = tile[i]
            t += Q8_TILE_TOKENS
        for u in range(t, t1):
            out[u, col] = _row(w[o], s[o], b[o], xq[u], d[u], d8[u], xsum[u], cb, bits, row)

    @njit(inline="always")
    def chunk_starts(first_row):
        """int64 [m + 1]: where the chunks of ROW_BLOCK rows of each of m matrices start (first_row int64 [m + 1]:
        where their rows start, then the total), then the number of chunks."""
        m = first_row.shape[0] - 1
        first_chunk = np.zeros(m + 1, np.int64)
        for i in range(m):
            first_chunk[i + 1] = first_chunk[i] + (first_row[i + 1] - first_row[i] + ROW_BLOCK - 1) // ROW_BLOCK
        return first_chunk

    @njit(fastmath=FASTMATH, inline="always")
    def matvecs_chunk(c, addr, first_row, first_chunk, xq, d, d8, xsum, out, bits, scale, row):
        """Chunk c (chunk_starts) of q8_kernels' matvecs: its ROW_BLOCK rows of one matrix of the address table
        addr with every token of x (quantised: xq, d, xsum; d8 = step_lanes(d, row)), the tokens a tile
        (Q8_TILE_TOKENS) at a time; bits, scale and row are the calling kernel's literals. One token (decode)
        takes its views once for the chunk: a view taken in the row loop costs each row a reference count's
        increment and decrement (atomic; NRT_incref/decref calls) that numba does not hoist."""
        i = 0
        while first_chunk[i + 1] <= c:
            i += 1
        rows = first_row[i + 1] - first_row[i]
        w, s, b = expert_view(addr, i, rows, xq.shape[1] * bits // 32, xsum.shape[1], scale)
        cb = np.empty(d.shape[1], np.float32)
        tile = np.empty(Q8_TILE_TOKENS, np.float32)
        r0 = (c - first_chunk[i]) * ROW_BLOCK
        if xq.shape[0] == 1:  # _rows_of_tokens' row for one token
            x0, d0, d80, xsum0 = xq[0], d[0], d8[0], xsum[0]
            for o in range(r0, min(rows, r0 + ROW_BLOCK)):
                out[0, first_row[i] + o] = _row(w[o], s[o], b[o], x0, d0, d80, xsum0, cb, bits, row)
        else:
            for t0 in range(0, xq.shape[0], Q8_TILE_TOKENS):
                for o in range(r0, min(rows, r0 + ROW_BLOCK)):
                    _rows_of_tokens(w, s, b, o, xq, d, d8, xsum, t0, min(xq.shape[0], t0 + Q8_TILE_TOKENS), cb, tile,
                                    bits, row, out, first_row[i] + o)

    @njit(fastmath=FASTMATH, inline="always")
    def _natural_row(wrow, srow, brow, xq, d, xsum, cb, bits):
        """One affine output row, inputs in natural order: the integer block dots scaled by d_b * scale_g
        (formed per row in the scratch cb), plus the bias term; 8-bit codes in blocks of 32 by the x86 8-bit
        row kernel where it exists (the portable loop's scales and order of sums), else the portable loop."""
        bias = _row_scales(srow, brow, d, xsum, cb, True)
        if X86_BYTES and bits == 8 and xq.shape[0] == 32 * cb.shape[0]:
            return q8w_row_dot(wrow, xq, cb) + bias
        return _plain_row_dot(wrow, xq, cb, bits) + bias

    def _row(wrow, srow, brow, xq, d, d8, xsum, cb, bits, row):
        """One output row of codes wrow (uint32 words) with one token's q8 inputs xq (int8), d (float32 per
        block), d8 (its step_lanes), xsum (its group sums); cb a float32 scratch [blocks]; bits and row
        (row_kind) literals. The format follows the scales' dtype: E8M0 bytes (uint8) are MXFP4's row (no
        bias), float32 or bf16 bits an affine one; the x86 row kernels (numba_x86) add the bias term sum_g
        bias_g * xsum_g."""
        raise NotImplementedError("only callable from numba-compiled code")

    def _tile(wrow, srow, brow, xq, d, xsum, t0, tile, cb, bits, row):
        """tile[i] = _row of one row with token t0 + i for i < Q8_TILE_TOKENS (xq, d, xsum: all the tokens):
        one pass over the row's codes for the x86 kernels, token by token for the portable ones."""
        raise NotImplementedError("only callable from numba-compiled code")

    def _x86_row_kernels(srow, bits, row):
        """(row_dot, tile_dot) of the x86 kernel for literal `bits` and `row` and the scales' dtype, or None
        (the portable loops)."""
        if row.literal_value == "paired":
            return (e2m1_row_dot, e2m1_tile_dot) if srow.dtype == types.uint8 else (q4_row_dot, q4_tile_dot)
        if row.literal_value.startswith("units") and srow.dtype != types.uint8:
            return UNIT_KERNELS[bits.literal_value, int(row.literal_value[-1])]
        return None

    def _literals(bits, row):
        return isinstance(bits, types.IntegerLiteral) and isinstance(row, types.StringLiteral)

    @overload(_row, inline="always")
    def _row_impl(wrow, srow, brow, xq, d, d8, xsum, cb, bits, row):
        if not _literals(bits, row):
            return None  # numba retries with the closure constants as literals
        kernels = _x86_row_kernels(srow, bits, row)
        if kernels is None and srow.dtype == types.uint8:
            return lambda wrow, srow, brow, xq, d, d8, xsum, cb, bits, row: _e2m1_portable_row_dot(
                wrow, xq, d, srow, HALF_SCALE_VALUES)
        if kernels is None:
            return lambda wrow, srow, brow, xq, d, d8, xsum, cb, bits, row: _natural_row(wrow, srow, brow, xq, d, xsum,
                                                                                     cb, bits)
        row_dot = kernels[0]
        if srow.dtype == types.uint8:
            return lambda wrow, srow, brow, xq, d, d8, xsum, cb, bits, row: row_dot(wrow, xq, d, srow,
                                                                                     HALF_SCALE_VALUES)

        def affine(wrow, srow, brow, xq, d, d8, xsum, cb, bits, row):
            _row_scales(srow, brow, d, xsum, cb, False)
            return row_dot(wrow, xq, cb, srow, 0) + _bias(brow, xsum)

        if row.literal_value != "paired":
            return affine

        def paired(wrow, srow, brow, xq, d, d8, xsum, cb, bits, row):
            shift = _group_shift(srow, d)
            if shift == 0:  # groups of 32: two weight scales per step
                _row_scales(srow, brow, d, xsum, cb, False)
                return row_dot(wrow, xq, cb, srow, 0) + _bias(brow, xsum)
            return q4_group_row_dot(wrow, xq, d8, srow, shift - 1) + _bias(brow, xsum)

        return paired

    @overload(_tile, inline="always")
    def _tile_impl(wrow, srow, brow, xq, d, xsum, t0, tile, cb, bits, row):
        if not _literals(bits, row):
            return None

        kernels = _x86_row_kernels(srow, bits, row)
        if kernels is None:
            def tokens(wrow, srow, brow, xq, d, xsum, t0, tile, cb, bits, row):
                for i in range(Q8_TILE_TOKENS):
                    # the portable rows read no step lanes (step_lanes): d in their place
                    tile[i] = _row(wrow, srow, brow, xq[t0 + i], d[t0 + i], d[t0 + i], xsum[t0 + i], cb, bits,
                                   row)

            return tokens
        tile_dot = kernels[1]
        if srow.dtype == types.uint8:
            return lambda wrow, srow, brow, xq, d, xsum, t0, tile, cb, bits, row: tile_dot(
                wrow, xq, d, srow, HALF_SCALE_VALUES, t0, tile)

        def affine(wrow, srow, brow, xq, d, xsum, t0, tile, cb, bits, row):
            tile_dot(wrow, xq, d, srow, _group_shift(srow, d), t0, tile)
            for i in range(Q8_TILE_TOKENS):
                tile[i] = tile[i] + _bias(brow, xsum[t0 + i])

        return affine

    @functools.lru_cache(maxsize=None)
    def q8_kernels(bits: int, scale: str, row: str) -> SimpleNamespace:
        """The q8 kernels for one bit width, scale kind (numba_packed.SCALE_KINDS: affine float32 or bf16, or
        MXFP4's E8M0) and row kernel (row_kind); the three are closure constants, so numba compiles only the
        row kernel that applies."""

        @cached_njit(parallel=PRANGE_ONLY, fastmath=FASTMATH)
        def matvecs(addr, first_row, xq, d, xsum, out):
            """out[t, first_row[m] + o] = W_m[o] . x[t] for each token (decode or prefill) and each matrix m of
            the address table addr int64 [m, 3] (words, scales, biases; one in_features), x given quantised
            (quantize_q8); first_row int64 [m + 1]: where each matrix's rows start in out, then the total.
            One parallel region for all the matrices (PRANGE_ONLY), chunks of ROW_BLOCK rows within one matrix
            (matvecs_chunk)."""
            first_chunk = chunk_starts(first_row)
            d8 = step_lanes(d, row)
            for c in prange(first_chunk[-1]):
                matvecs_chunk(c, addr, first_row, first_chunk, xq, d, d8, xsum, out, bits, scale, row)

        @cached_njit(parallel=PRANGE_ONLY, fastmath=FASTMATH)
        def experts_gate_up(g_addr, u_addr, xq, d, xsum, g_bias, u_bias, act, h):
            """h[e, i] = gated(gate_e[i] . x + g_bias[e, i], up_e[i] . x + u_bias[e, i]) for the k experts of
            one token (x quantised; numba_packed.gated, act as there; biases [k, inter] or [k, 0])."""
            k, inter = h.shape
            n_words = xq.shape[1] * bits // 32
            nblk = (inter + EXPERT_ROW_BLOCK - 1) // EXPERT_ROW_BLOCK
            # the token's views taken once: a view taken in the row loop costs each row a reference count's
            # increment and decrement (atomic; NRT_incref/decref calls) that numba does not hoist
            x0, d0, d80, xsum0 = xq[0], d[0], step_lanes(d, row)[0], xsum[0]
            for c in prange(k * nblk):
                e = c // nblk
                cb = np.empty(d.shape[1], np.float32)
                gate = np.empty(EXPERT_ROW_BLOCK, np.float32)
                i0 = (c % nblk) * EXPERT_ROW_BLOCK
                i1 = min(inter, i0 + EXPERT_ROW_BLOCK)
                for up in range(2):  # the chunk's gate rows, then its up rows: two contiguous runs
                    w, s, b = expert_view(u_addr if up else g_addr, e, inter, n_words, xsum.shape[1], scale)
                    bias = u_bias if up else g_bias
                    for i in range(i0, i1):
                        v = _row(w[i], s[i], b[i], x0, d0, d80, xsum0, cb, bits, row)
                        if bias.shape[1]:
                            v += bias[e, i]
                        if up:
                            h[e, i] = gated(gate[i - i0], v, act)
                        else:
                            gate[i - i0] = v

        @cached_njit(parallel=PRANGE_ONLY, fastmath=FASTMATH)
        def experts_down(d_addr, hq, hd, hsum, d_bias, weights, out):
            """out[o] = sum_e weights[e] * (down_e[o] . h_e + d_bias[e, o]), h_e given quantised (d_bias
            [k, hidden] or [k, 0]); a chunk of hidden rows reads one expert's rows for the whole chunk before
            the next expert's."""
            k = hq.shape[0]
            n_rows = out.shape[0]
            n_words = hq.shape[1] * bits // 32
            hd8 = step_lanes(hd, row)
            for c in prange((n_rows + EXPERT_ROW_BLOCK - 1) // EXPERT_ROW_BLOCK):
                o0 = c * EXPERT_ROW_BLOCK
                o1 = min(n_rows, o0 + EXPERT_ROW_BLOCK)
                cb = np.empty(hd.shape[1], np.float32)
                acc = np.zeros(EXPERT_ROW_BLOCK, np.float32)
                for e in range(k):
                    w, s, b = expert_view(d_addr, e, n_rows, n_words, hsum.shape[1], scale)
                    he, hde, hd8e, hse = hq[e], hd[e], hd8[e], hsum[e]  # not in the row loop (experts_gate_up)
                    for o in range(o0, o1):
                        v = _row(w[o], s[o], b[o], he, hde, hd8e, hse, cb, bits, row)
                        if d_bias.shape[1]:
                            v += d_bias[e, o]
                        acc[o - o0] += weights[e] * v
                out[o0:o1] = acc[: o1 - o0]

        return SimpleNamespace(matvecs=matvecs, experts_gate_up=experts_gate_up, experts_down=experts_down)


def quantize(x: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """x float32 [T, n] -> (xq int8 [T, n], d float32 [T, n / block], xsum float32 [T, n / group_size], row):
    the q8 activations in the order the row kernel for `bits` reads (row_kind: paired order for 'paired')."""
    T, n = x.shape
    block = q8_block(group_size)
    row = row_kind(bits, n, group_size)
    xq = np.empty((T, n), np.int8)
    d = np.empty((T, n // block), np.float32)
    xsum = np.empty((T, n // group_size), np.float32)
    kernel = quantize_q8_tokens if T >= PARALLEL_QUANTIZE_TOKENS else quantize_q8
    kernel(x, block, row == "paired", xq, d, xsum)
    return xq, d, xsum, row


class LinearsPlan(NamedTuple):
    """What a q8 call of matrices of one input and format needs besides x (linears_plan): made once per tuple
    of resident weights by the backend, so a decode layer's calls skip it."""

    bits: int
    group_size: int
    first_row: np.ndarray  # int64 [m + 1]: where each matrix's rows start in the output, then the total
    addr: np.ndarray  # int64 [m, 3]: the matrices' words, scales and biases (their memory alive meanwhile)
    matvecs: object  # the compiled q8_kernels(...).matvecs for their format and row kernel
    in_features: int
    scale: str  # their scale kind (numba_packed.SCALE_KINDS)
    row: str  # their row kernel (row_kind)
    # the KernelWeights addr points into, held while the plan is, where the caller may not hold them (weights
    # converted for this call: float16 scales); () in a plan kept beside weak references to its weights
    weights: tuple


def linears_plan(ws: list, addresses) -> LinearsPlan:
    """The LinearsPlan of KernelWeights ``ws`` (numba_backend) of one bits, group size, in_features and scale
    dtype; ``addresses`` builds their int64 [m, 3] address table (numba_backend._addresses)."""
    w = ws[0]
    row = row_kind(w.bits, w.in_features, w.group_size)
    first_row = np.array([0, *itertools.accumulate(v.out_features for v in ws)], np.int64)
    return LinearsPlan(w.bits, w.group_size, first_row, addresses(ws), q8_kernels(w.bits, w.scale, row).matvecs,
                       w.in_features, w.scale, row, tuple(ws))


def linears(x: np.ndarray, plan: LinearsPlan, call) -> list[np.ndarray]:
    """[x · W_m^T for each m]: x float32 [T, in] (decode or prefill) with q8 activations, the matrices of
    ``plan`` (linears_plan) all in one parallel region; each output float32 [T, out_m] (a column slice of one
    array). ``call`` runs a kernel with its work count (numba_backend._call: one thread below the parallel
    threshold)."""
    xq, d, xsum, _ = quantize(x, plan.bits, plan.group_size)
    first_row = plan.first_row
    out = np.empty((x.shape[0], int(first_row[-1])), np.float32)
    call(plan.matvecs, x.shape[0] * int(first_row[-1]) * plan.in_features, plan.addr, first_row, xq, d, xsum, out)
    return [out[:, a:b] for a, b in zip(first_row[:-1], first_row[1:])]


def experts_gate_up(x: np.ndarray, fmt, g_addr: np.ndarray, u_addr: np.ndarray, g_bias: np.ndarray,
                    u_bias: np.ndarray, act: np.ndarray, call) -> np.ndarray:
    """h float32 [k, inter]: gated(gate_e · x + g_bias_e, up_e · x + u_bias_e) for each of the k experts of
    one token x float32 [1, hidden] with q8 activations, in one parallel region (numba_packed.gated: act
    float32 [0] for SwiGLU, [limit, alpha] for the clamped one). fmt: the projections' format (bits,
    group_size, scale, out_features, in_features: numba_experts.FusedFormat or a KernelWeight, the same across
    the k experts); g_addr, u_addr: their int64 [k, 3] address tables; g_bias, u_bias float32 [k, inter] or
    [k, 0]; call: numba_backend._call."""
    xq, xd, xsum, row = quantize(x, fmt.bits, fmt.group_size)
    h = np.empty((g_addr.shape[0], fmt.out_features), np.float32)
    work = 2 * g_addr.shape[0] * fmt.out_features * fmt.in_features
    call(q8_kernels(fmt.bits, fmt.scale, row).experts_gate_up, work, g_addr, u_addr, xq, xd, xsum, g_bias, u_bias,
         act, h)
    return h


def experts_down(h: np.ndarray, fmt, d_addr: np.ndarray, d_bias: np.ndarray, weights: np.ndarray, call) -> np.ndarray:
    """sum_e weights[e] * (down_e · h_e + d_bias_e) float32 [hidden] with q8 activations (each h_e
    quantised), in one parallel region; h float32 [k, inter] from experts_gate_up; fmt and d_addr as there,
    d_bias [k, hidden] or [k, 0]."""
    hq, hd, hsum, row = quantize(h, fmt.bits, fmt.group_size)
    out = np.empty(fmt.out_features, np.float32)
    work = d_addr.shape[0] * fmt.out_features * fmt.in_features
    call(q8_kernels(fmt.bits, fmt.scale, row).experts_down, work, d_addr, hq, hd, hsum, d_bias, weights, out)
    return out
