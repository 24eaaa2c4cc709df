"""q8 activations: the integer numerics of the CPU backends' quantised mat-vec, defined in readable NumPy.

A linear layer with a group-wise affine weight (``w = scale_g * q + bias_g``, flashmoe.format.quant) and
float activations computes, for one output row,

    y = sum_g scale_g * (q_g . x_g) + bias_g * sum(x_g)                      (the bias factoring)

In ``q8`` mode the input vector is first quantised to int8 in blocks of Q8_BLOCK (32) values with one float32
scale ``d_b`` per block (llama.cpp's Q8_0 codes: ``d_b = max|x_b| / 127``, ``xq = roundf(x / d_b)``), so that
the codes meet integers and each block's dot product is exact in int32:

    y = sum_g scale_g * sum_{b in g} d_b * (q_b . xq_b)  +  bias_g * sum_{b in g} d_b * sum(xq_b)

This is exactly ``W · x̂`` with ``x̂ = d_b * xq`` (the dequantised activations): the bias term uses the sums of
the quantised activations, as llama.cpp's Q8_1 blocks carry them. The exact float sums of x would look more
precise but are not: the codes ``q`` are not centred (0..2^bits - 1), so pairing exact sums with rounded dot
products leaves the rounding error on ``scale * q`` instead of on the centred weight; that measured 3x the
error of this form (1.5% against 0.55% of a 512x512 layer's output norm; docs/benchmarks.md). A group holds
``group_size / 32`` blocks (group sizes below 32 use one block per group). The integer sums are exact and the
float sums here are taken in float64 and rounded once, so a backend's q8 kernel may differ from this only by the
order of its float32 sums (conformance).

Every call of such a linear in q8 mode takes q8 activations, whatever its number of tokens T: decode and
prefill alike, each token's vector quantised on its own (a token's output does not depend on the others in
its call). For prefill this is also the faster way on the CPU: the integer row kernels over tiles of tokens
beat the float mat-mat that dequantises each row once for all tokens (docs/benchmarks.md, "Prefill on the
CPU").

MXFP4 weights (flashmoe.format.mxfp4: ``w = E2M1(code) · 2^(s_b − 127)`` per block of 32, one block per
activation block) meet the codes the same way: twice an E2M1 value is an integer in [-12, 12] (FP4_DOUBLED),
so each block's dot with the int8 activations is exact in int32 and

    y = sum_b 2^(s_b − 128) * d_b * (2·E2M1(code_b) . xq_b)                                   (no bias term)

again exactly ``W · x̂``.

How far q8 is from the float path: each element's rounding error is at most ``d_b / 2 = max|x_b| / 254``,
independent and zero-mean, so the output moves by about ``|w| * max|x_b| / (127 * sqrt(12))`` per sqrt(input):
about 0.5% of the output's norm for Gaussian x. tests/test_q8.py holds the q8 reference to the float reference
within ``Q8_VS_FLOAT_TOLERANCE``; docs/benchmarks.md records the demo model's greedy tokens and perplexity.
"""

from __future__ import annotations

import numpy as np

from flashmoe.format.mxfp4 import BLOCK, FP4_VALUES, SCALE_BIAS, Mxfp4Tensor, fp4_codes
from flashmoe.format.quant import QuantizedTensor, unpack
from flashmoe.reference.ops import silu

#: The activation modes of the CPU backends: float32 throughout, or q8 for the quantised mat-vecs.
ACTIVATIONS = ("float", "q8")
#: Values per activation block (one float32 scale each): llama.cpp's QK8_0.
Q8_BLOCK = 32
#: The affine weight widths that take q8 activations in q8 mode, in any group size (16, GGUF's K-quants, and up):
#: each has an integer row kernel (backends/numba_q8.py; docs/benchmarks.md, "q8 activations on the CPU").
Q8_BITS = (2, 3, 4, 5, 6, 8)
#: Bound on |q8 - float| / |float| (Euclidean norms over the output) of a SwiGLU expert on Gaussian inputs
#: and weights, every bit width (tests/test_q8.py; the module docstring gives the expected size per layer).
Q8_VS_FLOAT_TOLERANCE = 1.5e-2
#: 2 · E2M1 value of each MXFP4 code (flashmoe.format.mxfp4.FP4_VALUES): exact integers in [-12, 12].
FP4_DOUBLED = (2 * FP4_VALUES).astype(np.int8)


def q8_block(group_size: int) -> int:
    """The activation block used with weights of `group_size`: Q8_BLOCK, or the group when it is smaller
    (so a block never straddles two groups)."""
    return min(Q8_BLOCK, group_size)


def uses_q8(bits: int, group_size: int) -> bool:
    """Whether q8 mode gives a quantised linear of `bits` and `group_size` q8 activations (linear_q8), for any
    number of tokens; otherwise it computes with float activations, exactly as float mode does."""
    return bits in Q8_BITS and group_size % q8_block(group_size) == 0


def quantize_q8(x: np.ndarray, block: int = Q8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """x float32 (T, n) -> (xq int8 (T, n), d float32 (T, n / block)) with x ≈ d_b * xq in each block.

    d_b = max|x_b| / 127 and xq = roundf(x * (1 / d_b)) (float32, halves away from zero; 0 in an all-zero
    block): the codes of ggml's Q8_0 (``gguf.quants.Q8_0``), whose scale is then rounded to float16; here it stays
    float32.
    Raises ValueError when n is not a multiple of `block`."""
    x = np.asarray(x, np.float32)
    T, n = x.shape
    if n % block:
        raise ValueError(f"q8 activations: {n} inputs is not a multiple of the block of {block}")
    xb = x.reshape(T, n // block, block)  # (T, blocks, block)
    d = np.max(np.abs(xb), axis=-1) / np.float32(127)  # (T, blocks)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)  # 1 / d_b, 0 for an all-zero block
    xq = np.clip(round_half_away(xb * inv[..., None]), -127, 127)
    return xq.astype(np.int8).reshape(T, n), d


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), exactly: |v| = floor|v| + frac, and the half-up step is
    floor(2 * frac) (both exact in float), as ggml's quantisers round."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + np.floor(2 * (a - whole)))


def linear_q8(x: np.ndarray, w: QuantizedTensor | Mxfp4Tensor) -> np.ndarray:
    """y = x·Wᵀ with q8 activations (module docstring). x: float32 (T, in); w: 2-D QuantizedTensor or
    Mxfp4Tensor [out, in]. Returns float32 (T, out)."""
    x = np.asarray(x, np.float32)
    if isinstance(w, Mxfp4Tensor):
        return _linear_q8_mxfp4(x, w)
    T, n = x.shape
    out, gs = w.weight.shape[0], w.group_size
    block = q8_block(gs)
    xq, d = quantize_q8(x, block)
    codes = unpack(np.asarray(w.weight), w.bits).reshape(out, n // block, block).astype(np.int32)
    isum = np.einsum("tbi,obi->tob", xq.reshape(T, n // block, block).astype(np.int32), codes)  # exact int32
    qx = (isum * d[:, None, :].astype(np.float64)).reshape(T, out, n // gs, gs // block).sum(-1)  # (T, out, G)
    block_sums = xq.reshape(T, n // block, block).sum(-1, dtype=np.int32) * d.astype(np.float64)  # (T, blocks)
    xsum = block_sums.reshape(T, n // gs, gs // block).sum(-1)  # (T, G): group sums of x̂
    scales, biases = (np.asarray(a, np.float32).astype(np.float64) for a in (w.scales, w.biases))
    y = (qx * scales).sum(-1) + xsum @ biases.T  # (T, out)
    return y.astype(np.float32)


def _linear_q8_mxfp4(x: np.ndarray, w: Mxfp4Tensor) -> np.ndarray:
    """linear_q8 for MXFP4: y = sum_b 2^(s_b − 128) * d_b * (FP4_DOUBLED[code_b] . xq_b) (module docstring)."""
    T, n = x.shape
    out = w.blocks.shape[0]
    xq, d = quantize_q8(x, BLOCK)
    codes = FP4_DOUBLED[fp4_codes(np.asarray(w.blocks))].reshape(out, n // BLOCK, BLOCK).astype(np.int32)
    isum = np.einsum("tbi,obi->tob", xq.reshape(T, n // BLOCK, BLOCK).astype(np.int32), codes)  # exact int32
    half_scales = np.ldexp(1.0, np.asarray(w.scales, np.int32) - (SCALE_BIAS + 1))  # (out, blocks) float64, exact
    y = (isum * d[:, None, :].astype(np.float64) * half_scales).sum(-1)  # (T, out)
    return y.astype(np.float32)


def swiglu_q8(x: np.ndarray, expert: dict) -> np.ndarray:
    """The SwiGLU expert with q8 activations on every projection: down(SiLU(gate(x)) ⊙ up(x)).
    x: float32 (T, hidden); expert: QuantizedTensor 'gate_proj', 'up_proj' [I, H], 'down_proj' [H, I]."""
    h = silu(linear_q8(x, expert["gate_proj"])) * linear_q8(x, expert["up_proj"])  # (T, I)
    return linear_q8(h, expert["down_proj"])
