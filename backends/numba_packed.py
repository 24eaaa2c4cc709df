"""Reading packed weights inside numba kernels, shared by the float kernels (numba_float.py) and the q8
ones (numba_q8.py): one code of a packed row, a scale or bias widened to float32, an E2M1 code's value, a
weight's arrays from an address table, and the experts' gated activation; with the fastmath flags and chunk
sizes both use, and the float kernels' input order (permute_input) and row passes (unit_dots, fold_groups,
dequant_rows_permuted: numba_backend's module docstring).

Two weight formats share every kernel, told apart by the scales' dtype (the *scale kind*, a compile-time
constant of each kernel): MLX affine (``w = scale_g * code + bias_g``, scales and biases float32 or bfloat16
bits in uint16) and MXFP4 (flashmoe.format.mxfp4: ``w = E2M1(code) * 2^(s_b - 127)``, uint8 E8M0 scales, no
biases; the blocks' bytes read as uint32 words of 8 codes, the even element in the low nibble, exactly the
4-bit affine packing).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
    from llvmlite import ir as llvm_ir
    from numba import njit
    from numba.core import types
    from numba.core.cpu_options import ParallelOptions
    from numba.extending import intrinsic, overload
except ImportError:  # numba_backend reports it through unavailable_reason
    numba = None

from flashmoe.backends.numba_cache import cached_njit

FASTMATH = {"contract", "reassoc"}
#: numba's parallel options for kernels whose only parallel loops are their prange loops: with plain
#: ``parallel=True`` numba also turns array expressions outside them (``np.zeros``, ``a[:] = b``) into parallel
#: regions of their own, each a start and a join of the pool (numba_q8's matvecs had two regions a call; the
#: attention block kernel, numba_attention, dozens: a slice copy per head and cache row, the quantiser's zeroing).
#: A ParallelOptions, not a dict: numba pops a dict's keys as it reads them (numba.core.cpu_options), so a
#: dict held for all of a kernel's compiles was empty from its second specialisation on, which then compiled as
#: plain ``parallel=True`` (the attention block's read-only-argument specialisation ran 14 regions a call, 4 ms
#: a layer at 2 threads against 0.6 at one; docs/benchmarks.md, "tenth session").
PRANGE_ONLY = ParallelOptions({"prange": True, "comprehension": False, "reduction": False, "inplace_binop": False,
                               "setitem": False, "numpy": False, "stencil": False, "fusion": False}) if numba else None
# Rows handled per scheduling chunk: amortises the per-chunk scratch allocation and keeps a chunk's
# dequantised tile (ROW_BLOCK x in floats) inside L2.
ROW_BLOCK = 16
# Rows per chunk of the fused expert kernels: each matrix's rows of a chunk are read in one run.
EXPERT_ROW_BLOCK = 64
#: The dtype of a weight's scales as the kernels read them -> its scale kind (the kernels' compile-time format
#: constant): float32 or bfloat16 bits (affine), or E8M0 bytes (MXFP4).
SCALE_KINDS = {np.dtype(np.float32): "f32", np.dtype(np.uint16): "bf16", np.dtype(np.uint8): "e8m0"}


def codes_per_unit(bits: int) -> int:
    """Codes in one packing unit: a word for 2/4/8 bits, a 32-code block of ``bits`` words for 3/5/6."""
    return 32 // bits if 32 % bits == 0 else 32


def permute_input(x: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 ``[T, in]`` -> (xp ``[T, codes_per_unit, in / codes_per_unit]``, xsum ``[T, in/group_size]``).

    ``xp[t, j, u] = x[t, u * codes_per_unit + j]``; xsum are the per-group sums of the bias factoring."""
    T, n = x.shape
    cpu = codes_per_unit(bits)
    xp = np.ascontiguousarray(x.reshape(T, n // cpu, cpu).transpose(0, 2, 1))
    xsum = x.reshape(T, n // group_size, group_size).sum(axis=-1, dtype=np.float32)
    return xp, xsum


if numba is not None:

    @intrinsic
    def u32_as_f32(typingctx, bits):
        """Reinterpret a uint32's bits as a float32 (a bitcast; numba has no scalar view)."""

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_ir.FloatType())

        return types.float32(types.uint32), codegen

    def widen(v):
        """A scale or bias as float32: float32 as it is, uint16 as the bfloat16 it holds (its bits become the
        high half of a float32: exact), uint8 as the E8M0 power of two 2^(s - 127) it holds (MXFP4: s at
        float32's exponent field; s = 0 is the subnormal 2^-127, s = 255 inf, as np.ldexp gives)."""
        raise NotImplementedError("only callable from numba-compiled code")

    @overload(widen, inline="always")
    def _widen_impl(v):
        if isinstance(v, types.Float):
            return lambda v: np.float32(v)
        if v == types.uint16:
            return lambda v: u32_as_f32(np.uint32(v) << np.uint32(16))
        if v == types.uint8:
            return lambda v: u32_as_f32((np.uint32(v) << np.uint32(23)) | (np.uint32(v == 0) << np.uint32(22)))
        return None

    @njit
    def fp4_value(c):
        """The E2M1 value of code c (uint32, 0..15) as float32, by arithmetic (vectorisable, unlike a table).

        E2M1 and float32 encode alike below their exponent fields: the magnitude bits e (2) m (1) placed at
        float32 bits 22..24 are the float32 v · 2^-126 (e = 0 lands on float32's subnormals, 0 and 2^-127, as
        E2M1's own subnormals 0 and 0.5 do), bit 3 moved to bit 31 is the sign, and the product with 2^126 is
        exact. Three integer operations and a multiply, no select. Not inlined by numba, so the multiply keeps
        strict float semantics inside the fastmath kernels (reassociated, 2^126 could meet x first and overflow);
        LLVM still inlines it."""
        bits = ((c & np.uint32(7)) << np.uint32(22)) | ((c & np.uint32(8)) << np.uint32(28))
        return u32_as_f32(bits) * np.float32(2.0**126)

    @njit(inline="always")
    def code_value(c, e2m1):
        """A code's value before its scale: E2M1's (MXFP4) when ``e2m1`` (a compile-time constant), else the
        unsigned integer itself (affine)."""
        if e2m1:
            return fp4_value(c)
        return np.float32(np.int32(c))

    @njit(inline="always")
    def code(wrow, u, j, bits):
        """Code j (0-based) of packing unit u of one packed row, as uint32."""
        mask = np.uint32((1 << bits) - 1)
        if 32 % bits == 0:
            return (wrow[u] >> np.uint32(j * bits)) & mask
        bit = j * bits
        k = u * bits + (bit >> 5)
        s = bit & 31
        c = wrow[k] >> np.uint32(s)
        if s + bits > 32:
            c |= wrow[k + 1] << np.uint32(32 - s)
        return c & mask

    def _pointer_intrinsic(nbtype):
        @intrinsic
        def pointer(typingctx, address):
            """An int64 address -> a typed C pointer, for ``numba.carray``."""
            sig = types.CPointer(nbtype)(types.int64)

            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

            return sig, codegen

        return pointer

    _u32_pointer = _pointer_intrinsic(types.uint32)

    def _expert_view(scale_pointer):
        @njit(inline="always")
        def view(addresses, e, rows, n_words, n_groups):
            """The e-th expert's (words, scales, biases) as arrays over the caller's memory (no copy)."""
            words = numba.carray(_u32_pointer(addresses[e, 0]), (rows, n_words))
            scales = numba.carray(scale_pointer(addresses[e, 1]), (rows, n_groups))
            biases = numba.carray(scale_pointer(addresses[e, 2]), (rows, n_groups))
            return words, scales, biases

        return view

    _u8_pointer = _pointer_intrinsic(types.uint8)

    @njit(inline="always")
    def _e8m0_view(addresses, e, rows, n_words, n_groups):
        """An MXFP4 weight's (words, E8M0 scales, biases): it has no biases, so an empty array per row."""
        words = numba.carray(_u32_pointer(addresses[e, 0]), (rows, n_words))
        scales = numba.carray(_u8_pointer(addresses[e, 1]), (rows, n_groups))
        return words, scales, numba.carray(_u8_pointer(addresses[e, 1]), (rows, 0))

    # Module globals, not closure cells: numba keys its disk cache on the pickled closure cells, and a
    # dispatcher pickles differently in every process, so a kernel capturing one would recompile each run.
    _VIEWS = {"f32": _expert_view(_pointer_intrinsic(types.float32)),
              "bf16": _expert_view(_pointer_intrinsic(types.uint16)), "e8m0": _e8m0_view}

    def expert_view(addresses, e, rows, n_words, n_groups, scale):
        """The e-th (words, scales, biases) of an address table int64 [m, 3] (an expert's projection, or one
        of several matrices of one input) as arrays over the caller's memory, no copy: words uint32
        [rows, n_words], scales and biases [rows, n_groups] of the scale kind ``scale`` (SCALE_KINDS, a
        literal: a kernel's closure constant); MXFP4's biases are empty."""
        raise NotImplementedError("only callable from numba-compiled code")

    @overload(expert_view, inline="always")
    def _expert_view_impl(addresses, e, rows, n_words, n_groups, scale):
        if not isinstance(scale, types.StringLiteral):
            return None  # numba retries with the closure constant as a literal
        view = _VIEWS[scale.literal_value]
        return lambda addresses, e, rows, n_words, n_groups, scale: view(addresses, e, rows, n_words, n_groups)

    @njit(fastmath=FASTMATH, inline="always")
    def gated(gate, up, act):
        """An expert's gated activation of one row: SwiGLU's silu(gate) · up when act is empty, gpt-oss's
        clamped SwiGLU (flashmoe.reference.moe.clamped_swiglu) when act = [limit, alpha] float32:
        (clip(up, ±limit) + 1) · g · σ(alpha · g), g = min(gate, limit). A NaN passes through either."""
        if act.shape[0] == 0:
            return gate / (np.float32(1.0) + np.exp(-gate)) * up
        limit = act[0]
        g = limit if gate > limit else gate
        u = -limit if up < -limit else (limit if up > limit else up)
        return (u + np.float32(1.0)) * g * (np.float32(1.0) / (np.float32(1.0) + np.exp(-act[1] * g)))

    @njit(inline="always")
    def unit_dots(wrow, xp, pw, bits, e2m1):
        """pw[u] = sum_j value(u, j) * xp[j, u]: pass 1 of the factored dot product (value: the code, or its
        E2M1 value for MXFP4, numba_packed.code_value). When pw has two entries per unit (groups of 16 at
        3/5/6 bits: a 32-code unit spans two groups), pw[2u + h] sums half h."""
        cpu = 32 // bits if 32 % bits == 0 else 32
        if pw.shape[0] != xp.shape[1]:
            for u in range(xp.shape[1]):
                for h in range(2):
                    t = np.float32(0.0)
                    for j in range(16 * h, 16 * h + 16):
                        t += code_value(code(wrow, u, j, bits), e2m1) * xp[j, u]
                    pw[2 * u + h] = t
            return
        for u in range(pw.shape[0]):
            t = np.float32(0.0)
            for j in range(cpu):
                t += code_value(code(wrow, u, j, bits), e2m1) * xp[j, u]
            pw[u] = t

    @njit(fastmath=FASTMATH, inline="always")
    def _fold_fixed(pw, srow, brow, xsum, upg, e2m1):
        acc = np.float32(0.0)
        for g in range(srow.shape[0]):
            d = np.float32(0.0)
            for i in range(upg):
                d += pw[g * upg + i]
            if e2m1:  # MXFP4: no bias
                acc += widen(srow[g]) * d
            else:
                acc += widen(srow[g]) * d + widen(brow[g]) * xsum[g]
        return acc

    @cached_njit(fastmath=FASTMATH)
    def fold_groups(pw, srow, brow, xsum, e2m1):
        """Pass 2: sum_g scale_g * (sum of the group's unit dots) + bias_g * xsum_g (no bias term for MXFP4,
        ``e2m1``, whose E8M0 scale bytes ``widen`` reads as their powers of two).

        Units per group (group_size / codes_per_unit) is 1..32; with a literal count the inner sum is
        unrolled, which made this pass 2.5x faster than a loop of run-time length (docs/benchmarks.md)."""
        upg = pw.shape[0] // srow.shape[0]
        if upg == 8:
            return _fold_fixed(pw, srow, brow, xsum, 8, e2m1)
        if upg == 4:
            return _fold_fixed(pw, srow, brow, xsum, 4, e2m1)
        if upg == 16:
            return _fold_fixed(pw, srow, brow, xsum, 16, e2m1)
        if upg == 2:
            return _fold_fixed(pw, srow, brow, xsum, 2, e2m1)
        if upg == 1:
            return _fold_fixed(pw, srow, brow, xsum, 1, e2m1)
        return _fold_fixed(pw, srow, brow, xsum, upg, e2m1)

    @njit(fastmath=FASTMATH, inline="always")
    def dequant_rows_permuted(words, scales, biases, bits, e2m1, r0, r1, tile):
        """tile[r - r0, j, u] = scale * value(r, u, j) + bias: rows r0..r1 in the permuted layout (``e2m1``:
        MXFP4, E2M1 values and no bias)."""
        cpu = tile.shape[1]
        nu = tile.shape[2]
        halves = max(1, scales.shape[1] // nu)  # 2 for groups of 16 at 3/5/6 bits: two groups per unit
        upg = max(1, nu // scales.shape[1])
        # each unit's scale and bias (per half unit), so the loop over units vectorises
        su = np.empty((halves, nu), np.float32)
        bu = np.empty((halves, nu), np.float32)
        for r in range(r0, r1):
            for g in range(scales.shape[1]):
                s = widen(scales[r, g])
                b = np.float32(0.0) if e2m1 else widen(biases[r, g])
                for u in range(g * upg // halves, g * upg // halves + upg):
                    su[g % halves, u] = s
                    bu[g % halves, u] = b
            wrow = words[r]
            for j in range(cpu):
                h = j * halves // cpu
                for u in range(nu):
                    tile[r - r0, j, u] = su[h, u] * code_value(code(wrow, u, j, bits), e2m1) + bu[h, u]


def stacked_biases(experts: list[dict], name: str, rows: int) -> np.ndarray:
    """float32 [k, rows]: each expert's '{name}.bias' (zeros where one has none), or [k, 0] when none has
    one (then the fused expert kernels add nothing)."""
    biases = [e.get(f"{name}.bias") for e in experts]
    if all(b is None for b in biases):
        return np.empty((len(experts), 0), np.float32)
    return np.stack([np.zeros(rows, np.float32) if b is None else np.asarray(b, np.float32) for b in biases])
