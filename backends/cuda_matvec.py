"""The quantised mat-vec kernels of the CUDA backend (backends/cuda_backend.py): qlinear, qgate_up,
qdown_combine, qembed, and their row dot products; conventions as backends/cuda_kernels.py (flat float32
device arrays, rows of LANES threads, the weights' flat buffer viewed as uint32 and uint16).

Quantised weights stay packed on the GPU in the MLX layout (flashmoe/format/quant.py) inside one flat buffer
viewed twice, as uint32 and as uint16: the words at ``w_off`` (uint32 index), the scales and biases at
``s_off`` / ``b_off`` in their own element's units (uint32 index for float32 scales, uint16 index for
float16 / bfloat16). The scale format is decoded in the kernel from the raw bits, so a streamed expert is
used exactly as its bytes arrive from the expert file: one copy of its bytes, no conversion pass.

The mat-vec works in *units* of 32 codes (``bits`` consecutive words: 32 codes for every bit width, also
3, 5 and 6 bits whose codes straddle words). A group holds ``group_size / 32`` whole units (or, for groups of
16, a unit holds two groups), so with the bias factoring of an affine-quantised dot product (docs/design.md,
"Speed")

    y = sum_g scale_g * (q_g . x_g) + bias_g * sum(x_g)

a unit's partial dot needs only integer codes and x. A block is ``(32, ROWS)`` threads: each row of 32
threads (a warp on a GPU) owns one output row. At 2, 4 and 8 bits its lanes take whole words, the warp
reading consecutive words (_qdot_words); at 3, 5 and 6 bits they walk the row's units together, lane l taking
code l of each (the warp reads 32 consecutive inputs and the unit's words in one transaction each); then
the row's lanes are summed. Kernels are built per (bits, group_size, scale format) by factories so those
are compile-time constants and the code loops unroll.
"""

from __future__ import annotations

from functools import lru_cache

from numba import cuda, float32, int32, uint32

from flashmoe.backends.cuda_kernels import LANES, ROWS, _as_f32, _lane_sum, _silu
from flashmoe.backends.cuda_loads import _aligned16, _and_or, _ld, _load4, _scale_bits, _scale_loader, _scale_value

CODES_PER_LANE = 32 // LANES  # codes of a 32-code unit each lane of a row takes in the mat-vec
WORDS_PER_LANE = 8  # words of a row each lane loads per pass of the mat-vec (2, 4, 8 bits): 2048 4-bit codes
# The same for the down projection's walk over the k experts' rows: 4, not 8, keeps qdown_combine at 62
# registers, 8 blocks of 4 warps per SM, so a 4096-row down projection (1024 blocks) runs in one wave (8 words
# per lane: 79 registers, 6 blocks per SM, 1.3 waves; H100, Qwen3.5-397B shapes: 54.9 -> 32.1 us).
EXPERT_WORDS_PER_LANE = 4

@lru_cache(maxsize=None)
def _code_reader(bits: int):
    """Device function (b32, w0, c) -> code c of the 32-code unit whose first word is b32[w0], as uint32."""
    mask = uint32((1 << bits) - 1)
    per_word = 32 // bits if 32 % bits == 0 else 0  # 0: codes straddle words (3, 5 and 6 bits)

    @cuda.jit(device=True)
    def read(b32, w0, c):
        bit = c * bits
        k = w0 + (bit >> 5)
        s = bit & 31
        code = b32[k] >> uint32(s)
        if not per_word and s + bits > 32:
            code |= b32[k + 1] << uint32(32 - s)
        return code & mask

    return read


@lru_cache(maxsize=None)
def _qdot(bits: int, group_size: int, fmt: int):
    """Device function: this lane's part of one quantised row . x (bias factored per group).

    The row's lanes walk its units together, lane l taking code l of each (``LANES`` apart in the
    simulator): a warp then reads 32 consecutive inputs, the unit's ``bits`` words and one scale and bias
    per group, each in one transaction. (Lane l owning whole units l, l + 32, ... instead made every read of
    x touch 32 sectors 128 bytes apart: n_in sector reads per output row.) This walk is for 3, 5 and 6 bits,
    whose codes straddle words; 2, 4 and 8 bits are :func:`_qdot_words`, and groups of 16 (two per unit)
    :func:`_qdot_small_groups`.

    (b32, b16, wrow, srow, brow, n_units, x, xoff, lane): wrow/srow/brow index the row's first word /
    scale / bias; x[xoff : xoff + 32 * n_units] is the input.
    """
    if 32 % bits == 0:
        return _qdot_words(bits, group_size, fmt)
    if group_size < 32:
        return _qdot_small_groups(bits, group_size, fmt)
    load = _scale_loader(fmt)
    read = _code_reader(bits)
    units_per_group = group_size // 32

    @cuda.jit(device=True)
    def qdot(b32, b16, wrow, srow, brow, n_units, x, xoff, lane):
        acc = float32(0.0)
        for g in range(n_units // units_per_group):
            dot = float32(0.0)
            xs = float32(0.0)
            for uu in range(units_per_group):
                u = g * units_per_group + uu
                for i in range(CODES_PER_LANE):  # one on a GPU: the warp reads 32 inputs in a row
                    c = lane + i * LANES
                    xv = x[xoff + u * 32 + c]
                    dot += float32(read(b32, wrow + u * bits, c)) * xv
                    xs += xv
            acc += load(b32, b16, srow + g) * dot + load(b32, b16, brow + g) * xs
        return acc

    return qdot


@lru_cache(maxsize=None)
def _word_dot(bits: int, two: bool, vec: bool):
    """Device function (word_a, word_b, x, c0) -> (sum_j f(code_j of word_a) * x[c0 + j], the same of word_b
    (0 unless two), sum_j x[c0 + j]) over the word's 32 / bits codes (2, 4 and 8 bits), where f(c) = 1 + c / 2^bits:
    the word's codes . x is 2^bits * (first - last), :func:`_unit_dot`.

    f(c) is the float32 whose exponent is 0 and whose mantissa's top `bits` bits are c: one shift and one
    three-input logic op from the word, exact, and each product one fused multiply-add. (2^23 + c, c in the low
    mantissa bits, took a shift, two logic ops and a subtraction of 2^23 per code, and the products were a
    tree of multiplies and adds; the integer pipe was the kernels' busiest, ncu. With 1 + c / 2^bits one
    subtraction per word remains, and its cancellation costs about one bit of the word's float32 sum.)
    x is read 4 floats at a time: with vec, a compile-time constant, as one 16-byte load (a lane's 8 inputs
    of a 4-bit word in two loads instead of eight, a quarter of the L1 wavefronts of a warp whose lanes read
    32 bytes apart); &x[c0] must then be 16-byte aligned."""
    per_word = 32 // bits
    top = 23 - bits  # the code's place in the mantissa
    field = uint32(((1 << bits) - 1) << top)
    one = uint32(0x3F800000)

    @cuda.jit(device=True)
    def code(word, s):
        if top >= s:
            return _as_f32(_and_or(word << uint32(top - s), field, one))
        return _as_f32(_and_or(word >> uint32(s - top), field, one))

    @cuda.jit(device=True)
    def word_dot(word_a, word_b, x, c0):
        dot_a = float32(0.0)
        dot_b = float32(0.0)
        xs = float32(0.0)
        for j4 in range(per_word // 4):
            if vec:
                x0, x1, x2, x3 = _load4(x, c0 + 4 * j4)
            else:
                x0, x1, x2 = _ld(x, c0 + 4 * j4), _ld(x, c0 + 4 * j4 + 1), _ld(x, c0 + 4 * j4 + 2)
                x3 = _ld(x, c0 + 4 * j4 + 3)
            s = 4 * j4 * bits
            dot_a = cuda.fma(code(word_a, s), x0, dot_a)
            dot_a = cuda.fma(code(word_a, s + bits), x1, dot_a)
            dot_a = cuda.fma(code(word_a, s + 2 * bits), x2, dot_a)
            dot_a = cuda.fma(code(word_a, s + 3 * bits), x3, dot_a)
            if two:
                dot_b = cuda.fma(code(word_b, s), x0, dot_b)
                dot_b = cuda.fma(code(word_b, s + bits), x1, dot_b)
                dot_b = cuda.fma(code(word_b, s + 2 * bits), x2, dot_b)
                dot_b = cuda.fma(code(word_b, s + 3 * bits), x3, dot_b)
            xs += (x0 + x1) + (x2 + x3)
        return dot_a, dot_b, xs

    return word_dot


@lru_cache(maxsize=None)
def _unit_dot(bits: int, fmt: int):
    """Device function (first, xs, scale bits, bias bits) -> scale * (codes . x) + bias * xs for one word's sums
    from :func:`_word_dot` (first = sum_j (1 + code_j / 2^bits) * x_j, xs = sum_j x_j, so codes . x =
    2^bits * (first - xs))."""
    value = _scale_value(fmt)
    lift = float32(1 << bits)

    @cuda.jit(device=True)
    def unit_dot(first, xs, s, b):
        return (value(s) * lift) * (first - xs) + value(b) * xs

    return unit_dot


def _group_shift(bits: int, group_size: int) -> int:
    """log2 of the words of one group at 2, 4 and 8 bits: a word's group is its index shifted right by this
    (group sizes are powers of two, flashmoe/format/quant.py; a floor division of a signed index compiled to a
    shift plus a sign correction)."""
    words = group_size * bits // 32
    if words & (words - 1):
        raise ValueError(f"group_size {group_size} is not a power of two")
    return words.bit_length() - 1


@lru_cache(maxsize=None)
def _qdot_words(bits: int, group_size: int, fmt: int):
    """:func:`_qdot` for 2, 4 and 8 bits (whole codes per word): lane l takes the row's words l, l + LANES, ...,
    WORDS_PER_LANE of them per pass; a warp reads 128 consecutive bytes per load, and a row of 2048 4-bit codes
    is one pass. A pass first loads its words, scales and biases, all in flight together, then dots the
    codes with x (one loop that loaded and used a word at a time compiled to one round trip to memory after
    another: sm_90 PTX). (Walking 32-code units, lane l taking code l of each, with four groups' loads in
    flight measured 1.7-2x slower per launch: docs/benchmarks.md, issue 15 runs 3 and 4.) A word's codes lie
    in one group: 32 / bits divides every group size (16 and up)."""
    qdot2 = _qdot2_words(bits, group_size, fmt, False)

    @cuda.jit(device=True)
    def qdot_words(b32, b16, wrow, srow, brow, n_units, x, xoff, lane):
        return qdot2(b32, b16, wrow, srow, brow, 0, 0, 0, n_units, x, xoff, lane)[0]

    return qdot_words


@lru_cache(maxsize=None)
def _qdot2_words(bits: int, group_size: int, fmt: int, two: bool):
    """Device function: this lane's parts of (row_a . x, row_b . x) for two rows of one format and input (an
    expert's gate and up rows), each x load used by both, WORDS_PER_LANE / 2 words of each in flight per lane;
    two=False: row a only ((acc_a, 0)), WORDS_PER_LANE words. (`two` is a compile-time constant and a lane's
    loads for two rows fit in registers: a run-time `two`, or 8 words of each row, kept the arrays in local
    memory, a 192-byte stack frame in ptxas -v: the loop over them was not unrolled.) Whether x can be read
    16 bytes at a time is decided once, not per word: a test per word kept each word's x loads behind a branch,
    one L1 round trip after another (sm_90 SASS)."""
    walk_vec, walk = _qdot2_walk(bits, group_size, fmt, two, True), _qdot2_walk(bits, group_size, fmt, two, False)

    @cuda.jit(device=True)
    def qdot2(b32, b16, wa, sa, ba, wb, sb, bb, n_units, x, xoff, lane):
        if _aligned16(x, xoff):
            return walk_vec(b32, b16, wa, sa, ba, wb, sb, bb, n_units, x, xoff, lane)
        return walk(b32, b16, wa, sa, ba, wb, sb, bb, n_units, x, xoff, lane)

    return qdot2


@lru_cache(maxsize=None)
def _qdot2_walk(bits: int, group_size: int, fmt: int, two: bool, vec: bool):
    """:func:`_qdot2_words` with x's 16-byte loads (vec) or without."""
    sbits, unit_dot = _scale_bits(fmt), _unit_dot(bits, fmt)
    word_dot = _word_dot(bits, two, vec)
    per_word = 32 // bits
    gshift = _group_shift(bits, group_size)
    wpl = WORDS_PER_LANE // 2 if two else WORDS_PER_LANE  # words of each row in flight per lane

    @cuda.jit(device=True)
    def walk(b32, b16, wa, sa, ba, wb, sb, bb, n_units, x, xoff, lane):
        n_words = n_units * bits
        acc_a = float32(0.0)
        acc_b = float32(0.0)
        words_a = cuda.local.array(wpl, uint32)
        scales_a = cuda.local.array(wpl, uint32)  # raw bits: decoded at their use, after all the loads
        biases_a = cuda.local.array(wpl, uint32)
        words_b = cuda.local.array(wpl, uint32)
        scales_b = cuda.local.array(wpl, uint32)
        biases_b = cuda.local.array(wpl, uint32)
        for start in range(0, n_words, LANES * wpl):
            g0 = (start + lane) >> gshift
            for u in range(wpl):  # the pass's loads first, all in flight together
                w = start + u * LANES + lane
                if w < n_words:
                    # word w's group; as g0 + a constant when LANES words span whole groups, so that the
                    # pass's scale and bias addresses are one base and immediate offsets (sm_90 SASS)
                    g = g0 + u * (LANES >> gshift) if LANES % (1 << gshift) == 0 else w >> gshift
                    words_a[u] = _ld(b32, wa + w)
                    scales_a[u] = sbits(b32, b16, sa + g)
                    biases_a[u] = sbits(b32, b16, ba + g)
                    if two:
                        words_b[u] = _ld(b32, wb + w)
                        scales_b[u] = sbits(b32, b16, sb + g)
                        biases_b[u] = sbits(b32, b16, bb + g)
            for u in range(wpl):
                w = start + u * LANES + lane
                if w < n_words:
                    dot_a, dot_b, xs = word_dot(words_a[u], words_b[u], x, xoff + w * per_word)
                    acc_a += unit_dot(dot_a, xs, scales_a[u], biases_a[u])
                    if two:
                        acc_b += unit_dot(dot_b, xs, scales_b[u], biases_b[u])
        return acc_a, acc_b

    return walk


@lru_cache(maxsize=None)
def _qdot2(bits: int, group_size: int, fmt: int):
    """Device function (b32, b16, wa, sa, ba, wb, sb, bb, n_units, x, xoff, lane) -> this lane's parts of
    (row_a . x, row_b . x): :func:`_qdot2_words` at 2, 4 and 8 bits, else two :func:`_qdot` walks."""
    if 32 % bits == 0:
        return _qdot2_words(bits, group_size, fmt, True)
    qdot = _qdot(bits, group_size, fmt)

    @cuda.jit(device=True)
    def qdot2(b32, b16, wa, sa, ba, wb, sb, bb, n_units, x, xoff, lane):
        return (qdot(b32, b16, wa, sa, ba, n_units, x, xoff, lane),
                qdot(b32, b16, wb, sb, bb, n_units, x, xoff, lane))

    return qdot2


@lru_cache(maxsize=None)
def _qdot_experts(bits: int, group_size: int, fmt: int):
    """Device function: this lane's part of sum_e weights[e] * (row o of expert e . x[e * in :]), expert e in
    slot slots[e] (words at w0 + slots[e] * stride32, scales and biases at s0 / b0 + slots[e] * stride_s).
    At 2, 4 and 8 bits the k experts' rows are one walk of words, EXPERT_WORDS_PER_LANE loads in flight per lane
    across experts (a down row of 768 4-bit codes is 96 words: expert by expert, a lane had 3 loads in
    flight and k round trips one after another); else one :func:`_qdot` per expert.

    A pass first reads each of its words' expert slot and weight (slots and weights: small, cached), then
    the words, scale and bias bits, then dots them: no load's value is used before the pass's last load is
    issued. A lane's words are i = lane, lane + LANES, ...; word i is word w of expert e, (e, w) stepped
    along without a division (a division and a slot load before each word's loads, and the router weight
    multiplied into the scale at its load, made a pass of 8 words 8 memory round trips: 75 us against the
    expert-by-expert walk's 65 on an H100, Qwen3.5-397B shapes).

    (b32, b16, w0, s0, b0, stride32, stride_s, slots [k], o, n_units, x [k * in], weights [k], lane)."""
    if 32 % bits:
        qdot = _qdot(bits, group_size, fmt)

        @cuda.jit(device=True)
        def qdot_experts(b32, b16, w0, s0, b0, stride32, stride_s, slots, o, n_units, x, weights, lane):
            words, groups = n_units * bits, n_units * 32 // group_size
            p = float32(0.0)
            for e in range(slots.shape[0]):
                ew, es = slots[e] * stride32 + o * words, slots[e] * stride_s + o * groups
                p += weights[e] * qdot(b32, b16, w0 + ew, s0 + es, b0 + es, n_units, x, e * n_units * 32, lane)
            return p

        return qdot_experts
    walk_vec, walk = _experts_walk(bits, group_size, fmt, True), _experts_walk(bits, group_size, fmt, False)

    @cuda.jit(device=True)
    def qdot_experts(b32, b16, w0, s0, b0, stride32, stride_s, slots, o, n_units, x, weights, lane):
        if _aligned16(x, 0):  # decided once (see _qdot2_words)
            return walk_vec(b32, b16, w0, s0, b0, stride32, stride_s, slots, o, n_units, x, weights, lane)
        return walk(b32, b16, w0, s0, b0, stride32, stride_s, slots, o, n_units, x, weights, lane)

    return qdot_experts


@lru_cache(maxsize=None)
def _experts_walk(bits: int, group_size: int, fmt: int, vec: bool):
    """:func:`_qdot_experts` at 2, 4 and 8 bits, with x's 16-byte loads (vec) or without."""
    sbits, unit_dot = _scale_bits(fmt), _unit_dot(bits, fmt)
    word_dot = _word_dot(bits, False, vec)
    per_word = 32 // bits
    gshift = _group_shift(bits, group_size)

    @cuda.jit(device=True)
    def walk(b32, b16, w0, s0, b0, stride32, stride_s, slots, o, n_units, x, weights, lane):
        n_words, groups = n_units * bits, n_units * 32 // group_size
        k = slots.shape[0]
        acc = float32(0.0)
        at = cuda.local.array(EXPERT_WORDS_PER_LANE, int32)  # the word's index in its expert's row; -1: past the end
        slot = cuda.local.array(EXPERT_WORDS_PER_LANE, int32)
        wt = cuda.local.array(EXPERT_WORDS_PER_LANE, float32)
        words = cuda.local.array(EXPERT_WORDS_PER_LANE, uint32)
        scales = cuda.local.array(EXPERT_WORDS_PER_LANE, uint32)
        biases = cuda.local.array(EXPERT_WORDS_PER_LANE, uint32)
        e, w = 0, lane
        while w >= n_words:
            w -= n_words
            e += 1
        for start in range(0, k * n_words, LANES * EXPERT_WORDS_PER_LANE):
            for u in range(EXPERT_WORDS_PER_LANE):
                at[u] = -1
                if e < k:
                    at[u], slot[u], wt[u] = w, _ld(slots, e), _ld(weights, e)
                w += LANES
                while w >= n_words:
                    w -= n_words
                    e += 1
            for u in range(EXPERT_WORDS_PER_LANE):
                if at[u] >= 0:
                    g = slot[u] * stride_s + o * groups + (at[u] >> gshift)
                    words[u] = _ld(b32, w0 + slot[u] * stride32 + o * n_words + at[u])
                    scales[u] = sbits(b32, b16, s0 + g)
                    biases[u] = sbits(b32, b16, b0 + g)
            for u in range(EXPERT_WORDS_PER_LANE):
                if at[u] >= 0:  # word i = start + u * LANES + lane; its inputs start at i * per_word
                    dot, _, xs = word_dot(words[u], words[u], x, (start + u * LANES + lane) * per_word)
                    acc += wt[u] * unit_dot(dot, xs, scales[u], biases[u])
        return acc

    return walk


@lru_cache(maxsize=None)
def _qdot_small_groups(bits: int, group_size: int, fmt: int):
    """:func:`_qdot` for groups smaller than a unit (16: llama.cpp's K-quant sub-blocks): a unit holds
    ``32 / group_size`` groups, and each lane applies the scale and bias of its own code's group."""
    load = _scale_loader(fmt)
    read = _code_reader(bits)
    groups_per_unit = 32 // group_size

    @cuda.jit(device=True)
    def qdot(b32, b16, wrow, srow, brow, n_units, x, xoff, lane):
        acc = float32(0.0)
        for u in range(n_units):
            for i in range(CODES_PER_LANE):
                c = lane + i * LANES
                xv = x[xoff + u * 32 + c]
                g = u * groups_per_unit + c // group_size
                acc += (load(b32, b16, srow + g) * float32(read(b32, wrow + u * bits, c)) +
                        load(b32, b16, brow + g)) * xv
        return acc

    return qdot


# -- quantised matrices -------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def qlinear(bits: int, group_size: int, fmt: int):
    """out_m[t, o] = W_m[o] . x[t] for up to three matrices m = a, b, c of one input and one format (q, k and
    v in one launch; n_b = n_c = 0 for one matrix). Launch grid (blocks(n_a) + blocks(n_b) + blocks(n_c), T)
    with blocks(n) = ceil(n / ROWS), block (LANES, ROWS): a block's rows belong to one matrix.

    (b32_m, b16_m, w_off_m, s_off_m, b_off_m, n_out_m, out_m [T * n_out_m] for m = a, b, c; n_units,
    x [T * in])."""
    qdot = _qdot(bits, group_size, fmt)

    @cuda.jit
    def kernel(b32a, b16a, wa, sa, ba, na, outa, b32b, b16b, wb, sb, bb, nb, outb, b32c, b16c, wc, sc, bc, nc,
               outc, n_units, x):
        sh = cuda.shared.array((ROWS, LANES), float32)
        lane, r = cuda.threadIdx.x, cuda.threadIdx.y
        t = cuda.blockIdx.y
        blk, in_a, in_b = cuda.blockIdx.x, (na + ROWS - 1) // ROWS, (nb + ROWS - 1) // ROWS
        b32, b16, w_off, s_off, b_off, n_out, out = b32a, b16a, wa, sa, ba, na, outa
        if blk >= in_a + in_b:
            b32, b16, w_off, s_off, b_off, n_out, out, blk = b32c, b16c, wc, sc, bc, nc, outc, blk - in_a - in_b
        elif blk >= in_a:
            b32, b16, w_off, s_off, b_off, n_out, out, blk = b32b, b16b, wb, sb, bb, nb, outb, blk - in_a
        o = blk * ROWS + r
        words, groups = n_units * bits, n_units * 32 // group_size
        p = float32(0.0)
        if o < n_out:
            p = qdot(b32, b16, w_off + o * words, s_off + o * groups, b_off + o * groups, n_units, x,
                     t * n_units * 32, lane)
        total = _lane_sum(p, sh, lane, r)
        if o < n_out and lane == 0:
            out[t * n_out + o] = total

    return kernel


@lru_cache(maxsize=None)
def qgate_up(bits: int, group_size: int, fmt: int):
    """h[e, t, i] = silu(gate_e[i] . x[t]) * (up_e[i] . x[t]) for k experts, expert e in slot slots[e] of
    ``stride32`` words (``stride_s`` scale elements). Grid (ceil(inter / ROWS), k * T), block (LANES, ROWS).

    (b32, b16, gw, gs, gb, uw, us, ub, stride32, stride_s, slots [k], n_inter, n_units, n_tok,
    x [T * hidden], h [k * T * inter])."""
    qdot2 = _qdot2(bits, group_size, fmt)

    @cuda.jit
    def kernel(b32, b16, gw, gs, gb, uw, us, ub, stride32, stride_s, slots, n_inter, n_units, n_tok, x, h):
        sh = cuda.shared.array((ROWS, LANES), float32)
        lane, r = cuda.threadIdx.x, cuda.threadIdx.y
        i = cuda.blockIdx.x * ROWS + r
        e = cuda.blockIdx.y // n_tok
        t = cuda.blockIdx.y % n_tok
        words, groups = n_units * bits, n_units * 32 // group_size
        ew, es = slots[e] * stride32 + i * words, slots[e] * stride_s + i * groups
        a = float32(0.0)
        b = float32(0.0)
        if i < n_inter:
            a, b = qdot2(b32, b16, gw + ew, gs + es, gb + es, uw + ew, us + es, ub + es, n_units, x,
                         t * n_units * 32, lane)
        a = _lane_sum(a, sh, lane, r)
        b = _lane_sum(b, sh, lane, r)
        if i < n_inter and lane == 0:
            h[(e * n_tok + t) * n_inter + i] = _silu(a) * b

    return kernel


@lru_cache(maxsize=None)
def qdown_combine(bits: int, group_size: int, fmt: int):
    """out[o] = sum_e weights[e] * (down_e[o] . h[e]) for one token's k experts. Grid ceil(hidden / ROWS),
    block (LANES, ROWS).

    (b32, b16, dw, ds, db, stride32, stride_s, slots [k], n_out, n_units, h [k * inter], weights [k],
    out [hidden]); expert e in slot slots[e] as in :func:`qgate_up`."""
    qdot_experts = _qdot_experts(bits, group_size, fmt)

    @cuda.jit
    def kernel(b32, b16, dw, ds, db, stride32, stride_s, slots, n_out, n_units, h, weights, out):
        sh = cuda.shared.array((ROWS, LANES), float32)
        lane, r = cuda.threadIdx.x, cuda.threadIdx.y
        o = cuda.blockIdx.x * ROWS + r
        p = float32(0.0)
        if o < n_out:
            p = qdot_experts(b32, b16, dw, ds, db, stride32, stride_s, slots, o, n_units, h, weights, lane)
        total = _lane_sum(p, sh, lane, r)
        if o < n_out and lane == 0:
            out[o] = total

    return kernel


@lru_cache(maxsize=None)
def qembed(bits: int, group_size: int, fmt: int):
    """out[t, i] = dequantised W[ids[t], i], one thread per element. Grid ceil(T * in / FLAT_BLOCK).

    (b32, b16, w_off, s_off, b_off, n_in, ids [T], out [T * in])."""
    load = _scale_loader(fmt)
    mask = uint32((1 << bits) - 1)

    @cuda.jit
    def kernel(b32, b16, w_off, s_off, b_off, n_in, ids, out):
        n = cuda.grid(1)
        if n < out.shape[0]:
            row, i = ids[n // n_in], n % n_in
            bit = i * bits  # the row is one little-endian bit stream
            k = w_off + row * (n_in * bits // 32) + (bit >> 5)
            s = bit & 31
            code = b32[k] >> uint32(s)
            if s + bits > 32:
                code |= b32[k + 1] << uint32(32 - s)
            g = row * (n_in // group_size) + i // group_size
            out[n] = load(b32, b16, s_off + g) * float32(code & mask) + load(b32, b16, b_off + g)

    return kernel
