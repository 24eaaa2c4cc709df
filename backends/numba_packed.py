"""Reading packed weights inside numba kernels, shared by the float kernels (numba_backend.py) and the q8
ones (numba_q8.py): one code of a packed row, a scale or bias widened to float32, and an expert's arrays
from an address table; with the fastmath flags and chunk sizes both use, and the float kernels' input
order (permute_input).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
    from llvmlite import ir as llvm_ir
    from numba import njit
    from numba.core import types
    from numba.extending import intrinsic, overload
except ImportError:  # numba_backend reports it through unavailable_reason
    numba = None

FASTMATH = {"contract", "reassoc"}
# Rows handled per scheduling chunk: amortises the per-chunk scratch allocation and keeps a chunk's
# dequantised tile (ROW_BLOCK x in floats) inside L2.
ROW_BLOCK = 16
# Rows per chunk of the fused expert kernels: each matrix's rows of a chunk are read in one run.
EXPERT_ROW_BLOCK = 64


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
        high half of a float32: exact)."""
        raise NotImplementedError("only callable from numba-compiled code")

    @overload(widen, inline="always")
    def _widen_impl(v):
        if isinstance(v, types.Float):
            return lambda v: np.float32(v)
        if v == types.uint16:
            return lambda v: u32_as_f32(np.uint32(v) << np.uint32(16))
        return None

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

    # Module globals, not closure cells: numba keys its disk cache on the pickled closure cells, and a
    # dispatcher pickles differently in every process, so a kernel capturing one would recompile each run.
    f32_expert_view = _expert_view(_pointer_intrinsic(types.float32))
    bf16_expert_view = _expert_view(_pointer_intrinsic(types.uint16))
